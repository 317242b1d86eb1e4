"""Every file a run writes goes through here: temp file + fsync + rename, so a crash, SIGKILL, full disk or
Ctrl-C leaves the old file or the new one, never half of one. Permissions follow the umask, as for any file."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from dlrun.core.errors import DlrunError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _mode_of_plain_open(path))  # mkstemp makes 0600: results would be unreadable to the group
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


def _mode_of_plain_open(path: Path) -> int:
    """The permissions open(path, "w") would leave: an existing file keeps its own, a new one gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask. os.umask can only read it by changing it, so /proc is asked first (no window in which
    another thread would create files with a wrong mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV with the union of their keys as header (a key a row lacks is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def write_rows(folder: Path, stem: str, rows: list[dict]) -> None:
    """<stem>.csv for people and spreadsheets, <stem>.jsonl for programs; both rewritten whole, atomically."""
    write_csv(Path(folder) / f"{stem}.csv", rows)
    write_jsonl(Path(folder) / f"{stem}.jsonl", rows)
