"""Datasets: deterministic splits, shapes and tasks, batched augmentation, and the on-disk formats
(torchvision MNIST/FashionMNIST/CIFAR-10 files and ImageFolder trees) read offline from tiny files
the tests write themselves."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from dlrun import data
from dlrun.config import validate
from dlrun.core.errors import DlrunError
from dlrun.data import Augment, TensorSplit, split_indices

CPU = torch.device("cpu")


def build(*overrides: str) -> data.Data:
    """The dataset exactly as `dlrun train <overrides>` would build it."""
    return data.build(validate.validate("train", list(overrides)).dataset, CPU)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# ---- splits ------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    train, val, test = split_indices(1000, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(1000))  # no overlap, nothing lost
    again = split_indices(1000, 0.1, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    other = split_indices(1000, 0.1, 0.2, seed=4)
    assert not torch.equal(test, other[2]) and not torch.equal(train, other[0])


def test_split_too_small_is_an_error():
    with pytest.raises(DlrunError, match="cannot split 3 samples"):
        split_indices(3, 0.1, 0.1, seed=0)


def test_split_seed_selects_the_split_through_the_config():
    a, b, c = build("dataset.split_seed=1"), build("dataset.split_seed=1"), build("dataset.split_seed=2")
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.y, c.test.y)


# ---- bundled datasets --------------------------------------------------------------------------


def test_digits():
    d = build("dataset=digits")
    assert d.task == "classification" and d.num_outputs == 10 and d.input_shape == (1, 8, 8)
    assert (len(d.train), len(d.val), len(d.test)) == (1258, 180, 359)  # 1797 samples, val 0.1, test 0.2
    assert d.train.x.shape == (1258, 1, 8, 8) and d.train.y.dtype == torch.long
    assert set(d.train.y.tolist()) == set(range(10))
    # standardized with train statistics
    assert abs(d.train.x.mean().item()) < 1e-4 and abs(d.train.x.std().item() - 1) < 1e-2


def test_diabetes_is_regression_with_standardized_targets():
    d = build("dataset=diabetes", "model=mlp")
    assert d.task == "regression" and d.num_outputs == 1 and d.input_shape == (10,)
    assert len(d.train) + len(d.val) + len(d.test) == 442
    assert d.train.x.shape[1:] == (10,) and d.train.y.shape[1:] == (1,) and d.train.y.dtype == torch.float32
    assert abs(d.train.y.mean().item()) < 1e-4 and abs(d.train.y.std().item() - 1) < 1e-3
    assert 50 < d.target_std < 100 and 100 < d.target_mean < 200  # disease progression units


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_synthetic_any_shape(task):
    outputs = 4 if task == "classification" else 1
    d = build(
        "dataset=synthetic",
        "dataset.num_samples=200",
        "dataset.input_shape=[3,6,5]",
        f"dataset.num_outputs={outputs}",
        f"dataset.task={task}",
    )
    assert d.task == task and d.input_shape == (3, 6, 5) and d.num_outputs == outputs
    assert len(d.train) + len(d.val) + len(d.test) == 200
    assert d.train.x.shape[1:] == (3, 6, 5)
    if task == "classification":
        assert d.train.y.dtype == torch.long and set(d.train.y.tolist()) <= set(range(4))
    else:
        assert d.train.y.shape[1:] == (1,)


def test_declared_shape_must_match_the_data():
    with pytest.raises(
        DlrunError, match=r"dataset digits has input shape \[1, 8, 8\], but dataset.input_shape is \[1, 9, 9\]"
    ):
        build("dataset=digits", "dataset.input_shape=[1,9,9]")


# ---- batching and augmentation -----------------------------------------------------------------


def test_tensor_split_batches_cover_everything_once_in_seeded_order():
    split = TensorSplit(torch.arange(10).float().view(10, 1), torch.arange(10))
    plain = [y.tolist() for _, y in split.batches(4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def order(seed):
        return torch.cat([y for _, y in split.batches(4, shuffle_seed=seed)]).tolist()

    assert sorted(order(1)) == list(range(10))
    assert order(1) == order(1)
    assert order(1) != order(2)
    for x, y in split.batches(3, shuffle_seed=5):
        assert torch.equal(x.view(-1).long(), y)  # inputs stay paired with their labels


def test_augmentation_keeps_shapes_and_is_seeded():
    x = torch.randn(16, 3, 8, 8)
    aug = Augment(crop_padding=2, hflip=True)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    assert torch.equal(Augment()(x, torch.Generator().manual_seed(0)), x)  # off = identity
    flat = torch.randn(4, 10)
    assert torch.equal(aug(flat, torch.Generator()), flat)  # tabular data is never augmented


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    p = 2
    x = torch.randn(32, 1, 6, 6)
    out = Augment(crop_padding=p)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    shifts = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert matches, f"sample {i} is not a crop of its padded input"
        shifts.add(matches[0])
    assert len(shifts) > 1  # per-sample random offsets, not one for the batch


def test_flip_is_per_sample():
    x = torch.randn(64, 2, 4, 5)
    out = Augment(hflip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


# ---- torchvision formats, offline --------------------------------------------------------------


def write_idx(path, array: np.ndarray) -> None:
    """An idx ubyte file as MNIST ships it (big-endian magic 0x08 = ubyte, then the dimensions)."""
    path.write_bytes(
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def write_mnist(root, cls_name: str, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """Tiny raw files in root/<Class>/raw, the uncompressed names torchvision 0.29 reads (no md5 check on them)."""
    rng = np.random.default_rng(seed)
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize(("option", "cls_name"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_offline(tmp_path, option, cls_name):
    arrays = write_mnist(tmp_path, cls_name)
    d = build(f"dataset={option}", f"dataset.root={tmp_path}")
    assert d.task == "classification" and d.input_shape == (1, 28, 28) and d.num_outputs == 10
    assert (len(d.train), len(d.val), len(d.test)) == (18, 2, 10)  # val carved from train; official test kept
    images, labels = arrays["t10k"]
    assert d.test.y.tolist() == labels.tolist()  # the official test set, in order
    assert corr(d.test.x, torch.from_numpy(images).float()) > 0.9999  # same pixels, only standardized
    assert len(d.class_names) == 10


def write_cifar(root, n_per_batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=n_per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return batches


@pytest.fixture
def cifar_without_md5(monkeypatch):
    # torchvision verifies the md5 of every CIFAR-10 file against the real dataset's; files small enough
    # for a unit test cannot match, so for this test only "intact" means "present".
    import os

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_offline(tmp_path, cifar_without_md5):
    batches = write_cifar(tmp_path)
    d = build("dataset=cifar10", f"dataset.root={tmp_path}")
    assert d.input_shape == (3, 32, 32) and d.num_outputs == 10 and d.class_names[0] == "class0"
    assert len(d.train) + len(d.val) == 15 and len(d.test) == 3
    assert d.augment == Augment(crop_padding=4, hflip=True)
    test = batches["test_batch"]
    assert d.test.y.tolist() == test["labels"]
    raw = torch.from_numpy(test["data"]).float().view(-1, 3, 32, 32)  # CIFAR rows are channel-major
    for c in range(3):  # NCHW conversion kept every channel's pixels in place
        assert corr(d.test.x[:, c], raw[:, c]) > 0.9999


@pytest.mark.parametrize(
    ("option", "folder", "files"),
    [
        ("mnist", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("fashion_mnist", "FashionMNIST/raw", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]),
        ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    ],
)
def test_missing_files_name_the_folder_and_the_files(tmp_path, option, folder, files):
    with pytest.raises(DlrunError) as info:
        build(f"dataset={option}", f"dataset.root={tmp_path}")
    message = str(info.value)
    assert str(tmp_path / folder) in message and "dataset.download=true" in message
    for name in files:
        assert name in message
    assert "\n" not in message


def test_cifar10_without_its_meta_file_names_it(tmp_path, cifar_without_md5):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(DlrunError, match="batches.meta"):
        build("dataset=cifar10", f"dataset.root={tmp_path}")


# ---- image folders ---------------------------------------------------------------------------


def write_images(root, layout: dict[str, int]):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, (name, count) in enumerate(layout.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            size = (20 + 3 * i, 24)
            mode = ("RGB", "L", "RGBA")[i % 3]  # mixed modes all become 3 channels
            pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(root / name / f"{k}_{i}.png")


def image_folder(root, *extra):
    return build(
        "dataset=image_folder",
        f"dataset.root={root}",
        "dataset.image_size=16",
        "dataset.num_workers=0",
        "dataset.val_fraction=0.2",
        "dataset.test_fraction=0.2",
        *extra,
    )


def test_image_folder(tmp_path):
    write_images(tmp_path, {"cat": 5, "dog": 5})
    d = image_folder(tmp_path)
    assert d.class_names == ["cat", "dog"] and d.num_outputs == 2 and d.input_shape == (3, 16, 16)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 2)
    xs, ys = zip(*d.train.batches(4, shuffle_seed=0, augment=d.augment))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.long and set(y.tolist()) <= {0, 1}
    again = torch.cat([y for _, y in d.train.batches(4, shuffle_seed=0)])
    assert torch.equal(y, again)  # seeded shuffle order
    assert sorted(y.tolist()) == sorted(torch.cat([y for _, y in d.train.batches(4)]).tolist())


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DlrunError, match=f"image_folder root {tmp_path / 'nope'} does not exist"):
        image_folder(tmp_path / "nope")


def test_image_folder_without_class_folders(tmp_path):
    with pytest.raises(DlrunError, match="has no class sub-folders"):
        image_folder(tmp_path)


def test_image_folder_class_without_images(tmp_path):
    write_images(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DlrunError, match=f"class folder {tmp_path / 'dog'} has no images"):
        image_folder(tmp_path)


def test_image_folder_unreadable_image_is_named(tmp_path):
    write_images(tmp_path, {"cat": 2, "dog": 2})
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DlrunError, match=f"unreadable image {bad}"):
        image_folder(tmp_path)


# ---- data-parallel shards (dlrun.training.distributed.Shard passes shard=(rank, world)) ----


def test_sharded_splits_cover_every_sample_once():
    split = TensorSplit(torch.arange(10).view(10, 1).float(), torch.arange(10))
    seen = [torch.cat([y for _, y in split.batches(4, shard=(rank, 3))]) for rank in range(3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))  # evaluation: each sample on exactly one rank
    shuffled = [torch.cat([y for _, y in split.batches(4, shuffle_seed=1, shard=(rank, 3))]) for rank in range(3)]
    assert {len(s) for s in shuffled} == {4}  # training: padded so every rank runs the same steps
    assert set(torch.cat(shuffled).tolist()) == set(range(10))
    unsharded = torch.cat([y for _, y in split.batches(4, shuffle_seed=1)])
    assert torch.equal(torch.stack(shuffled, 1).flatten()[:10], unsharded)  # the same epoch order, interleaved


def test_image_folder_splits_shard_the_same_epoch_order():
    """FolderSplit (DataLoader over files) shards like TensorSplit: the ranks' parts of one epoch are disjoint,
    cover the split, and every rank runs the same number of steps."""
    from torch.utils.data import TensorDataset

    from dlrun.data.files import FolderSplit

    dataset = TensorDataset(torch.arange(10).view(10, 1).float(), torch.arange(10))
    split = FolderSplit(dataset, indices=list(range(10)), num_workers=0)
    parts = [torch.cat([y for _, y in split.batches(4, shuffle_seed=3, shard=(rank, 2))]) for rank in range(2)]
    assert [len(p) for p in parts] == [5, 5]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    evaluated = [torch.cat([y for _, y in split.batches(4, shard=(rank, 3))]) for rank in range(3)]
    assert sorted(torch.cat(evaluated).tolist()) == list(range(10))
