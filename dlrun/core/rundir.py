"""Run directories: unique names, the latest completed run of a command, paths as written into summaries.

Layout contract (later commands and users rely on it; the files' contents are in dlrun.core.contract):
    outputs/<command>/<YYYY-MM-DD_HH-MM-SS>[_<name>]/
        .hydra/            composed config + overrides (written by Hydra)
        <command>.log      the run's log
        summary.json       machine-readable result of the run
        checkpoints/       last.pt, best.pt            (train)
        metrics.csv/.jsonl one row per epoch           (train, qat)
"""

from __future__ import annotations

import re
import time
import unicodedata
from pathlib import Path

from dlrun.core.errors import DlrunError, UsageError

OUTPUTS = Path("outputs")
SUMMARY = "summary.json"


NAME_CHARS = 80
NAME_BYTES = 200  # a file name is at most 255 bytes: room for the timestamp and a -N suffix


def sanitize_name(name: str) -> str:
    """A run name that stays one path component: `../../etc` becomes `etc`, `café` stays `café`.

    Letters and digits of any script are kept (NFC, so the same name is the same folder on every OS); any other
    run of characters (separators, spaces, control and format characters) becomes one `-`; no leading dot.
    """
    cleaned = re.sub(r"[^\w.-]+", "-", unicodedata.normalize("NFC", str(name))).strip(".-")[:NAME_CHARS]
    while len(cleaned.encode()) > NAME_BYTES:
        cleaned = cleaned[:-1]
    return cleaned.rstrip(".-")


def reserve_run_dir(command: str, name: str | None = None, *, multirun: bool = False) -> Path:
    """Create and return a fresh run directory; concurrent runs in the same second get distinct ones."""
    parent = OUTPUTS / command / ("multirun" if multirun else "")
    stem = time.strftime("%Y-%m-%d_%H-%M-%S")
    if name and sanitize_name(name):
        stem += "_" + sanitize_name(name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            candidate = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                candidate.mkdir()  # atomic: exactly one process wins each name
                return candidate
            except FileExistsError:
                continue
    except OSError as exc:
        raise DlrunError(f"cannot create a run directory under {parent}: {exc.strerror or exc}") from None
    raise DlrunError(f"too many runs named {stem} under {parent}")


def completed_runs(command: str) -> list[Path]:
    """Run directories of `command` that finished (have summary.json), oldest first."""
    root = OUTPUTS / command
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.glob(f"*/{SUMMARY}")] + [p.parent for p in root.glob(f"multirun/*/*/{SUMMARY}")]
    return sorted(runs, key=lambda p: (p / SUMMARY).stat().st_mtime)


def latest_run(*commands: str) -> Path:
    """The most recently completed run of any of `commands`, or a one-line error saying what to run first."""
    runs = sorted((r for c in commands for r in completed_runs(c)), key=lambda p: (p / SUMMARY).stat().st_mtime)
    if not runs:
        raise UsageError(f"no completed {' or '.join(commands)} run under {OUTPUTS}/; run `dlrun {commands[0]}` first")
    return runs[-1]


def run_dir_arg(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"run directory {value} does not exist")
    return path


def relative(path: Path) -> str:
    """A path as written into summaries: relative to the working directory when inside it (no machine paths)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def current() -> Path:
    """The run directory Hydra set up for this job."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
