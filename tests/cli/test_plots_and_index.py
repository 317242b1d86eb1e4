"""Plots every train-contract run writes (curves.png, confusion_matrix.png) and `dlrun ls runs`, the index of past
runs under outputs/: status (finished / interrupted / failed / unreadable), headline test metric, filters."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from dlrun.core import run_index
from helpers import TINY_MODEL, error_line, ok, run_dirs, run_dlrun

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, asserting a PNG signature and more than 5 kB of image."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    assert len(data) > 5_000, f"{path}: only {len(data)} bytes"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-epoch digits run (the train recipe, so session.fit's callbacks) in its own working directory."""
    cwd = tmp_path_factory.mktemp("plots")
    ok(run_dlrun(["train", "trainer.epochs=2", *TINY_MODEL, "trainer.device=cpu", "name=tiny"], cwd))
    (run,) = run_dirs(cwd)
    return run.resolve()


def outputs_with(tiny_run: Path, tmp_path: Path) -> Path:
    """A fresh working directory whose outputs/train/ holds a copy of the tiny run; returns the working directory."""
    shutil.copytree(tiny_run, tmp_path / "outputs" / "train" / tiny_run.name)
    return tmp_path


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of a rich table as lists of stripped cells."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")] for line in stdout.splitlines() if line.startswith("│")
    ]


def test_train_writes_valid_curves_and_confusion_matrix(tiny_run):
    width, height = png_size(tiny_run / "curves.png")
    assert width > 1200 and 250 < height < width / 2  # loss, val accuracy, val top5, lr side by side
    width, height = png_size(tiny_run / "confusion_matrix.png")
    assert 0.8 < width / height < 1.6
    assert not list(tiny_run.glob(".*.tmp"))


def test_ls_runs_lists_the_finished_run_with_its_test_accuracy(tiny_run, tmp_path):
    cwd = outputs_with(tiny_run, tmp_path)
    summary = json.loads((tiny_run / "summary.json").read_text())
    out = ok(run_dlrun(["ls", "runs"], cwd)).stdout
    (row,) = table_rows(out)
    assert row[:2] == ["train", tiny_run.name]
    assert "finished" in row
    assert f"{summary['metrics']['test']['accuracy']:.4f}" in row
    assert str(summary["metrics"]["test"]["samples"]) in row  # 359 test images
    assert str(summary["params"]) in row


def test_ls_runs_status_of_interrupted_failed_and_unreadable_runs(tiny_run, tmp_path):
    cwd = outputs_with(tiny_run, tmp_path)
    interrupted = cwd / "outputs" / "train" / "2030-01-01_00-00-00_cut"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "last.pt").write_bytes(b"weights")
    (cwd / "outputs" / "train" / "2030-01-02_00-00-00_crashed" / ".hydra").mkdir(parents=True)
    unreadable = cwd / "outputs" / "eval" / "2030-01-03_00-00-00"
    unreadable.mkdir(parents=True)
    (unreadable / "summary.json").write_text('{"command": "eval", "metrics": ')
    out = ok(run_dlrun(["ls", "runs"], cwd)).stdout
    status = {row[1]: row[3] for row in table_rows(out) if row[1]}
    assert status == {
        tiny_run.name: "finished",
        "2030-01-01_00-00-00_cut": "interrupted",
        "2030-01-02_00-00-00_crashed": "failed",
        "2030-01-03_00-00-00": "unreadable",
    }
    assert "not readable JSON" in out and "Traceback" not in out


def test_ls_runs_command_and_last_filters(tiny_run, tmp_path):
    cwd = outputs_with(tiny_run, tmp_path)
    for command, name in (("eval", "2030-01-01_00-00-00"), ("train", "2030-01-02_00-00-00_newest")):
        (cwd / "outputs" / command / name / "checkpoints").mkdir(parents=True)
    only_train = table_rows(ok(run_dlrun(["ls", "runs", "--command", "train"], cwd)).stdout)
    assert [row[:2] for row in only_train] == [["train", tiny_run.name], ["train", "2030-01-02_00-00-00_newest"]]
    last = table_rows(ok(run_dlrun(["ls", "runs", "--last", "1"], cwd)).stdout)
    assert [row[1] for row in last] == ["2030-01-02_00-00-00_newest"]
    everything = table_rows(ok(run_dlrun(["ls", "runs", "--sort", "accuracy"], cwd)).stdout)
    assert everything[0][1] == tiny_run.name  # the one run with an accuracy comes first
    none = ok(run_dlrun(["ls", "runs", "--command", "export"], cwd)).stdout
    assert "no runs under outputs/export/" in none


def test_ls_runs_refuses_bad_options_in_one_line(tmp_path):
    error_line(run_dlrun(["ls", "runs", "--sort", "acuracy"], tmp_path), 2, "unknown sort key", "accuracy")
    error_line(run_dlrun(["ls", "model", "--last", "2"], tmp_path), 2, "dlrun ls runs")
    assert "no runs under outputs/" in ok(run_dlrun(["ls", "runs"], tmp_path)).stdout


def test_ls_of_config_groups_still_works(tmp_path):
    out = ok(run_dlrun(["ls", "model"], tmp_path)).stdout
    assert "lenet" in out and "runs under" not in out


def test_ls_runs_does_not_import_torch(tiny_run, tmp_path):
    cwd = outputs_with(tiny_run, tmp_path)
    result = run_dlrun(["ls", "runs"], cwd, python_args=["-X", "importtime"])
    assert result.returncode == 0, result.stderr
    modules = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "dlrun.core.run_index" in modules  # the import log is really there
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "torchvision", "executorch", "torchao", "matplotlib")}
    assert not heavy, sorted(heavy)[:5]


