"""Export models to deployable artifacts and check the artifacts against the source model.

Formats: .pte (ExecuTorch; XNNPACK-delegated or portable kernels), .pt2 (torch.export archive), .onnx.
Some lowerings produce silently wrong numbers, so every export should be followed by `check_parity`.
ExecuTorch and the ONNX packages are imported lazily: importing this module costs only torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlrun.capabilities import (  # noqa: F401  (re-exported)
    EXPORT_CAPABILITIES, FORMATS, SOURCE_KINDS, check_export_supported, quantized_source_kind,
)


_ONNX_INSTALL_HINT = "pip install 'dlrun[onnx]'"
# Printed by ExecuTorch's threadpool start-up on x86; harmless.
_RUNTIME_NOISE = ("cpuinfo_utils.cpp",)
# Graph plumbing that runs no kernel; left out of the delegation counts.
_BOOKKEEPING_OPS = {"getitem", "sym_size"}


def export_program(
    module: torch.nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True, max_batch: int = 64
) -> torch.export.ExportedProgram:
    """torch.export the module with dim 0 dynamic in [1, max_batch] (or fixed at the example's batch),
    without the source locations that would put this machine's paths into every artifact."""
    return strip_source_locations(_export(module, example, dynamic_batch=dynamic_batch, max_batch=max_batch))


def strip_source_locations(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop each node's Python stack trace: it embeds this machine's absolute source paths."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    return program


def _export(module: torch.nn.Module, example: torch.Tensor, *, dynamic_batch: bool, max_batch: int) -> torch.export.ExportedProgram:
    """torch.export with dim 0 dynamic in [1, max_batch] (or fixed at the example's batch).

    Takes an eager module (put in eval mode) or an exported/PT2E-converted GraphModule, such as
    `torch.export.load(path).module()`, which has no train/eval switch and is exported as is.
    """
    from torch._dynamo.exc import UserError

    if not isinstance(module, torch.fx.GraphModule):
        module.eval()  # export captures BatchNorm/Dropout in their current mode
    # The program keeps its example (torch.export.save writes it), and a view would bring along its
    # whole base tensor, e.g. the test set: hence the clones.
    if not dynamic_batch:
        return torch.export.export(module, (example.clone(),))
    if max_batch < 2:
        raise ValueError(f"max_batch must be at least 2 for a dynamic batch, got {max_batch}")
    # An example of batch 1 would specialize the batch dim to 1 (export treats sizes 0/1 as static).
    if example.shape[0] < 2:
        example = example[:1].expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        return torch.export.export(module, (example[:max_batch].clone(),), dynamic_shapes=({0: batch},))
    except UserError as e:
        if "Constraints violated" not in str(e):
            raise
        # e.g. a PT2E program saved with a smaller max batch keeps that bound as a guard
        guard = next((line.strip(" -") for line in str(e).splitlines() if "guard" in line), _first_line(e))
        raise ValueError(f"cannot export with batch in [1, {max_batch}]: {guard}") from e


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    delegated_nodes: int | None = None  # .pte only: ops inside backend delegates
    portable_nodes: int | None = None  # .pte only: ops left to ExecuTorch's portable kernels
    delegation: dict[str, dict[str, int]] = field(default_factory=dict)  # op -> {"delegated": n, "portable": n}


def to_pte(ep: torch.export.ExportedProgram, path: str | os.PathLike, *, backend: str) -> ExportResult:
    """Lower to an ExecuTorch program (XNNPACK delegate or portable kernels) and write it atomically."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from torch.fx.experimental import _config as fx_config

    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]
    elif backend == "portable":
        partitioner = []
    else:
        raise ValueError(f"unknown .pte backend {backend!r}; choose xnnpack or portable")

    bounds = _dynamic_upper_bounds(ep)
    try:
        # Lowering re-runs shape inference, and the fake convolution kernel guards on the batch *hint*
        # (nnpack's batch >= 16 check), which shrinks the planned max batch to 15 in the shared
        # ShapeEnv. Size-oblivious evaluation takes no such guard.
        with fx_config.patch(backed_size_oblivious=True):
            edge = to_edge_transform_and_lower(ep, partitioner=partitioner)
            info = get_delegation_info(edge.exported_program().graph_module)  # before to_executorch rewrites it
            program = edge.to_executorch()
    except Exception as e:  # noqa: BLE001 - exir raises many types; the first line names the op
        raise ValueError(f"cannot lower to .pte (backend={backend}): {_first_line(e)}") from e
    lowered_bounds = _dynamic_upper_bounds(edge.exported_program())
    if lowered_bounds != bounds:  # the .pte would reject batches the program was exported for
        raise ValueError(f"lowering shrank the dynamic input bounds from {bounds} to {lowered_bounds}")

    # A program can lower yet need a kernel the installed runtime lacks, which only fails at load time.
    plan = program.executorch_program.execution_plan[0]
    needed = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
    missing = sorted(needed - _executorch_runtime().operator_registry.operator_names)
    if missing:
        raise ValueError(f"cannot lower to .pte (backend={backend}): no runtime kernel for {', '.join(missing)}")

    path = Path(path)
    _write_atomically(path, program.buffer)
    ops = {
        op: {"delegated": b.delegated, "portable": b.non_delegated}
        for op, b in sorted(info.delegation_by_operator.items())
        if op not in _BOOKKEEPING_OPS
    }
    return ExportResult(
        path=path,
        size_bytes=path.stat().st_size,
        delegated_nodes=sum(c["delegated"] for c in ops.values()),
        portable_nodes=sum(c["portable"] for c in ops.values()),
        delegation=ops,
    )


def to_pt2(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> ExportResult:
    """torch.export.save the program atomically."""
    buffer = io.BytesIO()  # saved to a file, the archive's inner folder would take the temporary name
    torch.export.save(ep, buffer)
    path = Path(path)
    _write_atomically(path, buffer.getvalue())
    return ExportResult(path=path, size_bytes=path.stat().st_size)


def to_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    max_batch: int = 64,
) -> ExportResult:
    """Export with the torch.onnx dynamo exporter to one self-contained .onnx file, atomically."""
    _require("onnx", "onnxscript", purpose="ONNX export")
    ep = export_program(module, example, dynamic_batch=dynamic_batch, max_batch=max_batch)
    try:
        # From the ExportedProgram, not the module: no second trace, and the quantized GraphModule's
        # stuck training flag raises no warning. Naming the dim gives the input a readable axis.
        onnx_program = torch.onnx.export(
            ep, dynamo=True, verbose=False, dynamic_shapes=({0: "batch"},) if dynamic_batch else None
        )
    except torch.onnx.OnnxExporterError as e:
        # The first line is boilerplate; the summary names the op that has no ONNX translation.
        detail = next((line for line in str(e).splitlines() if "No ONNX function found" in line), _first_line(e))
        raise ValueError(f"cannot export to ONNX: {detail.split(': ', 1)[-1]}") from e
    path = Path(path)
    _write_atomically(path, onnx_program.model_proto.SerializeToString())  # weights inline (< 2 GB)
    return ExportResult(path=path, size_bytes=path.stat().st_size)


def load_runner(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an artifact in its own runtime, chosen by suffix; the runner maps a batch to its outputs."""
    path = Path(path)
    if path.suffix == ".pte":
        return _pte_runner(path)
    if path.suffix == ".onnx":
        return _onnx_runner(path)
    if path.suffix == ".pt2":
        return _pt2_runner(path)
    raise ValueError(f"cannot run {path.name}: expected a .pte, .pt2 or .onnx file")


def _pte_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    method = _executorch_runtime().load_program(path).load_method("forward")
    max_batch = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > max_batch:  # the runtime would only log an error code
            raise ValueError(f"batch {x.shape[0]} exceeds the {max_batch} that {path.name} was exported for")
        return method.execute([x.contiguous()])[0]

    return run


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    _require("onnxruntime", purpose="running .onnx files")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy()})[0])

    return run


