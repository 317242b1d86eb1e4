"""dlrun train against the same training written as a PyTorch Lightning user would write it.

    python -m benchmarks.vs_lightning [--quick] [--repeats N]     # needs `pip install 'dlrun[bench]'`

Both sides get the same dataset split (built by dlrun's dataset code), the same model and initial weights (same
seed), optimizer, per-step LR schedule, batch size, epochs, and keep the checkpoint with the best val accuracy,
then report test accuracy of that checkpoint. The Lightning side is a LightningModule, DataLoaders over the
split's tensors (shuffled), ModelCheckpoint(monitor="val_acc") and a CSVLogger, run by `lightning.Trainer` on
the CPU. Each side runs as its own process, interleaved (dlrun, lightning, dlrun, ...). `train s` is the time in
the training batches of every epoch (dlrun's summary train_seconds; on the Lightning side from each epoch's start
to its validation), the like-for-like number the goal is about; `lightning fit s` is its whole trainer.fit (with
validation, sanity check and checkpointing); `process s` the whole process.
Goals (issue 13): dlrun's fit >= 1.5x faster on the first two cases, not slower on the third; equal accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import machine, median, parser

# case -> dlrun train overrides (the Lightning side composes the same config)
CASES = {
    "digits+lenet (default)": [],
    "synthetic 1x28x28 20k + mlp": [
        "dataset=synthetic",
        "dataset.input_shape=[1,28,28]",
        "dataset.num_samples=20000",
        "model=mlp",
        "trainer.epochs=5",
    ],
    "synthetic 3x32x32 + resnet": [
        "dataset=synthetic",
        "dataset.input_shape=[3,32,32]",
        "dataset.num_samples=4096",
        "model=resnet",
        "trainer.epochs=3",
    ],
}
QUICK = {"digits+lenet (default)": ["trainer.epochs=2"]}
COMMON = ["trainer.device=cpu"]
GOAL_SPEEDUP = {"digits+lenet (default)": 1.5, "synthetic 1x28x28 20k + mlp": 1.5, "synthetic 3x32x32 + resnet": 1.0}


def lightning_fit(overrides: list[str], folder: Path) -> dict:
    """The Lightning user's script (in its own process): {train_s, fit_s, test_accuracy}."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from dlrun import data as datasets
    from dlrun import models
    from dlrun.config import compose
    from dlrun.training.schedulers import build_optimization

    cfg = compose.compose("train", overrides)
    t = cfg.trainer
    L.seed_everything(t.seed, verbose=False)
    data = datasets.build(cfg.dataset, torch.device("cpu"))

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = models.build(cfg.model, data.input_shape)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

        def test_step(self, batch, _):
            x, y = batch
            self.log("test_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self):
            optimizer, scheduler = build_optimization(
                cfg.optimizer,
                cfg.scheduler,
                self.parameters(),
                train_size=len(data.train),
                batch_size=t.batch_size,
                epochs=t.epochs,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class TrainBatchesTimer(L.Callback):
        """Seconds from each training epoch's start to its validation: dlrun's train_seconds counterpart."""

        def __init__(self):
            self.seconds, self.start = 0.0, None

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_validation_start(self, trainer, pl_module):
            if self.start is not None:  # None in the sanity check before the first epoch
                self.seconds += time.perf_counter() - self.start
                self.start = None

    def loader(split, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=shuffle)

    module = Classifier()
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", monitor="val_acc", mode="max")
    timer = TrainBatchesTimer()
    trainer = L.Trainer(
        max_epochs=t.epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(folder),
        callbacks=[checkpoint, timer],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, loader(data.train, True, t.batch_size), loader(data.val, False, t.eval_batch_size))
    fit_s = time.perf_counter() - start
    (result,) = trainer.test(
        ckpt_path=checkpoint.best_model_path, dataloaders=loader(data.test, False, t.eval_batch_size), verbose=False
    )
    return {"train_s": timer.seconds, "fit_s": fit_s, "test_accuracy": result["test_acc"]}


def run_dlrun(overrides: list[str], cwd: Path) -> dict:
    before = set(cwd.glob("outputs/train/*/summary.json"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlrun", "train", *overrides], cwd=cwd, check=True, capture_output=True)
    process_s = time.perf_counter() - start
    (summary,) = set(cwd.glob("outputs/train/*/summary.json")) - before
    summary = json.loads(summary.read_text())
    return {
        "train_s": summary["train_seconds"],
        "process_s": process_s,
        "test_accuracy": summary["metrics"]["test"]["accuracy"],
    }


def run_lightning(overrides: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.vs_lightning", "--child", json.dumps(overrides), str(cwd)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_s": time.perf_counter() - start}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", default="", help="run only the cases whose name contains this text")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # OVERRIDES_JSON FOLDER: the Lightning process
    args = p.parse_args()
    if args.child:  # the Lightning process
        print(json.dumps(lightning_fit(json.loads(args.child[0]), Path(args.child[1]))))
        return
    try:
        import lightning  # noqa: F401
    except ImportError:
        sys.exit("vs_lightning needs lightning: pip install 'dlrun[bench]'")
    cases, repeats = (QUICK, 1) if args.quick else (CASES, args.repeats)
    cases = {name: overrides for name, overrides in cases.items() if args.case in name}
    results: dict[str, dict[str, list[dict]]] = {case: {"dlrun": [], "lightning": []} for case in cases}
    with tempfile.TemporaryDirectory(prefix="dlrun-vs-lightning-") as tmp:
        for repeat in range(repeats):
            for case, overrides in cases.items():
                cwd = Path(tmp) / f"{repeat}-{len(results[case]['dlrun'])}-{abs(hash(case))}"
                cwd.mkdir()
                results[case]["dlrun"].append(run_dlrun([*COMMON, *overrides], cwd))
                results[case]["lightning"].append(run_lightning([*COMMON, *overrides], cwd / "lightning"))

    print(f"vs_lightning  ({machine()}; median of {repeats} interleaved repeats, each side its own process)")
    print(f"  {'case':32s} {'side':10s} {'train s':>8s} {'process s':>10s} {'test acc':>9s}  lightning fit s")
    for case, sides in results.items():
        row = {side: {k: median([r[k] for r in runs]) for k in runs[0]} for side, runs in sides.items()}
        for side, values in row.items():
            fit = f"  {values['fit_s']:.2f}" if "fit_s" in values else ""
            print(
                f"  {case:32s} {side:10s} {values['train_s']:8.2f} {values['process_s']:10.2f} "
                f"{values['test_accuracy']:9.4f}{fit}"
            )
        speedup = row["lightning"]["train_s"] / row["dlrun"]["train_s"]
        process = row["lightning"]["process_s"] / row["dlrun"]["process_s"]
        goal = GOAL_SPEEDUP[case]
        print(
            f"  {case:32s} lightning/dlrun train = {speedup:.2f}x, process = {process:.2f}x "
            f"(goal train >= {goal}x: {'met' if speedup >= goal else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
