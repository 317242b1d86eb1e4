"""What an epoch of `Loop.fit` does besides training and validating: write metrics, checkpoint, log, stop early.

A callback is a plain object with the hooks on_fit_start(loop), on_epoch_start(loop, epoch),
on_epoch_end(loop, result) and on_fit_end(loop) (subclass Callback for no-op defaults), plus on_step() if it
needs every optimizer step. Hooks run in list order; they read `loop.state` and may set `state.should_stop`.
Callbacks that write files or the terminal set `rank_zero_only`: in a DDP job the other ranks drop them, and a
first callback (ReduceTrainStats) turns the rank's train loss and throughput into the job's.
The EMA of trainer.ema is no callback but the Loop's `average`: validation and best.pt use it instead of the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from dlrun.core import checkpoint as ckpt
from dlrun.core import files, provenance, reports, ui
from dlrun.core.errors import DlrunError
from dlrun.training import adapters, distributed, env
from dlrun.training.loop import Callback, EpochResult, Loop

log = logging.getLogger("dlrun")
BEST, LAST = "best.pt", "last.pt"


class Progress(Callback):
    """A live bar over the fit's optimizer steps on a terminal (ui.progress); nothing elsewhere."""

    rank_zero_only = True  # in a DDP job only rank 0 writes

    def __init__(self, description: str = "training"):
        self.description = description
        self._bar = contextlib.ExitStack()
        self._advance: Callable[[], None] | None = None

    def on_fit_start(self, loop: Loop) -> None:
        steps_per_epoch = math.ceil(len(loop.data.train) / loop.config.batch_size)
        total = steps_per_epoch * (loop.config.epochs - loop.state.epoch)
        self._advance = self._bar.enter_context(ui.progress(total, self.description))

    def on_step(self) -> None:
        if self._advance is not None:  # None off a terminal
            self._advance()

    def on_fit_end(self, loop: Loop) -> None:
        self._bar.close()  # also on Ctrl-C: log lines go back to the real stdout


class MetricsWriter(Callback):
    """metrics.csv and metrics.jsonl in `folder`, one row per completed epoch, rewritten whole (atomically)."""

    rank_zero_only = True  # in a DDP job only rank 0 writes

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        files.write_rows(self.folder, "metrics", loop.state.rows)


class Checkpointer(Callback):
    """`folder`/last.pt after every epoch, best.pt after every improvement: everything a resume needs.

    MODEL always holds plain weights that later commands load into the config's model: best.pt the validated ones
    (`loop.evaluated`: the EMA under trainer.ema), LoRA adapters merged in. last.pt holds the live weights, plus
    the EMA's state and the PEFT model's own state when the fit has them, so that a resume continues them exactly.
    """

    rank_zero_only = True  # in a DDP job only rank 0 writes

    def __init__(self, folder: Path, config: dict):
        self.folder = Path(folder)
        self.config = config  # the resolved run config: later commands rebuild the model from it

    def on_fit_start(self, loop: Loop) -> None:
        if loop.state.epoch == 0:  # so Ctrl-C in the first epoch still leaves a last.pt to resume from
            ckpt.save(self.folder / LAST, self._snapshot(loop))

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        snapshot = self._snapshot(loop)
        if result.improved:
            best = {k: v for k, v in snapshot.items() if k not in (ckpt.EMA, ckpt.ADAPTER)}
            ckpt.save(self.folder / BEST, best | {ckpt.MODEL: adapters.plain_state_dict(loop.evaluated)})
        ckpt.save(self.folder / LAST, snapshot)

    def _snapshot(self, loop: Loop) -> dict:
        resumable = {}
        if loop.average is not None:
            resumable[ckpt.EMA] = loop.average.state_dict()
        if adapters.is_adapted(loop.model):
            resumable[ckpt.ADAPTER] = loop.model.state_dict()
        return resumable | {
            ckpt.MODEL: adapters.plain_state_dict(loop.model),
            ckpt.OPTIMIZER: loop.optimizer.state_dict(),
            ckpt.SCHEDULER: loop.scheduler.state_dict(),
            ckpt.EPOCH: loop.state.epoch,
            ckpt.RNG: env.rng_state(),
            ckpt.TRAINER_STATE: loop.state.to_checkpoint(),
            ckpt.CONFIG: self.config,
            ckpt.VERSIONS: provenance.versions(),
            ckpt.GIT_COMMIT: provenance.git_commit(),
        }