def test_index_reads_sweeps_lineage_and_sorts(tmp_path, monkeypatch):
    """run_index without the CLI: sweep jobs, the lineage column, lower-is-better sorting, bad metric values."""
    monkeypatch.chdir(tmp_path)
    outputs = Path("outputs")

    def summary(folder: Path, **fields) -> None:
        folder.mkdir(parents=True)
        base = {"command": "train", "checkpoint": "c", "best_epoch": 1, "epochs_run": 1, "wall_s": 1.0}
        base |= {"versions": {}, "git_commit": None, "config": {}}
        (folder / "summary.json").write_text(json.dumps(base | fields))

    summary(outputs / "train" / "multirun" / "2030-01-01_00-00-00" / "0", metrics={"test": {"mse": 30.0, "r2": 0.5}})
    summary(outputs / "train" / "multirun" / "2030-01-01_00-00-00" / "1", metrics={"test": {"mse": 20.0, "r2": 0.6}})
    summary(outputs / "train" / "2030-01-02_00-00-00", metrics={"test": {"mse": "bad", "r2": True}}, params=7)
    summary(
        outputs / "quantize" / "2030-01-03_00-00-00",
        command="quantize",
        mode="ptq",
        backend="xnnpack",
        dtype=None,
        program="model.pt2",
        size_bytes=10,
        source_run="outputs/train/2030-01-02_00-00-00",
        metrics={"test": {"accuracy": 0.9, "samples": 9}},
    )
    entries = run_index.index(outputs)
    assert [e.status for e in entries] == ["finished"] * 4, [e.reason for e in entries]
    rows = run_index.rows(entries)
    assert [row["run"] for row in rows[:2]] == ["multirun/2030-01-01_00-00-00/0", "multirun/2030-01-01_00-00-00/1"]
    assert rows[2]["mse"] is None and rows[2]["r2"] is None and rows[2]["params"] == 7  # not numbers: blank
    assert rows[3]["source run"] == "outputs/train/2030-01-02_00-00-00" and rows[3]["accuracy"] == 0.9
    by_mse = run_index.select(entries, sort="mse")
    assert [e.test.get("mse") for e in by_mse] == [20.0, 30.0, None, None]  # lower is better, missing last
    by_r2 = run_index.select(entries, sort="r2", last=3)
    assert [e.test.get("r2") for e in by_r2] == [0.6, None, None]
    assert run_index.select(entries, last=0) == []
    assert [e.command for e in run_index.index(outputs, "quantize")] == ["quantize"]


def test_an_interrupted_fit_gets_its_curves_but_no_confusion_matrix(tmp_path):
    """Plots.on_fit_end runs in Loop.fit's `finally`, after Ctrl-C too: the completed epochs' curves. The confusion
    matrix is drawn by session.fit from the test metrics of a completed fit only."""
    from types import SimpleNamespace

    from dlrun.training.callbacks import Plots

    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5, "lr": 0.01}
    loop = SimpleNamespace(
        state=SimpleNamespace(rows=[row, {**row, "epoch": 2}]), data=SimpleNamespace(task="classification")
    )
    plots = Plots(tmp_path)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        plots.on_fit_end(loop)
    png_size(tmp_path / "curves.png")
    assert not (tmp_path / "confusion_matrix.png").exists()


def test_a_command_is_a_folder_name_never_a_path(tmp_path):
    (tmp_path / "outputs" / "train" / "2030-01-01_00-00-00").mkdir(parents=True)
    for command in ("..", ".", "train/..", "../outputs"):
        assert run_index.index(tmp_path / "outputs", command) == []
    assert len(run_index.index(tmp_path / "outputs", "train")) == 1


def test_ls_runs_lists_tune_trials_with_command_last_and_sort(tiny_run, tmp_path):
    """A `dlrun tune` sweep is listed as its trials (train runs in outputs/tune/<sweep>/trials/<n>/), numbered in
    order, never as a failed run of its own; --command, --last and --sort apply to them like to any run."""
    cwd = outputs_with(tiny_run, tmp_path)
    sweep = cwd / "outputs" / "tune" / "2030-01-01_00-00-00"
    summary = json.loads((tiny_run / "summary.json").read_text())
    for number, accuracy in ((0, 0.5), (2, 0.9), (10, 0.7)):
        trial = sweep / "trials" / str(number)
        trial.mkdir(parents=True)
        summary["metrics"]["test"]["accuracy"] = accuracy
        (trial / "summary.json").write_text(json.dumps(summary))
    (sweep / "study.db").write_bytes(b"")
    tune_rows = table_rows(ok(run_dlrun(["ls", "runs", "--command", "tune"], cwd)).stdout)
    assert [(row[0], row[1], row[3]) for row in tune_rows] == [
        ("tune", f"{sweep.name}/trials/{n}", "finished") for n in (0, 2, 10)
    ]
    assert tune_rows[0][2] == "2030-01-01 00:00"  # the sweep's start
    best = table_rows(
        ok(run_dlrun(["ls", "runs", "--command", "tune", "--sort", "accuracy", "--last", "2"], cwd)).stdout
    )
    assert [row[1].rsplit("/", 1)[1] for row in best] == ["2", "10"]  # the 2 newest (2, 10), best first
    everything = table_rows(ok(run_dlrun(["ls", "runs", "--sort", "accuracy"], cwd)).stdout)
    assert len(everything) == 4 and everything[0][1].endswith("trials/2")
