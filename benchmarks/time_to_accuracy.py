"""Time to 99% test accuracy on the default run (digits + LeNet), and the whole `dlrun train` process time.

    python -m benchmarks.time_to_accuracy [--quick]
Goals: <= 3 s of training to 99% test accuracy, <= 12 s for the whole `dlrun train` process.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time

import torch
from hydra.utils import instantiate

from benchmarks._common import machine, parser
from dlrun import data as datasets
from dlrun import models
from dlrun.config import compose
from dlrun.training import env, evaluate, loop

TARGET = 0.99


def main() -> None:
    args = parser(__doc__).parse_args()
    overrides = ["trainer.epochs=2"] if args.quick else []
    cfg = compose.compose("train", overrides)
    t = cfg.trainer
    env.seed_everything(t.seed, False)
    data = datasets.build(cfg.dataset, torch.device("cpu"))
    model = models.build(cfg.model, data.input_shape)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    steps = math.ceil(len(data.train) / t.batch_size)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps * t.epochs, steps_per_epoch=steps)
    loss_fn = evaluate.loss_function(data.task)
    train_seconds, reached = 0.0, None
    for epoch in range(1, t.epochs + 1):
        stats = loop.train_epoch(
            model, data, optimizer, scheduler, loss_fn, epoch=epoch, batch_size=t.batch_size, seed=t.seed
        )
        train_seconds += stats.seconds
        model.eval()  # test accuracy is measured outside the timed training
        accuracy = evaluate.evaluate(model, data.test, data)["accuracy"]
        if reached is None and accuracy >= TARGET:
            reached = (epoch, train_seconds, accuracy)

    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dlrun", "train", *overrides], cwd=cwd, check=True, capture_output=True)
        process_s = time.perf_counter() - start

    print(f"time_to_accuracy  ({machine()}; dlrun train defaults: digits + LeNet, {t.epochs} epochs)")
    if reached:
        print(
            f"  {TARGET:.0%} test accuracy after epoch {reached[0]}: {reached[1]:.2f} s of training (goal <= 3 s), "
            f"accuracy {reached[2]:.4f}"
        )
    else:
        print(f"  {TARGET:.0%} test accuracy NOT reached in {t.epochs} epochs ({train_seconds:.2f} s of training)")
    print(f"  whole `dlrun train` process: {process_s:.2f} s (goal <= 12 s)")


if __name__ == "__main__":
    main()
