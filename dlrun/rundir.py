"""Run directories and the files in them: unique names, atomic writes, lineage lookups.

Layout contract (later commands and users rely on it):
    outputs/<command>/<YYYY-MM-DD_HH-MM-SS>[_<name>]/
        .hydra/            composed config + overrides (written by Hydra)
        <command>.log      the run's log
        summary.json       machine-readable result of the run
        checkpoints/       last.pt, best.pt            (train)
        metrics.csv/.jsonl one row per epoch           (train, qat)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dlrun.errors import DlrunError, UsageError

OUTPUTS = Path("outputs")
SUMMARY = "summary.json"


def sanitize_name(name: str) -> str:
    """A run name that stays one path component: `../../etc` becomes `etc`."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip(".-")
    return cleaned[:80]


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C included: never leave the temp file behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, read-only, permissions: one line naming the file
            raise DlrunError(f"cannot write {path}: {exc.strerror or exc}; the previous file is intact") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DlrunError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DlrunError(f"{path} is not readable JSON: {exc}") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def versions() -> dict[str, str | None]:
    """Versions of the stack, read from package metadata (no imports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("dlrun", "torch", "torchvision", "torchao", "executorch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    """Commit of the dlrun checkout (None when installed from a wheel or git is missing)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def relative(path: Path) -> str:
    """A path as written into summaries: relative to the working directory when inside it (no machine paths)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(lock: Path) -> int | None:
    """The pid of another live process holding `lock`, or None (no lock, our own, or stale)."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and _pid_alive(pid) else None


def check_unlocked(run_dir: Path) -> None:
    """Refuse early (before Hydra rewrites the run's .hydra/ files) when another live process writes `run_dir`."""
    lock = Path(run_dir) / LOCK
    pid = _lock_holder(lock)
    if pid is not None:
        raise UsageError(f"{run_dir} is in use by process {pid} (lock file {lock}); wait for it or stop it first")


def acquire_lock(run_dir: Path) -> Path:
    """Mark `run_dir` as being written by this process; refuse if another live process holds it."""
    lock = Path(run_dir) / LOCK
    for _ in range(2):
        try:
            _create_with_pid(lock)
            return lock
        except FileExistsError:
            check_unlocked(run_dir)
            lock.unlink(missing_ok=True)  # stale: its process is gone
        except OSError as exc:
            raise DlrunError(f"cannot lock {run_dir}: {exc.strerror or exc}") from None
    raise UsageError(f"cannot lock {run_dir}")


def _create_with_pid(lock: Path) -> None:
    """Create `lock` holding our pid, atomically: another process never reads it empty (and takes it as stale)."""
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        os.link(mine, lock)  # fails with FileExistsError when the lock exists
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem: exclusive create, then write
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
    finally:
        mine.unlink(missing_ok=True)


def release_lock(lock: Path) -> None:
    Path(lock).unlink(missing_ok=True)


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Delete temp files a killed atomic_write_bytes left behind (call only while holding the run's lock)."""
    removed = []
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def current() -> Path:
    """The run directory Hydra set up for this job."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def write_summary(run_dir: Path, command: str, config: dict, **fields: Any) -> dict:
    """summary.json: the machine-readable result of a run (`metrics`, sizes, timings, lineage...)."""
    summary = {"command": command, **fields, "versions": versions(), "git_commit": git_commit(), "config": config}
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """metrics.csv and metrics.jsonl, rewritten atomically each epoch (a crash never leaves half a row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
