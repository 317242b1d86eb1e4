"""`dlrun tune`: an Optuna study over train overrides, pruning hopeless trials epoch by epoch, resumable after a crash.

    dlrun tune search=lenet n_trials=30 trainer.epochs=10
    dlrun tune resume=outputs/tune/2026-12-01_10-00-00 n_trials=40   # continue the study; finished trials stay

Optuna is used directly rather than through hydra-optuna-sweeper: that plugin pins optuna<3 (and sqlalchemy<2 for
its SQLite storage), and a Hydra sweeper sees a job only once it has returned, so it cannot hand the trial to the
training loop for per-epoch pruning. Here each trial composes the train config with its overrides (Hydra's compose
API) and runs the train recipe in-process with a pruning callback.

The sweep directory (this run's directory):
    study.db                  the study (SQLite): every trial's params, per-epoch values and state
    trials/<n>/               trial n, a train run directory (`dlrun eval run=.../trials/<n>` works)
    trials.csv                one row per trial: state, objective value, epochs, params
    best.yaml                 the best trial's train overrides (its comment holds the `dlrun train` command)
    optimization_history.png, param_importances.png   Optuna's matplotlib plots
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlrun.config import compose, validate
from dlrun.core import files, locks, rundir, ui
from dlrun.core.errors import DlrunError, UsageError
from dlrun.training import tuning

log = logging.getLogger("dlrun")
INTERRUPTED = 130
STUDY = "study.db"
# Keys of conf/tune.yaml itself: everything else on the command line is a train override shared by every trial.
OWN_KEYS = ("search", "n_trials", "metric", "resume", "sampler", "pruner", "name")
LOWER_IS_BETTER = ("loss", "mse", "mae")
TYPES = ("float", "int", "categorical")


def run(cfg: DictConfig) -> None:
    sweep_dir = rundir.current()
    if cfg.get("search") is None:
        available = ", ".join(compose.groups().get("search", []))
        raise UsageError(f"dlrun tune needs a search space: search=<name> (available: {available})")
    base = train_overrides()
    space = check_space(OmegaConf.to_container(cfg.search, resolve=True), base)
    metric, direction = objective(cfg)
    lock = locks.acquire_lock(sweep_dir)
    try:
        study = tuning.open_study(cfg, sweep_dir / STUDY, direction)
        tuning.requeue_unfinished(study)
        optimize(study, cfg, space, base, sweep_dir, metric)
    except KeyboardInterrupt:
        raise DlrunError(f"interrupted; {_resume_hint(sweep_dir)}", INTERRUPTED) from None
    finally:
        locks.release_lock(lock)
    report(study, sweep_dir, metric, base)


# --- the search space and the objective ---------------------------------------------------------------------


def train_overrides() -> list[str]:
    """The command line's train overrides (those that are not tune's own keys): every trial starts from them."""
    from hydra.core.hydra_config import HydraConfig

    return [
        o
        for o in HydraConfig.get().overrides.task
        if not o.lstrip("+~").startswith("hydra") and o.lstrip("+~").split("=")[0].split(".")[0] not in OWN_KEYS
    ]


def check_space(search: dict, base: list[str]) -> dict[str, dict]:
    """The search space's params, each checked in shape and validated as a train override at its bounds or choices
    (an unknown key, a wrong type or a value out of range is one line before any trial runs)."""
    params = search.get("params") if isinstance(search, dict) else None
    if not isinstance(params, dict) or not params:
        raise UsageError("the search space has no params: give each train override a {type: ..., ...} entry")
    for key, spec in params.items():
        where = f"search space param '{key}'"
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in TYPES:
            raise UsageError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        if kind == "categorical":
            if not spec.get("choices") or not isinstance(spec["choices"], list):
                raise UsageError(f"{where}: categorical needs a non-empty list of choices")
            samples = spec["choices"]
        else:
            low, high = spec.get("low"), spec.get("high")
            number = int if kind == "int" else (int, float)
            if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)) or not low < high:
                raise UsageError(f"{where}: {kind} needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise UsageError(f"{where}: log: true needs low > 0, got {low!r}")
            samples = [low, high]
        for value in samples:
            try:
                with _outside_hydra_app():
                    validate.validate("train", [*base, override(key, value)])
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
    return params


@contextlib.contextmanager
def _outside_hydra_app():
    """Let config.validate initialize Hydra for itself inside this running Hydra app, then put the app's back."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def objective(cfg: DictConfig) -> tuple[str, str]:
    """(val metric, optuna direction): metric= or the task's own (evaluate.monitor: accuracy max, loss min)."""
    from dlrun.training import evaluate

    if cfg.metric is None:
        metric, mode = evaluate.monitor(cfg.dataset.task)
        return metric, "maximize" if mode == "max" else "minimize"
    return cfg.metric, "minimize" if cfg.metric in LOWER_IS_BETTER else "maximize"


