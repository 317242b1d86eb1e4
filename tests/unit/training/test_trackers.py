"""Trackers of `logger=[csv,tensorboard,mlflow]` (dlrun.training.trackers): one tiny train run through the CLI, then
what TensorBoard's EventAccumulator and MLflow's client read back from it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dlrun.training import trackers
from helpers import MICRO_TRAIN, error_line, ok, run_dirs, run_dlrun, subprocess_env

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
LOGGERS = "[csv,tensorboard,mlflow]" if HAS_MLFLOW else "[csv,tensorboard]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """A 2-epoch micro run with every tracker; returns its run directory (cwd is its outputs/'s parent)."""
    cwd = tmp_path_factory.mktemp("trackers")
    micro = [o for o in MICRO_TRAIN if not o.startswith("trainer.epochs=")]
    ok(run_dlrun(["train", *micro, "trainer.epochs=2", f"logger={LOGGERS}"], cwd))
    (run,) = run_dirs(cwd)
    return run.resolve()


def test_tensorboard_events_hold_epoch_scalars_test_metrics_and_hparams(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((tracked_run / "summary.json").read_text())
    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "test/accuracy"} <= set(scalars)
    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    val = events.Scalars("val/accuracy")
    assert [e.step for e in val] == [1, 2]
    assert [e.value for e in val] == pytest.approx([r["val_accuracy"] for r in rows])
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(summary["metrics"]["test"]["accuracy"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "test/accuracy" in {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(summary["config"]["optimizer"]["lr"])


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'dlrun[mlflow]')")
def test_mlflow_run_holds_config_params_epoch_and_test_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    cwd = tracked_run.parents[2]
    summary = json.loads((tracked_run / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dlrun")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["optimizer.lr"] == str(summary["config"]["optimizer"]["lr"])
    assert run.data.params["trainer.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary["metrics"]["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "curves.png"} <= artifacts
    assert (cwd / "outputs" / "mlartifacts").is_dir() and not (cwd / "mlruns").exists()


def test_a_missing_tracker_package_is_one_line_with_the_pip_command(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as if not installed\n")
    result = run_dlrun(
        ["train", *MICRO_TRAIN, "logger=[csv,mlflow]"], tmp_path, env=subprocess_env(PYTHONPATH=str(hook))
    )
    error_line(result, 2, "logger=mlflow needs the mlflow package", "pip install 'dlrun[mlflow]'")
    assert run_dirs(tmp_path) == []  # refused before training: no run left behind


def test_an_unknown_logger_is_one_line(tmp_path):
    error_line(
        run_dlrun(["train", "logger=[csv,tensorbord]"], tmp_path), 2, "unknown logger 'tensorbord'", "tensorboard"
    )


def test_flatten_and_metric_names():
    assert trackers.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}
    assert [trackers.scalar_tag(k) for k in ("train_loss", "val_r2", "lr")] == ["train/loss", "val/r2", "lr"]
    summary = {"metrics": {"test": {"accuracy": 0.5, "confusion_matrix": [[1]], "bad": float("nan")}, "val": {}}}
    assert trackers.result_metrics(summary) == {"test_accuracy": 0.5}
    assert trackers.result_metrics({"metrics": {"val": {"loss": 1}}}) == {"best_val_loss": 1.0}
