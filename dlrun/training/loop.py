"""The training step loop shared by `train` and `quantize mode=qat`.

The hot loop keeps everything on the device: the epoch's loss is summed into a device tensor and
read once per epoch, so a GPU never waits on a per-step `.item()`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.data import Data


class NonFiniteLoss(DlrunError):
    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"loss became NaN/inf at epoch {epoch}, step {step}; stopped (checkpoints from before are intact). "
            "Lower optimizer.lr, set trainer.grad_clip, or use trainer.nan_policy=skip_batch"
        )


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    skipped_batches: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_epoch(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    *,
    epoch: int,
    batch_size: int,
    seed: int,
    precision: str = "fp32",
    grad_clip: float | None = None,
    nan_policy: str = "stop",
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over the training split. Raises NonFiniteLoss (policy `stop`) after the epoch's first bad step."""
    model.train()
    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    loss_sum = torch.zeros((), device=device)
    step_losses: list[torch.Tensor] = []
    samples = skipped = 0
    start = time.perf_counter()
    # The shuffle/augment stream depends only on (seed, epoch): a resumed run sees the same batches.
    for x, y in data.train.batches(batch_size, shuffle_seed=seed * 100_003 + epoch, augment=data.augment):
        with autocast:
            loss = loss_fn(model(x).float(), y)
        if nan_policy == "skip_batch" and not torch.isfinite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        detached = loss.detach()
        loss_sum += detached * len(x)
        step_losses.append(detached)
        samples += len(x)
        if on_step is not None:
            on_step()
    if step_losses and nan_policy == "stop":
        finite = torch.isfinite(torch.stack(step_losses))
        if not bool(finite.all()):
            raise NonFiniteLoss(epoch, int((~finite).nonzero()[0]) + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if samples == 0:
        raise NonFiniteLoss(epoch, 1) if skipped else DlrunError("the training split is empty")
    return EpochStats(loss_sum.item() / samples, samples, time.perf_counter() - start, skipped)
