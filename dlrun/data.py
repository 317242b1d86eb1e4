"""Datasets as train/val/test splits that yield (x, y) batches on the training device.

In-memory datasets (digits, diabetes, MNIST, FashionMNIST, CIFAR-10, synthetic) are preprocessed
once into standardized tensors, moved to the device, and batched by slicing a seeded permutation;
augmentation runs batched on those tensors. No per-sample DataLoader on that path: for small
models the DataLoader's Python overhead per sample dominates training time.
`image_folder` streams decoded images through a DataLoader with worker processes.

Each builder is a Hydra `_target_` (see conf/dataset/); the keys every dataset config shares
(task, input_shape, num_outputs, augment, fractions, split_seed) arrive as keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from dlrun.errors import DlrunError

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

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None, augment: Augment | None = None) -> Iterator[Batch]: ...


@dataclass
class TensorSplit:
    """A split held as two tensors on the training device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device))

    def batches(self, batch_size, *, shuffle_seed=None, augment=None):
        n = len(self.x)
        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        order = torch.randperm(n, generator=generator).to(self.x.device) if generator is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                x, y = self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                x, y = self.x[index], self.y[index]
            if augment is not None and generator is not None:
                x = augment(x, generator)
            yield x, y


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
    # Regression targets are standardized for training; metrics are reported in the original units.
    target_mean: float = 0.0
    target_std: float = 1.0

    def to(self, device: torch.device) -> "Data":
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
        raise DlrunError(f"cannot split {n} samples into val={val_fraction} and test={test_fraction} fractions")
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _standardized(x: torch.Tensor, y: torch.Tensor, parts, *, task: str, image: bool, **meta) -> Data:
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


def _meta(task, input_shape, num_outputs, augment, actual_shape, actual_outputs, name) -> dict:
    """Check the config's declared shape against the real data; models are built from the declared one."""
    if tuple(input_shape) != tuple(actual_shape):
        raise DlrunError(f"dataset {name} has input shape {list(actual_shape)}, but dataset.input_shape is {list(input_shape)}")
    if num_outputs is not None and int(num_outputs) != actual_outputs:
        raise DlrunError(f"dataset {name} has {actual_outputs} outputs, but dataset.num_outputs is {num_outputs}")
    if task not in ("classification", "regression"):
        raise DlrunError(f"dataset.task must be classification or regression, got {task!r}")
    return dict(input_shape=tuple(actual_shape), num_outputs=actual_outputs, augment=Augment(**augment))


