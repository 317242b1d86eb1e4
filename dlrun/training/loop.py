"""The one training loop of `train` and `quantize mode=qat`: `train_epoch` (the hot loop) and `Loop.fit` (epochs,
validation, the metric row, best tracking), with everything else an epoch does in callbacks
(dlrun.training.callbacks).

The hot loop keeps everything on the device: the epoch's loss is summed into a device tensor and
read once per epoch, so a GPU never waits on a per-step `.item()`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.data import Data
from dlrun.training import evaluate

ComputeLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
SetMode = Callable[[nn.Module, bool], None]  # (model, training)


def module_mode(model: nn.Module, training: bool) -> None:
    """The default train/eval switch; graphs that refuse `.train()` (PT2E QAT) give the loop their own."""
    model.train(training)


def supervised_loss(loss_fn: nn.Module) -> ComputeLoss:
    """The default `compute_loss`: the loss of the model's outputs (in fp32, also under bf16 autocast)."""
    return lambda model, x, y: loss_fn(model(x).float(), y)


class NonFiniteLoss(DlrunError):
    def __init__(self, epoch: int, step: int | None, advice: str = ""):
        where = f"at epoch {epoch}, step {step}" if step else f"in every batch of epoch {epoch}"
        message = f"loss became NaN/inf {where}; stopped (checkpoints from before are intact). {advice}"
        super().__init__(message.rstrip())
        self.epoch, self.step = epoch, step


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
    compute_loss: ComputeLoss | None = None,
    set_mode: SetMode = module_mode,
) -> EpochStats:
    """One pass over the training split, the loss from `compute_loss` (default: `supervised_loss(loss_fn)`).

    Raises NonFiniteLoss after the epoch's first bad step (policy `stop`) or when every batch was skipped.
    """
    set_mode(model, True)
    compute_loss = compute_loss or supervised_loss(loss_fn)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    loss_sum = torch.zeros((), device=device)
    step_losses: list[torch.Tensor] = []
    samples = skipped = 0
    start = time.perf_counter()
    # The shuffle/augment stream depends only on (seed, epoch): a resumed run sees the same batches.
    for x, y in data.train.batches(batch_size, shuffle_seed=seed * 100_003 + epoch, augment=data.augment):
        with autocast:
            loss = compute_loss(model, x, y)
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
        raise NonFiniteLoss(epoch, None) if skipped else DlrunError("the training split is empty")
    return EpochStats(loss_sum.item() / samples, samples, time.perf_counter() - start, skipped)


@dataclass(frozen=True)
class FitConfig:
    """What `Loop.fit` needs to know besides the objects it trains; `from_trainer` reads a train config's `trainer`."""

    epochs: int  # the last epoch to run
    batch_size: int
    seed: int  # with the epoch, fixes each epoch's shuffle and augmentation
    eval_batch_size: int = 512
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    grad_clip: float | None = None
    nan_policy: str = "stop"  # stop | skip_batch
    nan_advice: str = "Lower the learning rate"  # a NonFiniteLoss's remedy, in the names of the user's settings

    @classmethod
    def from_trainer(cls, trainer: Any) -> FitConfig:
        clip = "lower trainer.grad_clip" if trainer.grad_clip else "set trainer.grad_clip"
        if trainer.nan_policy == "skip_batch":  # never advise the setting already in use
            advice = f"Lower optimizer.lr or {clip}"
        else:
            advice = f"Lower optimizer.lr, {clip}, or use trainer.nan_policy=skip_batch"
        return cls(
            epochs=trainer.epochs,
            batch_size=trainer.batch_size,
            seed=trainer.seed,
            eval_batch_size=trainer.eval_batch_size,
            precision=trainer.precision,
            grad_clip=trainer.grad_clip,
            nan_policy=trainer.nan_policy,
            nan_advice=advice,
        )


@dataclass
class TrainState:
    """Where a fit stands; checkpoints keep `to_checkpoint()` (rows live in metrics.jsonl) so a resume continues it."""

    epoch: int = 0  # the last completed epoch
    best: float | None = None  # the monitored val metric of the best epoch
    best_epoch: int = 0  # 0 until an epoch validates with finite metrics
    stale_epochs: int = 0  # completed epochs since the best one
    rows: list[dict] = field(default_factory=list)  # one metric row per completed epoch
    should_stop: bool = False  # a callback's request (early stopping, pruning) to end the fit after this epoch

    def record(self, row: dict, val: dict, metric: str, mode: str) -> bool:
        """Add a completed epoch's row; True if it is the new best. An epoch with a NaN/inf val metric never is
        (a diverged model can still score a finite accuracy), so best.pt never holds NaN weights."""
        finite = all(math.isfinite(value) for value in val.values() if isinstance(value, float))
        improved = finite and evaluate.is_better(val[metric], self.best, mode)
        self.epoch = row["epoch"]
        self.rows.append(row)
        if improved:
            self.best, self.best_epoch, self.stale_epochs = val[metric], self.epoch, 0
        else:
            self.stale_epochs += 1
        return improved

    def to_checkpoint(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs}

    @classmethod
    def from_checkpoint(cls, saved: dict, epoch: int, rows: list[dict]) -> TrainState:
        return cls(epoch=epoch, rows=rows, **saved)


