"""Where a run's numbers came from: versions of the stack and the git commit of dlrun (stored in every
checkpoint and summary)."""

from __future__ import annotations

import subprocess
from pathlib import Path


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