def suggest(trial, space: dict[str, dict]) -> list[str]:
    """The trial's overrides, one per param of the space."""
    chosen = []
    for key, spec in space.items():
        if spec["type"] == "categorical":
            value = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            value = trial.suggest_int(
                key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False)
            )
        else:
            value = trial.suggest_float(
                key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False)
            )
        chosen.append(override(key, value))
    return chosen


def override(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return f"{key}={str(value).lower() if value is not None else 'null'}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


# --- the study (storage, sampler and pruner: dlrun.training.tuning) ---------------------------------------------


def optimize(study, cfg: DictConfig, space: dict, base: list[str], sweep_dir: Path, metric: str) -> None:
    import optuna
    from optuna.trial import TrialState

    done = tuning.ended(study)
    if done:
        log.info(f"continuing the study in {rundir.relative(sweep_dir)}: {done} of {cfg.n_trials} trials already ran")
    while done < cfg.n_trials:
        trial = study.ask()
        overrides = [*base, *suggest(trial, space)]
        label = f"trial {trial.number} ({done + 1}/{cfg.n_trials})"
        log.info(f"{label}: {' '.join(overrides[len(base) :])}")
        try:
            value = run_trial(trial, overrides, sweep_dir / "trials" / str(trial.number), metric)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"{label} pruned: {pruned}")
        except DlrunError as error:
            if error.exit_code == INTERRUPTED:
                tuning.requeue(study, trial.number, trial._trial_id, trial.params)
                raise DlrunError(
                    f"interrupted in trial {trial.number}; {_resume_hint(sweep_dir)}", INTERRUPTED
                ) from None
            if isinstance(error, UsageError):  # the same for every trial (e.g. metric=): stop the study
                study.tell(trial, state=TrialState.FAIL)
                raise
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"{label} failed: {files.first_line(error)}")
        else:
            study.tell(trial, value)
            best = study.best_trial
            log.info(f"{label}: val {metric} {value:.4f} (best {best.value:.4f}, trial {best.number})")
        done += 1


def run_trial(trial, overrides: list[str], trial_dir: Path, metric: str) -> float:
    """Train one trial in trial_dir as `dlrun train <overrides>` would; its best epoch's val metric."""
    import optuna

    from dlrun.commands import train
    from dlrun.training import trackers

    cfg = _trial_config(overrides, trial_dir)
    pruning = tuning.TrialPruning(trial, metric)
    trial.set_user_attr("run_dir", rundir.relative(trial_dir))
    with _as_hydra_job(cfg, trial_dir, overrides) as job_cfg:
        train.run(job_cfg, extra_callbacks=[pruning])
        trackers.finish(job_cfg, trial_dir)
    if pruning.pruned_after is not None:
        raise optuna.TrialPruned(f"after epoch {pruning.pruned_after}, val {metric} {pruning.value:.4f}")
    return float(files.read_json(trial_dir / rundir.SUMMARY)["metrics"]["val"][metric])


