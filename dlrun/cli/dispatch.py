"""From a command line to a recipe: validate the overrides, reserve the run directory, let Hydra compose the
config and set up logging, then call the recipe's `run(cfg)`. Errors end here as one `error:` line, and a
refused command leaves nothing behind: no run directory without results, no rewritten resumed run."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from dlrun.cli.registry import Command
from dlrun.config import compose, trust, validate
from dlrun.core.errors import FAILURE, USAGE, DlrunError, UsageError
from dlrun.training import distributed

# Commands whose interrupted runs continue in place with resume=RUN_DIR (dlrun.training.session; dlrun.commands.tune),
# and the file such a run directory holds.
RESUMABLE = {
    "train": "checkpoints/last.pt",
    "distill": "checkpoints/last.pt",
    "tune": "study.db",
    "prune": "checkpoints/round.pt",
}
# Commands that train with DDP over trainer.devices processes (dlrun.training.distributed).
DATA_PARALLEL = ("train",)
# What a summary.json's metrics.test is ranked by in a sweep's table, the first one present.
MAIN_METRICS = ("accuracy", "r2", "mse", "loss")


def dispatch(command: Command, overrides: list[str], multirun: bool, cfg_mode: str | None, verbose: bool) -> None:
    """Validate the overrides, pick the run directory, then hand over to Hydra's own runner."""
    reserved = None  # the run (or sweep) directory this invocation created, None when the user chose it
    resumed = None
    launch_devices = 0  # > 1: this process starts that many DDP workers (trainer.devices) and waits for them
    try:
        if multirun and cfg_mode:
            raise UsageError("--cfg prints one job's config: drop --multirun (-m), or pick one value per sweep")
        overrides = compose.expand_aliases(compose.quote_non_ascii(overrides), command.aliases)
        as_typed = overrides  # what DDP workers get: each one replays a resumed run's overrides itself
        typed_targets = trust.targets_in_overrides(overrides)
        resumed = _resume_dir(command.name, overrides)
        replayed = _with_resumed_overrides(resumed, overrides) if resumed else overrides
        composed = validate.validate(command.name, replayed)
        # A resumed run replays overrides read from its directory: only dlrun's builders and the targets the user
        # typed now (or trusts) may be instantiated, checked before anything is built or written.
        where = "the resumed run's .hydra/overrides.yaml" if resumed else "the command line"
        trusted = [*typed_targets, *composed.get("trust_targets", [])]
        trust.check_targets(trust.plain(composed), where, trusted, stored=False)
        overrides = replayed
        if not multirun:
            validate.check_no_sweep(overrides)
        if not cfg_mode:
            validate.check_complete(composed)
        worker = distributed.is_worker() and not cfg_mode
        if worker:  # one process of a DDP job: join the others before choosing the run directory with them
            if command.name not in DATA_PARALLEL:
                raise UsageError(f"dlrun {command.name} runs in one process: start it without a distributed launcher")
            distributed.join(composed.trainer.dist_timeout_s, use_cuda=_uses_cuda(composed))
        elif not cfg_mode:
            launch_devices = _devices_to_launch(command.name, composed, multirun)
        if not cfg_mode and not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
            from dlrun.core.rundir import reserve_run_dir

            def reserve() -> Path:
                return reserve_run_dir(command.name, composed.get("name"), multirun=multirun)

            # Under an outside launcher (torchrun, srun) rank 0 reserves the one run directory for all ranks.
            run_dir = distributed.shared_run_dir(reserve) if worker else reserve()
            reserved = run_dir if distributed.is_main() else None
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            overrides = [*overrides, f"{key}={compose.quote(str(run_dir))}"]
            as_typed = [*as_typed, f"{key}={compose.quote(str(run_dir))}"]
        if worker:
            run_dir = Path(_run_dir_override(overrides))
            overrides = [*overrides, *distributed.worker_overrides(run_dir)]
            distributed.send_output_to_log(run_dir)
    except DlrunError as exc:
        fail(exc, verbose)

    if launch_devices:
        args = [*(["--verbose"] if verbose else []), command.name, *as_typed]
        code = distributed.launch(command.name, args, launch_devices, reserved or resumed)
        if code in (USAGE, FAILURE) and reserved is not None:
            _remove_if_without_results(reserved, command.name)
        sys.exit(code)

    import hydra

    # Hydra rewrites a resumed run's .hydra/*.yaml before the recipe can refuse the resume (a model that does
    # not fit the checkpoint): keep the bytes so that a refused resume leaves the run as it was.
    before_resume = _ResumedRun.snapshot(resumed) if resumed and not cfg_mode else None
    jobs = _Jobs(command, verbose, multirun, reserved)
    argv = [*overrides]
    if multirun:
        argv.append("--multirun")
    if cfg_mode:
        argv += ["--cfg", cfg_mode]
    sys.argv = ["dlrun", *argv]  # hydra.main reads its arguments from sys.argv only
    try:
        hydra.main(config_path=str(compose.conf_dir()), config_name=command.name, version_base="1.3")(jobs)()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and before_resume is not None:
            before_resume.restore_if_not_continued()
        # A refused or failed command leaves no empty run behind; an interrupted one (Ctrl-C) keeps its log.
        if exit_.code in (USAGE, FAILURE) and reserved is not None and not multirun and not jobs.crashed:
            _remove_if_without_results(reserved, command.name)
        raise
    if multirun and not cfg_mode:
        jobs.report()


