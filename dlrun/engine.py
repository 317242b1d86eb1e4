"""The training step loop and evaluation shared by `train`, `quantize mode=qat` and `eval`.

The hot loop keeps everything on the device: the epoch's loss is summed into a device tensor and
read once per epoch, so a GPU never waits on a per-step `.item()`.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dlrun.data import Data, Split
from dlrun.errors import DlrunError, UsageError

Predict = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteLoss(DlrunError):
    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"loss became NaN/inf at epoch {epoch}, step {step}; stopped (checkpoints from before are intact). "
            "Lower optimizer.lr, set trainer.grad_clip, or use trainer.nan_policy=skip_batch"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={name} requested but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def monitor(task: str) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint, and whether higher is better."""
    return ("accuracy", "max") if task == "classification" else ("loss", "min")


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def loss_function(task: str, label_smoothing: float = 0.0) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return nn.MSELoss()


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    skipped_batches: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_epoch(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    *,
    epoch: int,
    batch_size: int,
    seed: int,
    precision: str = "fp32",
    grad_clip: float | None = None,
    nan_policy: str = "stop",
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over the training split. Raises NonFiniteLoss (policy `stop`) after the epoch's first bad step."""
    model.train()
    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    loss_sum = torch.zeros((), device=device)
    step_losses: list[torch.Tensor] = []
    samples = skipped = 0
    start = time.perf_counter()
    # The shuffle/augment stream depends only on (seed, epoch): a resumed run sees the same batches.
    for x, y in data.train.batches(batch_size, shuffle_seed=seed * 100_003 + epoch, augment=data.augment):
        with autocast:
            loss = loss_fn(model(x).float(), y)
        if nan_policy == "skip_batch" and not torch.isfinite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        detached = loss.detach()
        loss_sum += detached * len(x)
        step_losses.append(detached)
        samples += len(x)
        if on_step is not None:
            on_step()
    if step_losses and nan_policy == "stop":
        finite = torch.isfinite(torch.stack(step_losses))
        if not bool(finite.all()):
            raise NonFiniteLoss(epoch, int((~finite).nonzero()[0]) + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if samples == 0:
        raise NonFiniteLoss(epoch, 1) if skipped else DlrunError("the training split is empty")
    return EpochStats(loss_sum.item() / samples, samples, time.perf_counter() - start, skipped)


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
    totals: dict[str, torch.Tensor | float] = {}
    n = 0
    matrix = torch.zeros(data.num_outputs, data.num_outputs, dtype=torch.long) if confusion and classification else None
    targets, outputs_all = [], []
    for x, y in split.batches(batch_size):
        out = predict(x).float()
        y_cpu = y.cpu()
        out_cpu = out.cpu()
        _add(totals, "loss", loss_fn(out_cpu, y_cpu).item() * len(x))
        if classification:
            pred = out_cpu.argmax(1)
            _add(totals, "correct", (pred == y_cpu).sum().item())
            if data.num_outputs > 5:
                top5 = out_cpu.topk(5, dim=1).indices
                _add(totals, "top5", (top5 == y_cpu[:, None]).any(1).sum().item())
            if matrix is not None:
                matrix += torch.bincount(y_cpu * data.num_outputs + pred, minlength=data.num_outputs**2).view_as(matrix)
        else:
            targets.append(y_cpu)
            outputs_all.append(out_cpu)
        if reference is not None:
            ref = reference(x).float().cpu()
            _add(totals, "max_abs_diff", (ref - out_cpu).abs().max().item(), reduce=max)
            if classification:
                _add(totals, "agree", (ref.argmax(1) == out_cpu.argmax(1)).sum().item())
        n += len(x)
    if n == 0:
        raise DlrunError("the evaluation split is empty")
    metrics: dict = {"loss": totals["loss"] / n, "samples": n}
    if classification:
        metrics["accuracy"] = totals["correct"] / n
        if "top5" in totals:
            metrics["top5"] = totals["top5"] / n
        if matrix is not None:
            metrics["confusion_matrix"] = matrix.tolist()
    else:
        y_all, out_all = torch.cat(targets), torch.cat(outputs_all)
        err = (out_all - y_all) * data.target_std  # back to the dataset's own units
        metrics["mse"] = err.pow(2).mean().item()
        metrics["mae"] = err.abs().mean().item()
        metrics["r2"] = 1 - (out_all - y_all).pow(2).sum().item() / max((y_all - y_all.mean()).pow(2).sum().item(), 1e-12)
    if reference is not None:
        metrics["max_abs_diff"] = totals["max_abs_diff"]
        if classification:
            metrics["top1_agreement"] = totals["agree"] / n
    return metrics


def _add(totals: dict, key: str, value: float, reduce=lambda a, b: a + b) -> None:
    totals[key] = reduce(totals[key], value) if key in totals else value

