"""`dlrun distill` end to end: a small student taught by a trained teacher, in a train-contract run directory that
eval/quantize/export take as run=; the no-KD baseline measured beside it; Ctrl-C and resume; refused input.

One LeNet teacher (53k params, 3 epochs on digits) is trained per module and read, never written, by every test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dlrun.core import contract
from helpers import (
    ONE_THREAD_ENV,
    PYTHON,
    Result,
    assert_comparison_png,
    error_line,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    subprocess_env,
    tree_hashes,
)

TEACHER_TRAIN = (
    "trainer.device=cpu",
    "trainer.deterministic=true",
    "trainer.epochs=3",
    "optimizer.lr=0.01",
    "name=teacher",
)
STUDENT = ("model=lenet", "model.channels=[8,16]", "model.hidden=32")  # 3.7k params
DISTILL = (
    *STUDENT,
    "trainer.epochs=2",
    "baseline=true",
    "trainer.device=cpu",
    "trainer.deterministic=true",
    "optimizer.lr=0.01",
)
ENV = subprocess_env(**ONE_THREAD_ENV)


def dlrun(cwd: Path, *args) -> Result:
    return run_dlrun(args, cwd, env=ENV)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("teacher")
    ok(dlrun(cwd, "train", *TEACHER_TRAIN))
    (run,) = run_dirs(cwd)
    return run.resolve()


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory) -> tuple[Path, Result, dict, dict]:
    """The command of the issue, straight through: (run dir, result, teacher files before, after)."""
    cwd = tmp_path_factory.mktemp("distill")
    before = tree_hashes(teacher)
    result = ok(dlrun(cwd, "distill", f"teacher={teacher}", *DISTILL))
    (run,) = run_dirs(cwd, "distill")
    return run.resolve(), result, before, tree_hashes(teacher)


# ---- the run and its summary ----------------------------------------------------------------------


def test_distill_run_is_a_train_run_with_teacher_student_and_baseline_accuracies(distilled, teacher):
    run, result, teacher_before, teacher_after = distilled
    for path in (
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
        "distill.log",
        "baseline/checkpoints/best.pt",
        "baseline/metrics.jsonl",
    ):
        assert (run / path).is_file(), path
    assert not (run / ".lock").exists()
    assert teacher_after == teacher_before  # the teacher run is only read

    summary = contract.read_summary(run, "distill")  # typed and checked, as later commands read it
    assert isinstance(summary.record, contract.DistillRecord)
    assert summary.record.epochs_run == 2 and summary.record.temperature == 2.0 and summary.record.alpha == 0.5
    assert summary.record.teacher.endswith("checkpoints/best.pt") and teacher.name in summary.record.teacher
    assert summary.record.baseline_checkpoint.endswith(f"{run.name}/baseline/checkpoints/best.pt")
    assert Path(summary.lineage.source_run).name == teacher.name
    assert summary.config["dataset"] == summary.lineage.source_config["dataset"]  # the teacher's data and splits

    metrics = summary.metrics
    teacher_summary = json.loads((teacher / "summary.json").read_text())
    assert metrics["teacher"]["accuracy"] == teacher_summary["metrics"]["test"]["accuracy"]  # same model, same split
    for name in ("test", "baseline"):
        assert metrics[name]["samples"] == 359 and metrics[name]["accuracy"] > 0.3  # chance is 0.1
    comparison = summary.extra["comparison"]
    assert comparison["student"] == metrics["test"]["accuracy"]
    assert comparison["baseline"] == metrics["baseline"]["accuracy"]
    assert comparison["gain_over_baseline"] == pytest.approx(comparison["student"] - comparison["baseline"])
    assert 0 < comparison["student_teacher_agreement"] <= 1
    assert summary.extra["params"] < summary.extra["teacher_params"] / 10

    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert "distill epoch 2/2" in result.stdout and "baseline epoch 2/2" in result.stdout
    assert "teacher" in result.stdout and "baseline" in result.stdout  # the test-split table


def test_eval_rebuilds_the_student_from_the_distill_run(distilled, tmp_path):
    run, *_ = distilled
    ok(dlrun(tmp_path, "eval", f"run={run}", "device=cpu", "latency_repeats=2"))
    (evaluated,) = run_dirs(tmp_path, "eval")
    summary = json.loads((evaluated / "summary.json").read_text())
    distill = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["test"]["accuracy"] == distill["metrics"]["test"]["accuracy"]
    assert summary["params"] == distill["params"]


@pytest.mark.slow
def test_quantize_and_export_take_the_distill_run(distilled, tmp_path):
    run, *_ = distilled
    ok(
        dlrun(
            tmp_path,
            "quantize",
            f"run={run}",
            "mode=ptq",
            "backend=xnnpack",
            "quantizer.calib_batches=2",
            "latency_repeats=3",
            "throughput_batch=8",
        )
    )
    ok(dlrun(tmp_path, "export", f"run={run}", "format=pt2"))


@pytest.mark.slow
def test_with_alpha_0_the_student_is_the_baseline(teacher, tmp_path):
    """Same initial weights, seed and epochs: without the teacher's term the two fits are one and the same."""
    ok(dlrun(tmp_path, "distill", f"teacher={teacher}", *DISTILL, "distiller.alpha=0"))
    (run,) = run_dirs(tmp_path, "distill")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["test"] == summary["metrics"]["baseline"]


