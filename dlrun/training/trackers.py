"""Experiment trackers beside the csv files, chosen with `logger=[csv,tensorboard,mlflow]` (conf/logger/).

Each tracker is a training Callback that logs every epoch's row while the fit runs (`from_config`, added by
session.fit); `finish(cfg, folder)`, called once the run's summary.json is written (cli.dispatch after the
recipe, `dlrun tune` after each trial), adds the test metrics, the hyperparameters and the artifacts, reading them
from the summary: the trackers see exactly what the run reports. A tracker's package is imported only when its
logger is selected; a missing one is a one-line error naming the pip command.

    tensorboard  <run_dir>/tensorboard/ event files: train/loss, val/<metric>, lr per epoch; hparams + test metrics
    mlflow       a run in `tracking_uri` (sqlite), tagged with the run directory: params = the flattened config,
                 per-epoch metrics, test metrics, summary.json and the plots as artifacts. A resumed dlrun run
                 continues its MLflow run.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path

from dlrun.core import rundir
from dlrun.core.errors import UsageError
from dlrun.training.loop import Callback, EpochResult, Loop

# logger option -> (the module it needs, how to install it)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'dlrun[mlflow]'"),
}
RUN_TAG = "dlrun_run_dir"  # the MLflow tag that ties an MLflow run to its dlrun run directory


def selected(cfg) -> list[str]:
    """The logger options of a composed config (`logger: {csv: {}, tensorboard: {...}}`); none without a logger."""
    return list(cfg.get("logger") or {})


def from_config(cfg, folder: Path) -> list[Callback]:
    """The tracking callbacks of cfg.logger for a fit writing into `folder` (csv is session.fit's own writer)."""
    from omegaconf import OmegaConf

    callbacks: list[Callback] = []
    for name in selected(cfg):
        if name == "tensorboard":
            require(name)
            callbacks.append(TensorBoard(Path(folder), cfg.logger.tensorboard.flush_secs))
        elif name == "mlflow":
            require(name)
            config = OmegaConf.to_container(cfg, resolve=True)
            callbacks.append(MLflow(Path(folder), dict(cfg.logger.mlflow), config))
    return callbacks


def finish(cfg, folder: Path) -> None:
    """Log the finished run's test metrics, hyperparameters and artifacts to its trackers; nothing when the run
    has no summary.json (it did not fit, e.g. a tune sweep's own directory) or no tracker was started in it."""
    from dlrun.training import distributed

    summary_path = Path(folder) / rundir.SUMMARY
    if not distributed.is_main() or not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    if "tensorboard" in selected(cfg) and (Path(folder) / TensorBoard.SUBDIR).is_dir():
        _tensorboard_results(Path(folder), summary)
    if "mlflow" in selected(cfg):
        _mlflow_results(Path(folder), dict(cfg.logger.mlflow), summary)


def require(name: str) -> None:
    module, install = PACKAGES[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"logger={name} needs the {module} package: {install}") from None


class TensorBoard(Callback):
    """Per-epoch scalars into <folder>/tensorboard/ (a resumed run appends a new event file there)."""

    SUBDIR = "tensorboard"
    rank_zero_only = True  # in a DDP job only rank 0 writes (training.distributed.for_this_rank)

    def __init__(self, folder: Path, flush_secs: int):
        self.log_dir, self.flush_secs = folder / self.SUBDIR, flush_secs
        self.writer = None

    def on_fit_start(self, loop: Loop) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        for key, value in epoch_metrics(result.row).items():
            self.writer.add_scalar(scalar_tag(key), value, result.epoch)

    def on_fit_end(self, loop: Loop) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow(Callback):
    """One MLflow run per dlrun run directory: created (with the config as params) on the first fit, found again
    by its tag when the dlrun run is resumed."""

    rank_zero_only = True

    def __init__(self, folder: Path, settings: dict, config: dict):
        self.folder, self.settings, self.config = folder, settings, config
        self.client, self.run_id = None, None

    def on_fit_start(self, loop: Loop) -> None:
        self.client, self.run_id = _mlflow_run(self.folder, self.settings, create_with=self.config)

    def on_epoch_end(self, loop: Loop, result: EpochResult) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, result.epoch) for key, value in epoch_metrics(result.row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)


def epoch_metrics(row: dict) -> dict[str, float]:
    """A metric row's finite numbers, without the epoch counter itself."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and _finite(v)}


def scalar_tag(key: str) -> str:
    """`train_loss` -> `train/loss`, `val_accuracy` -> `val/accuracy`: TensorBoard groups the charts by prefix."""
    for prefix in ("train_", "val_", "test_", "best_val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key.removeprefix(prefix)}"
    return key


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists stay one value."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def result_metrics(summary: dict) -> dict[str, float]:
    """summary.json's final metrics as flat finite numbers: {"test_accuracy": 0.97, "best_val_accuracy": 0.98}
    (the val ones are the best epoch's, named apart from the per-epoch val_* series)."""
    metrics = summary.get("metrics") or {}
    names = {"test": "test", "val": "best_val"}
    return {
        f"{names[split]}_{name}": float(value)
        for split, values in metrics.items()
        if split in names and isinstance(values, dict)
        for name, value in values.items()
        if _finite(value)
    }


def _tensorboard_results(folder: Path, summary: dict) -> None:
    """The hparams dashboard's row: the flattened config with the run's final metrics, as test/* and best_val/*
    scalars."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = {scalar_tag(k): v for k, v in result_metrics(summary).items()}  # the hparams table reads these tags
    params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(summary["config"]).items()}
    step = summary.get("epochs_run") or 0
    with SummaryWriter(log_dir=str(folder / TensorBoard.SUBDIR)) as writer:
        experiment, session_start, session_end = hparams(params, metrics)
        for item in (experiment, session_start, session_end):
            writer.file_writer.add_summary(item)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)


def _mlflow_results(folder: Path, settings: dict, summary: dict) -> None:
    from mlflow.entities import Metric

    client, run_id = _mlflow_run(folder, settings)
    if run_id is None:
        return
    now, step = int(time.time() * 1000), summary.get("epochs_run") or 0
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in result_metrics(summary).items()])
    artifacts = [folder / rundir.SUMMARY, *sorted(folder.glob("*.png"))]
    if settings.get("log_checkpoint") and (folder / "checkpoints" / "best.pt").is_file():
        artifacts.append(folder / "checkpoints" / "best.pt")
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


def _mlflow_run(folder: Path, settings: dict, *, create_with: dict | None = None):
    """(client, run id) of the MLflow run tagged with `folder`; created when `create_with` (the config) is given
    and there is none yet, else run id None."""
    import logging

    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # the store's table creation and migrations on first use
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=settings["tracking_uri"])
    experiment = client.get_experiment_by_name(settings["experiment"])
    if experiment is None:
        location = Path(settings["artifacts"]).resolve().as_uri()
        experiment_id = client.create_experiment(settings["experiment"], artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    where = rundir.relative(folder)
    found = client.search_runs([experiment_id], filter_string=f"tags.{RUN_TAG} = '{where}'", max_results=1)
    if found:
        return client, found[0].info.run_id
    if create_with is None:
        return client, None
    run = client.create_run(experiment_id, run_name=folder.name, tags={RUN_TAG: where})
    params = [Param(k, str(v)) for k, v in flatten(create_with).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return client, run.info.run_id


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
