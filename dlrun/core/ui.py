"""What the user sees: a rich progress bar on a terminal, one plain line per epoch elsewhere (CI logs),
and rich tables of results."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

log = logging.getLogger("dlrun")
TEXT_MIN_WIDTH = 8  # a text column narrower than this shows too little of a label to be worth its padding


@contextlib.contextmanager
def progress(total_steps: int, description: str) -> Iterator[callable]:
    """Yield an `advance()` callback; a live bar on a TTY, a no-op otherwise."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )
    task = bar.add_task(description, total=total_steps)
    original = sys.stdout
    with bar:
        # Log lines go through rich's stdout proxy so they print above the bar instead of through it.
        handlers = [
            h for h in log.handlers if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is original
        ]
        for handler in handlers:
            handler.setStream(sys.stdout)
        try:
            yield lambda: bar.advance(task)
        finally:
            for handler in handlers:
                handler.setStream(original)


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def metrics_table(title: str, columns: Mapping[str, Mapping[str, object]]) -> None:
    """One row per metric, one column per source (e.g. val / test, or fp32 / int8); lists are skipped."""
    names: list[str] = []
    for values in columns.values():
        names += [k for k, v in values.items() if k not in names and not isinstance(v, (list, dict))]
    table = Table(title=title)
    table.add_column("metric", overflow="ellipsis")
    for source, values in columns.items():
        _add_column(table, source, [values.get(name) for name in names])
    for name in names:
        table.add_row(name, *(_cell(columns[s].get(name)) for s in columns))
    print_table(table)


def rows_table(title: str, rows: list[Mapping[str, object]], *, log: bool = True) -> None:
    """A table with one row per record (e.g. one per benchmarked variant)."""
    table = Table(title=title)
    headers = list(dict.fromkeys(k for row in rows for k in row))
    for header in headers:
        _add_column(table, header, [row.get(header) for row in rows])
    for row in rows:
        table.add_row(*(_cell(row.get(h)) for h in headers))
    print_table(table, log=log)


def _cell(value) -> str:
    return "" if value is None else fmt(value)


def _add_column(table: Table, header: str, values: list) -> None:
    """Numbers are right-aligned and never wrapped (a folded "8.758" reads as two numbers); text wraps at spaces
    and ellipsizes a word too long for its column (a path is cut, never split across lines)."""
    present = [v for v in values if v is not None and v != ""]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        table.add_column(header, justify="right", no_wrap=True)
    else:
        table.add_column(header, overflow="ellipsis")


def console_width() -> int | None:
    """COLUMNS when set, else the terminal's own width (None: rich asks it), else 120 for pipes and CI logs."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if sys.stdout.isatty() else 120


def _fit_numbers(table: Table, console: Console) -> None:
    """Fit a table wider than the console without squeezing numbers: rich would shrink every column alike.

    Text columns give way first (rich wraps them at spaces); if that is not enough, numeric columns shrink to their
    widest value and fold their header instead; if even that is too wide, the cell padding goes.
    """
    if Measurement.get(console, console.options.update_width(10**6), table).maximum <= console.width:
        return
    numeric = [column for column in table.columns if column.no_wrap and column.width is None]
    texts = len(table.columns) - len(numeric)

    def needed(number_widths: int, padding: int) -> int:
        return number_widths + TEXT_MIN_WIDTH * texts + len(table.columns) + 1 + 2 * padding * len(table.columns)

    values = {id(column): max((cell_len(str(cell)) for cell in column.cells), default=1) for column in numeric}
    if needed(sum(max(values[id(c)], cell_len(str(c.header))) for c in numeric), 1) <= console.width:
        return
    for column in numeric:
        column.width, column.no_wrap, column.overflow = values[id(column)], False, "fold"
    if needed(sum(values.values()), 1) > console.width:
        table.padding = (0, 0)


def print_table(table: Table, *, log: bool = True) -> None:
    """Print a table (and, inside a run, keep a copy in the run's log file)."""
    console = Console(width=console_width())
    _fit_numbers(table, console)
    console.print(table)
    if log:
        with console.capture() as captured:
            console.print(table)
        logging.getLogger().info("\n%s", captured.get())  # the root logger writes only to the run's log file
