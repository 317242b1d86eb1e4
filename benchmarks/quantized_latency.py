"""Batch-1 latency and size of int8 vs fp32 across runtimes: ExecuTorch .pte (XNNPACK), eager, and
x86-Inductor int8 through torch.compile. Random weights: these are speed and size numbers only.

    python -m benchmarks.quantized_latency [--quick]
Goals (ResNet-18 at 64x64): int8 .pte <= 1/2.5 of fp32 .pte and <= 1/10 of fp32 eager;
int8 .pte size <= 0.27 x fp32 .pte.
Timings are interleaved (one round = every variant once) so machine drift hits all variants alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import machine, parser
from dlrun import models
from dlrun.compression import quantization
from dlrun.deploy import lower, program, runtime

ZOO = {  # name -> (builder, input shape)
    "resnet18@64": (models.resnet18, (3, 64, 64)),
    "mobilenet_v2@64": (models.mobilenet_v2, (3, 64, 64)),
    "lenet@8 (digits)": (models.LeNet, (1, 8, 8)),
}


def variants(name: str, tmp: Path, *, with_x86: bool) -> tuple[dict, dict]:
    """name -> callable at batch 1, and name -> file size in bytes."""
    builder, shape = ZOO[name]
    torch.manual_seed(0)
    fp32 = builder(input_shape=shape, num_outputs=10).eval()
    calib = [torch.randn(16, *shape) for _ in range(4)]
    example = calib[0]
    int8 = quantization.quantize_ptq(fp32, example, calib, backend="xnnpack")
    calls, sizes = {"fp32 eager": fp32}, {}
    for label, module in (("fp32 .pte", fp32), ("int8 .pte", int8)):
        path = tmp / f"{label.split()[0]}.pte"
        result = lower.to_pte(program.export_program(module, example, max_batch=16), path, backend="xnnpack")
        calls[label], sizes[label] = runtime.load_runner(path), result.size_bytes
    if with_x86:  # x86 int8 gets its speed from inductor's fused int8 kernels
        x86 = quantization.quantize_ptq(fp32, example, calib, backend="x86_inductor")
        with torch.no_grad():
            compiled = torch.compile(x86)
            compiled(example[:1])
        calls["x86 int8 compiled"] = compiled
    return calls, sizes


def interleaved_ms(calls: dict, x: torch.Tensor, rounds: int, per_round: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            for _ in range(5):
                fn(x)
        for _ in range(rounds):
            for name, fn in calls.items():
                start = time.perf_counter()
                for _ in range(per_round):
                    fn(x)
                times[name].append((time.perf_counter() - start) * 1e3 / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    args = parser(__doc__).parse_args()
    names = ["lenet@8 (digits)"] if args.quick else list(ZOO)
    rounds, per_round = (3, 5) if args.quick else (15, 20)
    print(f"quantized_latency  ({machine()}; batch 1, median of {rounds} interleaved rounds x {per_round} calls)")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            calls, sizes = variants(name, Path(tmp), with_x86=not args.quick)
            ms = interleaved_ms(calls, torch.randn(1, *ZOO[name][1]), rounds, per_round)
        line = "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
        print(f"  {name}: {line}")
        ratios = (
            f"int8.pte/fp32.pte = {ms['int8 .pte'] / ms['fp32 .pte']:.3f} (goal <= 0.4)   "
            f"int8.pte/eager = {ms['int8 .pte'] / ms['fp32 eager']:.3f} (goal <= 0.1)   "
            f"size int8/fp32 .pte = {sizes['int8 .pte'] / sizes['fp32 .pte']:.3f} (goal <= 0.27; "
            f"{sizes['fp32 .pte'] / 1e6:.1f} -> {sizes['int8 .pte'] / 1e6:.1f} MB)"
        )
        if "x86 int8 compiled" in ms:
            ratios += f"   x86-int8-compiled/eager = {ms['x86 int8 compiled'] / ms['fp32 eager']:.3f}"
        print(f"    {ratios}")


if __name__ == "__main__":
    main()
