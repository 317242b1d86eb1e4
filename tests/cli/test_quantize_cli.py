"""`dlrun quantize` end to end through the CLI: every mode x backend, what a run leaves behind, and refusals.

The fast tests share one tiny digits LeNet (conftest `trained_run`) and one ptq-xnnpack run (`ptq_run`);
the accuracy targets on the real default model (`dlrun train` with no overrides) are a slow test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlrun.config import capabilities
from helpers import (
    CHEAP_QUANTIZE,
    ONE_THREAD_ENV,
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
COMPARISON_KEYS = {
    "runtime",
    "size_ratio",
    "program_size_ratio",
    "latency_speedup",
    "throughput_speedup",
    "max_abs_diff",
}


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def load_exported(path: Path) -> torch.export.ExportedProgram:
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops and torchao tensor types

    return torch.export.load(path)


def only_run(cwd: Path, command: str = "quantize") -> Path:
    (run,) = run_dirs(cwd, command)
    return run


def assert_quantize_summary(
    summary: dict, *, mode: str, backend: str, train_run: Path, cwd: Path, task: str = "classification"
) -> None:
    assert summary["command"] == "quantize" and summary["mode"] == mode and summary["backend"] == backend
    test, fp32, comparison = summary["metrics"]["test"], summary["metrics"]["fp32"], summary["comparison"]
    assert test["samples"] == fp32["samples"] > 0  # the same test split for both
    assert COMPARISON_KEYS <= set(comparison), comparison
    if task == "classification":
        assert {"accuracy_drop", "top1_agreement"} <= set(comparison)
        assert comparison["accuracy_drop"] == pytest.approx(fp32["accuracy"] - test["accuracy"])
        assert comparison["top1_agreement"] == test["top1_agreement"]
    else:
        assert "accuracy" not in test and {"mse", "mae", "r2"} <= set(test) and "top1_agreement" not in comparison
        assert comparison["mse_increase"] == pytest.approx(test["mse"] - fp32["mse"])
    assert comparison["size_ratio"] == pytest.approx(test["weights_bytes"] / fp32["weights_bytes"])
    for metrics in (test, fp32):
        assert metrics["latency_ms_p50"] > 0 and metrics["throughput_b8"] > 0 and metrics["weights_bytes"] > 0
    # lineage: relative to the working directory when inside it, else absolute
    assert (cwd / summary["train_run"]).resolve() == train_run and (cwd / summary["source_run"]).resolve() == train_run
    assert summary["source_config"]["model"]["_target_"]  # what later commands rebuild the data and model from


# --- the shared ptq run --------------------------------------------------------------------------------------


def test_ptq_xnnpack_run_directory_and_summary(ptq_run, pipeline):
    run, _, _ = ptq_run
    assert run.parent == (pipeline.cwd / "outputs" / "quantize").resolve()
    assert {p.name for p in (run / ".hydra").iterdir()} >= {"config.yaml", "overrides.yaml", "hydra.yaml"}
    assert "mode=ptq" in (run / "quantize.log").read_text()
    assert (run / "model.pt2").stat().st_size > 0
    summary = summary_of(run)
    assert_quantize_summary(summary, mode="ptq", backend="xnnpack", train_run=pipeline.train_run, cwd=pipeline.cwd)
    assert summary["program"].endswith("model.pt2") and summary["qat_epochs"] == []
    comparison = summary["comparison"]
    assert comparison["runtime"] == "executorch xnnpack .pte"
    assert comparison["top1_agreement"] >= 0.95 and abs(comparison["accuracy_drop"]) <= 0.03
    assert comparison["size_ratio"] < 0.45  # int8 weights; the tiny model's float biases and BN keep it above 1/4


def test_quantize_leaves_the_source_run_untouched(ptq_run):
    _, before, after = ptq_run
    assert before and after == before


def test_eval_of_a_quantize_run_reports_the_quantize_accuracy(ptq_run, pipeline, cli):
    run, _, _ = ptq_run
    ok(cli("eval", f"run={run}", "latency_repeats=5", env=ENV))
    evaluated = summary_of(only_run(cli.cwd, "eval"))
    assert evaluated["kind"] == "quantized" and evaluated["evaluated"] == str(run / "model.pt2")
    assert evaluated["metrics"]["test"]["accuracy"] == summary_of(run)["metrics"]["test"]["accuracy"]
    # lineage still leads to the train run, though eval ran in another directory than quantize
    assert Path(evaluated["train_run"]) == pipeline.train_run and Path(evaluated["source_run"]) == run


# --- the other fast modes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qat_run(trained_run, tmp_path_factory):
    """`dlrun quantize mode=qat backend=xnnpack` as typed (latest train run), shortened to one epoch."""
    cwd = tmp_path_factory.mktemp("qat")
    train_run = copy_train_run(trained_run, cwd)
    before = tree_hashes(train_run)
    ok(run_dlrun(["quantize", "mode=qat", "backend=xnnpack", "quantizer.epochs=1", *CHEAP_QUANTIZE], cwd, env=ENV))
    return only_run(cwd).resolve(), train_run, before


def test_qat_xnnpack_fine_tunes_and_records_each_epoch(qat_run):
    run, train_run, before = qat_run
    summary = summary_of(run)
    assert_quantize_summary(summary, mode="qat", backend="xnnpack", train_run=train_run, cwd=run.parents[2])
    (row,) = summary["qat_epochs"]
    assert row["epoch"] == 1 and {"train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(row)
    assert read_jsonl(run / "metrics.jsonl") == summary["qat_epochs"]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    assert summary["comparison"]["top1_agreement"] >= 0.9
    assert tree_hashes(train_run) == before  # fine-tuning works on a copy of the weights


def test_weight_only_int8_keeps_excluded_layers_float_in_the_saved_program(trained_run, cli):
    """torchao weight-only int8 on the Linear layers, lenet's last Linear (head.4) excluded."""
    ok(
        cli(
            "quantize",
            "mode=weight_only",
            "quantizer.dtype=int8",
            "quantizer.exclude=[head.4]",
            f"run={trained_run.run_dir}",
            *CHEAP_QUANTIZE,
            env=ENV,
        )
    )
    run = only_run(cli.cwd)
    summary = summary_of(run)
    assert_quantize_summary(summary, mode="weight_only", backend="torchao", train_run=trained_run.run_dir, cwd=cli.cwd)
    assert summary["dtype"] == "int8" and summary["comparison"]["runtime"].startswith("eager pytorch")
    assert summary["comparison"]["top1_agreement"] >= 0.98
    weights = load_exported(run / "model.pt2").state_dict
    assert (
        type(weights["head.1.weight"]).__name__ == "Int8Tensor" and weights["head.1.weight"].qdata.dtype == torch.int8
    )
    assert type(weights["head.4.weight"]) in (torch.Tensor, torch.nn.Parameter)  # excluded: a plain float tensor
    assert weights["head.4.weight"].dtype == torch.float32


