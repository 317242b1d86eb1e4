"""A model trained inside its run directory, as `train` and `distill` do it: one writer at a time (the lock),
Ctrl-C that stops after the last completed epoch and prints the resume command (exit 130), and `fit`, which
trains with the run's optimizer/scheduler/trainer config, checkpoints every epoch, continues from last.pt when
resuming, and reports the best checkpoint's test metrics.

    with session.guarded(run_dir, "train"):
        fitted = session.fit(model, data, cfg, run_dir, config, device=device, resume=bool(cfg.resume))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.core import checkpoint as ckpt
from dlrun.core import locks, reports, rundir
from dlrun.core.errors import DlrunError, UsageError
from dlrun.data import Data
from dlrun.training import callbacks, env, evaluate, loop, schedulers

log = logging.getLogger("dlrun")
INTERRUPTED = 130  # the shell's code for Ctrl-C
# Settings that make a resumed run a different experiment when they changed since its last.pt (a warning, not an
# error: extending trainer.epochs or lowering the lr on resume is legitimate). Keys a command lacks compare equal.
SAME_EXPERIMENT = (
    "trainer.seed",
    "trainer.batch_size",
    "optimizer",
    "scheduler",
    "dataset",
    "distiller",
    "teacher",
    "teacher_ckpt",
)


@contextlib.contextmanager
def guarded(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run's lock while training; the first Ctrl-C becomes DlrunError(exit 130) saying how to resume."""
    lock = locks.acquire_lock(run_dir)
    previous_handler = signal.signal(signal.SIGINT, on_interrupt(lock))
    try:
        yield
    except KeyboardInterrupt:
        raise DlrunError(_interrupted(run_dir, command), INTERRUPTED) from None
    else:
        signal.signal(signal.SIGINT, previous_handler)
    finally:
        locks.release_lock(lock)


def on_interrupt(lock: Path):
    """First Ctrl-C: KeyboardInterrupt (stop cleanly, say how to resume). Second: exit at once.

    Every file of a run is replaced atomically, so exiting mid-way leaves each one old or new, never half;
    the handler stays installed until the process ends, so a Ctrl-C during shutdown cannot print a traceback.
    """
    interrupted = False

    def handler(signum, frame):
        nonlocal interrupted
        if interrupted:
            locks.release_lock(lock)
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(INTERRUPTED)
        interrupted = True
        raise KeyboardInterrupt

    return handler


def _interrupted(run_dir: Path, command: str) -> str:
    """Say how to resume only when there is something to resume from: last.pt is written before the first epoch
    (as epoch 0, the initial weights and RNG state, so a resume from it is the same run), not before."""
    if not (run_dir / "checkpoints" / callbacks.LAST).is_file():
        return "interrupted before training started; nothing to resume (run the command again)"
    return (
        "interrupted; checkpoints/last.pt holds the last completed epoch (0: none). "
        f"Resume with: dlrun {command} resume={rundir.relative(run_dir)}"
    )


def task_loss(task: str, trainer: DictConfig) -> nn.Module:
    """The supervised loss of `task` with the trainer's label smoothing (classification only)."""
    return evaluate.loss_function(task, trainer.label_smoothing if task == "classification" else 0.0)


@dataclass(frozen=True)
class Fitted:
    """A finished fit; the model holds its best.pt weights, in eval mode."""

    state: loop.TrainState
    val: dict  # the best epoch's validation metrics
    test: dict  # the best checkpoint's test metrics (with the confusion matrix for classification)

    @property
    def epochs_run(self) -> int:
        return self.state.rows[-1]["epoch"]

    @property
    def train_seconds(self) -> float:
        return sum(row["seconds"] for row in self.state.rows)


def fit(
    model: nn.Module,
    data: Data,
    cfg: DictConfig,
    folder: Path,
    config: dict,
    *,
    device: torch.device,
    resume: bool,
    compute_loss: loop.ComputeLoss | None = None,
    label: str = "",
    extra_callbacks: Sequence[loop.Callback] = (),
) -> Fitted:
    """Train `model` with cfg.optimizer, cfg.scheduler and cfg.trainer, writing folder/metrics.csv|jsonl and
    folder/checkpoints/{best,last}.pt (holding `config`, from which later commands rebuild the model). When
    resuming, continue from folder/checkpoints/last.pt if there is one. `compute_loss` replaces the supervised loss
    (distillation); `label` tells this fit's progress and epoch lines from another's in the same run;
    `extra_callbacks` run after the built-in ones (a tuning trial's pruning callback)."""
    t = cfg.trainer
    optimizer, scheduler = schedulers.build_optimization(
        cfg.optimizer,
        cfg.scheduler,
        model.parameters(),
        train_size=len(data.train),
        batch_size=t.batch_size,
        epochs=t.epochs,
    )
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    fitting = loop.Loop(
        model,
        data,
        optimizer,
        scheduler,
        task_loss(data.task, t),
        loop.FitConfig.from_trainer(t),
        callbacks=[
            callbacks.Progress(label or "training"),
            callbacks.MetricsWriter(folder),
            callbacks.Checkpointer(checkpoints, config),
            callbacks.EpochLog(f"{label} " if label else ""),
            callbacks.EarlyStopping(t.patience),
            callbacks.Plots(folder),
            *extra_callbacks,
        ],
        compute_loss=compute_loss,
        network=torch.compile(model) if t.compile else None,
    )
    if resume and (checkpoints / callbacks.LAST).is_file():
        locks.remove_stale_temps(folder, checkpoints)  # left by a process killed mid-write (we hold the lock)
        fitting.state = _restore(fitting, checkpoints / callbacks.LAST, device, config, folder)
    state = fitting.fit()
    if not state.best_epoch:  # every epoch validated to NaN/inf: no best.pt was written
        raise DlrunError(f"no epoch had finite validation metrics, so there is no best.pt. {fitting.config.nan_advice}")

    model.load_state_dict(ckpt.load(checkpoints / callbacks.BEST, device)[ckpt.MODEL])
    model.eval()
    test = evaluate.evaluate(model, data.test, data, batch_size=t.eval_batch_size, confusion=True)
    if "confusion_matrix" in test:
        path = folder / "confusion_matrix.png"
        title = f"{folder.name}: test, best epoch {state.best_epoch}"
        callbacks.guarded(
            path, lambda: reports.confusion_matrix_plot(path, test["confusion_matrix"], data.class_names, title=title)
        )
    val = {k.removeprefix("val_"): v for k, v in state.rows[state.best_epoch - 1].items() if k.startswith("val_")}
    return Fitted(state, val, test)


