"""dataset=csv: your own table (plain or .gz) -> standardized features and classes or regression targets, with
one-line errors that name the row and column of a bad value. The tests write their own small files."""

from __future__ import annotations

import gzip

import pytest
import torch

from dlrun import data
from dlrun.config import validate
from dlrun.core.errors import UsageError

CPU = torch.device("cpu")


def build(path, *overrides: str) -> data.Data:
    """The dataset exactly as `dlrun train dataset=csv dataset.path=<path> <overrides>` builds it."""
    cfg = validate.validate("train", ["dataset=csv", f"dataset.path={path}", *overrides])
    return data.build(cfg.dataset, CPU)


def write(path, lines: list[str]):
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def table(n: int, label) -> list[str]:
    return [f"{i * 0.5:.2f},{(i % 7) - 3},{label(i)}" for i in range(n)]


def test_gz_with_header_and_text_labels_is_classification_with_class_names(tmp_path):
    path = write(tmp_path / "t.csv.gz", ["age,dose,outcome", *table(40, lambda i: "yes" if i % 2 else "no")])
    d = build(path, "dataset.target=outcome")
    assert d.task == "classification" and d.num_outputs == 2 and d.class_names == ["no", "yes"]
    assert d.input_shape == (2,)
    assert len(d.train) + len(d.val) + len(d.test) == 40
    # standardized with the train split's statistics
    assert d.train.x.mean(0).abs().max() < 1e-5 and (d.train.x.std(0) - 1).abs().max() < 1e-4
    assert d.train.y.dtype == torch.long


def test_integer_target_without_header_is_classification_sorted_numerically(tmp_path):
    path = write(tmp_path / "t.csv", table(60, lambda i: [10, 2, 7][i % 3]))
    d = build(path)  # header auto (all numbers: none), target = last column
    assert d.task == "classification" and d.class_names == ["2", "7", "10"]


def test_float_target_is_regression_and_explicit_task_and_features_apply(tmp_path):
    path = write(tmp_path / "t.csv", ["a,b,y", *table(50, lambda i: f"{i * 1.5 + 0.25}")])
    d = build(path, "dataset.target=y")
    assert d.task == "regression" and d.num_outputs == 1 and d.train.y.shape[1:] == (1,)
    assert d.target_std > 0
    d = build(path, "dataset.target=0", "dataset.features=[b]", "dataset.task=regression")
    assert d.input_shape == (1,) and d.task == "regression"


@pytest.mark.parametrize(
    ("bad_cell", "needle"),
    [("", "an empty value"), ("abc", "'abc'"), ("nan", "'nan'")],
)
def test_a_missing_or_non_numeric_value_names_its_line_and_column(tmp_path, bad_cell, needle):
    lines = ["age,dose,outcome", *table(20, lambda i: i % 2)]
    lines[5] = f"1.0,{bad_cell},1"  # line 6 of the file
    with pytest.raises(UsageError) as caught:
        build(write(tmp_path / "t.csv", lines), "dataset.target=outcome")
    message = str(caught.value)
    assert "line 6" in message and "column 'dose'" in message and needle in message and "\n" not in message


def test_malformed_files_are_one_line_usage_errors(tmp_path):
    cases = {
        "ragged": (["a,b,y", "1,2,0", "1,2", "3,4,1"], "line 3 has 2 columns"),
        "one_class": (["a,y", *[f"{i},1" for i in range(10)]], "single class"),
    }
    for name, (lines, needle) in cases.items():
        with pytest.raises(UsageError, match=needle):
            build(write(tmp_path / f"{name}.csv", lines))
    path = write(tmp_path / "t.csv", ["a,b,y", *table(10, lambda i: i % 2)])
    with pytest.raises(UsageError, match="has no column 'label'; its columns: a, b, y"):
        build(path, "dataset.target=label")
    with pytest.raises(UsageError, match="column 5 is out of range"):
        build(path, "dataset.target=5")
    with pytest.raises(UsageError, match="is not a file"):
        build(tmp_path / "missing.csv")


def test_declared_sizes_are_checked_against_the_file(tmp_path):
    path = write(tmp_path / "t.csv", table(30, lambda i: i % 3))
    assert build(path, "dataset.input_shape=[2]", "dataset.num_outputs=3").num_outputs == 3
    with pytest.raises(UsageError, match="dataset.num_outputs is 4"):
        build(path, "dataset.num_outputs=4")
