"""What a run directory holds for the next command: summary.json (and, in dlrun.core.checkpoint, checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlrun.core.files import write_json
from dlrun.core.provenance import git_commit, versions
from dlrun.core.rundir import SUMMARY


def write_summary(run_dir: Path, command: str, config: dict, **fields: Any) -> dict:
    """summary.json: the machine-readable result of a run (`metrics`, sizes, timings, lineage...)."""
    summary = {"command": command, **fields, "versions": versions(), "git_commit": git_commit(), "config": config}
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary
