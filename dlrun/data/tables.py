"""Your own table: `dataset=csv` reads a CSV file (plain or .gz) into standardized feature rows and a target.

The file is read with Python's csv module (no pandas). Its shape (number of features, number of classes) is
only known once it is read: the config may leave input_shape/num_outputs null and `dlrun train` fills them in
from the built Data, so the stored config rebuilds the same model. Shared with dataset=text_csv: reading the
rows and mapping labels to class indices.
"""

from __future__ import annotations

import csv as csv_module
import gzip
from pathlib import Path

import torch

from dlrun.core.errors import UsageError
from dlrun.data.splits import Data, checked_meta, split_indices, standardized


def csv_table(
    *,
    path,
    target,
    features,
    header,
    delimiter,
    task,
    input_shape,
    num_outputs,
    augment,
    val_fraction,
    test_fraction,
    split_seed,
) -> Data:
    """Feature columns -> float rows standardized with train statistics; the target column -> classes or values."""
    if header == "auto" and isinstance(target, str):  # a column given by name needs a header row
        header = True
    names, rows = read_rows(path, header, delimiter)
    target_col = column_index(-1 if target is None else target, names, len(names), path, "target")
    if features is None:
        feature_cols = [i for i in range(len(names)) if i != target_col]
    else:
        feature_cols = [column_index(f, names, len(names), path, "features") for f in features]
    if not feature_cols:
        raise UsageError(f"{path} has no feature columns besides the target")
    x = torch.tensor([[number(row[c], path, line, names[c]) for c in feature_cols] for line, row in rows.items()])
    labels = [row[target_col] for row in rows.values()]
    task = task_of(labels) if task == "auto" else task
    if task == "classification":
        y, class_names = class_indices(labels, path)
    elif task == "regression":
        y = torch.tensor([number(v, path, line, names[target_col]) for line, v in zip(rows, labels, strict=True)])
        class_names = None
    else:
        raise UsageError(f"dataset.task must be auto, classification or regression, got {task!r}")
    outputs = len(class_names) if class_names else 1
    shape = (len(feature_cols),)
    meta = checked_meta(task, input_shape, num_outputs, augment, shape, outputs, str(path))
    parts = split_indices(len(x), val_fraction, test_fraction, split_seed)
    return standardized(x.float(), y, parts, task=task, image=False, class_names=class_names, **meta)


def read_rows(path, header, delimiter) -> tuple[list[str], dict[int, list[str]]]:
    """(column names, {line number: cells}) of a CSV file; every row must have as many cells as the first.

    `header`: true, false or auto (a first row with a non-number where the second row has a number is a header).
    Without a header the columns are named by their index.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"dataset.path {path} is not a file")
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rt", encoding="utf-8", newline="") as f:
            lines = {n: row for n, row in enumerate(csv_module.reader(f, delimiter=delimiter), 1) if any(row)}
    except (OSError, UnicodeDecodeError, csv_module.Error) as exc:
        raise UsageError(f"cannot read {path} as a CSV file: {exc}") from None
    if not lines:
        raise UsageError(f"{path} is empty")
    rows = list(lines.values())
    if header == "auto":
        header = len(rows) > 1 and any(
            not _is_number(a) and _is_number(b) for a, b in zip(rows[0], rows[1], strict=False)
        )
    elif not isinstance(header, bool):
        raise UsageError(f"dataset.header must be auto, true or false, got {header!r}")
    first = next(iter(lines))
    names = [c.strip() for c in lines.pop(first)] if header else [str(i) for i in range(len(rows[0]))]
    for line, row in lines.items():
        if len(row) != len(names):
            raise UsageError(f"{path} line {line} has {len(row)} columns, the first row has {len(names)}")
    if not lines:
        raise UsageError(f"{path} has a header but no data rows")
    return names, lines


def column_index(column, names: list[str], width: int, path, key: str) -> int:
    """A column given by name (with a header) or by index (negative counts from the end)."""
    if isinstance(column, int) and not isinstance(column, bool):
        if -width <= column < width:
            return column % width
        raise UsageError(f"dataset.{key}: column {column} is out of range, {path} has {width} columns")
    if column in names:
        return names.index(column)
    raise UsageError(f"dataset.{key}: {path} has no column {column!r}; its columns: {', '.join(names[:20])}")


def number(cell: str, path, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):  # NaN (also "nan" typed in the file) or inf
        shown = repr(cell) if cell.strip() else "an empty value"
        raise UsageError(f"{path} line {line}, column {column!r}: {shown} is not a number (missing or non-numeric)")
    return value


def task_of(labels: list[str]) -> str:
    """Integers or strings are class labels; any other number makes the target a regression value."""
    if all(_is_int(v) for v in labels) or not all(_is_number(v) for v in labels):
        return "classification"
    return "regression"


def class_indices(labels: list[str], path) -> tuple[torch.Tensor, list[str]]:
    """Labels -> class indices in sorted order (numerically for integer labels) and the class names."""
    distinct = {v.strip() for v in labels}
    names = sorted(distinct, key=int) if all(_is_int(v) for v in distinct) else sorted(distinct)
    if len(names) < 2:
        raise UsageError(f"{path}: the target has a single class {names[0]!r}; classification needs at least two")
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[v.strip()] for v in labels], dtype=torch.long), names


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True