@dataclass(frozen=True)
class EpochResult:
    """What the callbacks get at the end of an epoch; `row` is also the last of `state.rows`."""

    epoch: int
    stats: EpochStats
    val: dict  # the val split's metrics (evaluate.evaluate)
    row: dict  # epoch, train_loss, val_<metric>..., lr, seconds, samples_per_s
    improved: bool  # a new best on the monitored metric


class Callback:
    """What an epoch does besides training and validating (dlrun.training.callbacks): no-op hooks, subclasses
    override the ones they need, and define on_step() only if they need every optimizer step."""

    rank_zero_only = False  # True for callbacks that write files or the terminal: rank 0 only in a DDP job

    def on_fit_start(self, loop: Loop) -> None:
        pass

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        pass

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        pass

    def on_fit_end(self, loop: Loop) -> None:
        pass


@dataclass
class Loop:
    """`fit()` runs epochs state.epoch+1..config.epochs: train one epoch, validate, record the row, call the callbacks.

    Extension points: `compute_loss(model, x, y)` (distillation adds a teacher's term), `set_mode(model, training)`
    (graphs that refuse `.train()`, frozen BatchNorm), `network` (what trains, e.g. torch.compile(model), sharing
    `model`'s weights), `average` (an EMA of `model`, updated after every optimizer step, that is validated and kept
    as best in place of `model`: see `evaluated`).
    """

    model: nn.Module  # what trains (through `network`) and what last.pt holds
    data: Data
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    config: FitConfig
    callbacks: Sequence[Callback] = ()
    compute_loss: ComputeLoss | None = None  # None: supervised_loss(loss_fn)
    set_mode: SetMode = module_mode
    network: nn.Module | None = None  # None: the model itself
    average: Any = None  # a torch.optim.swa_utils.AveragedModel of `model` (dlrun.training.ema), or None
    state: TrainState = field(default_factory=TrainState)

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and kept as best.pt: the average's when there is one."""
        return self.model if self.average is None else self.average.module

    @property
    def monitor(self) -> tuple[str, str]:
        """The val metric that decides `improved`, and whether higher is better."""
        return evaluate.monitor(self.data.task)

    def fit(self) -> TrainState:
        """Run the remaining epochs. on_fit_end runs even when fit raises (Ctrl-C, NaN), to close what
        on_fit_start opened."""
        # Only callbacks that ask for it (a progress bar) run per optimizer step: the hot loop stays lean.
        step_hooks = [callback.on_step for callback in self.callbacks if hasattr(callback, "on_step")]
        if self.average is not None:  # first, so that every other hook sees this step's average
            step_hooks.insert(0, lambda: self.average.update_parameters(self.model))

        def on_step() -> None:
            for hook in step_hooks:
                hook()

        try:
            for callback in self.callbacks:
                callback.on_fit_start(self)
            for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
                self._run_epoch(epoch, on_step if step_hooks else None)
                if self.state.should_stop:
                    break
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self)
        return self.state

    def _run_epoch(self, epoch: int, on_step: Callable[[], None] | None) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        c = self.config
        network = self.model if self.network is None else self.network
        try:
            stats = train_epoch(
                network,
                self.data,
                self.optimizer,
                self.scheduler,
                self.loss_fn,
                epoch=epoch,
                batch_size=c.batch_size,
                seed=c.seed,
                precision=c.precision,
                grad_clip=c.grad_clip,
                nan_policy=c.nan_policy,
                on_step=on_step,
                compute_loss=self.compute_loss,
                set_mode=self.set_mode,
            )
        except NonFiniteLoss as error:  # the hot loop knows where; the config knows which settings to advise
            raise NonFiniteLoss(error.epoch, error.step, c.nan_advice) from None
        self.set_mode(self.evaluated, False)
        val = evaluate.evaluate(self.evaluated, self.data.val, self.data, batch_size=c.eval_batch_size)
        row = {
            "epoch": epoch,
            "train_loss": stats.loss,
            **{f"val_{k}": v for k, v in val.items() if k != "samples"},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": stats.seconds,
            "samples_per_s": stats.samples_per_s,
        }
        improved = self.state.record(row, val, *self.monitor)
        result = EpochResult(epoch, stats, val, row, improved)
        for callback in self.callbacks:
            callback.on_epoch_end(self, result)
