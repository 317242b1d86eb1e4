"""Metrics of any predictor (eager model, quantized program, runtime artifact) on a split, and what "better" means."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.data import Data, Split

Predict = Callable[[torch.Tensor], torch.Tensor]


def monitor(task: str) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint, and whether higher is better."""
    return ("accuracy", "max") if task == "classification" else ("loss", "min")


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def loss_function(task: str, label_smoothing: float = 0.0) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return nn.MSELoss()


@torch.no_grad()
def evaluate(
    predict: Predict,
    split: Split,
    data: Data,
    *,
    batch_size: int = 512,
    confusion: bool = False,
    reference: Predict | None = None,
) -> dict:
    """Metrics of `predict` on a split: loss plus accuracy/top-5/confusion matrix or MSE/MAE/R² in target units.

    With `reference` (e.g. the fp32 model), also its top-1 agreement and max abs output difference.
    """
    classification = data.task == "classification"
    loss_fn = loss_function(data.task)
    # Every total starts at zero, so that a rank with an empty shard reduces the same keys as the others.
    keys = ["loss", *(["correct", "top5"] if classification else []), *(["max_abs_diff", "agree"] if reference else [])]
    totals: dict[str, float] = dict.fromkeys(keys, 0.0)
    n = 0
    matrix = torch.zeros(data.num_outputs, data.num_outputs, dtype=torch.long) if confusion and classification else None
    targets, outputs_all = [], []
    for x, y in split.batches(batch_size):
        out = predict(x).float()
        y_cpu = y.cpu()
        out_cpu = out.cpu()
        totals["loss"] += loss_fn(out_cpu, y_cpu).item() * len(x)
        if classification:
            pred = out_cpu.argmax(1)
            totals["correct"] += (pred == y_cpu).sum().item()
            if data.num_outputs > 5:  # top-5 of 5 classes or fewer is always 1
                top5 = out_cpu.topk(5, dim=1).indices
                totals["top5"] += (top5 == y_cpu[:, None]).any(1).sum().item()
            if matrix is not None:
                matrix += torch.bincount(y_cpu * data.num_outputs + pred, minlength=data.num_outputs**2).view_as(matrix)
        else:
            targets.append(y_cpu)
            outputs_all.append(out_cpu)
        if reference is not None:
            ref = reference(x).float().cpu()
            totals["max_abs_diff"] = max(totals["max_abs_diff"], (ref - out_cpu).abs().max().item())
            if classification:
                totals["agree"] += (ref.argmax(1) == out_cpu.argmax(1)).sum().item()
        n += len(x)
    if getattr(split, "world", 1) > 1:  # a data-parallel rank's shard: the metrics are of the whole split
        totals, n, matrix, targets, outputs_all = _over_ranks(totals, n, matrix, targets, outputs_all, classification)
    if n == 0:
        raise DlrunError("the evaluation split is empty")
    metrics: dict = {"loss": totals["loss"] / n, "samples": n}
    if classification:
        metrics["accuracy"] = totals["correct"] / n
        if data.num_outputs > 5:
            metrics["top5"] = totals["top5"] / n
        if matrix is not None:
            metrics["confusion_matrix"] = matrix.tolist()
    else:
        y_all, out_all = torch.cat(targets), torch.cat(outputs_all)
        err = (out_all - y_all) * data.target_std  # back to the dataset's own units
        metrics["mse"] = err.pow(2).mean().item()
        metrics["mae"] = err.abs().mean().item()
        metrics["r2"] = 1 - (out_all - y_all).pow(2).sum().item() / max(
            (y_all - y_all.mean()).pow(2).sum().item(), 1e-12
        )
    if reference is not None:
        metrics["max_abs_diff"] = totals["max_abs_diff"]
        if classification:
            metrics["top1_agreement"] = totals["agree"] / n
    return metrics


def _over_ranks(totals: dict, n: int, matrix, targets: list, outputs: list, classification: bool):
    """Sum every rank's totals (max for max_abs_diff), confusion matrix and regression outputs: each rank then holds
    the whole split's numbers and takes the same decisions."""
    from dlrun.training import distributed

    summed = distributed.all_reduce_totals({**totals, "samples": n}, maxima=("max_abs_diff",))
    n = int(summed.pop("samples"))
    totals = {key: summed[key] for key in totals}
    if matrix is not None:
        matrix = distributed.all_reduce_tensor(matrix)
    if not classification:
        empty = torch.empty(0, 1)
        targets = [distributed.all_gather_cat(torch.cat(targets) if targets else empty)]
        outputs = [distributed.all_gather_cat(torch.cat(outputs) if outputs else empty)]
    return totals, n, matrix, targets, outputs