def _trial_config(overrides: list[str], trial_dir: Path) -> DictConfig:
    """The train config with the trial's overrides and Hydra's node (composed by the running Hydra app)."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = hydra_compose("train", [*overrides, f"hydra.run.dir={compose.quote(str(trial_dir))}"], True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UsageError(compose.one_line(exc)) from None
    with _writable(cfg):
        cfg.hydra.runtime.output_dir = str(trial_dir.resolve())
    return cfg


@contextlib.contextmanager
def _as_hydra_job(cfg: DictConfig, trial_dir: Path, overrides: list[str]):
    """Make the trial a Hydra job as `dlrun train` gets it: its .hydra/ snapshot (so that `dlrun eval run=` and
    `dlrun train resume=` work on it), HydraConfig pointing at its directory (rundir.current), its train.log."""
    from hydra.core.hydra_config import HydraConfig

    (trial_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    files.atomic_write_text(trial_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(job_cfg))
    files.atomic_write_text(trial_dir / ".hydra" / "hydra.yaml", OmegaConf.to_yaml({"hydra": cfg.hydra}))
    files.atomic_write_text(trial_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))
    sweep_job = HydraConfig.instance().cfg
    handler = logging.FileHandler(trial_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    loggers = (logging.getLogger("dlrun"), logging.getLogger())
    HydraConfig.instance().set_config(cfg)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield job_cfg
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
        HydraConfig.instance().cfg = sweep_job


@contextlib.contextmanager
def _writable(cfg: DictConfig):
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        yield


# --- the results ----------------------------------------------------------------------------------------------


def report(study, sweep_dir: Path, metric: str, base: list[str]) -> None:
    """trials.csv and the terminal table, best.yaml, and Optuna's plots."""
    rows = [_trial_row(t) for t in study.trials]
    files.write_csv(sweep_dir / "trials.csv", rows)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    title = f"dlrun tune: {len(complete)} complete of {len(rows)} trials, val {metric} ({study.direction.name.lower()})"
    ui.rows_table(title, [{k: v for k, v in row.items() if k != "run"} for row in rows], log=False)
    if not complete:
        raise DlrunError(f"no trial completed, so there is no best.yaml; see {rundir.relative(sweep_dir)}/trials.csv")
    write_best(study.best_trial, sweep_dir, metric, base)
    _plots(study, sweep_dir)


def _trial_row(trial) -> dict:
    intermediate = trial.intermediate_values
    return {
        "trial": trial.number,
        "state": "interrupted" if trial.user_attrs.get("interrupted") else trial.state.name.lower(),
        "value": trial.value,
        "epochs": max(intermediate) if intermediate else None,
        **trial.params,
        "run": trial.user_attrs.get("run_dir"),
    }


def write_best(best, sweep_dir: Path, metric: str, base: list[str]) -> None:
    """best.yaml: the winning trial's full train overrides, and the command that replays them."""
    overrides = [*base, *(override(k, v) for k, v in best.params.items())]
    command = "dlrun train " + " ".join(shlex.quote(o) for o in overrides)
    body = OmegaConf.to_yaml(
        {
            "trial": best.number,
            "metric": f"val_{metric}",
            "value": best.value,
            "run": best.user_attrs.get("run_dir"),
            "overrides": overrides,
        }
    )
    header = f"# The best trial of {rundir.relative(sweep_dir)}. Replay it with:\n#   {command}\n"
    files.atomic_write_text(sweep_dir / "best.yaml", header + body)
    print(f"best: trial {best.number}, val {metric} {best.value:.4f}\nreplay: {command}")


def _plots(study, sweep_dir: Path) -> None:
    """optimization_history.png and param_importances.png (the latter needs two complete trials that differ)."""
    from optuna.visualization import matplotlib as optuna_plots

    from dlrun.core import reports

    reports.pyplot()  # the Agg backend: no display needed
    plots = [("optimization_history", optuna_plots.plot_optimization_history)]
    if sum(t.state.name == "COMPLETE" for t in study.trials) >= 2:  # importances compare completed trials
        plots.append(("param_importances", optuna_plots.plot_param_importances))
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and few-trials notes: the plot says enough
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info(f"no {name}.png: {files.first_line(exc)}")
            continue
        reports.save_figure(axes.figure, sweep_dir / f"{name}.png", tight=True)  # optuna sets no margins


def _resume_hint(sweep_dir: Path) -> str:
    return f"finished trials are kept in the study; continue with: dlrun tune resume={rundir.relative(sweep_dir)}"