def init_weights(model: nn.Module, init_from: str, device, trusted=()) -> list[str]:
    """A fresh run's starting weights from init_from: a RUN_DIR (its best.pt; the stored config is checked by the
    allowlist like every stored config) or a weights file (a dlrun checkpoint or a user's own state_dict). Tensors
    whose shapes differ from `model`'s (a new head for another class count) keep their fresh initialization; those
    keys are returned and logged in one line. Missing or unexpected keys (another architecture) are refused."""
    from dlrun.core import sources

    path = Path(init_from)
    if path.is_dir():
        source = sources.resolve(run=init_from, trusted=trusted)
        if source.kind != "checkpoint":
            raise UsageError(f"init_from needs a run with checkpoints/best.pt, {source.label} is a {source.kind}")
        path = source.path
    where = f"init_from={init_from}"
    weights = ckpt.state_dict_of(ckpt.load_file(path, device), where)
    own = model.state_dict()
    reinit = [
        f"{key} {tuple(weights[key].shape)}->{tuple(own[key].shape)}"
        for key in own
        if key in weights and weights[key].shape != own[key].shape
    ]
    fitting = {
        key: (own[key] if key in weights and weights[key].shape != own[key].shape else value)
        for key, value in weights.items()
    }
    if own and len(reinit) == len(own):
        raise UsageError(f"{where}: none of its weights fit this run's model (every shape differs); check model=")
    ckpt.load_weights(model, fitting, where, "this run's model config")
    loaded = len(own) - len(reinit)
    if reinit:
        log.info(
            f"init_from {rundir.relative(path)}: loaded {loaded} of {len(own)} tensors; re-initialized "
            f"{len(reinit)} whose shapes differ: {', '.join(reinit)}"
        )
    else:
        log.info(f"init_from {rundir.relative(path)}: loaded all {loaded} tensors")
    return [item.split(" ")[0] for item in reinit]


def _restore(fitting: loop.Loop, path: Path, device, config: dict, folder: Path) -> loop.TrainState:
    """Load last.pt into the live objects; returns the train state after its epoch, with the metric rows up to it."""
    saved = ckpt.load(path, device)
    ckpt.load_weights(fitting.model, saved[ckpt.MODEL], str(path), "this run's model config")
    try:
        fitting.optimizer.load_state_dict(saved[ckpt.OPTIMIZER])
        fitting.scheduler.load_state_dict(saved[ckpt.SCHEDULER])
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{path} does not match this run's model/optimizer config: {reason}") from None
    env.set_rng_state(saved[ckpt.RNG])
    saved_config, current = OmegaConf.create(saved[ckpt.CONFIG]), OmegaConf.create(config)
    for key in SAME_EXPERIMENT:
        if OmegaConf.select(saved_config, key) != OmegaConf.select(current, key):
            log.warning(f"warning: {key} differs from the checkpoint's; the resumed run is not the same experiment")
    done = saved[ckpt.EPOCH]
    planned, epochs = OmegaConf.select(saved_config, "trainer.epochs"), fitting.config.epochs
    if planned is not None and planned != epochs and saved_config.get("scheduler") is not None:
        log.warning(
            f"warning: trainer.epochs {planned} -> {epochs}: the run was planned for {planned} epochs; a "
            f"schedule set by the total (cosine, onecycle) is stretched over {epochs} from epoch {done + 1} on"
        )
    if done >= epochs:
        log.warning(
            f"warning: {rundir.relative(folder)} already finished its {done} epochs (trainer.epochs={epochs}): "
            "nothing to train; its best.pt is evaluated again and summary.json rewritten"
        )
    rows = []
    if (folder / "metrics.jsonl").is_file():  # rows written after last.pt (killed in between) are dropped
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["epoch"] <= done]
    log.info(f"resuming {rundir.relative(folder)} after epoch {done}")
    return loop.TrainState.from_checkpoint(saved[ckpt.TRAINER_STATE], done, rows)
