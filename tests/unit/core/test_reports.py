"""reports' plots: real PNG files (signature, IHDR dimensions, not an empty canvas), written atomically."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from dlrun.core import reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, asserting the signature, that IHDR comes first and that the file is not tiny."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert len(data) > 5_000, f"{path}: {len(data)} bytes, an empty figure?"
    return struct.unpack(">II", data[16:24])


def rows(task: str, epochs: int = 5) -> list[dict]:
    metrics = {"accuracy": 0.9, "top5": 0.99} if task == "classification" else {"mse": 3000.0, "mae": 40.0, "r2": 0.4}
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e,
            **{f"val_{k}": v * (1 + e / 100) for k, v in metrics.items()},
            "lr": 0.01 * 0.5**e,
            "seconds": 0.1,
            "samples_per_s": 1000.0,
        }
        for e in range(1, epochs + 1)
    ]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_curves_plot_is_one_figure_of_subplots(tmp_path, task):
    path = tmp_path / "curves.png"
    reports.curves_plot(path, rows(task), title="tiny")
    width, height = png_size(path)
    panels = 4 if task == "classification" else 5  # loss, the val metrics, lr
    assert width > panels * 300 and 250 < height < width / 2  # side by side, one row
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left


def test_curves_plot_takes_non_finite_and_missing_values_as_gaps(tmp_path):
    data = rows("classification")
    data[2]["val_loss"] = math.nan
    data[3]["train_loss"] = math.inf
    del data[1]["val_accuracy"]
    data[0]["lr"] = "n/a"
    reports.curves_plot(tmp_path / "curves.png", data)
    png_size(tmp_path / "curves.png")


def test_curves_plot_of_one_epoch(tmp_path):
    reports.curves_plot(tmp_path / "curves.png", rows("classification", epochs=1))
    png_size(tmp_path / "curves.png")


def test_confusion_matrix_plot_has_a_square_grid(tmp_path):
    matrix = [[30 if i == j else (i + j) % 3 for j in range(10)] for i in range(10)]
    names = [f"digit {i}" for i in range(10)]
    reports.confusion_matrix_plot(tmp_path / "cm.png", matrix, names, title="test")
    width, height = png_size(tmp_path / "cm.png")
    assert 0.8 < width / height < 1.6


def test_confusion_matrix_plot_numbers_classes_without_names(tmp_path):
    reports.confusion_matrix_plot(tmp_path / "cm.png", [[5, 1], [0, 7]], None)
    png_size(tmp_path / "cm.png")
    reports.confusion_matrix_plot(tmp_path / "cm.png", [[5, 1], [0, 7]], ["only one name"])  # wrong count: numbered
    png_size(tmp_path / "cm.png")


def test_many_classes_skip_the_cell_counts(tmp_path):
    n = 40
    matrix = [[1 if i == j else 0 for j in range(n)] for i in range(n)]
    reports.confusion_matrix_plot(tmp_path / "cm.png", matrix, [f"class_{i}" for i in range(n)])
    png_size(tmp_path / "cm.png")


def test_a_failed_plot_write_leaves_the_old_file(tmp_path, monkeypatch):
    from dlrun.core import files
    from dlrun.core.errors import DlrunError

    path = tmp_path / "curves.png"
    reports.curves_plot(path, rows("classification"))
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(DlrunError, match="curves.png"):
        reports.curves_plot(path, rows("classification", epochs=3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
