"""Datasets as train/val/test splits that yield (x, y) batches on the training device.

In-memory datasets are preprocessed once into standardized tensors, moved to the device, and batched by
slicing a seeded permutation; augmentation runs batched on those tensors. No per-sample DataLoader on that
path: for small models the DataLoader's Python overhead per sample dominates training time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dlrun.core.errors import UsageError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0  # random crop after zero-padding by this many pixels
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch of images (N, C, H, W) with per-sample random crops/flips, batched."""
        if x.dim() != 4 or not (self.crop_padding or self.hflip):
            return x
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
            rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
            cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
            batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
            x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x


class Split(Protocol):
    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        augment: Augment | None = None,
        shard: tuple[int, int] = (0, 1),  # (rank, world size): this process's part in data-parallel training
    ) -> Iterator[Batch]: ...


@dataclass
class TensorSplit:
    """A split held as two tensors on the training device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))

    def batches(self, batch_size, *, shuffle_seed=None, augment=None, shard=(0, 1)):
        n = len(self.x)
        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        order = torch.randperm(n, generator=generator) if generator is not None else None
        if shard[1] > 1:
            order = shard_order(torch.arange(n) if order is None else order, shard, pad=generator is not None)
        order = order.to(self.x.device) if order is not None else None
        for start in range(0, len(order) if order is not None else n, batch_size):
            if order is None:
                x, y = self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                x, y = self.x[index], self.y[index]
            if augment is not None and generator is not None:
                x = augment(x, generator)
            yield x, y


def shard_order(order: torch.Tensor, shard: tuple[int, int], *, pad: bool) -> torch.Tensor:
    """Rank `shard[0]` of `shard[1]`'s samples of an epoch's order. Training pads by wrapping around so that every
    rank runs the same number of steps (as DistributedSampler); evaluation gives each sample to exactly one rank."""
    rank, world = shard
    if pad:
        total = -(-len(order) // world) * world
        order = order.repeat(-(-total // len(order)))[:total]
    return order[rank::world]


@dataclass
class Data:
    task: str  # classification | regression
    input_shape: tuple[int, ...]
    num_outputs: int
    train: Split
    val: Split
    test: Split
    augment: Augment = field(default_factory=Augment)
    class_names: list[str] | None = None
    vocab_size: int | None = None  # token-id inputs (dataset=text_csv): ids < vocab_size, 0 = padding
    # Regression targets are standardized for training; metrics are reported in the original units.
    target_mean: float = 0.0
    target_std: float = 1.0

    def to(self, device: torch.device) -> Data:
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            if isinstance(split, TensorSplit):
                setattr(self, name, split.to(device))
        return self

    def example(self, batch: int = 2) -> torch.Tensor:
        """Real test inputs of the right shape (batch >= 2 keeps torch.export from specializing it)."""
        x, _ = next(iter(self.test.batches(batch)))
        return x


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Deterministic train/val/test index split from `seed`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n - n_test - n_val < 1 or (val_fraction > 0 and n_val == 0) or (test_fraction > 0 and n_test == 0):
        raise UsageError(f"cannot split {n} samples into val={val_fraction} and test={test_fraction} fractions")
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def standardized(x: torch.Tensor, y: torch.Tensor, parts, *, task: str, image: bool, **meta) -> Data:
    """Standardize inputs (per channel for images) with train-split statistics and package the splits."""
    train_idx, val_idx, test_idx = parts
    xt = x[train_idx]
    dims = [0, 2, 3] if image else [0]
    mean, std = xt.mean(dims, keepdim=True)[:1], xt.std(dims, keepdim=True)[:1].clamp_min(1e-6)
    x = (x - mean) / std
    target_mean, target_std = 0.0, 1.0
    if task == "regression":
        target_mean, target_std = y[train_idx].mean().item(), y[train_idx].std().item()
        y = ((y - target_mean) / target_std).float().view(-1, 1)
    return Data(
        task=task,
        train=TensorSplit(x[train_idx].contiguous(), y[train_idx].contiguous()),
        val=TensorSplit(x[val_idx].contiguous(), y[val_idx].contiguous()),
        test=TensorSplit(x[test_idx].contiguous(), y[test_idx].contiguous()),
        target_mean=target_mean,
        target_std=target_std,
        **meta,
    )


def checked_meta(task, input_shape, num_outputs, augment, actual_shape, actual_outputs, name) -> dict:
    """Check the config's declared shape against the real data; models are built from the declared one."""
    if input_shape is not None and tuple(input_shape) != tuple(actual_shape):  # null: read from the data
        raise UsageError(
            f"dataset {name} has input shape {list(actual_shape)}, but dataset.input_shape is {list(input_shape)}"
        )
    if num_outputs is not None and int(num_outputs) != actual_outputs:
        raise UsageError(f"dataset {name} has {actual_outputs} outputs, but dataset.num_outputs is {num_outputs}")
    if task not in ("classification", "regression"):
        raise UsageError(f"dataset.task must be classification or regression, got {task!r}")
    return dict(input_shape=tuple(actual_shape), num_outputs=actual_outputs, augment=Augment(**augment))
