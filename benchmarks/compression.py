"""The compression chapter measured through the CLI, each result against its own fp32 source in one run:

    python -m benchmarks.compression [--quick]

digits + model=resnet: `dlrun prune flops_ratio=0.5` (goal: <= 0.5x FLOPs, test accuracy within 1.0 pt of fp32
after fine-tuning); the pruned and the unpruned model each `dlrun quantize mode=ptq` + `dlrun export format=pte`
(goal: pruned int8 .pte <= 0.6x the latency of the unpruned int8 .pte, batch 1, interleaved timing); `dlrun
distill` resnet -> lenet (channels [8,16], hidden 32) with KD and without (baseline=true), side by side.
synthetic 3x32x32 + model=mobilenet_v2: the same prune, for shape coverage (depthwise convs, inverted residuals).
Every number comes from the runs' summary.json files, except the .pte latencies, timed here side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._common import machine, parser
from benchmarks.quantized_latency import interleaved_ms

FULL = {
    "train": ["trainer.epochs=20"],
    "prune": ["steps=2", "finetune_epochs=5"],
    "distill": ["trainer.epochs=20"],
    "mobilenet": ["trainer.epochs=3", "dataset.num_samples=1024"],
    "rounds": (15, 50),
}
QUICK = {
    "train": ["trainer.epochs=1"],
    "prune": ["steps=1", "finetune_epochs=1"],
    "distill": ["trainer.epochs=1"],
    "mobilenet": ["trainer.epochs=1", "dataset.num_samples=256"],
    "rounds": (3, 5),
}
RESNET = ["model=resnet", "dataset=digits", "trainer.device=cpu"]
MOBILENET = ["model=mobilenet_v2", "dataset=synthetic", "dataset.input_shape=[3,32,32]", "trainer.device=cpu"]
STUDENT = ["model=lenet", "model.channels=[8,16]", "model.hidden=32"]
CHEAP = ["latency_repeats=20", "throughput_batch=16"]  # quantize's own fp32-vs-int8 timing is not what is measured


def dlrun(cwd: Path, command: str, *args: str) -> tuple[Path, dict]:
    """Run one dlrun command in `cwd`; (its new run directory, its summary.json)."""
    root = cwd / "outputs" / command
    before = set(root.iterdir()) if root.is_dir() else set()
    done = subprocess.run([sys.executable, "-m", "dlrun", command, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"dlrun {command} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    (run,) = set(root.iterdir()) - before
    return run, json.loads((run / "summary.json").read_text())


def prune_row(cwd: Path, train_run: Path, train: dict, settings: dict, label: str) -> tuple[Path, dict]:
    # round_to=8: XNNPACK's int8 kernels run odd channel counts (11, 23, 45) slower than the unpruned 16/32/64
    run, pruned = dlrun(
        cwd, "prune", f"run={train_run}", "pruner.flops_ratio=0.5", "pruner.round_to=8", *settings["prune"]
    )
    fp32, after = train["metrics"]["test"]["accuracy"], pruned["metrics"]["test"]["accuracy"]
    kept = pruned["comparison"]
    print(
        f"  {label} prune flops_ratio=0.5: FLOPs {pruned['before']['flops']:,} -> {pruned['after']['flops']:,} "
        f"= {kept['flops_kept']:.3f}x (goal <= 0.5), params {kept['params_kept']:.3f}x; "
        f"test accuracy {fp32:.4f} -> {after:.4f} = {100 * (after - fp32):+.2f} pt (goal >= -1.0)"
    )
    return run, pruned


def int8_pte(cwd: Path, run: Path) -> Path:
    quantized, _ = dlrun(cwd, "quantize", f"run={run}", "mode=ptq", "backend=xnnpack", *CHEAP)
    exported, summary = dlrun(cwd, "export", f"run={quantized}", "format=pte", "backend=xnnpack")
    if not summary["verification"]["passed"]:
        sys.exit(f"{exported}: the int8 .pte failed its verification: {summary['verification']['reason']}")
    return exported / Path(summary["artifact"]).name


def main() -> None:
    args = parser(__doc__).parse_args()
    settings = QUICK if args.quick else FULL
    rounds, per_round = settings["rounds"]
    print(f"compression  ({machine()}; every ratio measured in this run)")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        train_run, train = dlrun(cwd, "train", *RESNET, *settings["train"])
        pruned_run, _ = prune_row(cwd, train_run, train, settings, "digits resnet")

        from dlrun.deploy import runtime

        ptes = {"unpruned int8 .pte": int8_pte(cwd, train_run), "pruned int8 .pte": int8_pte(cwd, pruned_run)}
        calls = {name: runtime.load_runner(path) for name, path in ptes.items()}
        ms = interleaved_ms(calls, torch.randn(1, 1, 8, 8), rounds, per_round)
        sizes = {name: path.stat().st_size for name, path in ptes.items()}
        print(
            f"  digits resnet int8 .pte batch 1: unpruned {ms['unpruned int8 .pte']:.4f} ms, pruned "
            f"{ms['pruned int8 .pte']:.4f} ms: pruned/unpruned = "
            f"{ms['pruned int8 .pte'] / ms['unpruned int8 .pte']:.3f} (goal <= 0.6); size "
            f"{sizes['unpruned int8 .pte'] / 1e3:.1f} -> {sizes['pruned int8 .pte'] / 1e3:.1f} kB "
            f"(median of {rounds} interleaved rounds x {per_round} calls)"
        )

        _, distilled = dlrun(
            cwd,
            "distill",
            f"teacher={train_run}",
            *STUDENT,
            "baseline=true",
            "trainer.device=cpu",
            *settings["distill"],
        )
        c = distilled["comparison"]
        print(
            f"  digits distill resnet ({distilled['teacher_params']:,} params) -> lenet ({distilled['params']:,} "
            f"params): teacher {c['teacher']:.4f}, student with KD {c['student']:.4f}, without KD {c['baseline']:.4f} "
            f"(KD gain {100 * c['gain_over_baseline']:+.2f} pt; agreement with the teacher "
            f"{c['student_teacher_agreement']:.4f} vs {c['baseline_teacher_agreement']:.4f})"
        )

        mobile_run, mobile = dlrun(cwd, "train", *MOBILENET, *settings["mobilenet"])
        prune_row(cwd, mobile_run, mobile, settings, "synthetic 3x32x32 mobilenet_v2")


if __name__ == "__main__":
    main()
