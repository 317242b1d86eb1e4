"""Tables of result rows as files: CSV for spreadsheets, JSON for programs, Markdown for people, and a PNG
scatter plot of a trade-off (e.g. accuracy vs latency). All written atomically through dlrun.core.files."""

from __future__ import annotations

import io
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # "tight": keep the legend right of the axes
    plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())
