"""Accuracy-aware quantization: which layers does int8 hurt, and which few must stay float to meet a budget.

Every measure is taken on the validation split against the fp32 model, for a `quantize(exclude)` function that
returns the model quantized with the named layers left float (PT2E: not annotated by the backend quantizer):

    sqnr_db          SQNR of the model's outputs (torchao compute_error) with only this layer quantized
    only_quantized   quality lost with only this layer quantized (every other layer float)
    only_float       quality lost with every layer quantized except this one

Quality lost is in accuracy points (classification) or percent of the fp32 MSE (regression). The search floats
layers in order of increasing SQNR (the most damaging first) until the loss is within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.data import Data
from dlrun.training import evaluate

Quantize = Callable[[Sequence[str]], Callable[[torch.Tensor], torch.Tensor]]  # float layers -> quantized predictor


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    params: int
    sqnr_db: float | None  # None: the outputs were identical (the mode does not quantize this layer)
    only_quantized: float  # quality lost with only this layer quantized
    only_float: float  # quality lost with every other layer quantized


@dataclass(frozen=True)
class Search:
    float_layers: list[str]  # the fewest layers, in search order, that the search kept float
    loss: float  # quality lost on validation with them float
    met: bool  # loss <= the budget
    quantized: Callable  # the model quantized with float_layers float


def candidate_layers(model: nn.Module, *, linear_only: bool = False, skip: Sequence[str] = ()) -> list[str]:
    """The layers a quantizer makes int8 (convs and Linear; weight-only: Linear), outside the `skip` subtrees."""
    kinds = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds) and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def quality_loss(fp32: dict, quantized: dict, task: str) -> float:
    """Quality lost, positive = worse: accuracy points (classification) or percent of the fp32 MSE (regression)."""
    if task == "classification":
        return 100 * (fp32["accuracy"] - quantized["accuracy"])
    return 100 * (quantized["mse"] - fp32["mse"]) / max(fp32["mse"], 1e-12)


def unit(task: str) -> str:
    return "accuracy points" if task == "classification" else "% of the fp32 MSE"


@dataclass
class Validation:
    """The fp32 model's validation metrics and outputs, against which every quantized variant is measured."""

    data: Data
    fp32: dict
    outputs: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, data: Data) -> Validation:
        return cls(data, evaluate.evaluate(model, data.val, data), _outputs(model, data))

    def loss(self, predict) -> float:
        return quality_loss(self.fp32, evaluate.evaluate(predict, self.data.val, self.data), self.data.task)

    def sqnr(self, predict) -> float | None:
        from torchao.quantization.utils import compute_error

        sqnr = compute_error(self.outputs, _outputs(predict, self.data)).item()
        return sqnr if math.isfinite(sqnr) else None


def analyse(model: nn.Module, layers: list[str], quantize: Quantize, validation: Validation) -> list[LayerSensitivity]:
    """One row per layer: two quantizations each (only it quantized, only it float)."""
    rows = []
    for layer in layers:
        others = [name for name in layers if name != layer]
        alone = quantize(others)
        params = sum(p.numel() for p in model.get_submodule(layer).parameters())
        rows.append(
            LayerSensitivity(
                layer=layer,
                params=params,
                sqnr_db=validation.sqnr(alone),
                only_quantized=validation.loss(alone),
                only_float=validation.loss(quantize([layer])),
            )
        )
    return rows


def ranked(rows: list[LayerSensitivity]) -> list[str]:
    """Most damaging first: lowest SQNR, then the largest loss when quantized alone; identical outputs last."""
    return [r.layer for r in sorted(rows, key=lambda r: (r.sqnr_db is None, r.sqnr_db or 0.0, -r.only_quantized))]


def search(order: list[str], quantize: Quantize, validation: Validation, max_drop: float, max_float: int) -> Search:
    """Float the first k layers of `order`, k = 0, 1, ... max_float, until the loss is within `max_drop`."""
    best = None
    for k in range(min(max_float, len(order)) + 1):
        quantized = quantize(order[:k])
        found = Search(order[:k], validation.loss(quantized), False, quantized)
        if found.loss <= max_drop:
            return Search(found.float_layers, found.loss, True, quantized)
        if best is None or found.loss < best.loss:
            best = found
    return best


def budget_error(found: Search, max_drop: float, layers: int, max_float: int, task: str) -> DlrunError:
    """The one line when even the most float layers allowed miss the budget (exit 1: the input was valid)."""
    floated = ", ".join(found.float_layers) or "none"
    return DlrunError(
        f"max_drop={max_drop:g} not met: the best reached loses {found.loss:.2f} {unit(task)} on the val split "
        f"with {len(found.float_layers)} of {layers} layers float ({floated}; at most max_float_layers={max_float}); "
        "nothing was saved: raise max_drop or max_float_layers"
    )


@torch.no_grad()
def _outputs(predict, data: Data) -> torch.Tensor:
    return torch.cat([predict(x).float().cpu() for x, _ in data.val.batches(512)])
