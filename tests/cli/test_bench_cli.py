"""`dlrun bench` end to end: one table over the variants of a train run, found through lineage; a broken variant
is a failed row, never a crash."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers import ONE_THREAD_ENV, copy_train_run, error_line, ok, run_dirs, run_dlrun, subprocess_env

ENV = subprocess_env(**ONE_THREAD_ENV)
CHEAP_BENCH = ("warmup=1", "latency_repeats=5", "throughput_repeats=2", "throughput_batch=8")
COLUMNS = (
    "variant",
    "format",
    "status",
    "weights_mb",
    "file_mb",
    "params",
    "flops",
    "metric",
    "samples",
    "top1_agreement",
    "latency_ms_p50",
    "latency_ms_p90",
    "throughput_sps",
    "speedup",
)


def bench_run(cwd: Path) -> Path:
    runs = run_dirs(cwd, "bench")
    assert runs, "no bench run"
    return runs[-1]


@pytest.fixture
def project(pipeline, ptq_run, fp32_pte, int8_pte, tmp_path) -> Path:
    """A copy of the pipeline's outputs/ (train run, ptq run, fp32 and int8 .pte exports), free to break.
    Lineage in summaries is relative to the project directory, so the copy is a project of its own."""
    shutil.copytree(pipeline.cwd / "outputs", tmp_path / "outputs")
    return tmp_path


def test_bench_reports_every_variant_and_a_broken_one_as_failed(project, pipeline, fp32_pte):
    broken = project / "outputs" / "export" / fp32_pte.name / "model.pte"
    broken.write_bytes(broken.read_bytes()[:4000])  # truncated: the runtime cannot load it

    result = ok(run_dlrun(["bench", "formats=[eager,quantized,pte]", *CHEAP_BENCH], project, env=ENV))
    run = bench_run(project)
    assert {p.name for p in run.iterdir()} >= {
        "bench.csv",
        "bench.json",
        "bench.md",
        "bench.png",
        "summary.json",
        "bench.log",
    }
    rows = json.loads((run / "bench.json").read_text())
    by_name = {row["variant"]: row for row in rows}
    # formats= picks the rows: no torch.compile variant, and every quantize/export run of this train run
    assert set(by_name) == {
        "fp32 eager",
        "ptq xnnpack program (eager reference)",
        "pt2e_int8 .pte xnnpack",
        "fp32 .pte xnnpack",
    }
    assert len(rows) == 4 and not [r for r in rows if r["format"] == "compile"]
    assert by_name["fp32 .pte xnnpack"]["status"].startswith("failed: ")
    assert "Failed to load program" in by_name["fp32 .pte xnnpack"]["status"]
    for name, row in by_name.items():
        if name == "fp32 .pte xnnpack":
            continue
        assert row["status"] == "ok", row
        assert set(COLUMNS) <= set(row), set(COLUMNS) - set(row)
        assert row["metric"] > 0.8 and row["top1_agreement"] >= 0.95
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p90"] and row["throughput_sps"] > 0 and row["speedup"] > 0
        assert row["file_mb"] > 0 and row["params"] > 0 and row["flops"] > 0
        assert row["samples"] == by_name["fp32 eager"]["samples"] > 0  # every metric on the same test split
        assert (row["weights_mb"] is None) == (row["format"] == "pte")  # a runtime artifact has only its file size
    assert by_name["fp32 eager"]["speedup"] == 1.0 and by_name["fp32 eager"]["top1_agreement"] == 1.0
    # Sizes compare like with like: tensors with tensors. The fp32 rows' file is the train checkpoint, which also
    # holds Adam's two moments per weight.
    fp32, int8 = by_name["fp32 eager"], by_name["ptq xnnpack program (eager reference)"]
    assert int8["weights_mb"] < 0.45 * fp32["weights_mb"] and fp32["file_mb"] > 2 * fp32["weights_mb"]

    with open(run / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert set(COLUMNS) <= set(table[0]) and [r["variant"] for r in table] == [r["variant"] for r in rows]
    markdown = (run / "bench.md").read_text().splitlines()
    assert markdown[0].startswith("| variant | format |") and len(markdown) == 2 + len(rows)
    assert (run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["command"] == "bench" and summary["rows"] == rows and summary["threads"] >= 1
    assert (project / summary["train_run"]).resolve() == (
        project / "outputs" / "train" / pipeline.train_run.name
    ).resolve()
    assert "fp32 .pte xnnpack" in result.stdout and "failed" in result.stdout


def test_bench_refuses_an_unknown_format(trained_run, cli):
    error_line(
        cli("bench", f"run={trained_run.run_dir}", "formats=[eager,nosuch]", env=ENV),
        2,
        "unknown bench format(s) nosuch",
        "eager, compile, quantized, pte, pt2, onnx",
    )


@pytest.mark.slow
def test_export_missing_creates_the_standard_set_once(trained_run, cli):
    """ptq-xnnpack program, its .pte and .onnx, fp32 .pte and .onnx, each as its own run; a second bench reuses them."""
    copy_train_run(trained_run, cli.cwd)
    ok(cli("bench", "export_missing=true", *CHEAP_BENCH, env=ENV, timeout=900))
    quantized, exported = run_dirs(cli.cwd, "quantize"), run_dirs(cli.cwd, "export")
    assert len(quantized) == 1 and len(exported) == 4
    rows = json.loads((bench_run(cli.cwd) / "bench.json").read_text())
    assert all(row["status"] == "ok" for row in rows), rows
    assert [row["variant"] for row in rows] == [
        "fp32 eager",
        "fp32 torch.compile",
        "ptq xnnpack program (eager reference)",
        "pt2e_int8 .pte xnnpack",
        "fp32 .pte xnnpack",
        "fp32 .onnx onnxruntime",
        "pt2e_int8 .onnx onnxruntime",
    ]
    ok(cli("bench", "export_missing=true", "formats=[eager]", *CHEAP_BENCH, env=ENV))
    assert run_dirs(cli.cwd, "quantize") == quantized and run_dirs(cli.cwd, "export") == exported
    rows = json.loads((bench_run(cli.cwd) / "bench.json").read_text())
    assert [(r["variant"], r["status"]) for r in rows] == [("fp32 eager", "ok")]  # formats=[eager]: one row


QUANTIZED = "ptq xnnpack program (eager reference)"


def _new_run(project: Path, command: str, *args) -> Path:
    before = set(run_dirs(project, command))
    ok(run_dlrun([command, *args], project, env=ENV))
    (added,) = set(run_dirs(project, command)) - before
    return added


def _compressed(project: Path) -> tuple[Path, Path, Path]:
    """(train run, a prune run of it, a student it taught) in the project."""
    train_run = next((project / "outputs" / "train").iterdir())
    pruned = _new_run(project, "prune", f"run={train_run}", "steps=1", "finetune_epochs=0", "latency_repeats=5")
    student = ("model=lenet", "model.channels=[4,8]", "model.hidden=16", "trainer.epochs=1", "trainer.device=cpu")
    return train_run, pruned, _new_run(project, "distill", f"teacher={train_run}", *student)


def _bench_rows(project: Path, train_run: Path) -> dict[str, dict]:
    ok(run_dlrun(["bench", f"run={train_run}", "formats=[eager,quantized]", *CHEAP_BENCH], project, env=ENV))
    return {row["variant"]: row for row in json.loads((bench_run(project) / "summary.json").read_text())["rows"]}


def test_bench_lists_pruned_distilled_and_quantized_variants(project):
    """The project holds the pipeline's ptq run; a prune run and a distilled student (taught by the train run) join
    the table, each with its own params, measured on the same test split."""
    train_run, pruned, distilled = _compressed(project)
    rows = _bench_rows(project, train_run)
    expected = {"fp32 eager", "pruned 50% fp32 eager", "distilled lenet fp32 eager", QUANTIZED}
    assert expected <= set(rows), sorted(rows)
    assert all(rows[name]["status"] == "ok" for name in expected), rows
    student, fp32 = rows["distilled lenet fp32 eager"], rows["fp32 eager"]
    assert student["params"] < rows["pruned 50% fp32 eager"]["params"] < fp32["params"]
    distill_summary = json.loads((distilled / "summary.json").read_text())
    assert student["metric"] == pytest.approx(distill_summary["metrics"]["test"]["accuracy"])
    assert student["samples"] == fp32["samples"]


@pytest.mark.slow
def test_bench_lists_pruned_quantized_and_distilled_quantized_variants(project):
    train_run, pruned, distilled = _compressed(project)
    quantize = ("mode=ptq", "quantizer.calib_batches=2", "latency_repeats=5", "throughput_batch=8")
    _new_run(project, "quantize", f"run={pruned}", *quantize)
    _new_run(project, "quantize", f"run={distilled}", *quantize)
    rows = _bench_rows(project, train_run)
    expected = {f"pruned 50% {QUANTIZED}", f"distilled lenet {QUANTIZED}"}
    assert expected <= set(rows) and all(rows[name]["status"] == "ok" for name in expected), sorted(rows)
    assert rows[f"distilled lenet {QUANTIZED}"]["params"] == rows["distilled lenet fp32 eager"]["params"]
    assert rows[f"pruned 50% {QUANTIZED}"]["params"] == rows["pruned 50% fp32 eager"]["params"]
