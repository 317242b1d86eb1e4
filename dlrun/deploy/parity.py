"""Parity of an artifact with its source model: the same inputs through both, at batch 1, a middle batch and
the largest batch the artifact declares; outputs, top-1 agreement and accuracy compared."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Parity:
    samples: int
    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max |reference output|: comparable across models
    top1_agreement: float | None  # classification only
    accuracy: float | None  # of the artifact over all samples, when targets are given
    batch_sizes: list[int]


_MAX_SAMPLES_AT_BATCH_1 = 64  # one call per sample is slow; a few samples prove batch 1 works


def verification_batch_sizes(max_batch: int) -> list[int]:
    """Batch 1, a middle size and max_batch, in ascending order: the whole range the artifact declares, met the
    way a deployed program meets it. A runtime that sizes a buffer on its first batch and overruns it on a
    larger one (XNNPACK's int8 mean, see `_xnnpack_configs`) only fails when a larger batch follows a smaller."""
    return sorted({1, max(1, max_batch // 2), max_batch})


def check_parity(
    reference: Callable[[torch.Tensor], torch.Tensor],
    runner: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    classification: bool = True,
) -> Parity:
    """Run the inputs through reference and artifact at each batch size, in the order given, and compare.

    Batch 1 covers the first few inputs, other sizes all of them, and a size above the number of inputs
    runs once on the inputs repeated to fill it, so that the largest batch is really run. Differences and
    agreement pool every compared row, so an artifact that is wrong at one batch size only still shows up;
    check the difference too, as a wrong artifact can keep most argmaxes (XNNPACK weight-only did).
    """
    refs, outs = [], []
    with torch.no_grad():
        for size in batch_sizes:
            batches = _parity_batches(inputs, size)
            refs.append(torch.cat([reference(b).float() for b in batches]))
            outs.append(torch.cat([runner(b).float() for b in batches]))
    ref, out = torch.cat(refs), torch.cat(outs)
    max_abs_diff = (ref - out).abs().max().item()
    samples = min(max(len(o) for o in outs), len(inputs))  # batch 1 alone covers only the first _MAX_SAMPLES_AT_BATCH_1
    accuracy = None
    if classification and targets is not None:
        widest = max(outs, key=len)[:samples]  # the pass that covers the most samples, without repeats
        accuracy = (widest.argmax(1) == targets[:samples]).float().mean().item()
    return Parity(
        samples=samples,
        max_abs_diff=max_abs_diff,
        relative_diff=max_abs_diff / max(ref.abs().max().item(), torch.finfo(torch.float32).tiny),
        top1_agreement=(out.argmax(1) == ref.argmax(1)).float().mean().item() if classification else None,
        accuracy=accuracy,
        batch_sizes=list(batch_sizes),
    )


def _parity_batches(inputs: torch.Tensor, size: int) -> list[torch.Tensor]:
    if size == 1:
        return list(inputs[:_MAX_SAMPLES_AT_BATCH_1].split(1))
    if size > len(inputs):
        return [inputs.repeat(math.ceil(size / len(inputs)), *[1] * (inputs.dim() - 1))[:size]]
    return list(inputs.split(size))