def test_init_from_starts_the_student_from_a_runs_weights(teacher, trained_run, tmp_path):
    """trained_run (a 4-epoch tiny LeNet) as the starting point: its architecture, and already accurate."""
    ok(
        dlrun(
            tmp_path,
            "distill",
            f"teacher={teacher}",
            f"init_from={trained_run.run_dir}",
            "trainer.epochs=1",
            "trainer.device=cpu",
            "optimizer.lr=0.0001",
        )
    )
    (run,) = run_dirs(tmp_path, "distill")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["model"] == trained_run.summary["config"]["model"]
    assert summary["params"] == trained_run.summary["params"]
    # One epoch at this lr barely moves the weights: the accuracy is trained_run's, not a fresh student's.
    assert summary["metrics"]["test"]["accuracy"] > 0.8


def test_a_structurally_pruned_run_teaches_and_is_distilled_into(teacher, tmp_path):
    """teacher= and init_from= the same prune run: the student starts as the pruned model (its narrower widths and
    weights), and the distill run's checkpoints carry those widths, so eval rebuilds the narrow student."""
    ok(dlrun(tmp_path, "prune", f"run={teacher}", "steps=1", "finetune_epochs=0", "latency_repeats=5"))
    (pruned,) = run_dirs(tmp_path, "prune")
    pruned_summary = json.loads((pruned / "summary.json").read_text())
    widths = torch.load(pruned / "checkpoints" / "best.pt", weights_only=True)["structure"]
    before = tree_hashes(pruned)
    args = (f"teacher={pruned}", f"init_from={pruned}", "trainer.epochs=1", "trainer.device=cpu", "baseline=true")
    ok(dlrun(tmp_path, "distill", *args))
    (run,) = run_dirs(tmp_path, "distill")
    assert tree_hashes(pruned) == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"] == pruned_summary["params"] < pruned_summary["before"]["params"]
    assert summary["teacher_params"] == pruned_summary["params"]
    for phase in ("", "baseline"):
        for name in ("best.pt", "last.pt"):
            saved = torch.load(run / phase / "checkpoints" / name, weights_only=True)
            assert saved["structure"] == widths, (phase, name)
    # One epoch from the pruned weights keeps the pruned model's accuracy, not a fresh student's.
    assert summary["metrics"]["test"]["accuracy"] > pruned_summary["metrics"]["test"]["accuracy"] - 0.1
    result = ok(dlrun(tmp_path, "eval", f"run={run}"))
    (evaluated,) = run_dirs(tmp_path, "eval")
    metrics = json.loads((evaluated / "summary.json").read_text())["metrics"]["test"]
    assert metrics["accuracy"] == summary["metrics"]["test"]["accuracy"], result.stdout
    assert_comparison_png(run / "comparison.png")


# ---- Ctrl-C, resume, NaN --------------------------------------------------------------------------

# A real SIGINT as the AT-th call of train_epoch begins: call 2 is the distilled student's epoch 2, call 4 the
# baseline's epoch 2 (the distilled student finished).
INTERRUPT_AT_CALL = """
import os, signal
import dlrun.training.loop as loop
at, calls, train_epoch = int(os.environ["AT"]), [], loop.train_epoch
def interrupted(*args, **kwargs):
    calls.append(kwargs["epoch"])
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGINT)
    return train_epoch(*args, **kwargs)
loop.train_epoch = interrupted
from dlrun.cli import main
main()
"""


