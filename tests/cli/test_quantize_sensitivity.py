"""Accuracy-aware quantization through the CLI: `dlrun quantize max_drop=...` on a model built to have one
outlier-heavy layer keeps exactly that layer float, meets the budget, and exports; an unreachable budget refuses.

The model: a digits MLP (64 -> 32 -> 32 -> 10) whose first hidden unit is switched off (zero weights, negative
bias: ReLU always gives 0) and whose second layer reads that unit with weights of 1000. fp32 outputs are exactly
those of the model without the outliers, but per-channel int8 weights of the second layer get a scale of
1000/127 per row, which rounds every ordinary weight to zero: that layer alone collapses accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (
    CHEAP_QUANTIZE,
    ONE_THREAD_ENV,
    assert_comparison_png,
    error_line,
    ok,
    run_dirs,
    run_dlrun,
    subprocess_env,
    tree_hashes,
)

ENV = subprocess_env(**ONE_THREAD_ENV)
OUTLIER_LAYER = "4"  # nn.Sequential(Flatten, Linear, ReLU, Dropout, Linear <- this one, ReLU, Dropout, Linear)


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory) -> Path:
    """A trained MLP run, then the same run with the outlier layer (saved as a dlrun checkpoint, as train saves)."""
    cwd = tmp_path_factory.mktemp("outlier")
    args = ("train", "model=mlp", "model.hidden=[32,32]", "model.dropout=0", "trainer.epochs=6", "trainer.device=cpu")
    ok(run_dlrun(args, cwd, env=ENV))
    (trained,) = run_dirs(cwd)
    outlier = cwd / "outputs" / "train" / "outlier"
    shutil.copytree(trained, outlier)
    for name in ("best.pt", "last.pt"):
        path = outlier / "checkpoints" / name
        saved = torch.load(path, weights_only=True)
        weights = saved["model"]
        weights["1.weight"][0], weights["1.bias"][0] = 0.0, -1.0  # hidden unit 0 never fires
        weights[f"{OUTLIER_LAYER}.weight"][:, 0] = 1000.0  # so these outliers never change an fp32 output
        torch.save(saved, path)
    return outlier


def quantize(cwd: Path, *args):
    return run_dlrun(("quantize", *args, "quantizer.calib_batches=4", *CHEAP_QUANTIZE), cwd, env=ENV)


@pytest.fixture(scope="module")
def budget_run(outlier_run) -> Path:
    """`dlrun quantize mode=ptq max_drop=1` of the outlier model."""
    cwd = outlier_run.parents[2]
    ok(quantize(cwd, f"run={outlier_run}", "mode=ptq", "max_drop=1"))
    (run,) = run_dirs(cwd, "quantize")
    return run


def test_budget_keeps_exactly_the_outlier_layer_float(budget_run):
    summary = json.loads((budget_run / "summary.json").read_text())
    assert summary["float_layers"] == [OUTLIER_LAYER]
    assert summary["max_drop"] == 1 and summary["val_drop"] <= 1
    table = {row["layer"]: row for row in summary["sensitivity"]}
    assert set(table) == {"1", OUTLIER_LAYER, "7"}
    worst = min(table.values(), key=lambda row: row["sqnr_db"])
    assert worst["layer"] == OUTLIER_LAYER and worst["only_quantized"] > 30  # alone it collapses accuracy
    assert table[OUTLIER_LAYER]["only_float"] <= 1  # and floating it alone is enough
    assert table["1"]["params"] == 64 * 32 + 32
    # The saved program is the mixed one: two int8 weights (layers 1 and 7), the outlier layer's float.
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops

    graph = torch.export.load(budget_run / "model.pt2").graph
    int8_weights = [n for n in graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(int8_weights) == 2
    assert summary["metrics"]["fp32"]["accuracy"] - summary["metrics"]["test"]["accuracy"] < 0.03
    assert "per-layer sensitivity" in (budget_run / "quantize.log").read_text()
    assert_comparison_png(budget_run / "comparison.png")


@pytest.mark.slow
def test_the_mixed_program_exports_to_a_pte_that_verifies(budget_run):
    cwd = budget_run.parents[2]
    ok(run_dlrun(("export", "format=pte", "backend=xnnpack", f"run={budget_run}"), cwd, env=ENV))
    (export,) = run_dirs(cwd, "export")
    summary = json.loads((export / "summary.json").read_text())
    assert summary["verification"]["passed"] is True and summary["verification"]["accuracy"] > 0.8


def test_unreachable_budget_refuses_and_saves_nothing(outlier_run):
    cwd = outlier_run.parents[2]
    before = set(run_dirs(cwd, "quantize"))
    source = tree_hashes(outlier_run)
    line = error_line(
        quantize(cwd, f"run={outlier_run}", "mode=ptq", "max_drop=1", "max_float_layers=0"), 1, "max_drop=1 not met"
    )
    assert "0 of 3 layers float" in line and "accuracy points" in line
    assert set(run_dirs(cwd, "quantize")) == before  # no run left as if it succeeded
    assert tree_hashes(outlier_run) == source


def test_negative_max_drop_is_one_line(cli):
    error_line(cli("quantize", "max_drop=-0.5"), 2, "max_drop must be null or a number >= 0")
    assert not (cli.cwd / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        ("mode=dynamic", "backend=xnnpack"),
        ("mode=ptq", "backend=x86_inductor"),
        ("mode=dynamic", "backend=x86_inductor"),
        ("mode=qat", "backend=xnnpack", "quantizer.epochs=1"),
        ("mode=qat", "backend=x86_inductor", "quantizer.epochs=1"),
    ],
)
def test_budget_holds_in_every_pt2e_mode_and_backend(outlier_run, mode, tmp_path):
    ok(run_dlrun(("quantize", f"run={outlier_run}", *mode, "max_drop=1", *CHEAP_QUANTIZE), tmp_path, env=ENV))
    (run,) = run_dirs(tmp_path, "quantize")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["float_layers"] == [OUTLIER_LAYER] and summary["val_drop"] <= 1


@pytest.mark.slow
def test_report_sensitivity_without_budget(pipeline):
    """report=sensitivity alone: the table for the shared LeNet, nothing kept float."""
    run = pipeline.new_run("quantize", "mode=ptq", "report=sensitivity", "quantizer.calib_batches=2", *CHEAP_QUANTIZE)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["float_layers"] == [] and summary["max_drop"] is None
    layers = [row["layer"] for row in summary["sensitivity"]]
    assert layers and all(row["sqnr_db"] is None or row["sqnr_db"] > 0 for row in summary["sensitivity"])
