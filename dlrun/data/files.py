"""Datasets read from files: torchvision's MNIST / FashionMNIST / CIFAR-10 layouts and an image folder.

Nothing is downloaded unless dataset.download=true; missing files fail with one line saying where to put them.
`image_folder` streams decoded images through a DataLoader with worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dlrun.core.errors import DlrunError, UsageError
from dlrun.data.splits import Batch, Data, checked_meta, shard_order, split_indices, standardized


def torchvision_dataset(
    *, dataset_class, root, download, task, input_shape, num_outputs, augment, val_fraction, split_seed
) -> Data:
    """MNIST / FashionMNIST / CIFAR10 from torchvision's on-disk format, loaded whole into tensors."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset_class, None)
    if cls is None or dataset_class not in ("MNIST", "FashionMNIST", "CIFAR10"):
        raise UsageError(f"unsupported dataset_class {dataset_class!r}; supported: MNIST, FashionMNIST, CIFAR10")
    try:
        train_set = cls(root, train=True, download=download)
        test_set = cls(root, train=False, download=download)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "corrupted" not in str(exc).lower():
            raise
        raise UsageError(_missing_files_message(cls, root)) from None  # dataset.root is the user's input
    except OSError as exc:  # download attempted without network
        raise DlrunError(f"could not download {dataset_class} into {root} (no network?): {exc}") from None

    def tensors(ds) -> Batch:
        data = torch.as_tensor(ds.data)
        x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # (N,H,W) or (N,H,W,C) -> NCHW
        return x.float() / 255.0, torch.as_tensor(ds.targets, dtype=torch.long)

    (x_train, y_train), (x_test, y_test) = tensors(train_set), tensors(test_set)
    meta = checked_meta(
        task, input_shape, num_outputs, augment, tuple(x_train.shape[1:]), len(train_set.classes), dataset_class
    )
    x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    train_idx, val_idx, _ = split_indices(len(x_train), val_fraction, 0.0, split_seed)
    test_idx = torch.arange(len(x_train), len(x))  # the official test set stays the test split
    return standardized(
        x, y, (train_idx, val_idx, test_idx), task=task, image=True, class_names=list(train_set.classes), **meta
    )


def _missing_files_message(cls, root) -> str:
    if hasattr(cls, "base_folder"):  # CIFAR: python pickle batches in one folder
        folder, files = (
            Path(root) / cls.base_folder,
            [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]],
        )
    else:  # MNIST family: idx files in <root>/<Class>/raw
        folder, files = (
            Path(root) / cls.__name__ / "raw",
            [Path(url).name.removesuffix(".gz") for url, _ in cls.resources],
        )
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

    def batches(self, batch_size, *, shuffle_seed=None, augment=None, shard=(0, 1)):
        from torch.utils.data import DataLoader, Subset

        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        indices = self.indices
        if shard[1] > 1:  # the epoch's order is drawn here, then each rank reads its part of it
            order = torch.randperm(len(indices), generator=generator) if generator is not None else None
            order = shard_order(torch.arange(len(indices)) if order is None else order, shard, pad=order is not None)
            indices = [self.indices[i] for i in order.tolist()]
        loader = DataLoader(
            Subset(self.dataset, indices),
            batch_size=batch_size,
            shuffle=generator is not None and shard[1] == 1,
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


SHOWN_PATHS = 3  # unreadable images named in the error; the rest are counted


def _check_image_folder(folder: Path) -> None:
    """Refuse, in one line naming the paths, a folder that cannot train a classifier: missing, no classes, a single
    class (accuracy 1.0 by construction), a class without images, or images that do not decode (all of them)."""
    from PIL import Image

    if not folder.exists():
        raise UsageError(f"image_folder root {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"image_folder root {folder} is not a directory (expected {folder}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"image_folder root {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    if len(classes) < 2:
        raise UsageError(
            f"image_folder root {folder} has one class folder ({classes[0]}); a classifier needs at least 2"
        )
    unreadable: list[tuple[Path, str]] = []
    for name in classes:
        images = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in images:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as exc:  # PIL raises many kinds for a bad file; each one is the same finding
                unreadable.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    if len(unreadable) == 1:
        raise UsageError(f"unreadable image {unreadable[0][0]} ({unreadable[0][1]}); fix or remove it")
    if unreadable:
        (first, reason), count = unreadable[0], len(unreadable)
        shown = "".join(f", {path}" for path, _ in unreadable[1:SHOWN_PATHS])
        more = f" and {count - SHOWN_PATHS} more" if count > SHOWN_PATHS else ""
        raise UsageError(f"{count} unreadable images: {first} ({reason}){shown}{more}; fix or remove them")


def image_folder(
    *, root, image_size, task, input_shape, num_outputs, augment, val_fraction, test_fraction, split_seed, num_workers
) -> Data:
    """Images in root/<class>/*.jpg: checked up front, resized/cropped to image_size, normalized to [-1, 1]."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    folder = Path(root)
    _check_image_folder(folder)
    transform = T.Compose(
        [
            _to_rgb,
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    dataset = ImageFolder(str(folder), transform=transform)
    meta = checked_meta(
        task, input_shape, num_outputs, augment, (3, image_size, image_size), len(dataset.classes), "image_folder"
    )
    parts = split_indices(len(dataset), val_fraction, test_fraction, split_seed)
    train, val, test = (FolderSplit(dataset, idx.tolist(), num_workers) for idx in parts)
    return Data(task=task, train=train, val=val, test=test, class_names=list(dataset.classes), **meta)