# --- refusals: one line, exit 2, nothing written ---------------------------------------------------------------

REFUSED = {
    "weight_only on xnnpack": (("mode=weight_only", "backend=xnnpack"), ("mode=weight_only", "backend=torchao")),
    "ptq on torchao": (("mode=ptq", "backend=torchao"), ("mode=ptq", "xnnpack or x86_inductor")),
    "unknown backend": (("backend=nosuch",), ("'nosuch'", "xnnpack, x86_inductor, torchao")),
    "no calibration": (("quantizer.calib_batches=0",), ("quantizer.calib_batches must be >= 1",)),
    "unknown exclude": (("quantizer.exclude=[head.44]",), ("no module 'head.44'", "did you mean head.4")),
}


@pytest.mark.parametrize("case", REFUSED)
def test_quantize_refuses_in_one_line(case, trained_run, cli):
    args, needles = REFUSED[case]
    error_line(cli("quantize", *args, f"run={trained_run.run_dir}", env=ENV), 2, *needles)
    assert not any((run / "summary.json").exists() for run in run_dirs(cli.cwd, "quantize"))


def test_quantize_without_a_train_run_says_to_train_first(cli):
    error_line(
        cli("quantize", "mode=qat", "backend=xnnpack", env=ENV), 2, "no completed train run", "run `dlrun train` first"
    )


def test_quantize_refuses_a_corrupt_source_checkpoint(trained_run, cli):
    broken = copy_train_run(trained_run, cli.cwd)
    best = broken / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:2000])
    error_line(
        cli("quantize", env=ENV),
        2,
        str(Path("outputs/train") / broken.name / "checkpoints" / "best.pt"),
        "truncated or corrupt",
    )


# --- slow: the remaining combinations, other models and tasks, the real default model's targets ------------------

SLOW_COMBINATIONS = [
    ("dynamic", "xnnpack", ()),
    ("dynamic", "x86_inductor", ()),
    ("ptq", "x86_inductor", ("quantizer.calib_batches=4",)),
    ("qat", "x86_inductor", ("quantizer.epochs=1",)),
    ("weight_only", "torchao", ("quantizer.dtype=int4", "quantizer.group_size=16")),
    ("weight_only", "torchao", ("quantizer.dtype=int8_dynamic",)),
]


