"""Tables of result rows as files: CSV for spreadsheets, JSON for programs, Markdown for people, and PNG plots:
a trade-off scatter (e.g. accuracy vs latency), a run's training curves, a confusion matrix, before/after bars. All
written atomically through dlrun.core.files; matplotlib (Agg, no display) is imported only when a plot is drawn."""

from __future__ import annotations

import io
import math
from itertools import cycle
from pathlib import Path

from dlrun.core import files, ui

# Distinct hollow shapes: points of variants that tie stay visible on top of each other.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def write_table(folder: Path, stem: str, rows: list[dict]) -> None:
    """<stem>.csv, <stem>.json and <stem>.md, with the union of the rows' keys as columns."""
    files.write_csv(folder / f"{stem}.csv", rows)
    files.write_json(folder / f"{stem}.json", rows)
    files.atomic_write_text(folder / f"{stem}.md", markdown(rows))


def markdown(rows: list[dict]) -> str:
    headers = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += [
        "| " + " | ".join(ui.fmt(row[h]) if row.get(h) is not None else "" for h in headers) + " |" for row in rows
    ]
    return "\n".join(lines) + "\n"


def tradeoff_plot(
    path: Path, points: list[tuple[str, float, float]], *, xlabel: str, ylabel: str, title: str, log_x: bool = False
) -> None:
    """One marker per (label, x, y) point, named in a legend: annotations beside points pile up on ties."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, x, y), marker, color in zip(points, cycle(_MARKERS), cycle(colors)):
        ax.scatter(x, y, s=60, marker=marker, facecolors="none", edgecolors=color, linewidths=1.5, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    save_figure(fig, path, tight=True)  # keeps the legend right of the axes


def curves_plot(path: Path, rows: list[dict], *, title: str = "training curves") -> None:
    """Loss (train and val), the val metrics and the learning rate by epoch, from metric rows as Loop.fit records
    them (epoch, train_loss, val_<metric>..., lr): one figure, one subplot each. Non-finite values are gaps."""
    plt = pyplot()
    epochs = [row["epoch"] for row in rows]
    # The headline metrics of evaluate.evaluate, in its order; val_loss shares the loss panel.
    metrics = [m for m in ("accuracy", "top5", "r2", "mse", "mae") if any(f"val_{m}" in row for row in rows)]
    panels = ["loss", *metrics, "lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    _margins(fig, left=0.6, right=0.2, bottom=0.5, top=0.75, wspace=0.3)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            ax.plot(epochs, _values(rows, "train_loss"), marker="o", markersize=3, label="train")
            ax.plot(epochs, _values(rows, "val_loss"), marker="o", markersize=3, label="val")
            ax.legend(fontsize=8)
            ax.set_title("loss")
        elif panel == "lr":
            ax.plot(epochs, _values(rows, "lr"), marker="o", markersize=3, color="tab:gray")
            ax.set_title("learning rate (end of epoch)")
        else:
            ax.plot(epochs, _values(rows, f"val_{panel}"), marker="o", markersize=3, color="tab:green")
            ax.set_title(f"val {panel}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)


def confusion_matrix_plot(
    path: Path, matrix: list[list[int]], class_names: list[str] | None = None, *, title: str = "confusion matrix"
) -> None:
    """Counts of (true class, predicted class), true classes down, predictions across, class names on both axes;
    the diagonal holds the correct predictions. Counts are printed in the cells up to 30 classes."""
    plt = pyplot()
    n = len(matrix)
    names = [str(name) for name in class_names] if class_names and len(class_names) == n else [str(i) for i in range(n)]
    side = min(max(4.5, 0.45 * n + 2.5), 24)
    longest = max(map(len, names), default=0)
    label_inches = 0.3 + 0.09 * longest  # the tick labels' width at font size 10, plus the axis label
    fig, ax = plt.subplots(figsize=(side + 1 + label_inches, side + (label_inches if longest > 3 else 0)))
    _margins(fig, left=0.25 + label_inches, right=0.65, bottom=0.35 + (label_inches if longest > 3 else 0.2), top=0.4)
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), names, rotation=90 if longest > 3 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(n))
    ax.set_title(f"{title}: {correct}/{total} correct" if total else title)
    if n <= 30:
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    color = "white" if count > peak / 2 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    save_figure(fig, path)


def comparison_plot(path: Path, columns: dict[str, dict], metrics: list[str], *, title: str) -> None:
    """Before/after bars: one panel per metric (accuracy, params, FLOPs, bytes, latency...), one bar per variant
    (e.g. fp32 source vs int8 result), each labelled with its value; metrics no variant has are left out."""
    shown = [m for m in metrics if any(_number(values.get(m)) for values in columns.values())]
    if not shown:
        raise ValueError("no metric to compare")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 3.6), squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(columns)
    for ax, metric in zip(axes[0], shown, strict=True):
        heights = [_values([columns[name]], metric)[0] for name in names]
        bars = ax.bar(range(len(names)), [0 if math.isnan(h) else h for h in heights], color=colors[: len(names)])
        for bar, height in zip(bars, heights, strict=True):
            label = "n/a" if math.isnan(height) else ui.fmt(int(height) if height == int(height) else height)
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.margins(y=0.15)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def _margins(fig, *, left: float, right: float, bottom: float, top: float, wspace: float = 0.2) -> None:
    """Fixed margins in inches: a layout engine ("constrained", "tight") would measure every text first, which
    doubles the time a figure takes to draw (~0.2 s each on 2 cores, issue 13)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height, wspace=wspace
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _values(rows: list[dict], key: str) -> list[float]:
    """rows' `key` as floats; missing or non-numeric values become NaN (a gap in the line)."""
    values = []
    for row in rows:
        value = row.get(key)
        values.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan)
    return values


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on first use: it costs ~0.3 s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, tight: bool = False) -> None:
    """The figure as a PNG, written atomically; the figure is closed either way. `tight` crops it to what was drawn
    (a legend outside the axes), at the cost of drawing it twice."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())
