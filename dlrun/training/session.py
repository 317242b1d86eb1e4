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
from dlrun.training import adapters, callbacks, distributed, ema, env, evaluate, loop, schedulers, trackers, transfer

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
    """Hold the run's lock while training (rank 0 holds it for a DDP job); the first Ctrl-C becomes
    DlrunError(exit 130) saying how to resume."""
    lock = locks.acquire_lock(run_dir) if distributed.is_main() else None
    previous_handler = signal.signal(signal.SIGINT, on_interrupt(lock))
    try:
        yield
    except KeyboardInterrupt:
        raise DlrunError(_interrupted(run_dir, command), INTERRUPTED) from None
    else:
        signal.signal(signal.SIGINT, previous_handler)
    finally:
        if lock is not None:
            locks.release_lock(lock)


def on_interrupt(lock: Path | None):
    """First Ctrl-C: KeyboardInterrupt (stop cleanly, say how to resume). Second: exit at once.

    Every file of a run is replaced atomically, so exiting mid-way leaves each one old or new, never half;
    the handler stays installed until the process ends, so a Ctrl-C during shutdown cannot print a traceback.
    """
    interrupted = False

    def handler(signum, frame):
        nonlocal interrupted
        if interrupted:
            if lock is not None:
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
    trainable_params: int = 0  # what the optimizer trained: less than the model's under trainer.freeze or LoRA

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
    data = distributed.sharded(data)  # in a DDP job, this rank's part of each split
    param_groups, set_mode, average = _fine_tuning(model, t)
    optimizer, scheduler = schedulers.build_optimization(
        cfg.optimizer,
        cfg.scheduler,
        param_groups,
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
        callbacks=distributed.for_this_rank(
            *([callbacks.ReduceTrainStats()] if distributed.is_worker() else []),
            callbacks.Progress(label or "training"),
            callbacks.MetricsWriter(folder),
            callbacks.Checkpointer(checkpoints, config),
            callbacks.EpochLog(f"{label} " if label else ""),
            callbacks.EarlyStopping(t.patience),
            callbacks.Plots(folder),
            *trackers.from_config(cfg, folder),
            *extra_callbacks,
        ),
        compute_loss=compute_loss,
        network=_network(model, t.compile, device),
        set_mode=set_mode,
        average=average,
    )
    if resume and (checkpoints / callbacks.LAST).is_file():
        locks.remove_stale_temps(folder, checkpoints)  # left by a process killed mid-write (we hold the lock)
        fitting.state = _restore(fitting, checkpoints / callbacks.LAST, device, config, folder)
    state = fitting.fit()
    if not state.best_epoch:  # every epoch validated to NaN/inf: no best.pt was written
        raise DlrunError(f"no epoch had finite validation metrics, so there is no best.pt. {fitting.config.nan_advice}")

    distributed.barrier()  # rank 0 has written the final best.pt
    model = adapters.unwrap(model)  # LoRA: best.pt holds merged plain weights
    model.load_state_dict(ckpt.load(checkpoints / callbacks.BEST, device)[ckpt.MODEL])
    model.eval()
    test = evaluate.evaluate(model, data.test, data, batch_size=t.eval_batch_size, confusion=True)
    if "confusion_matrix" in test and distributed.is_main():
        path = folder / "confusion_matrix.png"
        title = f"{folder.name}: test, best epoch {state.best_epoch}"
        callbacks.guarded(
            path, lambda: reports.confusion_matrix_plot(path, test["confusion_matrix"], data.class_names, title=title)
        )
    val = {k.removeprefix("val_"): v for k, v in state.rows[state.best_epoch - 1].items() if k.startswith("val_")}
    return Fitted(state, val, test, sum(p.numel() for group in optimizer.param_groups for p in group["params"]))


def _network(model: nn.Module, compile_: bool, device: torch.device) -> nn.Module | None:
    """What trains when it is not the model itself: DDP's wrapper in a distributed job, torch.compile's graph."""
    network = distributed.wrap(model, device) if distributed.is_worker() else None
    return torch.compile(network or model) if compile_ else network


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
    _restore_weights(fitting, saved, path)
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


# --- Fine-tuning: frozen parts, per-group learning rates, the EMA (dlrun.training.transfer, .ema, .adapters) ---


def _fine_tuning(model: nn.Module, trainer: DictConfig) -> tuple[list[dict], loop.SetMode, nn.Module | None]:
    """trainer.freeze, trainer.head/backbone_lr_ratio and trainer.ema: the optimizer's param groups (trainable
    parameters only), the loop's train/eval switch (frozen BatchNorm stays in eval mode, also under LoRA) and the
    moving average of the weights (None: off). Built after init_from's weights are in, before a resume's."""
    transfer.freeze(model, trainer.freeze)
    groups = transfer.param_groups(model, trainer.head, trainer.backbone_lr_ratio)
    trainable, total = transfer.count_trainable(model), sum(p.numel() for p in model.parameters())
    if trainable < total:
        log.info(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%)")
    frozen = transfer.frozen_norms(model)
    set_mode = transfer.frozen_norm_mode(frozen) if frozen else loop.module_mode
    average = ema.average(model, trainer.ema) if trainer.ema is not None else None
    return groups, set_mode, average


def _restore_weights(fitting: loop.Loop, saved: dict, path: Path) -> None:
    """last.pt's live weights into the model, and its EMA and PEFT states when this fit has them: the LoRA model
    resumes from its own state (MODEL holds it merged), the average continues exactly where it was."""
    adapted = adapters.is_adapted(fitting.model)
    averaged = fitting.average is not None
    for needed, key, setting in ((adapted, ckpt.ADAPTER, "adapter=lora"), (averaged, ckpt.EMA, "trainer.ema")):
        if needed and key not in saved:
            raise UsageError(f"{path} was saved without {setting}: resume it with the settings it was trained with")
    weights = saved[ckpt.ADAPTER] if adapted else saved[ckpt.MODEL]
    ckpt.load_weights(fitting.model, weights, str(path), "this run's model config")
    if averaged:
        ckpt.load_weights(fitting.average, saved[ckpt.EMA], f"{path} ({ckpt.EMA})", "this run's model config")
