"""Lowering an exported program to a file: ExecuTorch .pte (XNNPACK delegate or portable kernels), .pt2, .onnx.

Some lowerings produce silently wrong numbers, so `dlrun export` verifies every artifact in its own runtime
(dlrun.deploy.parity). ExecuTorch and the ONNX packages are imported lazily.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlrun.core.errors import ExportFailed
from dlrun.core.files import atomic_write_bytes, first_line
from dlrun.deploy import runtime
from dlrun.deploy.program import export_program

# Graph plumbing that runs no kernel; left out of the delegation counts.
_BOOKKEEPING_OPS = {"getitem", "sym_size"}


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    delegated_nodes: int | None = None  # .pte only: ops inside backend delegates
    portable_nodes: int | None = None  # .pte only: ops left to ExecuTorch's portable kernels
    delegation: dict[str, dict[str, int]] = field(default_factory=dict)  # op -> {"delegated": n, "portable": n}


def to_pte(
    ep: torch.export.ExportedProgram,
    path: str | os.PathLike,
    *,
    backend: str,
    etrecord: str | os.PathLike | None = None,
) -> ExportResult:
    """Lower to an ExecuTorch program (XNNPACK delegate or portable kernels) and write it atomically.

    `etrecord`: also write the ETRecord (the lowering's graphs and debug handles) there, which lets
    `dlrun profile` name each runtime event's operator; it adds ~0.02 s and a file ~2x the .pte's size."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from torch.fx.experimental import _config as fx_config

    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner(configs=_xnnpack_configs())]
    elif backend == "portable":
        partitioner = []
    else:
        raise ExportFailed(f"unknown .pte backend {backend!r}; choose xnnpack or portable")

    bounds = _dynamic_upper_bounds(ep)
    try:
        # Lowering re-runs shape inference, and the fake convolution kernel guards on the batch *hint*
        # (nnpack's batch >= 16 check), which shrinks the planned max batch to 15 in the shared
        # ShapeEnv. Size-oblivious evaluation takes no such guard.
        with fx_config.patch(backed_size_oblivious=True):
            edge = to_edge_transform_and_lower(ep, partitioner=partitioner, generate_etrecord=etrecord is not None)
            info = get_delegation_info(edge.exported_program().graph_module)  # before to_executorch rewrites it
            program = edge.to_executorch()
    except Exception as e:  # noqa: BLE001 - exir raises many types; the first line names the op
        raise ExportFailed(f"cannot lower to .pte (backend={backend}): {first_line(e)}") from e
    lowered_bounds = _dynamic_upper_bounds(edge.exported_program())
    if lowered_bounds != bounds:  # the .pte would reject batches the program was exported for
        raise ExportFailed(f"lowering shrank the dynamic input bounds from {bounds} to {lowered_bounds}")

    # A program can lower yet need a kernel the installed runtime lacks, which only fails at load time.
    plan = program.executorch_program.execution_plan[0]
    needed = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
    missing = sorted(needed - runtime.executorch_runtime().operator_registry.operator_names)
    if missing:
        raise ExportFailed(f"cannot lower to .pte (backend={backend}): no runtime kernel for {', '.join(missing)}")

    path = Path(path)
    atomic_write_bytes(path, program.buffer)
    if etrecord is not None:
        _save_etrecord(program, Path(etrecord))
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


def _save_etrecord(program, path: Path) -> None:
    buffer = io.BytesIO()  # ETRecord.save writes a zip to a path or file object: via memory, to write it atomically
    program.get_etrecord().save(buffer)
    atomic_write_bytes(path, buffer.getvalue())


@functools.cache
def _xnnpack_configs() -> list[type]:
    """XNNPACK's partitioner configs, except that an int8 mean over a dynamic batch runs in fp32 inside XNNPACK.

    XNNPACK runs an int8 mean (global average pooling) with an int32 accumulator workspace of batch x channels,
    sized when the delegate first reshapes; a later, larger batch writes past it. Measured on this stack with
    int8 mobilenet_v2 (1280 channels, inputs 7x5 or 8x8 alike): batch 1 then 64 died in memset inside the
    reduce (SIGSEGV); batch 1 then 32, or 1, 2, 3... in turn, corrupted the heap and aborted later
    (`free(): invalid next size`); 64 first, then 1 and 64, ran. fp32 means accumulate in their output and were
    unaffected, as are fixed batches, which never reshape. So for a dynamic batch the mean is taken without its
    dequantize/quantize neighbours, which XNNPACK then runs as explicit converts around an fp32 mean, in the same
    delegate: no crash at any batch, the same parity, and no slower (mobilenet_v2 x0.25, batch 64: 0.65 ms vs
    0.8 ms; leaving the mean to the portable kernel instead cost 4.5 ms).
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import MeanDimConfig
    from executorch.exir.backend.utils import is_shape_dynamic

    class DynamicBatchFloatMeanConfig(MeanDimConfig):
        def get_node_and_deps(self, node: torch.fx.Node, ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
            if is_shape_dynamic(node):
                return [node]  # the q/dq around it stay untagged: explicit converts, not a fused int8 mean
            return super().get_node_and_deps(node, ep)

    return [DynamicBatchFloatMeanConfig if config is MeanDimConfig else config for config in ALL_PARTITIONER_CONFIGS]


def to_pt2(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> ExportResult:
    """torch.export.save the program atomically."""
    buffer = io.BytesIO()  # saved to a file, the archive's inner folder would take the temporary name
    torch.export.save(ep, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
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
    runtime.require("onnx", "onnxscript", purpose="ONNX export")
    ep = export_program(module, example, dynamic_batch=dynamic_batch, max_batch=max_batch)
    try:
        # From the ExportedProgram, not the module: no second trace, and the quantized GraphModule's
        # stuck training flag raises no warning. Naming the dim gives the input a readable axis.
        onnx_program = torch.onnx.export(
            ep, dynamo=True, verbose=False, dynamic_shapes=({0: "batch"},) if dynamic_batch else None
        )
    except torch.onnx.OnnxExporterError as e:
        # The first line is boilerplate; the summary names the op that has no ONNX translation.
        detail = next((line for line in str(e).splitlines() if "No ONNX function found" in line), first_line(e))
        raise ExportFailed(f"cannot export to ONNX: {detail.split(': ', 1)[-1]}") from e
    path = Path(path)
    atomic_write_bytes(path, onnx_program.model_proto.SerializeToString())  # weights inline (< 2 GB)
    return ExportResult(path=path, size_bytes=path.stat().st_size)


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
