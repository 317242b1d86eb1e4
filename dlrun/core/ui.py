"""What the user sees: a rich progress bar on a terminal, one plain line per epoch elsewhere (CI logs),
and rich tables of results."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, Mapping

from rich.console import Console
from rich.table import Table

log = logging.getLogger("dlrun")


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

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task(description, total=total_steps)
    original = sys.stdout
    with bar:
        # Log lines go through rich's stdout proxy so they print above the bar instead of through it.
        handlers = [h for h in log.handlers if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is original]
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
    table.add_column("metric")
    for source in columns:
        table.add_column(source, justify="right")
    for name in names:
        table.add_row(name, *(fmt(columns[s].get(name, "")) for s in columns))
    print_table(table)


def rows_table(title: str, rows: list[Mapping[str, object]]) -> None:
    """A table with one row per record (e.g. one per benchmarked variant)."""
    table = Table(title=title)
    headers = list(dict.fromkeys(k for row in rows for k in row))
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(fmt(row[h]) if row.get(h) is not None else "" for h in headers))
    print_table(table)


def print_table(table: Table, *, log: bool = True) -> None:
    """Print a table (and, inside a run, keep a copy in the run's log file)."""
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    if log:
        with console.capture() as captured:
            console.print(table)
        logging.getLogger().info("\n%s", captured.get())  # the root logger writes only to the run's log file
