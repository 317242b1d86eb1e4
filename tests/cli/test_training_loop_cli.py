"""The one training loop seen from the CLI: QAT writes train's metric rows, NaN never becomes best.pt, and Ctrl-C
says how to resume only when there is something to resume."""

from __future__ import annotations

import csv

import torch

from dlrun.core import checkpoint
from helpers import (
    CHEAP_QUANTIZE,
    INTERRUPT_IN_EPOCH_1,
    ONE_THREAD_ENV,
    TINY_EPOCHS,
    TINY_MODEL,
    TINY_TRAIN,
    copy_train_run,
    error_line,
    interrupt_when,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    run_script,
    subprocess_env,
)

ENV = subprocess_env(**ONE_THREAD_ENV)
TIMING = {"seconds", "samples_per_s"}


def csv_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_qat_writes_the_metric_rows_of_train(trained_run, tmp_path):
    copy_train_run(trained_run, tmp_path)
    ok(run_dlrun(["quantize", "mode=qat", "backend=xnnpack", "quantizer.epochs=2", *CHEAP_QUANTIZE], tmp_path, env=ENV))
    (qat_run,) = run_dirs(tmp_path, "quantize")
    train_header, _ = csv_rows(trained_run.run_dir / "metrics.csv")
    qat_header, qat_rows = csv_rows(qat_run / "metrics.csv")
    assert qat_header == train_header  # epoch, train_loss, val_loss, val_accuracy, val_top5, lr, seconds, samples_per_s
    assert [int(row["epoch"]) for row in qat_rows] == [1, 2]
    assert [list(row) for row in read_jsonl(qat_run / "metrics.jsonl")] == [train_header] * 2


# SGD at lr=1e6 blows the weights up within epoch 1: its val loss is NaN (while its val accuracy is a finite 0.1,
# which would beat "no best yet"), and in epoch 2 every batch's loss is NaN.
DIVERGING = (*TINY_TRAIN, "optimizer=sgd", "optimizer.lr=1e6", "trainer.nan_policy=skip_batch")


def assert_no_nan_best(run) -> None:
    best = run / "checkpoints" / "best.pt"
    if best.exists():
        assert all(torch.isfinite(w).all() for w in checkpoint.load(best)["model"].values() if w.is_floating_point())


def test_diverging_run_with_skip_batch_keeps_nan_out_of_best_pt_and_advises_other_settings(tmp_path):
    line = error_line(run_dlrun(["train", *DIVERGING, "trainer.epochs=2"], tmp_path), 1, "NaN/inf", "optimizer.lr")
    assert "nan_policy" not in line  # skip_batch is in use: advising it would be useless
    (run,) = run_dirs(tmp_path)
    assert_no_nan_best(run)
    assert not (run / "checkpoints" / "best.pt").exists()  # the only completed epoch validated to NaN
    assert [row["epoch"] for row in read_jsonl(run / "metrics.jsonl")] == [1]


def test_a_run_whose_every_epoch_validates_to_nan_says_there_is_no_best_checkpoint(tmp_path):
    line = error_line(run_dlrun(["train", *DIVERGING, "trainer.epochs=1"], tmp_path), 1, "no best.pt", "optimizer.lr")
    assert "nan_policy" not in line
    (run,) = run_dirs(tmp_path)
    assert_no_nan_best(run)
    assert not (run / "summary.json").exists()


def test_ctrl_c_in_epoch_1_resumes_from_epoch_0_to_the_same_result(trained_run, tmp_path):
    args = ["train", *TINY_TRAIN, f"trainer.epochs={TINY_EPOCHS}"]
    line = error_line(run_script(INTERRUPT_IN_EPOCH_1, args, tmp_path), 130, "interrupted", "dlrun train resume=")
    (run,) = run_dirs(tmp_path)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 0
    result = ok(run_dlrun(["train", line.split("dlrun train ", 1)[1].strip()], tmp_path))
    assert "after epoch 0" in result.stdout
    mine, straight = (checkpoint.load(r / "checkpoints" / "last.pt")["model"] for r in (run, trained_run.run_dir))
    assert all(torch.equal(mine[key], straight[key]) for key in straight)  # the same run as one without Ctrl-C
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(trained_run.run_dir / "metrics.jsonl"))


# A real SIGINT while the model is being built, before any checkpoint exists.
INTERRUPT_BEFORE_TRAINING = interrupt_when("dlrun.models:build")


def test_ctrl_c_before_the_first_checkpoint_does_not_offer_a_resume(tmp_path):
    args = ["train", "trainer.device=cpu", *TINY_MODEL]
    result = run_script(INTERRUPT_BEFORE_TRAINING, args, tmp_path)
    line = error_line(result, 130, "interrupted", "nothing to resume")
    assert "resume=" not in line
    (run,) = run_dirs(tmp_path)
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / ".lock").exists()