@dataclass
class _Outcome:
    number: int
    overrides: list[str]
    run_dir: Path
    error: str | None = None  # the one-line reason it failed; None when it succeeded


@dataclass
class _Jobs:
    """Hydra's task function: runs the recipe for each job. A single run's failure ends the command; in a sweep a
    failed job is reported and the next one runs, and `report()` compares them all at the end."""

    command: Command
    verbose: bool
    multirun: bool
    reserved: Path | None
    outcomes: list[_Outcome] = field(default_factory=list)
    crashed: bool = False  # a bug (not a DlrunError) ended a job: its run directory keeps the log with the traceback

    def __call__(self, cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dlrun.core import rundir

        run_dir = rundir.current()
        job = HydraConfig.get()
        outcome = _Outcome(job.job.num if self.multirun else 0, list(job.overrides.task), run_dir)
        self.outcomes.append(outcome)
        crashed = False
        try:
            recipe = importlib.import_module(self.command.recipe)
            _route_torch_warnings_to_log()
            recipe.run(cfg)
            if cfg.get("logger"):  # the test metrics, hyperparameters and artifacts to the trackers of logger=[...]
                importlib.import_module("dlrun.training.trackers").finish(cfg, run_dir)
        except DlrunError as exc:
            error = exc
        except Exception as exc:  # a bug, not a user error: one line here, the traceback in the run's log
            logging.getLogger().error("unexpected error", exc_info=True)  # the root logger writes to the log only
            if self.verbose:
                traceback.print_exc()
            error, crashed = DlrunError(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)"), True
        else:
            if not self.multirun and distributed.is_main():
                print(_wrote(run_dir))  # plain print: a path rich would wrap could not be copied
            return
        self.crashed = self.crashed or crashed
        # An interrupted sweep (Ctrl-C, exit code 130) stops as a whole: only a failed job lets the sweep go on.
        if not self.multirun or error.exit_code not in (USAGE, FAILURE):
            fail(error, self.verbose and not crashed)
        outcome.error = _first_line(error)
        _log_error(outcome.error)
        print(f"job {outcome.number} failed: {outcome.error}", file=sys.stderr)
        if self.reserved is not None and not crashed:
            _remove_if_without_results(run_dir, self.command.name)

    def report(self) -> None:
        """One table comparing the sweep's jobs, then exit 1 if any failed."""
        from dlrun.core import rundir, ui

        if not self.outcomes and self.reserved is not None:  # a launcher ran the jobs in other processes (submitit)
            self.outcomes = _outcomes_on_disk(self.reserved, self.command.name)
        shared = set.intersection(*(set(o.overrides) for o in self.outcomes)) if self.outcomes else set()
        rows = []
        for outcome in self.outcomes:
            varied = [o for o in outcome.overrides if o not in shared] or outcome.overrides
            status = "ok" if outcome.error is None else f"failed: {outcome.error}"
            rows.append(
                {
                    "job": outcome.number,
                    "overrides": " ".join(varied),
                    "status": status,
                    **_main_test_metric(outcome.run_dir),
                }
            )
        failed = [o for o in self.outcomes if o.error is not None]
        if rows:
            title = f"dlrun {self.command.name} sweep: {len(rows) - len(failed)} of {len(rows)} jobs ok"
            ui.rows_table(title, rows, log=False)  # after the sweep no run's log is open
        if len(failed) < len(self.outcomes):
            print(f"wrote {rundir.relative(self.outcomes[0].run_dir.parent)}")
        if failed:
            numbers = ", ".join(str(o.number) for o in failed)
            fail(
                DlrunError(f"{len(failed)} of {len(self.outcomes)} jobs failed (job {numbers}); see the table above"),
                verbose=False,
            )


def _uses_cuda(cfg) -> bool:
    device = str(cfg.trainer.device)
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def _devices_to_launch(command: str, cfg, multirun: bool) -> int:
    """trainer.devices when this process must start a DDP job, else 0."""
    devices = cfg.trainer.devices if "trainer" in cfg and "devices" in cfg.trainer else 1
    if devices <= 1:
        return 0
    if command not in DATA_PARALLEL:
        raise UsageError(f"trainer.devices={devices}: dlrun {command} runs in one process")
    if multirun:
        raise UsageError(
            f"trainer.devices={devices} with --multirun: run the sweep's jobs one at a time on a cluster "
            "launcher (hydra/launcher=slurm), or drop trainer.devices"
        )
    distributed.check_devices(devices, str(cfg.trainer.device))
    return devices


def _run_dir_override(overrides: list[str]) -> str:
    value = next(o.partition("=")[2] for o in reversed(overrides) if o.startswith("hydra.run.dir="))
    return value.strip("'\"")


def _outcomes_on_disk(sweep_dir: Path, command: str) -> list[_Outcome]:
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
        outcomes.append(_Outcome(int(job.name), overrides, job, error))
    return outcomes


def _main_test_metric(run_dir: Path) -> dict:
    """{"metric": name, "test": value} from a job's summary.json metrics.test, or {} when it has none."""
    import json

    try:
        test = json.loads((run_dir / "summary.json").read_text()).get("metrics", {}).get("test", {})
    except (OSError, ValueError, AttributeError):
        return {}
    name = next((m for m in MAIN_METRICS if isinstance(test, dict) and isinstance(test.get(m), (int, float))), None)
    return {"metric": name, "test": test[name]} if name else {}


def _wrote(run_dir: Path) -> str:
    """`wrote <run dir>`, naming the images in it (bench.png): the files a user opens rather than reads."""
    from dlrun.core import rundir

    images = sorted(p.name for p in run_dir.glob("*.png"))
    return f"wrote {rundir.relative(run_dir)}" + (f" ({', '.join(images)})" if images else "")


def _remove_if_without_results(run_dir: Path, command: str) -> None:
    """Remove a run directory this invocation created when it holds only what Hydra writes before the recipe
    starts (.hydra/ and <command>.log): a refused command leaves no run behind. A checkpoint, metrics, a summary
    or an artifact is a result, and keeps the directory."""
    log_file = Path(f"{command}.log")
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if not path.is_dir() and relative.parts[0] != ".hydra" and relative != log_file:
            return
    shutil.rmtree(run_dir, ignore_errors=True)  # best effort: failing to tidy up must not hide the real error


@dataclass
class _ResumedRun:
    """The .hydra/*.yaml files of a run about to be resumed, and its last checkpoint's stamp."""

    run_dir: Path
    configs: dict[Path, bytes]
    checkpoint: tuple[int, int] | None

    @classmethod
    def snapshot(cls, run_dir: Path) -> _ResumedRun:
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


def _route_torch_warnings_to_log() -> None:
    """torch prints its own glog-style warnings to stderr; keep them in the run's log file instead."""
    torch_logger = logging.getLogger("torch")
    torch_logger.handlers.clear()
    torch_logger.propagate = True  # the root logger writes to <run_dir>/<command>.log only


def _resume_dir(command: str, overrides: list[str]) -> Path | None:
    """The run directory of `dlrun train|distill resume=RUN_DIR`, checked to be resumable; None without resume=."""
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


def _with_resumed_overrides(run_dir: Path, overrides: list[str]) -> list[str]:
    """`dlrun train|distill resume=RUN_DIR`: replay the run's own overrides and continue in its directory."""
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


def _first_line(exc: DlrunError) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _log_error(message: str) -> None:
    """Keep the error in the run's log: inside a run the root logger writes to <run_dir>/<command>.log."""
    root = logging.getLogger()
    if any(isinstance(handler, logging.FileHandler) for handler in root.handlers):
        root.error("error: %s", message)


def fail(exc: DlrunError, verbose: bool) -> NoReturn:
    """Print `error: <one line>` (and keep it in the run's log when there is one), then exit."""
    if verbose and exc.__traceback__ is not None:
        traceback.print_exception(exc)
    message = _first_line(exc)
    _log_error(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exc.exit_code)
