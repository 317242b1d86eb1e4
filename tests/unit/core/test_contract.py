"""The run contract: every kind of summary.json survives write -> read, keeps the flat JSON layout the commands
(and users' scripts) read, and a broken summary is one UsageError line naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlrun.core import contract
from dlrun.core.errors import UsageError
from dlrun.core.sources import Source

CONFIG = {
    "model": {"_target_": "dlrun.models.zoo.lenet"},
    "dataset": {"_target_": "dlrun.data.bundled.digits"},
    "export": {"max_batch": 64, "dynamic_batch": True},
}
LINEAGE = contract.Lineage(source_run="outputs/train/a", train_run="outputs/train/a", source_config=CONFIG)
VERIFIED = contract.Verification(
    passed=True,
    samples=256,
    max_abs_diff=1e-6,
    relative_diff=2e-7,
    top1_agreement=1.0,
    accuracy=0.97,
    batch_sizes=[1, 32],
)
RECORDS = {
    "train": contract.TrainRecord(checkpoint="outputs/train/a/checkpoints/best.pt", best_epoch=3, epochs_run=4),
    "eval": contract.EvalRecord(
        kind="checkpoint", evaluated="outputs/train/a/checkpoints/best.pt", weights_bytes=40_000, file_bytes=121_000
    ),
    "quantize": contract.QuantizeRecord(
        mode="ptq", backend="xnnpack", dtype=None, program="outputs/quantize/b/model.pt2", size_bytes=30_000
    ),
    "export": contract.ExportRecord(
        format="pte",
        backend="xnnpack",
        source_kind="fp32",
        artifact="outputs/export/c/model.pte",
        size_bytes=50_000,
        max_batch=64,
        dynamic_batch=True,
        verification=VERIFIED,
    ),
    "bench": contract.BenchRecord(
        rows=[{"variant": "fp32 eager", "status": "ok", "metric": 0.97, "samples": 360}], threads=2
    ),
}


def summary_of(command: str) -> contract.Summary:
    return contract.Summary(
        command,
        CONFIG,
        wall_s=1.5,
        record=RECORDS[command],
        metrics={"test": {"accuracy": 0.97, "samples": 360}},
        lineage=None if command == "train" else LINEAGE,
        extra={"params": 1234, "flops": 5678},
        versions={"torch": "2.14.1"},
        git_commit=None,
    )


@pytest.fixture
def written(tmp_path):
    """write(command, changes) -> the path of a valid summary.json of `command` with top-level keys changed
    (a value of `...` removes the key)."""

    def write(command: str, changes: dict) -> Path:
        data = summary_of(command).to_json()
        for key, value in changes.items():
            if value is ...:
                data.pop(key)
            else:
                data[key] = value
        path = tmp_path / command / "summary.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(data))
        return path

    return write


@pytest.mark.parametrize("command", list(RECORDS))
def test_every_summary_kind_round_trips(tmp_path, command):
    summary = summary_of(command)
    contract.write_summary(tmp_path, summary)
    assert contract.read_summary(tmp_path) == summary  # a run directory or the file itself
    assert contract.read_summary(tmp_path / "summary.json", command) == summary


@pytest.mark.parametrize("command", list(RECORDS))
def test_the_json_layout_stays_flat(tmp_path, command):
    """Records, extra fields and lineage sit at top level, where existing readers look for them."""
    contract.write_summary(tmp_path, summary_of(command))
    data = json.loads((tmp_path / "summary.json").read_text())
    record = RECORDS[command]
    assert data["command"] == command and data["config"] == CONFIG and data["wall_s"] == 1.5
    assert {"metrics", "versions", "git_commit", "params", "flops"} <= set(data)
    assert all(key in data for key in record.__dataclass_fields__)
    assert ("train_run" in data) == (command != "train")  # train runs are the roots of lineages
    if command == "export":
        assert data["verification"]["passed"] is True and data["verification"]["batch_sizes"] == [1, 32]
    if command == "quantize":
        assert (data["mode"], data["backend"], data["dtype"]) == ("ptq", "xnnpack", None)


def test_an_export_summary_from_before_max_batch_was_top_level_reads_it_from_the_config(written):
    path = written(
        "export",
        {
            "max_batch": ...,
            "dynamic_batch": ...,
            "config": {**CONFIG, "export": {"max_batch": 8, "dynamic_batch": False}},
        },
    )
    record = contract.read_summary(path).record
    assert (record.max_batch, record.dynamic_batch, record.largest_batch) == (8, False, 1)


def test_summaries_without_the_optional_keys_still_read(written):
    """bench summaries had no metrics, export verifications no reason."""
    assert contract.read_summary(written("bench", {"metrics": ...})).metrics == {}
    verification = {k: v for k, v in json.loads(json.dumps(VERIFIED.__dict__)).items() if k != "reason"}
    assert contract.read_summary(written("export", {"verification": verification})).record.verification.reason == ""


BROKEN = [  # (command, changed top-level keys, the key the message must name, what it must say)
    ("quantize", {"mode": ...}, "'mode'", "missing key"),
    ("quantize", {"mode": 8}, "'mode'", "should be a string, got an integer"),
    ("quantize", {"source_config": "not a config"}, "'source_config'", "should be an object or null"),
    ("export", {"verification": {"samples": 3}}, "'verification.passed'", "missing key"),
    ("export", {"verification": [True]}, "'verification'", "should be an object, got a list"),
    ("export", {"max_batch": "64"}, "'max_batch'", "should be an integer, got a string"),
    ("train", {"best_epoch": True}, "'best_epoch'", "should be an integer, got true/false"),
    ("train", {"config": ...}, "'config'", "missing key"),
    ("eval", {"wall_s": None}, "'wall_s'", "should be a number, got null"),
    ("bench", {"command": ...}, "'command'", "missing key"),
    ("bench", {"command": "benchmark"}, "'command'", "is 'benchmark', expected one of train, eval"),
]


@pytest.mark.parametrize("command,changes,key,problem", BROKEN)
def test_a_broken_summary_is_one_line_naming_the_file_and_the_key(written, command, changes, key, problem):
    path = written(command, changes)
    with pytest.raises(UsageError) as info:
        contract.read_summary(path)
    message = str(info.value)
    assert str(path) in message and key in message and problem in message, message
    assert "\n" not in message and info.value.exit_code == 2


@pytest.mark.parametrize(
    "content,problem", [("{not json", "is not readable JSON"), ("[1, 2]", "must be a JSON object")]
)
def test_a_summary_that_is_no_json_object_is_a_usage_error(tmp_path, content, problem):
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(UsageError, match=problem):
        contract.read_summary(tmp_path)


def test_missing_summary_and_wrong_command_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        contract.read_summary(tmp_path)
    contract.write_summary(tmp_path, summary_of("quantize"))
    with pytest.raises(UsageError, match="'command' is 'quantize', expected 'export'"):
        contract.read_summary(tmp_path, "export")


def test_extra_fields_cannot_shadow_typed_ones():
    with pytest.raises(ValueError, match="mode"):
        contract.Summary("quantize", CONFIG, 1.0, RECORDS["quantize"], extra={"mode": "qat"}).to_json()


def test_lineage_of_a_source_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = tmp_path / "outputs" / "train" / "a"
    quantized = tmp_path / "outputs" / "quantize" / "b"
    source = Source("quantized", quantized / "model.pt2", CONFIG, quantized, train)
    assert source.lineage == contract.Lineage("outputs/quantize/b", "outputs/train/a", CONFIG)
    loose = Source("checkpoint", tmp_path / "best.pt", CONFIG, None, None)  # a checkpoint outside any run directory
    assert loose.lineage == contract.Lineage(None, None, CONFIG)
