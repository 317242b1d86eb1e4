"""Quantization on the pinned stack: torchao PT2E with the XNNPACK or x86-Inductor quantizer, and torchao `quantize_`.

PT2E modes (ptq, dynamic, qat) export the model with a dynamic batch dimension, annotate the graph with a
backend quantizer, observe (calibrate or train) and convert to a graph of quantize/dequantize ops around
float ops that the backend fuses into int8 kernels. weight_only swaps the weights of eager nn.Linear
layers for torchao quantized tensors instead. Either result is saved as a `torch.export` program (`save_program`).

torchao and executorch are imported inside the functions: importing them costs seconds, and importing
X86InductorQuantizer registers Inductor passes globally.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import traceback
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from dlrun.capabilities import (  # noqa: F401  (re-exported)
    BACKENDS,
    CAPABILITIES,
    MODES,
    capability_rows,
    check_supported,
)

WEIGHT_ONLY_DTYPES = ("int8", "int4", "int8_dynamic")
_BN_FROZEN = "dlrun_bn_frozen"  # key in a QAT graph's .meta: keep BN statistics frozen across .train()


# --- export -------------------------------------------------------------------------------------------


def export_for_quantization(
    model: nn.Module, example: torch.Tensor, *, strict: bool = False, max_batch: int = 1024
) -> torch.fx.GraphModule:
    """The model as an ATen graph whose batch dimension stays dynamic (1..max_batch), in the model's current mode."""
    return _export_program(model, example, strict=strict, max_batch=max_batch).module()


def _export_program(
    model: nn.Module, example: torch.Tensor, *, strict: bool, max_batch: int
) -> torch.export.ExportedProgram:
    # A copy: torch.export stores the example in the program, and a view would drag its whole dataset along.
    # An example of batch 1 makes export specialize the batch dimension to 1.
    example = torch.cat([example, example]) if example.shape[0] < 2 else example.clone()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=strict)
    except Exception as error:
        raise ValueError(_export_failure(model, error)) from error


def _export_failure(model: nn.Module, error: Exception) -> str:
    """One line: why export failed and, when it can be found, in which submodule's forward."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "specialized it to be a constant" in text:
        reason = "the model fixes the batch size (e.g. a reshape to a constant batch); it must accept any batch"
    elif type(error).__name__ == "GuardOnDataDependentSymNode":
        reason = "data-dependent control flow (a Python branch, int() or .item() on a tensor value)"
    else:
        reason = lines[0] if lines else type(error).__name__
    where = _failing_module(model, error)
    return f"cannot export {type(model).__name__} with a dynamic batch: {reason}" + (f" ({where})" if where else "")


def _failing_module(model: nn.Module, error: Exception) -> str:
    """Match the innermost user-code location of the error against the submodules' forward methods.

    Non-strict export runs the real Python code, so the traceback has the location; strict export
    (TorchDynamo) only quotes it in the message.
    """
    locations = [(frame.filename, frame.lineno) for frame in traceback.extract_tb(error.__traceback__)]
    locations += [(file, int(line)) for file, line in re.findall(r'File "([^"]+)", line (\d+)', str(error))]
    forwards: dict[tuple[str, int], list[str]] = {}
    for name, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is None:
            continue
        for _, _, line in code.co_lines():
            names = forwards.setdefault((code.co_filename, line), [])
            if name not in names:
                names.append(name)
    for file, line in reversed(locations):
        if (file, line) in forwards:
            names = forwards[(file, line)]
            module = model.get_submodule(names[0])
            shown = ", ".join(repr(n or "<root>") for n in names[:3]) + (", ..." if len(names) > 3 else "")
            return f"in {type(module).__name__}.forward, {os.path.basename(file)}:{line}, module {shown}"
    return ""


@contextlib.contextmanager
def _mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """Export sees BatchNorm/Dropout in the requested mode; the caller's model gets its own mode back."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


# --- PT2E quantizers ------------------------------------------------------------------------------------


def make_quantizer(
    backend: str,
    *,
    per_channel: bool = True,
    is_qat: bool = False,
    is_dynamic: bool = False,
    exclude: Sequence[str] = (),
):
    """A configured PT2E quantizer; modules named in `exclude` (and everything inside them) stay float."""
    if backend == "xnnpack":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantizer import get_module_name_filter

        config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat, is_dynamic=is_dynamic)
        quantizer = XNNPACKQuantizer().set_global(config)
        if exclude:
            # XNNPACKQuantizer.set_module_name rejects a None config; its node filter is the way to skip modules.
            excluded = [get_module_name_filter(name) for name in exclude]
            quantizer.set_filter_function(lambda node: not any(inside(node) for inside in excluded))
        return quantizer
    if backend == "x86_inductor":
        if not per_channel:
            raise ValueError("backend=x86_inductor quantizes weights per channel only; use per_channel=true")
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        config = get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic)
        quantizer = X86InductorQuantizer().set_global(config)
        for name in exclude:
            quantizer.set_module_name_qconfig(name, None)
        return quantizer
    raise ValueError(f"no PT2E quantizer for backend {backend!r}; PT2E backends: xnnpack, x86_inductor")


