"""The accuracy-aware search on its own: ranking, the greedy float set, the budget line. A fake `quantize` whose
quality loss depends only on which layers stay float stands in for PT2E (the CLI tests run the real thing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlrun.compression import sensitivity
from dlrun.compression.sensitivity import LayerSensitivity


class FakeValidation:
    """Quality lost = the sum of the damage of every layer left quantized."""

    def __init__(self, damage: dict[str, float]):
        self.damage = damage

    def loss(self, quantized) -> float:
        return sum(d for layer, d in self.damage.items() if layer not in quantized)


def quantize(float_layers):
    return list(float_layers)  # the "model": which layers are float


def test_search_floats_the_fewest_most_damaging_layers():
    validation = FakeValidation({"a": 0.1, "b": 5.0, "c": 2.0})
    found = sensitivity.search(["b", "c", "a"], quantize, validation, max_drop=2.5, max_float=2)
    assert found.met and found.float_layers == ["b"] and found.loss == pytest.approx(2.1)
    assert found.quantized == ["b"]
    nothing = sensitivity.search(["b", "c", "a"], quantize, validation, max_drop=10, max_float=2)
    assert nothing.met and nothing.float_layers == []


def test_an_unreachable_budget_returns_the_best_reached_and_one_line():
    validation = FakeValidation({"a": 1.0, "b": 5.0, "c": 2.0})
    found = sensitivity.search(["b", "c", "a"], quantize, validation, max_drop=0.5, max_float=2)
    assert not found.met and found.float_layers == ["b", "c"] and found.loss == pytest.approx(1.0)
    error = sensitivity.budget_error(found, 0.5, 3, 2, "classification")
    assert error.exit_code == 1 and "\n" not in str(error)
    assert "max_drop=0.5 not met" in str(error) and "2 of 3 layers float (b, c" in str(error)


def test_ranked_puts_the_lowest_sqnr_first_and_unquantized_layers_last():
    rows = [
        LayerSensitivity("fc", 10, 30.0, 0.0, 1.0),
        LayerSensitivity("conv", 10, None, 0.0, 0.0),  # identical outputs: the mode leaves it float
        LayerSensitivity("outlier", 10, 0.3, 70.0, 0.0),
        LayerSensitivity("tie", 10, 30.0, 2.0, 1.0),  # same SQNR as fc, larger loss alone: first
    ]
    assert sensitivity.ranked(rows) == ["outlier", "tie", "fc", "conv"]


def test_quality_loss_units():
    assert sensitivity.quality_loss({"accuracy": 0.95}, {"accuracy": 0.94}, "classification") == pytest.approx(1.0)
    assert sensitivity.quality_loss({"mse": 2.0}, {"mse": 2.5}, "regression") == pytest.approx(25.0)


def test_candidate_layers_skip_excluded_subtrees():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    assert sensitivity.candidate_layers(model) == ["0", "1.0", "2"]
    assert sensitivity.candidate_layers(model, skip=["1"]) == ["0", "2"]
    assert sensitivity.candidate_layers(model, linear_only=True) == ["1.0", "2"]


def test_sqnr_of_identical_outputs_is_none(monkeypatch):
    validation = sensitivity.Validation(data=None, fp32={}, outputs=torch.ones(4, 3))
    monkeypatch.setattr(sensitivity, "_outputs", lambda predict, data: predict)  # outputs stand in for a model
    assert validation.sqnr(torch.ones(4, 3)) is None
    assert validation.sqnr(torch.ones(4, 3) * 1.01) == pytest.approx(40.0, abs=0.01)
