"""`resume=RUN_DIR`: which commands continue an interrupted run in place, the checks before Hydra touches the run,
the run's own overrides replayed, and its .hydra/ files kept so that a refused resume leaves the run as it was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlrun.config import compose
from dlrun.core.errors import UsageError

# Commands whose interrupted runs continue in place with resume=RUN_DIR (dlrun.training.session; dlrun.commands.tune),
# and the file such a run directory holds.
RESUMABLE = {
    "train": "checkpoints/last.pt",
    "distill": "checkpoints/last.pt",
    "tune": "study.db",
    "prune": "checkpoints/round.pt",
}


def resume_dir(command: str, overrides: list[str]) -> Path | None:
    """The run directory of `dlrun <command> resume=RUN_DIR`, checked to be resumable; None without resume=."""
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if command not in RESUMABLE or resume in (None, "", "null"):
        return None
    run_dir = Path(resume.strip("'\""))
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / RESUMABLE[command]).is_file():
        raise UsageError(
            f"cannot resume {run_dir}: no {RESUMABLE[command]} there (is it a dlrun {command} run directory?)"
        )
    if not saved.is_file():
        raise UsageError(f"cannot resume {run_dir}: {saved} is missing")
    from dlrun.core.locks import check_unlocked

    check_unlocked(run_dir)  # before Hydra rewrites .hydra/ of a run another process is still writing
    return run_dir


def with_resumed_overrides(run_dir: Path, overrides: list[str]) -> list[str]:
    """`dlrun <command> resume=RUN_DIR`: replay the run's own overrides and continue in its directory."""
    from omegaconf import OmegaConf

    saved = run_dir / ".hydra" / "overrides.yaml"
    replayed = OmegaConf.to_container(OmegaConf.load(saved))
    if not isinstance(replayed, list) or not all(isinstance(o, str) for o in replayed):
        raise UsageError(f"cannot resume {run_dir}: {saved} is not a list of overrides")
    previous = [o for o in replayed if not o.lstrip("+~").startswith(("hydra.", "hydra/", "resume="))]
    return [
        *previous,
        *[o for o in overrides if not o.startswith("hydra.run.dir=")],
        f"hydra.run.dir={compose.quote(str(run_dir))}",
    ]


@dataclass
class ResumedRun:
    """The .hydra/*.yaml files of a run about to be resumed, and its last checkpoint's stamp."""

    run_dir: Path
    configs: dict[Path, bytes]
    checkpoint: tuple[int, int] | None

    @classmethod
    def snapshot(cls, run_dir: Path) -> ResumedRun:
        configs = {path: path.read_bytes() for path in sorted((run_dir / ".hydra").glob("*.yaml"))}
        return cls(run_dir, configs, _stamp(run_dir / "checkpoints" / "last.pt"))

    def restore_if_not_continued(self) -> None:
        """Put the configs back unless training went on (a new last.pt): then the new config is the run's truth."""
        from dlrun.core.files import atomic_write_bytes

        if _stamp(self.run_dir / "checkpoints" / "last.pt") != self.checkpoint:
            return
        for path, data in self.configs.items():
            if not path.is_file() or path.read_bytes() != data:
                atomic_write_bytes(path, data)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