def _check_module_names(model: nn.Module, names: Sequence[str]) -> None:
    known = dict(model.named_modules())
    unknown = [name for name in names if not name or name not in known]
    if unknown:
        examples = ", ".join(list(known)[1:6])
        missing = ", ".join(map(repr, unknown))
        raise ValueError(f"exclude: {type(model).__name__} has no module {missing} (its modules include: {examples})")


def _pt2e_export(model: nn.Module, example: torch.Tensor, backend: str, *, training: bool) -> torch.fx.GraphModule:
    # X86InductorQuantizer fails on a non-strict export of a model that calls one ReLU module twice
    # (torchvision ResNet): "Input partition has more than one output node". Strict export works.
    with _mode(model, training=training):
        return export_for_quantization(model, example, strict=backend == "x86_inductor")


def _convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return converted


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """convert_pt2e folds weights into new int8 constants but keeps the float originals (and BN stats) as
    attributes; torch.export would save them too, making the int8 program larger than the fp32 one."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    called = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    tensors = [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]
    for name in tensors:
        owner, _, attribute = name.rpartition(".")
        if name in used or any(owner == module or owner.startswith(module + ".") for module in called):
            continue
        delattr(graph_module.get_submodule(owner), attribute)


def quantize_ptq(
    model: nn.Module,
    example: torch.Tensor,
    calib_batches: Iterable[torch.Tensor],
    *,
    backend: str,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Static post-training quantization: observe activation ranges on `calib_batches`, then convert."""
    check_supported("ptq", backend)
    _check_module_names(model, exclude)
    batches = iter(calib_batches)
    first = next(batches, None)
    if first is None:  # checked before the export: without calibration every activation scale is undefined
        raise ValueError("ptq needs at least one calibration batch; the calibration data was empty")
    quantizer = make_quantizer(backend, per_channel=per_channel, exclude=exclude)
    return _prepare_observe_convert(model, example, backend, quantizer, (first, *batches))


