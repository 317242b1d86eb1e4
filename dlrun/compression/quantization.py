"""Quantization on the pinned stack: torchao PT2E with the XNNPACK or x86-Inductor quantizer, and torchao `quantize_`.

PT2E modes (ptq, dynamic, qat) export the model with a dynamic batch dimension, annotate the graph with a
backend quantizer, observe (calibrate or train) and convert to a graph of quantize/dequantize ops around
float ops that the backend fuses into int8 kernels. weight_only swaps the weights of eager nn.Linear
layers for torchao quantized tensors instead. Either result is saved as a `torch.export` program
(dlrun.deploy.program.save_program).

torchao and executorch are imported inside the functions: importing them costs seconds, and importing
X86InductorQuantizer registers Inductor passes globally.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dlrun.config.capabilities import check_supported
from dlrun.core.errors import Unsupported
from dlrun.deploy.program import export_program
from dlrun.training.loop import Callback

WEIGHT_ONLY_DTYPES = ("int8", "int4", "int8_dynamic")
_BN_FROZEN = "dlrun_bn_frozen"  # key in a QAT graph's .meta: BN statistics stay frozen across set_qat_mode


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
            raise Unsupported("backend=x86_inductor quantizes weights per channel only; use per_channel=true")
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        config = get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic)
        quantizer = X86InductorQuantizer().set_global(config)
        for name in exclude:
            quantizer.set_module_name_qconfig(name, None)
        return quantizer
    raise Unsupported(f"no PT2E quantizer for backend {backend!r}; PT2E backends: xnnpack, x86_inductor")


def _check_module_names(model: nn.Module, names: Sequence[str]) -> None:
    known = dict(model.named_modules())
    unknown = [name for name in names if not name or name not in known]
    if unknown:
        examples = ", ".join(list(known)[1:6])
        missing = ", ".join(map(repr, unknown))
        raise Unsupported(f"exclude: {type(model).__name__} has no module {missing} (its modules include: {examples})")


def _pt2e_export(model: nn.Module, example: torch.Tensor, backend: str, *, training: bool) -> torch.fx.GraphModule:
    """The model as an ATen graph with a dynamic batch, in train mode for QAT, to annotate with a quantizer."""
    # X86InductorQuantizer fails on a non-strict export of a model that calls one ReLU module twice
    # (torchvision ResNet): "Input partition has more than one output node". Strict export works.
    program = export_program(model, example, max_batch=1024, strict=backend == "x86_inductor", training=training)
    return program.module()


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
        raise Unsupported("ptq needs at least one calibration batch; the calibration data was empty")
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

    The graph is in train mode. Like every exported graph it refuses `.train()` / `.eval()`: switch it with
    `set_qat_mode` (what a training loop's `set_mode` hook is for).
    """
    check_supported("qat", backend)
    _check_module_names(model, exclude)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = make_quantizer(backend, per_channel=per_channel, is_qat=True, exclude=exclude)
    # Exported in train mode so BatchNorm keeps batch statistics and prepare can fuse conv+BN for QAT.
    prepared = prepare_qat_pt2e(_pt2e_export(model, example, backend, training=True), quantizer)
    set_qat_mode(prepared, True)
    return prepared


def set_qat_mode(prepared: torch.fx.GraphModule, training: bool) -> None:
    """`.train(training)` for a QAT graph: torchao's graph rewrites swap BatchNorm/Dropout between batch and
    running statistics; a BN freeze from `set_qat_phase`, which torchao's train rewrite would undo, is re-applied."""
    from torchao.quantization.pt2e import (
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    if training:
        move_exported_model_to_train(prepared)
        _set_batch_norm_training(prepared, not prepared.meta.get(_BN_FROZEN, False))
    else:
        move_exported_model_to_eval(prepared)
    prepared.training = training


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
    if prepared.training:  # in eval mode BN already uses running statistics; set_qat_mode applies the freeze
        _set_batch_norm_training(prepared, bn_stats)


def convert_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 graph from a QAT-trained graph (which it consumes); BatchNorm is folded into the convs."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    return _convert(prepared)


class QATPhase(Callback):
    """Late in QAT, freeze the quantization ranges and then the BatchNorm statistics (set_qat_phase),
    so the last epochs train against what convert will use."""

    def __init__(self, disable_observers_after: int, freeze_bn_after: int):
        self.disable_observers_after = disable_observers_after
        self.freeze_bn_after = freeze_bn_after

    def on_epoch_start(self, loop, epoch: int) -> None:
        set_qat_phase(
            loop.model, observers=epoch <= self.disable_observers_after, bn_stats=epoch <= self.freeze_bn_after
        )


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
        raise Unsupported(f"unknown weight_only dtype {dtype!r}; dtypes: {', '.join(WEIGHT_ONLY_DTYPES)}")
    if dtype == "int4" and group_size < 1:
        raise Unsupported(f"int4 group_size must be a positive number of input features, got {group_size}")
    _check_module_names(model, exclude)

    # Exact type: a Linear subclass (e.g. MultiheadAttention.out_proj) may not use its weight through forward.
    def selected(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Linear and not any(name == ex or name.startswith(ex + ".") for ex in exclude)

    if dtype == "int4":
        for name, module in model.named_modules():
            if selected(module, name) and module.in_features % group_size:
                raise Unsupported(
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
