"""dlrun.core.files: atomic writes leave files with the permissions a plain open() would, under any umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dlrun.core import files


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002], ids=oct)
def test_new_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.log"
    plain.write_text("as logging or onnx would write it\n")
    files.write_json(tmp_path / "summary.json", {"ok": True})
    files.atomic_write_bytes(tmp_path / "last.pt", b"weights")
    assert mode(tmp_path / "summary.json") == mode(tmp_path / "last.pt") == mode(plain) == 0o666 & ~mask


def test_default_umask_makes_results_readable_by_others(tmp_path, umask):
    umask(0o022)
    files.write_rows(tmp_path, "metrics", [{"epoch": 1, "loss": 0.5}])
    for name in ("metrics.csv", "metrics.jsonl"):
        assert mode(tmp_path / name) == 0o644, name


def test_rewriting_a_file_keeps_its_own_mode(tmp_path, umask):
    umask(0o022)
    private = tmp_path / "summary.json"
    files.write_json(private, {"v": 1})
    private.chmod(0o600)  # the user made it private: a rewrite must not open it up again
    files.write_json(private, {"v": 2})
    assert mode(private) == 0o600 and files.read_json(private) == {"v": 2}
    assert not list(tmp_path.glob(".*.tmp"))