def test_slow_combinations_cover_every_capability():
    fast = {("ptq", "xnnpack"), ("qat", "xnnpack"), ("weight_only", "torchao")}
    assert {(m, b) for m, b, _ in SLOW_COMBINATIONS} | fast == set(capabilities.CAPABILITIES)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "backend", "extra"),
    SLOW_COMBINATIONS,
    ids=[f"{m}-{e[0].split('=')[1] if m == 'weight_only' else b}" for m, b, e in SLOW_COMBINATIONS],
)
def test_mode_backend_end_to_end(mode, backend, extra, trained_run, cli):
    ok(
        cli(
            "quantize",
            f"mode={mode}",
            f"backend={backend}",
            *extra,
            f"run={trained_run.run_dir}",
            *CHEAP_QUANTIZE,
            env=ENV,
        )
    )
    summary = summary_of(only_run(cli.cwd))
    assert_quantize_summary(summary, mode=mode, backend=backend, train_run=trained_run.run_dir, cwd=cli.cwd)
    assert summary["comparison"]["top1_agreement"] >= 0.9
    if backend == "x86_inductor":
        assert summary["comparison"]["runtime"] == "torch.compile (inductor)"


@pytest.mark.slow
def test_ptq_exclude_keeps_the_module_float_in_the_saved_program(trained_run, cli):
    ok(
        cli(
            "quantize",
            "mode=ptq",
            "quantizer.exclude=[head.4]",
            "quantizer.calib_batches=4",
            f"run={trained_run.run_dir}",
            *CHEAP_QUANTIZE,
            env=ENV,
        )
    )
    program = load_exported(only_run(cli.cwd) / "model.pt2")
    linears = [n for n in program.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2
    first, last = linears
    assert "dequantize_per_channel" in str(first.args[1].target)  # head.1: int8 weight, dequantized for the op
    assert last.args[1].op == "placeholder"  # head.4: its float weight goes straight in
    assert program.state_dict["head.4.weight"].dtype == torch.float32
    assert not [user for user in last.users if "quantize" in str(user.target)]  # and its output stays float


@pytest.mark.slow
def test_regression_model_quantizes_with_regression_metrics(cli):
    ok(cli("train", "dataset=diabetes", "model=mlp", "trainer.epochs=3", "trainer.device=cpu", env=ENV))
    ok(cli("quantize", "mode=ptq", "quantizer.calib_batches=4", *CHEAP_QUANTIZE, env=ENV))
    summary = summary_of(only_run(cli.cwd))
    assert_quantize_summary(
        summary,
        mode="ptq",
        backend="xnnpack",
        train_run=only_run(cli.cwd, "train").resolve(),
        cwd=cli.cwd,
        task="regression",
    )
    assert summary["comparison"]["mse_increase"] < 0.05 * summary["metrics"]["fp32"]["mse"]


@pytest.mark.slow
def test_resnet_on_synthetic_images_quantizes_with_ptq(cli):
    """Shape coverage: residual adds, a stride-2 stage and global pooling through PT2E and XNNPACK lowering."""
    ok(
        cli(
            "train",
            "model=resnet",
            "model.widths=[8,8,16]",
            "dataset=synthetic",
            "dataset.num_samples=256",
            "trainer.epochs=1",
            "trainer.device=cpu",
            env=ENV,
        )
    )
    ok(cli("quantize", "mode=ptq", "quantizer.calib_batches=4", *CHEAP_QUANTIZE, env=ENV))
    summary = summary_of(only_run(cli.cwd))
    assert_quantize_summary(
        summary, mode="ptq", backend="xnnpack", train_run=only_run(cli.cwd, "train").resolve(), cwd=cli.cwd
    )
    assert summary["comparison"]["top1_agreement"] >= 0.9 and summary["comparison"]["size_ratio"] < 0.35


@pytest.mark.slow
def test_default_model_meets_the_quantization_targets(cli):
    """The issue's targets, on `dlrun train` as shipped (digits + LeNet): ptq loses <= 0.5 pt of accuracy, qat
    <= 0.2 pt, and int8 weights take <= 0.3 of the fp32 bytes. `quantize mode=qat backend=xnnpack` runs as typed."""
    ok(cli("train", env=ENV))
    assert summary_of(only_run(cli.cwd, "train"))["metrics"]["test"]["accuracy"] >= 0.99
    ok(cli("quantize", "mode=ptq", "backend=xnnpack", "latency_repeats=5", env=ENV))
    ok(cli("quantize", "mode=qat", "backend=xnnpack", env=ENV))
    ptq, qat = (summary_of(run) for run in run_dirs(cli.cwd, "quantize"))
    assert ptq["mode"] == "ptq" and qat["mode"] == "qat" and len(qat["qat_epochs"]) == 3
    assert ptq["comparison"]["accuracy_drop"] <= 0.005, ptq["comparison"]
    assert qat["comparison"]["accuracy_drop"] <= 0.002, qat["comparison"]
    assert ptq["comparison"]["size_ratio"] <= 0.3 and qat["comparison"]["size_ratio"] <= 0.3
