"""Training throughput of dlrun's engine vs the notes' DataLoader loop vs a tuned hand-written loop.

Same model (LeNet), data (digits train split), batch size and optimizer for all three; repetitions
are interleaved (a, b, c, a, b, c, ...) so machine drift hits each variant alike.
    python -m benchmarks.train_throughput [--quick]
Goals: a/b >= 1.5 (the engine beats the textbook loop), a/c >= 0.97 (the engine costs nothing over hand-tuned code).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from benchmarks._common import machine, median, parser
from dlrun import data as datasets
from dlrun import models
from dlrun.config import compose
from dlrun.training import evaluate, loop, schedulers


def main() -> None:
    args = parser(__doc__).parse_args()
    epochs, repeats = (1, 2) if args.quick else (3, 7)
    cfg = compose.compose("train", [])
    data = datasets.build(cfg.dataset, torch.device("cpu"))
    batch = cfg.trainer.batch_size
    x, y = data.train.x, data.train.y

    def fresh():
        torch.manual_seed(0)
        model = models.build(cfg.model, data.input_shape)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def dlrun_engine() -> int:
        model, opt = fresh()
        sched = schedulers.constant(opt, total_steps=0, steps_per_epoch=0)
        loss_fn = evaluate.loss_function("classification")
        for epoch in range(1, epochs + 1):
            loop.train_epoch(model, data, opt, sched, loss_fn, epoch=epoch, batch_size=batch, seed=0)
        return epochs * len(x)

    def notes_loop() -> int:  # the textbook loop: TensorDataset + DataLoader(shuffle=True)
        model, opt = fresh()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
        return epochs * len(x)

    def hand_loop() -> int:  # tuned: resident tensors, index slicing, no per-step sync
        model, opt = fresh()
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), batch):
                index = order[start : start + batch]
                loss = loss_fn(model(x[index]), y[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return epochs * len(x)

    variants = {
        "a: dlrun engine": dlrun_engine,
        "b: notes' DataLoader loop": notes_loop,
        "c: tuned hand loop": hand_loop,
    }
    for fn in variants.values():  # untimed warm-up: oneDNN primitives and allocator caches are built once per process
        fn()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            samples = fn()
            rates[name].append(samples / (time.perf_counter() - start))
    a, b, c = (median(r) for r in rates.values())
    print(
        f"train_throughput  ({machine()}; LeNet on digits, batch {batch}, "
        f"{epochs} epochs x {repeats} interleaved repeats)"
    )
    for name, r in rates.items():
        print(f"  {name:28s} {median(r):10,.0f} samples/s")
    print(f"  a/b = {a / b:.2f}  (goal >= 1.5)   a/c = {a / c:.2f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
