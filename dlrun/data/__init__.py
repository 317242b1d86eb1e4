"""Datasets: `build(cfg.dataset, device)` returns a `Data` with train/val/test splits of (x, y) batches.

The builders are the `_target_`s of conf/dataset/ (dlrun.data.digits, ...): their names are part of every
stored config, so they stay importable from here.
"""

from __future__ import annotations

import torch

from dlrun.data.bundled import diabetes, digits, synthetic
from dlrun.data.files import FolderSplit, image_folder, torchvision_dataset
from dlrun.data.splits import Augment, Batch, Data, Split, TensorSplit, split_indices
from dlrun.data.tables import csv_table
from dlrun.data.text import text_csv

__all__ = [
    "Augment",
    "Batch",
    "Data",
    "Split",
    "TensorSplit",
    "build",
    "csv_table",
    "diabetes",
    "digits",
    "image_folder",
    "split_indices",
    "synthetic",
    "text_csv",
    "torchvision_dataset",
]


def build(dataset_cfg, device: torch.device) -> Data:
    """Instantiate the dataset config and put its tensors on `device`."""
    from dlrun.config.compose import instantiate

    data = instantiate(dataset_cfg, "dataset")
    for split in (data.train, data.val, data.test):
        if isinstance(split, FolderSplit):
            split.device = device
    return data.to(device)
