"""Datasets that need no download: sklearn's digits and diabetes, and seeded synthetic data of any shape.

Each builder is a Hydra `_target_` (see conf/dataset/); the keys every dataset config shares
(task, input_shape, num_outputs, augment, fractions, split_seed) arrive as keyword arguments.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from dlrun.core.errors import DlrunError
from dlrun.data.splits import Data, checked_meta, split_indices, standardized


def digits(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's 8x8 handwritten digits, shipped with scikit-learn (offline)."""
    features, target = load_digits_arrays()
    x = torch.tensor(features, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    meta = checked_meta(task, input_shape, num_outputs, augment, (1, 8, 8), 10, "digits")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return standardized(x, y, parts, task=task, image=True, class_names=[str(i) for i in range(10)], **meta)


def diabetes(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's diabetes regression set (10 features), shipped with scikit-learn (offline)."""
    features, target = load_diabetes_arrays()
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(target, dtype=torch.float32)
    meta = checked_meta(task, input_shape, num_outputs, augment, (10,), 1, "diabetes")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return standardized(x, y, parts, task=task, image=False, **meta)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(data (1797, 64) float64, target (1797,) int), equal to sklearn's `load_digits(return_X_y=True)`."""
    table = _sklearn_csv("digits.csv.gz", delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def load_diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(data (442, 10), target (442,)) float64, equal to sklearn's `load_diabetes(return_X_y=True)` (scaled=True):
    each feature mean-centred and divided by its standard deviation times sqrt(n_samples), as
    `sklearn.preprocessing.scale` followed by `/ sqrt(n)` computes it (nanmean/nanstd, in place, same order)."""
    data = _sklearn_csv("diabetes_data_raw.csv.gz")
    target = _sklearn_csv("diabetes_target.csv.gz")
    mean, std = np.nanmean(data, axis=0), np.nanstd(data, axis=0)
    data -= mean
    residual = np.nanmean(data, axis=0)
    if not np.allclose(residual, 0):  # sklearn's second centring pass (not taken for this data)
        data -= residual
    data /= np.where(std < 10 * np.finfo(std.dtype).eps, 1.0, std)
    residual = np.nanmean(data, axis=0)
    if not np.allclose(residual, 0):  # and its third (likewise)
        data -= residual
    data /= data.shape[0] ** 0.5
    return data, target


def _sklearn_csv(name: str, **loadtxt_kwargs) -> np.ndarray:
    """A data file scikit-learn ships in sklearn/datasets/data/, read without importing sklearn (~1 s, scipy)."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(r, "datasets", "data", name) for r in roots) if p.is_file()), None)
    if path is None:
        raise DlrunError(f"bundled dataset file sklearn/datasets/data/{name} not found: install scikit-learn")
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        return np.loadtxt(f, **loadtxt_kwargs)


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
