"""`dlrun tune`: an Optuna study whose trials are train run directories, pruned per epoch, resumable after a crash,
with best.yaml replayable through `dlrun train`."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import PYTHON, Result, error_line, ok, read_jsonl, run_dlrun, subprocess_env

# A linear model on digits, two epochs per trial: a trial takes about a second. Median pruning from the second trial
# on, at any epoch: with the sampler's seed 0 trial 2 draws a learning rate ~5x lower than trials 0-1 and is
# behind the median after epoch 1.
TUNE = (
    "tune",
    "search=lr",
    "trainer.device=cpu",
    "trainer.deterministic=true",
    "trainer.epochs=2",
    "model=linear",
    "pruner.startup_trials=1",
    "pruner.warmup_epochs=0",
)


def sweep_dirs(cwd: Path) -> list[Path]:
    root = cwd / "outputs" / "tune"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def trials(sweep: Path) -> list[dict]:
    with (sweep / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Result]:
    cwd = tmp_path_factory.mktemp("tune")
    result = ok(run_dlrun([*TUNE, "n_trials=3"], cwd))
    (sweep,) = sweep_dirs(cwd)
    return sweep, result


def test_a_study_writes_its_trials_as_train_runs_with_table_plots_and_best(study):
    sweep, result = study
    rows = trials(sweep)
    assert [row["trial"] for row in rows] == ["0", "1", "2"]
    assert (sweep / "study.db").is_file()
    for name in ("optimization_history.png", "param_importances.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"
    for row in rows:  # every trial, pruned or not, is a complete train run directory with its config snapshot
        trial_dir = sweep / "trials" / row["trial"]
        assert json.loads((trial_dir / "summary.json").read_text())["command"] == "train"
        assert (trial_dir / ".hydra" / "overrides.yaml").is_file() and (trial_dir / "train.log").is_file()
    assert "dlrun tune: " in result.stdout and "replay: dlrun train" in result.stdout


def test_the_pruner_stops_trials_behind_the_median_after_one_epoch(study):
    sweep, _ = study
    rows = trials(sweep)
    states = {row["trial"]: row["state"] for row in rows}
    assert states["0"] == "complete"  # the pruner's startup trial
    pruned = [row for row in rows if row["state"] == "pruned"]
    assert pruned, states
    complete_values = [float(row["value"]) for row in rows if row["state"] == "complete"]
    for row in pruned:
        epochs = read_jsonl(sweep / "trials" / row["trial"] / "metrics.jsonl")
        assert [e["epoch"] for e in epochs] == [1]  # stopped after the first of two epochs
        assert epochs[0]["val_accuracy"] < max(complete_values)
    for row in rows:
        if row["state"] == "complete":
            assert len(read_jsonl(sweep / "trials" / row["trial"] / "metrics.jsonl")) == 2


def test_best_yaml_replays_through_dlrun_train(study, tmp_path):
    sweep, _ = study
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    rows = {row["trial"]: row for row in trials(sweep)}
    assert best["value"] == max(float(r["value"]) for r in rows.values() if r["state"] == "complete")
    assert f"optimizer.lr={rows[str(best['trial'])]['optimizer.lr']}" in best["overrides"]
    ok(run_dlrun(["train", *best["overrides"]], tmp_path))
    (replayed,) = (tmp_path / "outputs" / "train").iterdir()
    summary = json.loads((replayed / "summary.json").read_text())
    assert summary["metrics"]["val"]["accuracy"] == pytest.approx(best["value"])  # deterministic: the same run


# Kills the process (SIGKILL: no cleanup at all) as the second trial starts its second epoch.
KILL_IN_TRIAL_1 = """
import os, signal
import dlrun.training.loop as loop
train_epoch = loop.train_epoch
calls = []
def killed(*args, **kwargs):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_epoch(*args, **kwargs)
loop.train_epoch = killed
from dlrun.cli import main
main()
"""


def test_a_crashed_study_resumes_without_repeating_finished_trials(tmp_path):
    args = [*TUNE, "pruner.name=none", "n_trials=2"]
    killed = subprocess.run(
        [PYTHON, "-c", KILL_IN_TRIAL_1, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr
    (sweep,) = sweep_dirs(tmp_path)
    first = (sweep / "trials" / "0" / "summary.json").read_bytes()
    assert not (sweep / "trials" / "1" / "summary.json").exists()

    ok(run_dlrun(["tune", f"resume={sweep}", "n_trials=3"], tmp_path))  # the replayed study, one trial more
    rows = trials(sweep)
    assert [(r["trial"], r["state"]) for r in rows] == [
        ("0", "complete"),
        ("1", "interrupted"),
        ("2", "complete"),  # trial 1's params asked again
        ("3", "complete"),  # n_trials=3: one more
    ]
    assert rows[2]["optimizer.lr"] == rows[1]["optimizer.lr"]
    assert (sweep / "trials" / "0" / "summary.json").read_bytes() == first  # not run again
    assert sweep_dirs(tmp_path) == [sweep]  # continued in place


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["tune", "trainer.epochs=1"], ("needs a search space", "lenet")),
        (["tune", "search=lenet", "model=linear"], ("search space param 'model.hidden'", "unknown key")),
        (["tune", "search=lr", "n_trials=0"], ("n_trials must be an integer >= 1",)),
        (["tune", "search=nope"], ("unknown search 'nope'",)),
        (["tune", "search=lr", "trainer.devices=2"], ("dlrun tune runs in one process",)),
    ],
)
def test_bad_tune_input_is_one_line_and_leaves_no_sweep(tmp_path, args, needles):
    error_line(run_dlrun(args, tmp_path), 2, *needles)
    assert sweep_dirs(tmp_path) == []


def test_resume_of_a_folder_without_a_study_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    error_line(run_dlrun(["tune", "resume=empty"], tmp_path), 2, "no study.db")


def test_a_trial_directory_evaluates_like_a_train_run(study, tmp_path):
    sweep, _ = study
    trial = sweep / "trials" / "0"
    ok(run_dlrun(["eval", f"run={trial}"], tmp_path))
    (evaluated,) = (tmp_path / "outputs" / "eval").iterdir()
    test = json.loads((trial / "summary.json").read_text())["metrics"]["test"]
    assert json.loads((evaluated / "summary.json").read_text())["metrics"]["test"]["accuracy"] == test["accuracy"]