def _pt2_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the ops int8 PT2E programs use

    from dlrun.quantization import quiet_export_log

    with quiet_export_log():
        module = torch.export.load(path).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


@dataclass
class Parity:
    samples: int
    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max |reference output|: comparable across models
    top1_agreement: float | None  # classification only
    accuracy: float | None  # of the artifact over all samples, when targets are given
    batch_sizes: list[int]


_MAX_SAMPLES_AT_BATCH_1 = 64  # one call per sample is slow; a few samples prove batch 1 works


def check_parity(
    reference: Callable[[torch.Tensor], torch.Tensor],
    runner: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    classification: bool = True,
) -> Parity:
    """Run the inputs through reference and artifact at each batch size and compare the outputs.

    Batch 1 covers the first few inputs, other sizes all of them. Differences and agreement pool
    every compared row, so an artifact that is wrong at one batch size only still shows up; check
    the difference too, as a wrong artifact can keep most argmaxes (XNNPACK weight-only did).
    """
    refs, outs = [], []
    with torch.no_grad():
        for size in batch_sizes:
            n = min(len(inputs), _MAX_SAMPLES_AT_BATCH_1) if size == 1 else len(inputs)
            batches = [inputs[start : min(start + size, n)] for start in range(0, n, size)]
            refs.append(torch.cat([reference(b).float() for b in batches]))
            outs.append(torch.cat([runner(b).float() for b in batches]))
    ref, out = torch.cat(refs), torch.cat(outs)
    max_abs_diff = (ref - out).abs().max().item()
    accuracy = None
    if classification and targets is not None:
        widest = max(outs, key=len)  # the pass that covers the most samples
        accuracy = (widest.argmax(1) == targets[: len(widest)]).float().mean().item()
    return Parity(
        samples=max(len(o) for o in outs),  # batch 1 alone covers only the first _MAX_SAMPLES_AT_BATCH_1
        max_abs_diff=max_abs_diff,
        relative_diff=max_abs_diff / max(ref.abs().max().item(), torch.finfo(torch.float32).tiny),
        top1_agreement=(out.argmax(1) == ref.argmax(1)).float().mean().item() if classification else None,
        accuracy=accuracy,
        batch_sizes=list(batch_sizes),
    )


def _dynamic_upper_bounds(ep: torch.export.ExportedProgram) -> list[int]:
    """Planned max of each symbolic dim of the user inputs (what ExecuTorch allocates memory for)."""
    from executorch.exir.sym_util import eval_upper_bound

    user_inputs = set(ep.graph_signature.user_inputs)
    return [
        eval_upper_bound(size)
        for node in ep.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs
        for size in node.meta["val"].shape
        if isinstance(size, torch.SymInt)
    ]


@functools.cache
def _executorch_runtime():
    """The ExecuTorch runtime, its threadpool started once with the cpuinfo noise filtered out."""
    import executorch.extension.pybindings.portable_lib as portable_lib
    from executorch.runtime import Runtime

    with _filtered_stderr(_RUNTIME_NOISE):
        portable_lib._threadpool_get_thread_count()  # starts the threadpool, which prints the noise
    return Runtime.get()


@contextlib.contextmanager
def _filtered_stderr(noise: Sequence[str]) -> Iterator[None]:
    """Capture fd 2 (native code writes there directly) and pass on the lines that are not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in noise):
                    sys.stderr.write(line)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: path never holds a partial artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _require(*modules: str, purpose: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)}: {_ONNX_INSTALL_HINT}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
