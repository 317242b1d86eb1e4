"""`dlrun eval`: re-measuring a trained checkpoint, and refusing files that are not (safe) checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dlrun.core import checkpoint
from dlrun.core.errors import UsageError
from helpers import error_line, ok, run_dirs


def eval_summary(cwd) -> dict:
    (run,) = run_dirs(cwd, "eval")
    return json.loads((run / "summary.json").read_text())


def assert_same_test_metrics(summary: dict, trained: dict) -> None:
    test, expected = summary["metrics"]["test"], trained["metrics"]["test"]
    assert test["samples"] == expected["samples"]
    assert test["accuracy"] == expected["accuracy"]  # same split, same weights: same predictions
    assert test["confusion_matrix"] == expected["confusion_matrix"]
    assert test["loss"] == pytest.approx(expected["loss"], rel=1e-5)  # batch size differs: float sums may not
    assert summary["params"] == trained["params"] and summary["flops"] == trained["flops"]
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p90"]
    assert summary["kind"] == "checkpoint"
    # the weights alone: the checkpoint file also holds Adam's two moments per weight, so it is ~3x larger
    assert 0 < summary["weights_bytes"] < summary["file_bytes"] / 2


def test_eval_checkpoint(trained_run, cli):
    best = trained_run.run_dir / "checkpoints" / "best.pt"
    result = ok(cli("eval", f"ckpt={best}", "latency_repeats=5"))
    summary = eval_summary(cli.cwd)
    assert summary["command"] == "eval" and summary["evaluated"] == str(best)
    assert_same_test_metrics(summary, trained_run.summary)
    assert f"{trained_run.summary['metrics']['test']['accuracy']:.4f}" in result.stdout
    assert summary["train_run"] == str(trained_run.run_dir)  # lineage back to the train run


def test_eval_run_directory(trained_run, cli):
    ok(cli("eval", f"run={trained_run.run_dir}", "latency_repeats=5"))
    summary = eval_summary(cli.cwd)
    assert summary["evaluated"] == str(trained_run.run_dir / "checkpoints" / "best.pt")
    assert summary["source_run"] == str(trained_run.run_dir)
    assert_same_test_metrics(summary, trained_run.summary)


def test_eval_without_any_run_says_to_train_first(cli):
    error_line(cli("eval"), 2, "no completed train run", "run `dlrun train` first")


class Marker:
    """Unpickling this would create a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def bad_files(tmp_path, trained_run):
    """Files that `dlrun eval ckpt=...` must refuse, and the marker a code-running one would create."""
    marker = tmp_path / "PWNED"
    real = (trained_run.run_dir / "checkpoints" / "best.pt").read_bytes()
    files = {
        "malicious": tmp_path / "malicious.pt",
        "truncated": tmp_path / "truncated.pt",
        "garbage": tmp_path / "garbage.pt",
        "text": tmp_path / "notes.pt",
        "tensor": tmp_path / "tensor.pt",
        "no_config": tmp_path / "no_config.pt",
        "missing": tmp_path / "missing.pt",
        "empty": tmp_path / "empty.pt",
    }
    files["empty"].write_bytes(b"")
    torch.save({"model": {}, "config": {}, "payload": Marker(marker)}, files["malicious"])
    files["truncated"].write_bytes(real[: len(real) // 2])
    files["garbage"].write_bytes(bytes(range(7, 256)) * 8)  # fixed bytes: random ones can look like a zip header
    files["text"].write_text("these are not weights\n")
    torch.save(torch.zeros(3), files["tensor"])
    torch.save({"model": {}}, files["no_config"])
    return files, marker


EXPECTED = {
    "malicious": "would run Python code",
    "truncated": "is not a readable checkpoint (truncated or corrupt)",
    "garbage": "is not a torch checkpoint file",
    "text": "is not a torch checkpoint file",
    "tensor": "is not a dlrun checkpoint",
    "no_config": "is not a dlrun checkpoint",
    "missing": "does not exist",
    "empty": "is not a readable checkpoint (truncated or corrupt): the file is empty",
}


@pytest.mark.parametrize("kind", EXPECTED)
def test_checkpoint_load_refuses(bad_files, kind):
    files, marker = bad_files
    with pytest.raises(UsageError) as info:
        checkpoint.load(files[kind])
    assert str(files[kind]) in str(info.value) and EXPECTED[kind] in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_eval_refuses_a_malicious_checkpoint(bad_files, cli):
    """What the user sees for any refused file (checkpoint.load's messages are all tested above)."""
    files, marker = bad_files
    error_line(cli("eval", f"ckpt={files['malicious']}"), 2, str(files["malicious"]), EXPECTED["malicious"])
    assert not marker.exists()
    assert not any((run / "summary.json").exists() for run in run_dirs(cli.cwd, "eval"))


def test_weights_of_another_model_are_refused_listing_what_differs(trained_run, cli):
    """Not torch's multi-line message cut after "for LeNet:": the first keys missing, unexpected and misshapen."""
    from dlrun.models import ResNet

    saved = torch.load(trained_run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    saved["model"] = ResNet((1, 8, 8), 10).state_dict()
    torch.save(saved, cli.cwd / "foreign.pt")
    line = error_line(cli("eval", "ckpt=foreign.pt"), 2, "foreign.pt", "does not fit its own model config (LeNet)")
    assert "missing keys (" in line and "unexpected keys (" in line and "shape mismatches, file vs model (" in line
    assert "features.0.0.weight (16, 1, 3, 3) vs (8, 1, 3, 3)" in line  # TINY_MODEL: 8 channels, ResNet's stem 16
