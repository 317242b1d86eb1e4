"""The Optuna study behind `dlrun tune`: SQLite storage, sampler and pruner from the tune config, trials cut off
by a crash asked again, and `TrialPruning`, the Loop callback that reports each epoch's val metric to the trial
and stops a hopeless one (the trial's directory stays a complete train run)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from dlrun.core import rundir
from dlrun.core.errors import UsageError
from dlrun.training.loop import Callback, EpochResult, Loop

log = logging.getLogger("dlrun")


def open_study(cfg: DictConfig, path: Path, direction: str):
    """The study in the SQLite file `path`, created or loaded (resume); its sampler's seed is offset by the trials it
    already has, so that a resumed study does not draw the same random startup points again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlrun logs one line per trial itself
    storage = f"sqlite:///{path.resolve()}"
    try:
        study = optuna.create_study(
            storage=storage, study_name="dlrun", direction=direction, pruner=pruner(cfg.pruner), load_if_exists=True
        )
    except ValueError as exc:  # a resumed study optimized in the other direction (metric= changed)
        raise UsageError(f"cannot continue the study in {rundir.relative(path.parent)}: {exc}") from None
    seed = cfg.sampler.seed + len(study.trials)
    if cfg.sampler.name == "random":
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler.startup_trials)
    return study


def pruner(settings: DictConfig):
    import optuna

    if settings.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.warmup_epochs
        )
    if settings.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=settings.min_epochs, reduction_factor=settings.reduction_factor
        )
    return optuna.pruners.NopPruner()


def requeue_unfinished(study) -> None:
    """A trial still RUNNING when the study opens was cut off by a crash (this process holds the sweep's lock, so
    nobody else runs it): record it as failed (interrupted) and ask its params again as the next trial."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        requeue(study, trial.number, trial._trial_id, trial.params)


def requeue(study, number: int, trial_id: int, params: dict) -> None:
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial_id, "interrupted", True)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"retry_of": number})
    log.info(f"trial {number} was interrupted: recorded as failed, its params are tried again")


def ended(study) -> int:
    """Trials that count towards n_trials: complete, pruned or failed, but not those cut off by a crash."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if "interrupted" not in t.user_attrs)


class TrialPruning(Callback):
    """Reports the monitored val metric to the trial after every epoch; when the pruner says so, asks the loop to
    stop after this epoch (the trial directory stays a complete run: best.pt, summary.json)."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_after: int | None = None
        self.value: float | None = None

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        if self.metric not in result.val:
            available = ", ".join(k for k in result.val if k != "samples")
            raise UsageError(f"metric={self.metric} is not a val metric of this task; available: {available}")
        value = result.val[self.metric]
        if not math.isfinite(value):
            return
        self.value = value
        self.trial.report(value, result.epoch)
        if self.trial.should_prune():
            self.pruned_after = result.epoch
            loop.state.should_stop = True