@pytest.mark.parametrize("at", [2, pytest.param(4, marks=pytest.mark.slow)], ids=["in_kd", "in_baseline"])
def test_interrupted_distill_resumes_to_the_uninterrupted_result(distilled, teacher, tmp_path, at):
    args = [PYTHON, "-c", INTERRUPT_AT_CALL, "distill", f"teacher={teacher}", *DISTILL]
    proc = subprocess.run(
        args,
        cwd=tmp_path,
        env=subprocess_env(AT=str(at), **ONE_THREAD_ENV),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = error_line(Result(proc.returncode, proc.stdout, proc.stderr), 130, "interrupted", "dlrun distill resume=")
    (run,) = run_dirs(tmp_path, "distill")
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()
    interrupted_phase = run if at == 2 else run / "baseline"
    assert torch.load(interrupted_phase / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    resume_arg = line.split("dlrun distill ", 1)[1].strip()
    assert resume_arg == f"resume={run.relative_to(tmp_path)}"
    result = ok(dlrun(tmp_path, "distill", resume_arg))
    assert "after epoch 1" in result.stdout and run_dirs(tmp_path, "distill") == [run]  # continued in place
    reference, *_ = distilled
    for phase in ("", "baseline"):
        mine = torch.load(run / phase / "checkpoints" / "last.pt", weights_only=True)["model"]
        ref = torch.load(reference / phase / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(mine[key], ref[key]) for key in ref), phase
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert metrics == json.loads((reference / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_nan_loss_stops_as_in_train(teacher, tmp_path):
    """scheduler=step multiplies the lr by 1e30 from epoch 2: the loss overflows there and the run stops."""
    explode = ("scheduler=step", "scheduler.step_epochs=1", "scheduler.gamma=1e30")
    result = dlrun(tmp_path, "distill", f"teacher={teacher}", *DISTILL, *explode)
    error_line(result, 1, "NaN/inf at epoch 2", "trainer.nan_policy=skip_batch")
    (run,) = run_dirs(tmp_path, "distill")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()


# ---- refused input: one line, exit 2, no run left, the teacher untouched --------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "dlrun distill needs a teacher: teacher=RUN_DIR"),
        (("teacher=no/such/run",), "run directory no/such/run does not exist"),
        (("teacher=T", "distiller.alpha=1.5"), "distiller.alpha must be a number in [0, 1], got 1.5"),
        (("teacher=T", "distiller.alpha=-0.1"), "distiller.alpha must be a number in [0, 1]"),
        (("teacher=T", "distiller.temperature=0"), "distiller.temperature must be a number > 0"),
        (("teacher=T", "distiller.temperature=-2"), "distiller.temperature must be a number > 0"),
        (("teacher=T", "model.num_outputs=5"), "has 10 classes, the student 5"),
        (("teacher_ckpt=T/checkpoints/best.pt", "model.num_outputs=5"), "has 10 classes, the student 5"),
        (("teacher=T", "teacher_ckpt=T/checkpoints/best.pt"), "give only one of teacher=, teacher_ckpt="),
        (("teacher=T", "dataset=diabetes"), "the student learns on the teacher's dataset"),
        (
            ("teacher=T", "init_from=T", "model.hidden=64"),
            "sets the student (the model stored there): drop model.hidden",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(teacher, tmp_path, args, message):
    before = tree_hashes(teacher)
    args = [a.replace("=T", f"={teacher}") for a in args]
    error_line(dlrun(tmp_path, "distill", *args, "trainer.device=cpu"), 2, message)
    assert run_dirs(tmp_path, "distill") == []
    assert tree_hashes(teacher) == before


def test_a_teacher_of_another_task_is_refused(teacher, tmp_path):
    """A regression run as the student's starting point for a classification teacher."""
    ok(
        dlrun(
            tmp_path,
            "train",
            "trainer.device=cpu",
            "trainer.epochs=1",
            "model=linear",
            "dataset=synthetic",
            "dataset.task=regression",
            "dataset.input_shape=[1,8,8]",
            "dataset.num_outputs=1",
            "dataset.num_samples=64",
        )
    )
    (regression,) = run_dirs(tmp_path)
    result = dlrun(tmp_path, "distill", f"teacher={teacher}", f"init_from={regression}", "trainer.device=cpu")
    error_line(result, 2, "solves classification, the student regression")
    assert run_dirs(tmp_path, "distill") == []


def test_cfg_job_shows_the_student_and_the_distiller(tmp_path):
    printed = yaml.safe_load(ok(dlrun(tmp_path, "distill", *STUDENT, "--cfg", "job")).stdout)
    assert printed["model"]["channels"] == [8, 16] and printed["distiller"] == {"temperature": 2.0, "alpha": 0.5}
    assert list(tmp_path.iterdir()) == []
