"""dlrun's XNNPACK .pte (fp32 and PT2E int8) against ONNX Runtime (fp32 and its own static int8) on the same weights.

    python -m benchmarks.vs_onnxruntime [--quick]     # needs `pip install 'dlrun[bench]'` (onnx, onnxruntime)

The same float model (random init, seed 0, BatchNorm statistics from the calibration batches) is exported by
dlrun (`export_program` -> `lower.to_pte`, as `dlrun export format=pte` does: example batch 32, dynamic batch up
to 64) and to ONNX with the dynamo exporter (`lower.to_onnx`). int8: dlrun's PT2E XNNPACK PTQ (per-channel) vs
ORT's `quant_pre_process` + `quantize_static` (QDQ, per-channel, uint8 activations / int8 weights), calibrated on
the same batches. ORT runs with 2 intra-op threads and spinning off; the .pte with ExecuTorch's threadpool (its
size is printed). Latency: median ms per call at batch 1 and 32 (a fifth of the calls per round), the variants
interleaved in rounds. Top-1 agreement is with the eager fp32 model on 256 random inputs.
Goals (issue 13): int8 .pte <= 0.7x ORT int8 at batch 1; fp32 .pte no slower than ORT fp32.
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
    "mobilenet_v2@64": (models.mobilenet_v2, (3, 64, 64)),
    "resnet18@64": (models.resnet18, (3, 64, 64)),
}
QUICK_ZOO = {"lenet@8": (models.LeNet, (1, 8, 8))}
THREADS = 2


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def ort_int8(fp32_onnx: Path, calib: list[torch.Tensor], folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            import onnx

            self.name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
            self.batches = iter(calib)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {self.name: batch.numpy()}

    prepared, quantized = folder / "ort_pre.onnx", folder / "ort_int8.onnx"
    quant_pre_process(str(fp32_onnx), str(prepared))
    quantize_static(
        str(prepared),
        str(quantized),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return quantized


def variants(builder, shape, folder: Path, calib_batches: int) -> tuple[dict, dict, torch.nn.Module]:
    """(name -> runner, name -> file bytes, eager fp32 model)."""
    torch.manual_seed(0)
    fp32 = builder(input_shape=shape, num_outputs=10)
    calib = [torch.randn(32, *shape) for _ in range(calib_batches)]
    # Fresh BatchNorm statistics shrink a random mobilenet_v2's logits to ~1e-10, which int8 rounds to 0 and any
    # argmax comparison then means nothing: a few train-mode passes give the activations a real scale first.
    with torch.no_grad():
        for batch in calib:
            fp32(batch)
    fp32.eval()
    example = calib[0]
    int8 = quantization.quantize_ptq(fp32, example, calib, backend="xnnpack")
    paths = {}
    for label, module in (("fp32 .pte", fp32), ("int8 .pte", int8)):
        paths[label] = folder / f"{label.split()[0]}.pte"
        lower.to_pte(program.export_program(module, example, max_batch=64), paths[label], backend="xnnpack")
    paths["fp32 ORT"] = folder / "fp32.onnx"
    lower.to_onnx(fp32, example, paths["fp32 ORT"], max_batch=64)
    paths["int8 ORT"] = ort_int8(paths["fp32 ORT"], calib, folder)
    runners = {
        label: runtime.load_runner(path) if path.suffix == ".pte" else ort_session(path)
        for label, path in paths.items()
    }
    return runners, {label: path.stat().st_size for label, path in paths.items()}, fp32


def interleaved_ms(runners: dict, x: torch.Tensor, rounds: int, per_round: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for run in runners.values():  # warm-up: weight packing, first allocations
            for _ in range(3):
                run(x)
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for _ in range(per_round):
                    run(x)
                times[name].append((time.perf_counter() - start) * 1e3 / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def agreement(runners: dict, fp32: torch.nn.Module, shape) -> dict[str, float]:
    x = torch.randn(256, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torch.cat([fp32(b) for b in x.split(32)]).argmax(1)
        return {
            name: (torch.cat([run(b) for b in x.split(32)]).argmax(1) == reference).float().mean().item()
            for name, run in runners.items()
        }


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    args = parser(__doc__).parse_args()
    runtime.require("onnx", "onnxscript", "onnxruntime", purpose="vs_onnxruntime")
    import onnxruntime

    torch.set_num_threads(THREADS)
    zoo, rounds, per_round, calib_batches = (QUICK_ZOO, 2, 3, 2) if args.quick else (ZOO, 7, 5, 8)
    from executorch.extension.pybindings import portable_lib

    threads = portable_lib._threadpool_get_thread_count()
    print(
        f"vs_onnxruntime  ({machine()}; onnxruntime {onnxruntime.__version__} with {THREADS} threads, spinning off; "
        f"ExecuTorch threadpool {threads} threads; median of {rounds} interleaved rounds x {per_round} calls)"
    )
    for name, (builder, shape) in zoo.items():
        with tempfile.TemporaryDirectory() as tmp:
            runners, sizes, fp32 = variants(builder, shape, Path(tmp), calib_batches)
            ms = {
                1: interleaved_ms(runners, torch.randn(1, *shape), rounds, per_round),
                32: interleaved_ms(runners, torch.randn(32, *shape), rounds, max(1, per_round // 5)),
            }
            agree = agreement(runners, fp32, shape)
        print(f"  {name}:")
        print(f"    {'variant':10s} {'b1 ms':>8s} {'b32 ms':>8s} {'MB':>7s} {'top1 agree':>10s}")
        for label in runners:
            row = f"{ms[1][label]:8.3f} {ms[32][label]:8.3f} {sizes[label] / 1e6:7.2f} {agree[label]:10.4f}"
            print(f"    {label:10s} {row}")
        int8_ratio = ms[1]["int8 .pte"] / ms[1]["int8 ORT"]
        fp32_ratio = ms[1]["fp32 .pte"] / ms[1]["fp32 ORT"]
        print(
            f"    int8 .pte/ORT int8 at b1 = {int8_ratio:.2f} (goal <= 0.7: {verdict(int8_ratio <= 0.7)})"
            f"   fp32 .pte/ORT fp32 at b1 = {fp32_ratio:.2f} (goal <= 1.0: {verdict(fp32_ratio <= 1.0)})"
        )


if __name__ == "__main__":
    main()