class ReduceTrainStats(Callback):
    """The first callback of every rank of a DDP job: the epoch row's train_loss becomes the mean over all ranks'
    samples and samples_per_s the whole job's throughput, so metrics.csv and the log describe the job, not rank 0."""

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        stats = result.stats
        job = distributed.all_reduce_totals(
            {"loss": stats.loss * stats.samples, "samples": stats.samples, "seconds": stats.seconds},
            maxima=("seconds",),
        )
        result.row["train_loss"] = job["loss"] / job["samples"]
        result.row["samples_per_s"] = job["samples"] / max(job["seconds"], 1e-9)


class EarlyStopping(Callback):
    """Stop after `patience` epochs without a better monitored val metric; None or 0 never stops."""

    def __init__(self, patience: int | None):
        self.patience = patience

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        if self.patience and loop.state.stale_epochs >= self.patience:
            log.info(f"early stopping: no better val_{loop.monitor[0]} for {self.patience} epochs")
            loop.state.should_stop = True


class EpochLog(Callback):
    """One line per epoch; ` *` marks a new best."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix  # e.g. "qat ", to tell fine-tuning epochs from training ones

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        stats, val, row = result.stats, result.val, result.row
        headline = "accuracy" if loop.data.task == "classification" else "r2"  # orders epochs as val loss does
        log.info(
            f"{self.prefix}epoch {result.epoch}/{loop.config.epochs}  train_loss {row['train_loss']:.4f}  "
            f"val_loss {val['loss']:.4f}  val_{headline} {val[headline]:.4f}{' *' if result.improved else ''}  "
            f"lr {row['lr']:.3g}  {stats.seconds:.2f}s  {row['samples_per_s']:,.0f} samples/s"
            + (f"  skipped {stats.skipped_batches} non-finite batches" if stats.skipped_batches else "")
        )


class Plots(Callback):
    """`folder`/curves.png: losses, val metrics and lr by epoch (the confusion matrix is the recipe's, drawn from the
    test metrics it reports).

    Drawn when the fit ends (also on Ctrl-C or NaN: the completed epochs) and, in a long fit, after an epoch when
    the last drawing is `every_s` old, so the curves can be watched while it runs. A plot that cannot be written is
    a warning, never the end of a run that trained.
    """

    rank_zero_only = True  # in a DDP job only rank 0 writes

    CURVES = "curves.png"

    def __init__(self, folder: Path, *, title: str = "", every_s: float = 60.0):
        self.folder = Path(folder)
        self.title = title or self.folder.name
        self.every_s = every_s
        self._drawn_at = time.monotonic()

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        if time.monotonic() - self._drawn_at >= self.every_s:
            self._draw_curves(loop)

    def on_fit_end(self, loop: Loop) -> None:
        self._draw_curves(loop)

    def _draw_curves(self, loop: Loop) -> None:
        self._drawn_at = time.monotonic()
        if loop.state.rows:
            path = self.folder / self.CURVES
            guarded(path, lambda: reports.curves_plot(path, loop.state.rows, title=self.title))


def guarded(path: Path, draw: Callable[[], None]) -> None:
    """Draw a plot; one that cannot be written (disk full, a bad value, a matplotlib error) is a warning only."""
    try:
        draw()
    except (DlrunError, OSError, ValueError, RuntimeError) as exc:  # disk full, a bad value, a matplotlib error
        log.warning(f"warning: could not write {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
