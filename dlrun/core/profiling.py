"""The four numbers practitioners ask of a model: parameters, FLOPs, size, and speed."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on a batch of one (torch.utils.flop_counter: matmuls and convs)."""
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), _dynamo_not_imported_by(getattr(flop_counter, "_FlopCounterMode", None)), counter:
        model(example[:1])
    model.train(was_training)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _dynamo_not_imported_by(mode: type | None) -> Iterator[None]:
    """Torch wraps every TorchDispatchMode's __torch_dispatch__ (here FlopCounterMode's inner mode's) in
    torch._disable_dynamo, whose first call imports torch._dynamo (~1.5 s) only to exclude the function from a
    compile. While torch._dynamo is not imported nothing can be compiling, so the exclusion is moot: for the
    duration, the wrapper's per-function cache (the private `__dynamo_disable` attribute of the wrapped function)
    holds the function itself. Another torch, or dynamo already imported: nothing changes."""
    fn = getattr(vars(mode).get("__torch_dispatch__") if mode is not None else None, "__wrapped__", None)
    if fn is None or "torch._dynamo" in sys.modules or hasattr(fn, "__dynamo_disable"):
        yield
        return
    setattr(fn, "__dynamo_disable", fn)
    try:
        yield
    finally:
        if getattr(fn, "__dynamo_disable", None) is fn:
            delattr(fn, "__dynamo_disable")


def time_calls(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 50) -> list[float]:
    """Wall-clock milliseconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@torch.no_grad()
def latency_ms(
    predict: Callable[[torch.Tensor], object], example: torch.Tensor, *, repeats: int = 50, warmup: int | None = None
) -> dict[str, float]:
    """Batch-1 latency: median and 90th percentile in ms."""
    x = example[:1].contiguous()
    warmup = max(3, repeats // 10) if warmup is None else warmup
    times = sorted(time_calls(lambda: predict(x), warmup=warmup, repeats=repeats))
    return {"p50": statistics.median(times), "p90": times[min(len(times) - 1, int(0.9 * len(times)))]}


@torch.no_grad()
def throughput(
    predict: Callable[[torch.Tensor], object], example: torch.Tensor, *, batch: int = 64, repeats: int = 10
) -> float:
    """Samples per second at `batch` (the example is tiled up to the batch size)."""
    reps = -(-batch // len(example))
    x = example.repeat(reps, *[1] * (example.dim() - 1))[:batch].contiguous()
    times = time_calls(lambda: predict(x), warmup=2, repeats=repeats)
    return batch / (statistics.median(times) / 1e3)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a model holds: parameters, buffers and graph constants (int8 weights of a
    quantized program live in constants). Unlike a file size, this excludes serialized graph metadata,
    which dominates for tiny models."""
    seen: dict[int, int] = {}
    for module in model.modules():
        tensors = [
            *module._parameters.values(),
            *module._buffers.values(),
            *(v for v in vars(module).values() if isinstance(v, torch.Tensor)),
        ]
        for tensor in tensors:
            if tensor is not None and not getattr(tensor, "is_meta", False):
                seen[id(tensor)] = _nbytes(tensor)
    return sum(seen.values())


def _nbytes(tensor: torch.Tensor) -> int:
    """Storage bytes, also for torchao's quantized tensor subclasses (their inner int8 data and scales)."""
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter:
        names, _ = inner()
        return sum(_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
