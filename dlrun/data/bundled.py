"""Datasets that need no download: sklearn's digits and diabetes, and seeded synthetic data of any shape.

Each builder is a Hydra `_target_` (see conf/dataset/); the keys every dataset config shares
(task, input_shape, num_outputs, augment, fractions, split_seed) arrive as keyword arguments.
"""

from __future__ import annotations

import math

import torch

from dlrun.data.splits import Data, checked_meta, split_indices, standardized


def digits(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's 8x8 handwritten digits, shipped with scikit-learn (offline)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    meta = checked_meta(task, input_shape, num_outputs, augment, (1, 8, 8), 10, "digits")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return standardized(x, y, parts, task=task, image=True, class_names=[str(i) for i in range(10)], **meta)


def diabetes(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's diabetes regression set (10 features), shipped with scikit-learn (offline)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.float32)
    meta = checked_meta(task, input_shape, num_outputs, augment, (10,), 1, "diabetes")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return standardized(x, y, parts, task=task, image=False, **meta)


def synthetic(*, task, input_shape, num_outputs, augment, num_samples, val_fraction, test_fraction, split_seed) -> Data:
    """Seeded Gaussian inputs labelled by a fixed random linear teacher: learnable, any shape."""
    generator = torch.Generator().manual_seed(split_seed)
    x = torch.randn(num_samples, *input_shape, generator=generator)
    flat = x.flatten(1)
    teacher = torch.randn(flat.shape[1], num_outputs, generator=generator) / math.sqrt(flat.shape[1])
    scores = flat @ teacher
    y = scores.argmax(1) if task == "classification" else scores[:, 0]
    meta = checked_meta(task, input_shape, num_outputs, augment, tuple(input_shape), num_outputs, "synthetic")
    parts = split_indices(num_samples, val_fraction, test_fraction, split_seed)
    return standardized(x, y, parts, task=task, image=len(input_shape) == 3, **meta)