def digits(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's 8x8 handwritten digits, shipped with scikit-learn (offline)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    meta = _meta(task, input_shape, num_outputs, augment, (1, 8, 8), 10, "digits")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return _standardized(x, y, parts, task=task, image=True, class_names=[str(i) for i in range(10)], **meta)


def diabetes(*, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed) -> Data:
    """sklearn's diabetes regression set (10 features), shipped with scikit-learn (offline)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.float32)
    meta = _meta(task, input_shape, num_outputs, augment, (10,), 1, "diabetes")
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return _standardized(x, y, parts, task=task, image=False, **meta)


def synthetic(*, task, input_shape, num_outputs, augment, num_samples, val_fraction, test_fraction, split_seed) -> Data:
    """Seeded Gaussian inputs labelled by a fixed random linear teacher: learnable, any shape."""
    generator = torch.Generator().manual_seed(split_seed)
    x = torch.randn(num_samples, *input_shape, generator=generator)
    flat = x.flatten(1)
    teacher = torch.randn(flat.shape[1], num_outputs, generator=generator) / math.sqrt(flat.shape[1])
    scores = flat @ teacher
    y = scores.argmax(1) if task == "classification" else scores[:, 0]
    meta = _meta(task, input_shape, num_outputs, augment, tuple(input_shape), num_outputs, "synthetic")
    parts = split_indices(num_samples, val_fraction, test_fraction, split_seed)
    return _standardized(x, y, parts, task=task, image=len(input_shape) == 3, **meta)


def torchvision_dataset(
    *, dataset_class, root, download, task, input_shape, num_outputs, augment, val_fraction, split_seed
) -> Data:
    """MNIST / FashionMNIST / CIFAR10 from torchvision's on-disk format, loaded whole into tensors."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset_class, None)
    if cls is None or dataset_class not in ("MNIST", "FashionMNIST", "CIFAR10"):
        raise DlrunError(f"unsupported dataset_class {dataset_class!r}; supported: MNIST, FashionMNIST, CIFAR10")
    try:
        train_set = cls(root, train=True, download=download)
        test_set = cls(root, train=False, download=download)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "corrupted" not in str(exc).lower():
            raise
        raise DlrunError(_missing_files_message(cls, root)) from None
    except OSError as exc:  # download attempted without network
        raise DlrunError(f"could not download {dataset_class} into {root} (no network?): {exc}") from None

    def tensors(ds) -> Batch:
        data = torch.as_tensor(ds.data)
        x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # (N,H,W) or (N,H,W,C) -> NCHW
        return x.float() / 255.0, torch.as_tensor(ds.targets, dtype=torch.long)

    (x_train, y_train), (x_test, y_test) = tensors(train_set), tensors(test_set)
    meta = _meta(task, input_shape, num_outputs, augment, tuple(x_train.shape[1:]), len(train_set.classes), dataset_class)
    x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    train_idx, val_idx, _ = split_indices(len(x_train), val_fraction, 0.0, split_seed)
    test_idx = torch.arange(len(x_train), len(x))  # the official test set stays the test split
    return _standardized(x, y, (train_idx, val_idx, test_idx), task=task, image=True, class_names=list(train_set.classes), **meta)


def _missing_files_message(cls, root) -> str:
    if hasattr(cls, "base_folder"):  # CIFAR: python pickle batches in one folder
        folder, files = Path(root) / cls.base_folder, [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    else:  # MNIST family: idx files in <root>/<Class>/raw
        folder, files = Path(root) / cls.__name__ / "raw", [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
    return (
        f"{cls.__name__} not found in {folder} (expected {', '.join(files)}); "
        f"copy the files there, set dataset.root, or pass dataset.download=true on a machine with network"
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderSplit:
    """A split of an ImageFolder, decoded by DataLoader workers."""

    dataset: object  # torchvision.datasets.ImageFolder
    indices: list[int]
    num_workers: int
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size, *, shuffle_seed=None, augment=None):
        from torch.utils.data import DataLoader, Subset

        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        loader = DataLoader(
            Subset(self.dataset, self.indices),
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if augment is not None and generator is not None:
                x = augment(x, generator)
            yield x, y


def _to_rgb(image):
    return image.convert("RGB")  # grayscale/palette/RGBA files all become 3 channels


def image_folder(
    *, root, image_size, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed, num_workers
) -> Data:
    """Images in root/<class>/*.jpg: checked up front, resized/cropped to image_size, normalized to [-1, 1]."""
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = Path(root)
    if not folder.is_dir():
        raise DlrunError(f"image_folder root {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DlrunError(f"image_folder root {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    for name in classes:
        images = [p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DlrunError(f"class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in images:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as exc:
                raise DlrunError(f"unreadable image {path}: {exc}") from None
    transform = T.Compose([
        _to_rgb, T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3),
    ])
    dataset = ImageFolder(str(folder), transform=transform)
    meta = _meta(task, input_shape, num_outputs, augment, (3, image_size, image_size), len(dataset.classes), "image_folder")
    parts = split_indices(len(dataset), val_fraction, test_fraction, split_seed)
    train, val, test = (FolderSplit(dataset, idx.tolist(), num_workers) for idx in parts)
    return Data(task=task, train=train, val=val, test=test, class_names=list(dataset.classes), **meta)


def build(dataset_cfg, device: torch.device) -> Data:
    """Instantiate the dataset config and put its tensors on `device`."""
    from dlrun.config import instantiate

    data = instantiate(dataset_cfg, "dataset")
    for split in (data.train, data.val, data.test):
        if isinstance(split, FolderSplit):
            split.device = device
    return data.to(device)
