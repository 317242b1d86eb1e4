"""An index of past runs under outputs/ for `dlrun ls runs`: one entry per run directory, read without torch.

A run directory is outputs/<command>/<run>/ or, for a sweep job, outputs/<command>/multirun/<timestamp>/<job>/
(dlrun.core.rundir), or a `dlrun tune` trial, outputs/tune/<timestamp>/trials/<n>/. Its status:

    finished     has summary.json (read with contract.read_summary)
    unreadable   has a summary.json that read_summary refuses (its one-line reason is kept); never a crash
    running      no summary.json yet, and a live process holds the run's lock (dlrun.core.locks)
    interrupted  no summary.json, but checkpoints/ holds a .pt file: `dlrun <command> resume=<run>` continues it
    failed       none of these
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dlrun.core import contract, locks, rundir

STATUSES = ("finished", "running", "interrupted", "failed", "unreadable")
HEADLINE = ("accuracy", "r2", "mse")  # the test metrics a row shows: classification, then regression
LOWER_IS_BETTER = {"loss", "mse", "mae", "params", "flops", "wall_s", "size_bytes", "weights_bytes", "latency_ms"}
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})_(\d{2})-(\d{2})-(\d{2})")


@dataclass
class RunEntry:
    command: str  # the outputs/ folder it is under
    path: Path
    date: dt.datetime
    status: str  # one of STATUSES
    test: dict = field(default_factory=dict)  # the numeric test metrics (accuracy, samples, r2, mse, ...)
    params: int | None = None
    source_run: str | None = None  # lineage: the run this one's model was read from
    reason: str = ""  # why the summary is unreadable

    def value(self, key: str) -> float | None:
        """A metric for sorting: a test metric, or one of params, date."""
        if key == "params":
            return self.params
        if key == "date":
            return self.date.timestamp()
        return self.test.get(key)

    def row(self) -> dict:
        """The table row: None cells are blank, columns of HEADLINE metrics no run has are dropped by the caller."""
        row = {
            "command": self.command,
            "run": _under_command(self.path),  # outputs/<command>/<run>: the command column says which
            "date": self.date.strftime("%Y-%m-%d %H:%M"),
            "status": self.status,
        }
        row.update({metric: self.test.get(metric) for metric in HEADLINE})
        row["samples"] = self.test.get("samples")
        row["params"] = self.params
        row["source run"] = self.source_run
        row["note"] = self.reason or None
        return row


def index(root: Path = rundir.OUTPUTS, command: str | None = None) -> list[RunEntry]:
    """Every run directory under `root` (of `command` when given), oldest first."""
    entries = [_entry(name, folder) for name, folder in _run_dirs(Path(root), command)]
    return sorted(entries, key=lambda e: (e.date, str(e.path.parent), _trial_number(e.path)))


def select(entries: list[RunEntry], *, last: int | None = None, sort: str | None = None) -> list[RunEntry]:
    """The `last` newest entries (all when None), then ordered by `sort`: best first (highest accuracy, lowest
    mse...; LOWER_IS_BETTER says which; date: newest first), runs without the metric at the end. Without `sort`:
    oldest first, as `index` returns them."""
    if last is not None:
        entries = entries[-last:] if last > 0 else []
    if sort:
        descending = sort not in LOWER_IS_BETTER
        present = [e for e in entries if _finite(e.value(sort))]
        missing = [e for e in entries if not _finite(e.value(sort))]
        entries = sorted(present, key=lambda e: e.value(sort), reverse=descending) + missing
    return entries


def rows(entries: list[RunEntry]) -> list[dict]:
    """Table rows of `entries`; a HEADLINE metric (or note) column appears only if some run has a value in it."""
    table = [entry.row() for entry in entries]
    empty = [key for key in (*HEADLINE, "samples", "note") if all(row[key] is None for row in table)]
    return [{k: v for k, v in row.items() if k not in empty} for row in table]


def rich_table(title: str, table_rows: list[dict]):
    """`rows` as a rich Table: numbers right-aligned, the identifying columns (command, run, date, status) never
    wrapped: on a narrow console source run and note wrap first."""
    from rich.table import Table

    table = Table(title=title)
    headers = list(dict.fromkeys(k for row in table_rows for k in row))
    for header in headers:
        if header in ("source run", "note"):
            table.add_column(header, overflow="fold")  # wraps first when the console is narrow
        elif header in ("command", "run", "date", "status"):
            table.add_column(header, no_wrap=True, overflow="ellipsis")
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for row in table_rows:
        table.add_row(*(_cell(row.get(header)) for header in headers))
    return table


def sort_keys(entries: list[RunEntry]) -> list[str]:
    """What `--sort` accepts: the test metrics of evaluate.evaluate and any other of these entries, params, date."""
    known = ("accuracy", "top5", "r2", "mse", "mae", "loss")
    metrics = dict.fromkeys([*known, *(k for e in entries for k in e.test if k != "samples")])
    return [*metrics, "params", "date"]


def _run_dirs(root: Path, command: str | None) -> list[tuple[str, Path]]:
    """(command, run directory) pairs: outputs/<command>/<run>/ and outputs/<command>/multirun/<sweep>/<job>/."""
    if command is not None and (Path(command).name != command or command in ("", ".", "..")):
        return []  # a command is one folder name under outputs/, never a path out of it
    found = []
    for folder in [root / command] if command else sorted(_dirs(root)):
        for run in sorted(_dirs(folder)):
            if run.name == "multirun":
                found += [(folder.name, job) for sweep in sorted(_dirs(run)) for job in sorted(_dirs(sweep))]
            elif (run / "trials").is_dir():  # a `dlrun tune` sweep: its trials are the runs
                found += [(folder.name, trial) for trial in sorted(_dirs(run / "trials"), key=_trial_number)]
            else:
                found.append((folder.name, run))
    return found


def _dirs(folder: Path) -> list[Path]:
    """The visible subfolders of `folder`; none when it is missing or unreadable."""
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def _entry(command: str, folder: Path) -> RunEntry:
    date = _date(folder)
    summary_path = folder / rundir.SUMMARY
    if not summary_path.exists():
        if locks._lock_holder(folder / locks.LOCK) is not None:
            return RunEntry(command, folder, date, "running")
        try:
            has_checkpoint = any(p.suffix == ".pt" and p.is_file() for p in (folder / "checkpoints").iterdir())
        except OSError:  # no checkpoints/ (or unreadable)
            has_checkpoint = False
        return RunEntry(command, folder, date, "interrupted" if has_checkpoint else "failed")
    try:
        summary = contract.read_summary(summary_path)
        test = summary.metrics.get("test")
        metrics = {k: v for k, v in test.items() if _number(v)} if isinstance(test, dict) else {}
        params = summary.extra.get("params")
        source = summary.lineage.source_run if summary.lineage else None
        return RunEntry(
            command,
            folder,
            date,
            "finished",
            metrics,
            params if _number(params) else None,
            source if isinstance(source, str) else None,
        )
    except Exception as exc:  # noqa: BLE001 - any bad summary is a row saying so, never a crash of the listing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return RunEntry(command, folder, date, "unreadable", reason=reason.replace(str(summary_path) + ": ", ""))


def _date(folder: Path) -> dt.datetime:
    """When the run started: the timestamp of its name (a sweep job or tune trial: of its sweep's), else the
    folder's mtime."""
    for name in (folder.name, folder.parent.name, folder.parent.parent.name):
        match = _STAMP.match(name)
        if match:
            try:
                return dt.datetime.strptime("{} {}:{}:{}".format(*match.groups()), "%Y-%m-%d %H:%M:%S")
            except ValueError:
                break
    try:
        return dt.datetime.fromtimestamp(folder.stat().st_mtime)
    except OSError:
        return dt.datetime.fromtimestamp(0)


def _under_command(path: Path) -> str:
    """<run>, multirun/<sweep>/<job> or <sweep>/trials/<n> (tune): the run's path below outputs/<command>/."""
    parts = path.parts
    if len(parts) >= 3 and (parts[-3] == "multirun" or parts[-2] == "trials"):
        return "/".join(parts[-3:])
    return path.name


def _trial_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)
