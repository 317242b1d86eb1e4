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

from dlrun.cli import resume, sweep
from dlrun.cli.failure import fail, first_line, log_error
from dlrun.cli.registry import Command
from dlrun.config import compose, trust, validate
from dlrun.core import process
from dlrun.core.errors import FAILURE, USAGE, DlrunError, UsageError
from dlrun.training import distributed

# Commands that train with DDP over trainer.devices processes (dlrun.training.distributed).
DATA_PARALLEL = ("train",)


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
        resumed = resume.resume_dir(command.name, overrides)
        replayed = resume.with_resumed_overrides(resumed, overrides) if resumed else overrides
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
    before_resume = resume.ResumedRun.snapshot(resumed) if resumed and not cfg_mode else None
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
class _Jobs:
    """Hydra's task function: runs the recipe for each job. A single run's failure ends the command; in a sweep a
    failed job is reported and the next one runs, and `report()` compares them all at the end."""

    command: Command
    verbose: bool
    multirun: bool
    reserved: Path | None
    outcomes: list[sweep.Outcome] = field(default_factory=list)
    crashed: bool = False  # a bug (not a DlrunError) ended a job: its run directory keeps the log with the traceback

    def __call__(self, cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dlrun.core import rundir

        run_dir = rundir.current()
        job = HydraConfig.get()
        outcome = sweep.Outcome(job.job.num if self.multirun else 0, list(job.overrides.task), run_dir)
        self.outcomes.append(outcome)
        crashed = False
        try:
            recipe = process.import_without_collection(self.command.recipe)  # torch and the rest
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
        outcome.error = first_line(error)
        log_error(outcome.error)
        print(f"job {outcome.number} failed: {outcome.error}", file=sys.stderr)
        if self.reserved is not None and not crashed:
            _remove_if_without_results(run_dir, self.command.name)

    def report(self) -> None:
        """One table comparing the sweep's jobs, then exit 1 if any failed."""
        if not self.outcomes and self.reserved is not None:  # a launcher ran the jobs in other processes (submitit)
            self.outcomes = sweep.outcomes_on_disk(self.reserved, self.command.name)
        failed = sweep.report(self.command.name, self.outcomes)
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


def _route_torch_warnings_to_log() -> None:
    """torch prints its own glog-style warnings to stderr; keep them in the run's log file instead."""
    torch_logger = logging.getLogger("torch")
    torch_logger.handlers.clear()
    torch_logger.propagate = True  # the root logger writes to <run_dir>/<command>.log only
