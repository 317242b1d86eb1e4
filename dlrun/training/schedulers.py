"""Learning-rate schedules, all stepped once per batch (conf/scheduler/ selects one with `_target_`).

Each takes the optimizer and the run's step counts, which only the trainer knows; the config
supplies the rest as a Hydra partial.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dlrun.core import process
from dlrun.core.errors import UsageError


def constant(optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: 1.0)


def step(
    optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float
) -> LRScheduler:
    return LambdaLR(optimizer, lambda s: gamma ** ((s // steps_per_epoch) // step_epochs))


def cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    warmup_start_ratio: float,
    min_lr_ratio: float,
) -> LRScheduler:
    warmup = min(int(warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))

    def factor(s: int) -> float:
        if s < warmup:
            return warmup_start_ratio + (1 - warmup_start_ratio) * s / warmup
        progress = (s - warmup) / max(total_steps - warmup, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def onecycle(
    optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, max_lr_ratio: float, pct_start: float
) -> LRScheduler:
    max_lr = [group["lr"] * max_lr_ratio for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 2), pct_start=pct_start)


def build_optimization(
    optimizer_cfg, scheduler_cfg, parameters, *, train_size: int, batch_size: int, epochs: int, lr_scale: float = 1.0
) -> tuple[Optimizer, LRScheduler]:
    """The optimizer and its per-batch schedule from their config groups (Hydra partials), sized for a fit of
    `epochs` over `train_size` samples. Train, QAT fine-tuning, pruning fine-tunes and distillation share it.

    `parameters` are tensors, or param groups (dlrun.training.transfer.param_groups) whose `lr_ratio` scales
    the optimizer's lr for that group (a backbone fine-tuned slower than its new head)."""
    from dlrun.config.compose import instantiate

    lr = optimizer_cfg.lr * lr_scale
    parameters = list(parameters)
    if parameters and isinstance(parameters[0], dict):
        parameters = [{"params": g["params"], "lr": lr * g.get("lr_ratio", 1.0)} for g in parameters]
    steps_per_epoch = math.ceil(train_size / batch_size)
    # torch.optim imports dynamo on the first optimizer (add_param_group is wrapped in torch._disable_dynamo) and
    # on every step: import it here, where it costs less (dlrun.core.process).
    process.import_without_collection("torch._dynamo")
    try:  # Hydra partials: a wrong added key (+optimizer.betaz=...) only fails here, when they are called
        optimizer = instantiate(optimizer_cfg, "optimizer")(parameters, lr=lr)
        scheduler = instantiate(scheduler_cfg, "scheduler")(
            optimizer, total_steps=steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build the optimizer or scheduler from the config: {exc}") from None
    return optimizer, scheduler
