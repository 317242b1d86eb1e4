"""`dlrun train` end to end: run directories, metrics files, summary.json, checkpoints, sweeps and resume."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time

import pytest
import torch
import yaml

from dlrun.core import rundir
from helpers import (
    MICRO_TRAIN,
    PYTHON,
    TIMESTAMP,
    TINY_EPOCHS,
    TINY_TRAIN,
    error_line,
    interrupt_when,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    run_script,
    subprocess_env,
)

COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_s"]
TIMING = {"seconds", "samples_per_s"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "rng", "config", "versions", "git_commit"}


# ---- the shared tiny run ------------------------------------------------------------------------


def test_run_directory_layout(trained_run):
    run = trained_run.run_dir
    assert run.parent == (trained_run.cwd / "outputs" / "train").resolve()
    assert re.fullmatch(TIMESTAMP + "_tiny", run.name)  # name=tiny becomes the suffix
    for path in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
        "train.log",
    ):
        assert (run / path).is_file(), path
    assert not (run / ".lock").exists()  # released when the run ends
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert set(trained_run.args[1:]) <= set(overrides)
    composed = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert composed["trainer"]["epochs"] == TINY_EPOCHS and composed["model"]["channels"] == [8, 16]


def test_progress_and_results_are_printed(trained_run):
    out = trained_run.result.stdout
    for epoch in range(1, TINY_EPOCHS + 1):
        assert f"epoch {epoch}/{TINY_EPOCHS}  train_loss" in out
    assert out.count("val_accuracy") == TINY_EPOCHS
    assert "accuracy" in out and "best epoch" in out
    log = (trained_run.run_dir / "train.log").read_text()
    assert f"epoch {TINY_EPOCHS}/{TINY_EPOCHS}" in log


def test_metrics_files_have_one_row_per_epoch(trained_run):
    rows = read_jsonl(trained_run.run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, TINY_EPOCHS + 1))
    for row in rows:
        assert set(COLUMNS) <= set(row)
        assert row["seconds"] > 0 and row["samples_per_s"] > 0 and 0 <= row["val_accuracy"] <= 1
    # scheduler=step step_epochs=1 gamma=0.5 from optimizer.lr=0.01: the lr after each epoch halves
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * 0.5**e for e in range(1, TINY_EPOCHS + 1)])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    with open(trained_run.run_dir / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert set(COLUMNS) <= set(table[0])
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        for key, value in row.items():
            assert float(line[key]) == pytest.approx(value, rel=1e-12), key


def test_summary(trained_run):
    summary = trained_run.summary
    rows = read_jsonl(trained_run.run_dir / "metrics.jsonl")
    assert summary["command"] == "train"
    test = summary["metrics"]["test"]
    assert test["samples"] == 359 and test["accuracy"] > 0.85  # chance is 0.1
    assert sum(map(sum, test["confusion_matrix"])) == 359
    assert sum(test["confusion_matrix"][i][i] for i in range(10)) == round(test["accuracy"] * 359)
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert summary["best_epoch"] == best["epoch"] and summary["epochs_run"] == TINY_EPOCHS
    assert summary["metrics"]["val"]["accuracy"] == best["val_accuracy"]
    assert summary["metrics"]["val"]["loss"] == best["val_loss"]
    # LeNet(channels=[8,16], hidden=32) on 1x8x8: conv 72 + BN 16, conv 1152 + BN 32, fc 16*2*2*32+32, fc 330
    assert summary["params"] == 72 + 16 + 1152 + 32 + (64 * 32 + 32) + (32 * 10 + 10)
    assert summary["flops"] > 0 and summary["wall_s"] > 0
    assert torch.__version__.startswith(summary["versions"]["torch"])
    commit = summary["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert summary["config"]["trainer"]["epochs"] == TINY_EPOCHS
    assert summary["config"]["model"]["input_shape"] == [1, 8, 8]  # resolved, not ${dataset.input_shape}
    assert summary["checkpoint"] == "outputs/train/" + trained_run.run_dir.name + "/checkpoints/best.pt"


def test_checkpoints_load_with_weights_only(trained_run):
    from dlrun import models

    last = torch.load(trained_run.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert CHECKPOINT_KEYS <= set(last)
    assert last["epoch"] == TINY_EPOCHS
    assert last["config"] == trained_run.summary["config"]
    assert last["versions"]["torch"] == trained_run.summary["versions"]["torch"]
    model = models.build(yaml_cfg(last["config"]).model)
    model.load_state_dict(last["model"])  # strict: the checkpoint fits the model its config describes
    best = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == trained_run.summary["best_epoch"]


def yaml_cfg(container: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(container)


# ---- run directories ---------------------------------------------------------------------------


def test_reserve_run_dir_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2030-01-01_00-00-00")
    first = rundir.reserve_run_dir("train", "../../etc")
    second = rundir.reserve_run_dir("train", "../../etc")
    assert first.name == "2030-01-01_00-00-00_etc" and second.name == "2030-01-01_00-00-00_etc-2"
    assert first.parent == second.parent == rundir.OUTPUTS / "train"
    assert rundir.sanitize_name("a b/c") == "a-b-c" and rundir.sanitize_name("..") == ""


def test_concurrent_runs_get_distinct_dirs_inside_outputs(tmp_path):
    """Two runs started together (usually in the same second), with a name that tries to escape."""
    args = [PYTHON, "-m", "dlrun", "train", *MICRO_TRAIN, "name=../../etc"]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    for d in dirs:
        assert re.fullmatch(TIMESTAMP + r"_etc(-2)?", d.name), d.name
        assert (d / "summary.json").is_file()
        assert d.resolve().is_relative_to((tmp_path / "outputs" / "train").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["train"]


def test_regression_in_a_chosen_run_dir(cli):
    """dataset=diabetes model=mlp reports mse/mae/r2 in target units; hydra.run.dir=X is where it goes."""
    result = ok(
        cli(
            "train",
            "dataset=diabetes",
            "model=mlp",
            "model.hidden=[32]",
            "trainer.epochs=3",
            "trainer.device=cpu",
            "optimizer.lr=0.01",
            "hydra.run.dir=custom/reg",
        )
    )
    run = cli.cwd / "custom" / "reg"
    assert not (cli.cwd / "outputs").exists()
    summary = json.loads((run / "summary.json").read_text())
    test = summary["metrics"]["test"]
    assert {"mse", "mae", "r2", "loss"} <= set(test) and "accuracy" not in test
    assert test["mae"] ** 2 <= test["mse"]  # Jensen
    # r2 and mse agree: r2 = 1 - mse / variance of the test targets (in the dataset's own units)
    from dlrun import data as datasets

    d = datasets.build(yaml_cfg(summary["config"]).dataset, torch.device("cpu"))
    y = d.test.y.view(-1).double() * d.target_std + d.target_mean
    assert test["r2"] == pytest.approx(1 - test["mse"] / y.var(unbiased=False).item(), rel=1e-4)
    assert 0.1 < test["r2"] < 1 and 30 < test["mae"] < 80  # a fitted model, in disease-progression units
    assert test["loss"] == pytest.approx(test["mse"] / d.target_std**2, rel=1e-4)
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 3 and {"val_mse", "val_mae", "val_r2"} <= set(rows[0])
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    for line in epoch_lines:  # one val_loss, then the regression headline metric (not val_loss twice)
        assert line.count("val_loss") == 1 and "val_r2" in line
    assert "mse" in result.stdout and "mae" in result.stdout


def test_multirun_makes_one_run_dir_per_job(cli):
    ok(cli("train", "-m", "optimizer.lr=0.01,0.002", *MICRO_TRAIN))
    (sweep,) = (cli.cwd / "outputs" / "train" / "multirun").iterdir()
    assert re.fullmatch(TIMESTAMP, sweep.name)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [json.loads((job / "summary.json").read_text())["config"]["optimizer"]["lr"] for job in jobs]
    assert lrs == [0.01, 0.002]
    for job in jobs:
        assert (job / "checkpoints" / "best.pt").is_file() and (job / ".hydra" / "overrides.yaml").is_file()


def test_cfg_job_prints_the_config_and_writes_nothing(cli):
    result = ok(cli("train", "model=resnet", "optimizer.lr=0.05", "--cfg", "job"))
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["_target_"] == "dlrun.models.ResNet" and printed["optimizer"]["lr"] == 0.05
    assert list(cli.cwd.iterdir()) == []


def test_dataset_errors_reach_the_user_as_one_line(cli):
    line = error_line(cli("train", "dataset=mnist", f"dataset.root={cli.cwd / 'data'}", "trainer.device=cpu"), 2)
    assert f"MNIST not found in {cli.cwd / 'data' / 'MNIST' / 'raw'}" in line and "train-images-idx3-ubyte" in line


# ---- resume ------------------------------------------------------------------------------------

# Ctrl-C as epoch 3 is about to start: last.pt holds epoch 2.
INTERRUPT_AT_EPOCH_3 = interrupt_when("dlrun.training.loop:train_epoch", epoch=3)


def assert_same_training(run_dir, reference_dir):
    """Bitwise-equal final weights and optimizer state; equal metric rows except wall-clock timings."""
    mine = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ref = torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)
    assert mine["epoch"] == ref["epoch"] == TINY_EPOCHS
    assert mine["model"].keys() == ref["model"].keys()
    for key in ref["model"]:
        assert torch.equal(mine["model"][key], ref["model"][key]), key
    for index, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["optimizer"]["state"][index][name], value), (index, name)
    assert mine["scheduler"] == ref["scheduler"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(read_jsonl(reference_dir / "metrics.jsonl"))
    assert (
        json.loads((run_dir / "summary.json").read_text())["metrics"]
        == json.loads((reference_dir / "summary.json").read_text())["metrics"]
    )


def test_interrupted_run_resumes_to_the_same_result(trained_run, tmp_path):
    """Ctrl-C after 2 epochs, then the printed resume command with a larger budget == 4 epochs straight.

    The run is started with trainer.epochs=3 and resumed with `resume=RUN trainer.epochs=4`, so the
    override given at resume time must win over the replayed trainer.epochs=3 of the original run.
    Equal to trained_run (4 epochs straight) only because the step schedule does not depend on
    trainer.epochs (cosine and one-cycle stretch with it; extending those is a different experiment).
    """
    args = ["train", *TINY_TRAIN, "trainer.epochs=3", "name=interrupted"]
    line = error_line(run_script(INTERRUPT_AT_EPOCH_3, args, tmp_path), 130, "interrupted", "dlrun train resume=")
    (run,) = run_dirs(tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()

    resume_arg = line.split("dlrun train ", 1)[1].strip()  # resume=outputs/train/<dir>, as printed
    assert resume_arg == f"resume={run.relative_to(tmp_path)}"  # relative to where the user ran it
    result = ok(run_dlrun(["train", resume_arg, f"trainer.epochs={TINY_EPOCHS}"], tmp_path))
    assert "resuming" in result.stdout and "after epoch 2" in result.stdout
    assert f"epoch {TINY_EPOCHS}/{TINY_EPOCHS}" in result.stdout
    assert run_dirs(tmp_path) == [run]  # continued in place, no new run directory
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.epochs=3" in overrides and overrides[-1] == f"trainer.epochs={TINY_EPOCHS}"
    assert json.loads((run / "summary.json").read_text())["config"]["trainer"]["epochs"] == TINY_EPOCHS
    assert_same_training(run, trained_run.run_dir)


@pytest.mark.slow
def test_extending_a_finished_run_with_more_epochs(trained_run, cli):
    """A finished 2-epoch run, then `resume=RUN trainer.epochs=4`: same dir, == 4 epochs straight."""
    ok(cli("train", *TINY_TRAIN, "trainer.epochs=2", "name=short"))
    (run,) = run_dirs(cli.cwd)
    two = read_jsonl(run / "metrics.jsonl")
    ok(cli("train", f"resume={run}", f"trainer.epochs={TINY_EPOCHS}"))
    assert run_dirs(cli.cwd) == [run]
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[:2] == two  # the first two epochs' rows are kept as they were
    assert json.loads((run / "summary.json").read_text())["config"]["trainer"]["epochs"] == TINY_EPOCHS
    assert_same_training(run, trained_run.run_dir)


def test_resume_needs_a_train_run_directory(cli):
    (cli.cwd / "empty").mkdir()
    error_line(cli("train", "resume=empty"), 2, "cannot resume empty: no checkpoints/last.pt")
    assert not (cli.cwd / "outputs").exists()


def test_resuming_a_finished_run_or_stretching_its_schedule_says_so(trained_run, tmp_path):
    """A finished run resumed re-evaluates and rewrites its summary, and more epochs stretch its schedule:
    each says so in one line."""
    import shutil

    run = tmp_path / "outputs" / "train" / trained_run.run_dir.name
    shutil.copytree(trained_run.run_dir, run)
    again = ok(run_dlrun(["train", f"resume={run}"], tmp_path))
    assert f"already finished its {TINY_EPOCHS} epochs" in again.stdout and "summary.json rewritten" in again.stdout
    longer = ok(run_dlrun(["train", f"resume={run}", f"trainer.epochs={TINY_EPOCHS + 1}"], tmp_path))
    assert f"trainer.epochs {TINY_EPOCHS} -> {TINY_EPOCHS + 1}" in longer.stdout and "stretched" in longer.stdout
