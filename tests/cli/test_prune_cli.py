"""`dlrun prune` end to end through the CLI: a structured prune of the session's tiny digits LeNet that really
shrinks it and leaves a train-like run (checkpoints, metrics.csv per round, summary.json with lineage) that eval,
quantize, export and bench take; unstructured pruning that says it gains nothing; and refusals of bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlrun.core import checkpoint as ckpt
from helpers import (
    CHEAP_QUANTIZE,
    MICRO_TRAIN,
    ONE_THREAD_ENV,
    Pipeline,
    assert_comparison_png,
    copy_train_run,
    error_line,
    ok,
    read_jsonl,
    run_dirs,
    run_dlrun,
    subprocess_env,
    tree_hashes,
)

ENV = subprocess_env(**ONE_THREAD_ENV)
QUICK_PRUNE = ("steps=2", "finetune_epochs=1", "latency_repeats=5")
# The tiny LeNet (95% test accuracy) loses 5-9 points with half its channels and one epoch of fine-tuning per round.
MAX_ACCURACY_DROP = 0.15


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def project(trained_run, tmp_path_factory) -> Pipeline:
    cwd = tmp_path_factory.mktemp("prune")
    return Pipeline(cwd=cwd, train_run=copy_train_run(trained_run, cwd))


@pytest.fixture(scope="module")
def pruned(project) -> tuple[Path, dict, dict]:
    """`dlrun prune steps=2 finetune_epochs=1` of the only train run: (run dir, source hashes before, after)."""
    before = tree_hashes(project.train_run)
    run = project.new_run("prune", *QUICK_PRUNE)
    return run, before, tree_hashes(project.train_run)


def test_structured_prune_shrinks_the_model_and_leaves_a_train_like_run(pruned, project):
    run, source_before, source_after = pruned
    assert source_before == source_after  # nothing written into the source run
    assert {"summary.json", "metrics.csv", "metrics.jsonl", "prune.log"} <= {p.name for p in run.iterdir()}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt", "round.pt"}

    rounds = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["params"] > rounds[1]["params"] > rounds[2]["params"]
    assert rounds[0]["flops"] > rounds[1]["flops"] > rounds[2]["flops"]
    assert all({"weights_bytes", "val_accuracy", "val_loss", "test_accuracy", "test_loss"} <= set(r) for r in rounds)

    summary = summary_of(run)
    assert summary["command"] == "prune" and summary["method"] == "structured" and summary["importance"] == "magnitude"
    assert summary["ratio"] == 0.5 and summary["steps"] == 2 and summary["ignored"] == ["head.4"]
    assert (project.cwd / summary["train_run"]).resolve() == project.train_run
    assert (project.cwd / summary["source_run"]).resolve() == project.train_run
    before, after = summary["before"], summary["after"]
    assert summary["params"] == after["params"] == rounds[-1]["params"] < 0.5 * before["params"]
    assert summary["flops"] == after["flops"] < 0.5 * before["flops"]
    assert after["weights_bytes"] < 0.5 * before["weights_bytes"] and after["zeros_fraction"] == 0
    test, unpruned = summary["metrics"]["test"], summary["metrics"]["unpruned"]
    assert test["samples"] == 359 and "confusion_matrix" in test
    assert unpruned["accuracy"] == rounds[0]["test_accuracy"] > 0.9
    assert summary["comparison"]["accuracy_drop"] == pytest.approx(unpruned["accuracy"] - test["accuracy"])
    assert summary["comparison"]["accuracy_drop"] < MAX_ACCURACY_DROP
    assert summary["comparison"]["flops_kept"] == pytest.approx(after["flops"] / before["flops"])

    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)  # plain tensors, ints and strings only
    assert saved[ckpt.STRUCTURE]["features.0.0"]["out_channels"] < 8
    assert saved[ckpt.CONFIG]["model"]["channels"] == [8, 16]  # the train config: the widths come from STRUCTURE
    assert_comparison_png(run / "comparison.png")


def test_eval_takes_the_pruned_run_like_a_train_run(pruned, project):
    run, _, _ = pruned
    evaluated = summary_of(project.new_run("eval", f"run={run}", "latency_repeats=5"))
    assert evaluated["kind"] == "checkpoint" and evaluated["params"] == summary_of(run)["params"]
    assert evaluated["metrics"]["test"]["accuracy"] == pytest.approx(summary_of(run)["metrics"]["test"]["accuracy"])


@pytest.mark.slow
def test_pruned_then_int8_pte_is_the_deployment_path(pruned, project):
    """prune -> quantize ptq -> export .pte -> eval the .pte, and bench of the train run lists the pruned variants."""
    run, _, _ = pruned
    pruned_accuracy = summary_of(run)["metrics"]["test"]["accuracy"]
    quantized = project.new_run(
        "quantize", f"run={run}", "mode=ptq", "backend=xnnpack", "quantizer.calib_batches=4", *CHEAP_QUANTIZE
    )
    assert summary_of(quantized)["metrics"]["fp32"]["accuracy"] == pytest.approx(pruned_accuracy)
    assert (project.cwd / summary_of(quantized)["source_run"]).resolve() == run
    assert (project.cwd / summary_of(quantized)["train_run"]).resolve() == project.train_run  # lineage to the root
    exported = project.new_run("export", f"run={quantized}", "format=pte")
    assert summary_of(exported)["verification"]["passed"]
    evaluated = summary_of(project.new_run("eval", f"artifact={exported / 'model.pte'}", "latency_repeats=5"))
    assert evaluated["metrics"]["test"]["accuracy"] == pytest.approx(pruned_accuracy, abs=0.03)

    bench = project.new_run(
        "bench", "formats=[eager,pte]", "warmup=1", "latency_repeats=5", "throughput_repeats=2", "throughput_batch=8"
    )
    rows = {row["variant"]: row for row in summary_of(bench)["rows"]}
    assert {"fp32 eager", "pruned 50% fp32 eager", "pruned 50% pt2e_int8 .pte xnnpack"} <= set(rows)
    assert rows["pruned 50% fp32 eager"]["params"] == summary_of(run)["params"] < rows["fp32 eager"]["params"]
    assert rows["pruned 50% fp32 eager"]["weights_mb"] < 0.5 * rows["fp32 eager"]["weights_mb"]


def test_unstructured_prune_reports_that_the_dense_model_is_no_smaller(trained_run, cli):
    copy_train_run(trained_run, cli.cwd)
    result = ok(
        cli("prune", "method=unstructured", "ratio=0.6", "steps=1", "finetune_epochs=1", "latency_repeats=5", env=ENV)
    )
    (run,) = run_dirs(cli.cwd, "prune")
    summary = summary_of(run)
    before, after = summary["before"], summary["after"]
    for key in ("params", "flops", "weights_bytes"):
        assert after[key] == before[key], key
    assert after["zeros_fraction"] > 0.5 > before["zeros_fraction"]
    assert summary["method"] == "unstructured" and summary["flops_ratio"] is None
    assert "no smaller or faster" in result.stdout + result.stderr
    ok(cli("eval", f"run={run}", "latency_repeats=5", env=ENV))  # a plain state_dict again: eval loads it


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["ratio=1.5"], ["ratio must be in (0, 1)", "1.5"]),
        (["ratio=0"], ["ratio must be in (0, 1)"]),
        (["flops_ratio=1"], ["flops_ratio must be in (0, 1)"]),
        (["ignore=[featurs.0]"], ["no module 'featurs.0'", "did you mean features.0"]),
        (["method=unstructured", "importance=taylor"], ["unknown key 'pruner.importance'"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, needles, trained_run, cli):
    source = copy_train_run(trained_run, cli.cwd)
    before = tree_hashes(source)
    error_line(cli("prune", *args, env=ENV), 2, *needles)
    assert run_dirs(cli.cwd, "prune") == [] and tree_hashes(source) == before


def test_a_model_without_prunable_layers_is_refused(cli):
    ok(cli("train", *MICRO_TRAIN, env=ENV))
    error_line(cli("prune", env=ENV), 2, "nothing to prune in Linear", "output layer ('1')")
    assert run_dirs(cli.cwd, "prune") == []


# A real SIGINT as the 2nd fine-tuning epoch begins: with steps=2 finetune_epochs=1, round 1 is complete.
INTERRUPT_IN_ROUND_2 = """
import os, signal
import dlrun.training.loop as loop
calls, train_epoch = [], loop.train_epoch
def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return train_epoch(*args, **kwargs)
loop.train_epoch = interrupted
from dlrun.cli import main
main()
"""


def test_interrupted_prune_resumes_after_its_last_round_to_the_uninterrupted_result(pruned, trained_run, tmp_path):
    import subprocess

    from helpers import PYTHON, Result

    reference, _, _ = pruned
    source = copy_train_run(trained_run, tmp_path)
    proc = subprocess.run(
        [PYTHON, "-c", INTERRUPT_IN_ROUND_2, "prune", f"run={source}", *QUICK_PRUNE],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = error_line(Result(proc.returncode, proc.stdout, proc.stderr), 130, "interrupted", "dlrun prune resume=")
    (run,) = run_dirs(tmp_path, "prune")
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoints" / "round.pt", weights_only=True)["round"] == 1

    result = ok(run_dlrun(["prune", line.split("dlrun prune ", 1)[1].strip()], tmp_path, env=ENV))
    assert "after round 1 of 2" in result.stdout and run_dirs(tmp_path, "prune") == [run]  # continued in place
    assert "round 1 " not in result.stdout.split("after round 1", 1)[1]  # round 1 was not redone
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    mine = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ref = torch.load(reference / "checkpoints" / "best.pt", weights_only=True)
    assert mine[ckpt.STRUCTURE] == ref[ckpt.STRUCTURE]
    assert all(torch.equal(mine[ckpt.MODEL][k], ref[ckpt.MODEL][k]) for k in ref[ckpt.MODEL])
    strip = ("latency_ms_p50",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in read_jsonl(reference / "metrics.jsonl")
    ]
