"""A sweep's outcome (`dlrun <command> -m ...`): one row per job with its varied overrides, status and headline test
metric, read from the jobs this process ran or, for a launcher that ran them elsewhere (submitit), from their
directories."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# What a summary.json's metrics.test is ranked by in a sweep's table, the first one present.
MAIN_METRICS = ("accuracy", "r2", "mse", "loss")


@dataclass
class Outcome:
    number: int
    overrides: list[str]
    run_dir: Path
    error: str | None = None  # the one-line reason it failed; None when it succeeded


def report(command: str, outcomes: list[Outcome]) -> list[Outcome]:
    """Print the table comparing the jobs (and the sweep directory when any succeeded); returns the failed ones."""
    from dlrun.core import rundir, ui

    shared = set.intersection(*(set(o.overrides) for o in outcomes)) if outcomes else set()
    rows = []
    for outcome in outcomes:
        varied = [o for o in outcome.overrides if o not in shared] or outcome.overrides
        status = "ok" if outcome.error is None else f"failed: {outcome.error}"
        rows.append(
            {
                "job": outcome.number,
                "overrides": " ".join(varied),
                "status": status,
                **main_test_metric(outcome.run_dir),
            }
        )
    failed = [o for o in outcomes if o.error is not None]
    if rows:
        title = f"dlrun {command} sweep: {len(rows) - len(failed)} of {len(rows)} jobs ok"
        ui.rows_table(title, rows, log=False)  # after the sweep no run's log is open
    if len(failed) < len(outcomes):
        print(f"wrote {rundir.relative(outcomes[0].run_dir.parent)}")
    return failed


def outcomes_on_disk(sweep_dir: Path, command: str) -> list[Outcome]:
    """The jobs of a sweep run by another process (hydra/launcher=submitit_local|slurm), read from their
    directories: overrides from .hydra/overrides.yaml, a failure from the `error:` line in the job's log."""
    from omegaconf import OmegaConf

    outcomes = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        saved = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(saved)] if saved.is_file() else []
        error = None
        if not (job / "summary.json").is_file():
            log_file = job / f"{command}.log"
            lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
            errors = [line.partition("error: ")[2] for line in lines if "error: " in line]
            error = errors[-1] if errors else f"no summary.json; see {job}"
        outcomes.append(Outcome(int(job.name), overrides, job, error))
    return outcomes


def main_test_metric(run_dir: Path) -> dict:
    """{"metric": name, "test": value} from a job's summary.json metrics.test, or {} when it has none."""

    try:
        test = json.loads((run_dir / "summary.json").read_text()).get("metrics", {}).get("test", {})
    except (OSError, ValueError, AttributeError):
        return {}
    name = next((m for m in MAIN_METRICS if isinstance(test, dict) and isinstance(test.get(m), (int, float))), None)
    return {"metric": name, "test": test[name]} if name else {}
