"""`trainer.ema`: an exponential moving average of the weights, updated after every optimizer step, validated and
kept as best.pt in place of the live weights (the Loop's `average`); last.pt holds both, so a resume continues the
same average instead of restarting it from the live weights.

The average covers the buffers too (BatchNorm running statistics): the averaged weights are validated with
statistics averaged the same way, not with the live model's, which belong to other weights.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def average(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` that `update_parameters(model)` moves towards the live weights: w = decay*w + (1-decay)*live
    (its first update copies them). Its state_dict (weights and update count) is what last.pt keeps under EMA."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
