"""The `dlrun` command line: Typer parses the command, Hydra composes the config and runs the job.

Heavy modules (torch, executorch) are imported only inside the job function, so `dlrun --help`,
`dlrun ls` and `--cfg job` start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from dlrun import config
from dlrun.errors import DlrunError, UsageError

app = typer.Typer(
    name="dlrun",
    help="Experiment runner for deep learning: train, eval, quantize, export and bench models from Hydra configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

OVERRIDES_HELP = "Hydra overrides: key=value, group=option, +key=value, ~key (e.g. model=resnet optimizer.lr=0.05)."
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

# The Hydra-backed commands: name -> help. Each runs dlrun/commands/<name>.py with conf/<name>.yaml.
COMMANDS = {
    "train": "Train a model: [bold]dlrun train model=resnet optimizer.lr=0.05[/bold] (resume with resume=RUN_DIR).",
    "eval": "Evaluate a checkpoint, quantized program or artifact: [bold]dlrun eval run=RUN_DIR[/bold] | ckpt=PATH | artifact=PATH.",
    "quantize": "Quantize a trained model: [bold]dlrun quantize mode=qat backend=xnnpack[/bold] (modes: ptq, dynamic, qat, weight_only).",
    "export": "Export and verify in its runtime: [bold]dlrun export format=pte backend=xnnpack[/bold] (formats: pte, pt2, onnx).",
    "bench": "Benchmark every variant of a run (eager, compiled, quantized, .pte, .onnx): [bold]dlrun bench run=RUN_DIR[/bold].",
}


def _hydra_command(name: str):
    def command(
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep over comma-separated values through Hydra's launcher."),
        cfg: Optional[str] = typer.Option(None, "--cfg", "-c", help="Print the composed config (job|hydra|all) and exit without running."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Python tracebacks for errors."),
    ):
        _dispatch(name, overrides or [], multirun, cfg, verbose)

    return command


for _name, _help in COMMANDS.items():
    app.command(name=_name, help=_help, context_settings=PASS_THROUGH)(_hydra_command(_name))


@app.command(name="ls")
def list_configs(group: Optional[str] = typer.Argument(None, help="Only this config group.")):
    """List config groups and their options (e.g. [bold]dlrun ls model[/bold])."""
    from rich.console import Console
    from rich.table import Table

    available = config.groups()
    if group is not None and group not in available:
        _fail(UsageError(config.unknown_choice("config group", group, list(available))), verbose=False)
    table = Table(title="dlrun config groups (select with group=option)")
    for column in ("group", "option", "description"):
        table.add_column(column, overflow="fold")
    for name, options in available.items():
        if group in (None, name):
            for option in options:
                table.add_row(name, option, config.describe(name, option))
    console = Console()
    console.print(table)
    if group in ("quantizer", "export"):
        from dlrun import capabilities

        console.print(capabilities.rich_table(group))


def main() -> None:
    try:
        app()
    except DlrunError as exc:  # raised before Hydra took over (validation)
        _fail(exc, verbose="--verbose" in sys.argv or "-v" in sys.argv)


def _dispatch(command: str, overrides: list[str], multirun: bool, cfg_mode: Optional[str], verbose: bool) -> None:
    """Validate the overrides, pick the run directory, then hand over to Hydra's own runner."""
    try:
        if multirun and cfg_mode:
            raise UsageError("--cfg prints one job's config: drop --multirun (-m), or pick one value per sweep")
        overrides = config.expand_aliases(command, overrides)
        typed_targets = config.targets_in_overrides(overrides)
        resumed = _with_resumed_overrides(command, overrides)
        composed = config.validate(command, resumed)
        # A resumed run replays overrides read from its directory: only dlrun's builders and the targets the user
        # typed now (or trusts) may be instantiated, checked before anything is built or written.
        where = "the resumed run's .hydra/overrides.yaml" if resumed is not overrides else "the command line"
        config.check_targets(config.plain(composed), where, [*typed_targets, *composed.get("trust_targets", [])], stored=False)
        overrides = resumed
        if not multirun:
            config.check_no_sweep(overrides)
        if not cfg_mode:
            config.check_complete(composed)
        if not cfg_mode and not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
            from dlrun.rundir import reserve_run_dir

            run_dir = reserve_run_dir(command, composed.get("name"), multirun=multirun)
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            overrides = [*overrides, f"{key}={config.quote(str(run_dir))}"]
    except DlrunError as exc:
        _fail(exc, verbose)

    import hydra

    def job(cfg) -> None:
        try:
            module = importlib.import_module(f"dlrun.commands.{command}")
            _route_torch_warnings_to_log()
            module.run(cfg)
        except DlrunError as exc:
            _fail(exc, verbose)
        except Exception as exc:  # a bug, not a user error: one line here, the traceback in the run's log
            logging.getLogger("dlrun").debug("unexpected error", exc_info=True)
            if verbose:
                traceback.print_exc()
            _fail(DlrunError(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)"), verbose=False)

    argv = [*overrides]
    if multirun:
        argv.append("--multirun")
    if cfg_mode:
        argv += ["--cfg", cfg_mode]
    sys.argv = ["dlrun", *argv]
    hydra.main(config_path=str(config.conf_dir()), config_name=command, version_base="1.3")(job)()


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
    from dlrun.rundir import check_unlocked

    check_unlocked(run_dir)  # before Hydra rewrites .hydra/ of a run another process is still writing
    from omegaconf import OmegaConf

    replayed = OmegaConf.to_container(OmegaConf.load(saved))
    if not isinstance(replayed, list) or not all(isinstance(o, str) for o in replayed):
        raise UsageError(f"cannot resume {run_dir}: {saved} is not a list of overrides")
    previous = [o for o in replayed if not o.lstrip("+~").startswith(("hydra.", "hydra/", "resume="))]
    return [*previous, *[o for o in overrides if not o.startswith("hydra.run.dir=")], f"hydra.run.dir={config.quote(str(run_dir))}"]


def _fail(exc: DlrunError, verbose: bool) -> None:
    """Print `error: <one line>` (and keep it in the run's log when there is one), then exit."""
    if verbose and exc.__traceback__ is not None:
        traceback.print_exception(exc)
    message = (str(exc).splitlines() or [type(exc).__name__])[0]
    root = logging.getLogger()
    if root.handlers:  # inside a run: the root logger writes only to <run_dir>/<command>.log
        root.error("error: %s", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exc.exit_code)