def quantize_dynamic(
    model: nn.Module,
    example: torch.Tensor,
    *,
    backend: str,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Dynamic quantization: int8 weights; activation scales are computed per call, so no calibration data."""
    check_supported("dynamic", backend)
    _check_module_names(model, exclude)
    quantizer = make_quantizer(backend, per_channel=per_channel, is_dynamic=True, exclude=exclude)
    # The weight observers only record ranges when run; without one pass convert produces empty
    # per-channel scales and XNNPACK lowering fails with "Invalid size of per channel quantization scales".
    return _prepare_observe_convert(model, example, backend, quantizer, [example])


def _prepare_observe_convert(model, example, backend: str, quantizer, batches) -> torch.fx.GraphModule:
    """PT2E post-training flow: export, insert observers, run `batches` through them, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    prepared = prepare_pt2e(_pt2e_export(model, example, backend, training=False), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return _convert(prepared)


# --- QAT ------------------------------------------------------------------------------------------------


def prepare_qat(
    model: nn.Module,
    example: torch.Tensor,
    *,
    backend: str,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """A fake-quantized graph to fine-tune with any optimizer; finish with `convert_qat`.

    The graph is in train mode. Unlike a plain exported graph it accepts `.train()` / `.eval()` (which
    swap BatchNorm/Dropout between batch and running statistics), so generic training loops work.
    """
    check_supported("qat", backend)
    _check_module_names(model, exclude)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = make_quantizer(backend, per_channel=per_channel, is_qat=True, exclude=exclude)
    # Exported in train mode so BatchNorm keeps batch statistics and prepare can fuse conv+BN for QAT.
    prepared = prepare_qat_pt2e(_pt2e_export(model, example, backend, training=True), quantizer)
    _route_train_eval(prepared)
    prepared.train()
    return prepared


def _route_train_eval(prepared: torch.fx.GraphModule) -> None:
    """Exported graphs raise on .train()/.eval(); send them to torchao's graph rewrites instead, and
    re-apply a BN freeze from `set_qat_phase`, which torchao's train rewrite would undo."""
    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        if mode:
            move_exported_model_to_train(self)
            _set_batch_norm_training(self, not self.meta.get(_BN_FROZEN, False))
        else:
            move_exported_model_to_eval(self)
        self.training = mode
        return self

    def to_eval(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return self.train(False)

    prepared.train = types.MethodType(train, prepared)
    prepared.eval = types.MethodType(to_eval, prepared)


def _set_batch_norm_training(graph_module: torch.fx.GraphModule, training: bool) -> None:
    """Set the `training` argument of every BatchNorm in the graph: False normalizes with the running
    statistics and stops updating them (the PT2E QAT recipe for freezing BN)."""
    for node in graph_module.graph.nodes:
        if node.target == torch.ops.aten.batch_norm.default:  # (input, weight, bias, mean, var, training, ...)
            node.args = (*node.args[:5], training, *node.args[6:])
    graph_module.recompile()


def set_qat_phase(prepared: torch.fx.GraphModule, *, observers: bool, bn_stats: bool) -> None:
    """Late in QAT, freeze the quantization ranges (observers=False) and the BatchNorm statistics
    (bn_stats=False) so the last epochs train against the ranges and statistics that convert will use."""
    from torchao.quantization.pt2e import disable_observer, enable_observer

    prepared.apply(enable_observer if observers else disable_observer)
    prepared.meta[_BN_FROZEN] = not bn_stats
    if prepared.training:  # in eval mode BN already uses running statistics; .train() applies the freeze
        _set_batch_norm_training(prepared, bn_stats)


def convert_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 graph from a QAT-trained graph (which it consumes); BatchNorm is folded into the convs."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    return _convert(prepared)


# --- weight-only (torchao quantize_) --------------------------------------------------------------------


def quantize_weight_only(
    model: nn.Module, *, dtype: str = "int8", group_size: int = 32, exclude: Sequence[str] = ()
) -> nn.Module:
    """A quantized copy of the model in eval mode, its nn.Linear weights replaced by torchao tensors.

    int8: per-channel int8 weights. int4: int4 weights in groups of `group_size` input features.
    int8_dynamic: int8 weights and per-token int8 activations. Layers named in `exclude` (and everything
    inside them) stay float. Convolutions stay float: on torchao 0.18 Int8Tensor has no convolution, and
    IntxWeightOnlyConfig builds mis-shaped 4-D scales and fails on convs with one input channel.
    """
    if dtype not in WEIGHT_ONLY_DTYPES:
        raise ValueError(f"unknown weight_only dtype {dtype!r}; dtypes: {', '.join(WEIGHT_ONLY_DTYPES)}")
    if dtype == "int4" and group_size < 1:
        raise ValueError(f"int4 group_size must be a positive number of input features, got {group_size}")
    _check_module_names(model, exclude)

    # Exact type: a Linear subclass (e.g. MultiheadAttention.out_proj) may not use its weight through forward.
    def selected(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Linear and not any(name == ex or name.startswith(ex + ".") for ex in exclude)

    if dtype == "int4":
        for name, module in model.named_modules():
            if selected(module, name) and module.in_features % group_size:
                raise ValueError(
                    f"int4 group_size={group_size} does not divide in_features={module.in_features} of layer "
                    f"{name!r}; pick a group_size that does or add {name!r} to exclude"
                )
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model).eval()
    quantize_(quantized, _weight_only_config(dtype, group_size), filter_fn=selected)
    return quantized


def _weight_only_config(dtype: str, group_size: int):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    if dtype == "int8":
        return Int8WeightOnlyConfig()
    if dtype == "int4":
        # Int4WeightOnlyConfig needs a CUDA kernel package; the Intx int4 tensor runs on CPU. It keeps each
        # int4 value in an int8, so it is finer-grained than int8 but not smaller on disk.
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return Int8DynamicActivationInt8WeightConfig()


# --- programs on disk -------------------------------------------------------------------------------------


def save_program(
    gm_or_module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, max_batch: int = 1024
) -> None:
    """Save a quantized graph (or a weight-only module) as a torch.export program with a dynamic batch.

    Written atomically (temp file + rename), so `path` never holds half a program.
    """
    from dlrun.exporting import strip_source_locations
    from dlrun.core.files import atomic_write_bytes

    program = strip_source_locations(_export_program(gm_or_module, example, strict=False, max_batch=max_batch))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_program(path: str | os.PathLike) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no saved program at {path}")
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops the program calls

    try:
        with quiet_export_log():
            return torch.export.load(path).module()
    except Exception as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"cannot load program {path}: {reason}") from error


@contextlib.contextmanager
def quiet_export_log() -> Iterator[None]:
    """On a corrupt file torch.export.load logs the traceback through its own stderr handler before raising;
    callers turn the error into one line, so the log would only bury it."""
    logger = logging.getLogger("torch.export")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def serialized_size(path_or_module: str | os.PathLike | nn.Module) -> int:
    """Bytes on disk of a saved file, or of a module's state_dict as torch.save writes it."""
    if isinstance(path_or_module, nn.Module):
        buffer = io.BytesIO()
        torch.save(path_or_module.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    return os.path.getsize(path_or_module)
