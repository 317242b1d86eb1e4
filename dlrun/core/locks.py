"""One writer per run directory: a lock file holding the writer's pid, taken atomically, stale when its process
is gone."""

from __future__ import annotations

import os
from pathlib import Path

from dlrun.core.errors import DlrunError, UsageError

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
