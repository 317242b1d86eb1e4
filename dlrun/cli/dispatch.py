"""From a command line to a recipe: validate the overrides, reserve the run directory, let Hydra compose the
config and set up logging, then call the recipe's `run(cfg)`. Errors end here as one `error:` line."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

from dlrun.cli.registry import Command
from dlrun.config import compose, trust, validate
from dlrun.core.errors import DlrunError, UsageError


def dispatch(command: Command, overrides: list[str], multirun: bool, cfg_mode: Optional[str], verbose: bool) -> None:
    """Validate the overrides, pick the run directory, then hand over to Hydra's own runner."""
    try:
        if multirun and cfg_mode:
            raise UsageError("--cfg prints one job's config: drop --multirun (-m), or pick one value per sweep")
        overrides = compose.expand_aliases(overrides, command.aliases)
        typed_targets = trust.targets_in_overrides(overrides)
        resumed = _with_resumed_overrides(command.name, overrides)
        composed = validate.validate(command.name, resumed)
        # A resumed run replays overrides read from its directory: only dlrun's builders and the targets the user
        # typed now (or trusts) may be instantiated, checked before anything is built or written.
        where = "the resumed run's .hydra/overrides.yaml" if resumed is not overrides else "the command line"
        trusted = [*typed_targets, *composed.get("trust_targets", [])]
        trust.check_targets(trust.plain(composed), where, trusted, stored=False)
        overrides = resumed
        if not multirun:
            validate.check_no_sweep(overrides)
        if not cfg_mode:
            validate.check_complete(composed)
        if not cfg_mode and not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
            from dlrun.core.rundir import reserve_run_dir

            run_dir = reserve_run_dir(command.name, composed.get("name"), multirun=multirun)
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            overrides = [*overrides, f"{key}={compose.quote(str(run_dir))}"]
    except DlrunError as exc:
        fail(exc, verbose)

    import hydra

    def job(cfg) -> None:
        try:
            recipe = importlib.import_module(command.recipe)
            _route_torch_warnings_to_log()
            recipe.run(cfg)
        except DlrunError as exc:
            fail(exc, verbose)
        except Exception as exc:  # a bug, not a user error: one line here, the traceback in the run's log
            logging.getLogger("dlrun").debug("unexpected error", exc_info=True)
            if verbose:
                traceback.print_exc()
            fail(DlrunError(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)"), verbose=False)

    argv = [*overrides]
    if multirun:
        argv.append("--multirun")
    if cfg_mode:
        argv += ["--cfg", cfg_mode]
    sys.argv = ["dlrun", *argv]  # hydra.main reads its arguments from sys.argv only
    hydra.main(config_path=str(compose.conf_dir()), config_name=command.name, version_base="1.3")(job)()


def _route_torch_warnings_to_log() -> None:
    """torch prints its own glog-style warnings to stderr; keep them in the run's log file instead."""
    torch_logger = logging.getLogger("torch")
    torch_logger.handlers.clear()
    torch_logger.propagate = True  # the root logger writes to <run_dir>/<command>.log only


def _with_resumed_overrides(command: str, overrides: list[str]) -> list[str]:
    """`dlrun train resume=RUN_DIR`: replay the run's own overrides and continue in its directory."""
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if command != "train" or resume in (None, "", "null"):
        return overrides
    run_dir = Path(resume.strip("'\""))
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise UsageError(f"cannot resume {run_dir}: no checkpoints/last.pt there (is it a dlrun train run directory?)")
    if not saved.is_file():
        raise UsageError(f"cannot resume {run_dir}: {saved} is missing")
    from dlrun.core.locks import check_unlocked

    check_unlocked(run_dir)  # before Hydra rewrites .hydra/ of a run another process is still writing
    from omegaconf import OmegaConf

    replayed = OmegaConf.to_container(OmegaConf.load(saved))
    if not isinstance(replayed, list) or not all(isinstance(o, str) for o in replayed):
        raise UsageError(f"cannot resume {run_dir}: {saved} is not a list of overrides")
    previous = [o for o in replayed if not o.lstrip("+~").startswith(("hydra.", "hydra/", "resume="))]
    return [*previous, *[o for o in overrides if not o.startswith("hydra.run.dir=")], f"hydra.run.dir={compose.quote(str(run_dir))}"]


def fail(exc: DlrunError, verbose: bool) -> None:
    """Print `error: <one line>` (and keep it in the run's log when there is one), then exit."""
    if verbose and exc.__traceback__ is not None:
        traceback.print_exception(exc)
    message = (str(exc).splitlines() or [type(exc).__name__])[0]
    root = logging.getLogger()
    if root.handlers:  # inside a run: the root logger writes only to <run_dir>/<command>.log
        root.error("error: %s", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exc.exit_code)
