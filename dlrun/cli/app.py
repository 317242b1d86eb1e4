"""The `dlrun` Typer app: one sub-command per registry entry, plus `dlrun ls`.

Heavy modules (torch, executorch) are imported only inside the job (dlrun.cli.dispatch), so `dlrun --help`,
`dlrun ls` and `--cfg job` start in a fraction of a second.
"""

from __future__ import annotations

import sys

import typer

from dlrun import __version__
from dlrun.cli.failure import fail
from dlrun.cli.registry import COMMANDS
from dlrun.config import compose
from dlrun.core import process
from dlrun.core.errors import DlrunError, UsageError

app = typer.Typer(
    name="dlrun",
    help="Experiment runner for deep learning: train, eval, quantize, export and bench models from Hydra configs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

OVERRIDES_HELP = "Hydra overrides: key=value, group=option, +key=value, ~key (e.g. model=resnet optimizer.lr=0.05)."
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
VERBOSE_HELP = "Show Python tracebacks for errors."


def _print_version(value: bool) -> None:
    if value:
        print(f"dlrun {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
):
    ctx.obj = {"verbose": verbose}  # `dlrun --verbose train ...` as well as `dlrun train --verbose ...`


def _hydra_command(name: str):
    def command(
        ctx: typer.Context,
        overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep over comma-separated values."),
        cfg: str | None = typer.Option(
            None, "--cfg", "-c", help="Print the composed config (job|hydra|all), run nothing."
        ),
        verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    ):
        from dlrun.cli.dispatch import dispatch  # validation, Hydra and the recipes: not for --help or ls

        dispatch(COMMANDS[name], overrides or [], multirun, cfg, verbose or (ctx.obj or {}).get("verbose", False))

    return command


for _command in COMMANDS.values():
    app.command(name=_command.name, help=_command.help, context_settings=PASS_THROUGH)(_hydra_command(_command.name))


RUNS = "runs"  # `dlrun ls runs`: past runs, not a config group (there is none of that name)


@app.command(name="ls")
def list_configs(
    group: str | None = typer.Argument(None, help=f"Only this config group, or [bold]{RUNS}[/bold]: past runs."),
    command: str | None = typer.Option(None, "--command", help=f"{RUNS}: only runs of this command (e.g. train)."),
    last: int | None = typer.Option(None, "--last", min=0, help=f"{RUNS}: only the N most recent runs."),
    sort: str | None = typer.Option(None, "--sort", help=f"{RUNS}: best first by this test metric, params or date."),
):
    """List config groups and their options (e.g. [bold]dlrun ls model[/bold]), or past runs under outputs/
    ([bold]dlrun ls runs --command train --last 5 --sort accuracy[/bold])."""
    from rich.table import Table

    from dlrun.core import ui

    if group == RUNS:
        _list_runs(command, last, sort)
        return
    if (command, last, sort) != (None, None, None):
        fail(UsageError(f"--command, --last and --sort apply to `dlrun ls {RUNS}` only"), verbose=False)
    available = compose.groups()
    if group is not None and group not in available:
        from dlrun.config.validate import unknown_choice

        fail(UsageError(unknown_choice("config group", group, list(available))), verbose=False)
    table = Table(title="dlrun config groups (select with group=option)")
    for column in ("group", "option", "description"):
        table.add_column(column, overflow="fold")
    for name, options in available.items():
        if group in (None, name):
            for option in options:
                table.add_row(name, option, compose.describe(name, option))
    ui.print_table(table, log=False)
    if group in ("quantizer", "export"):
        from dlrun.config import capabilities

        ui.print_table(capabilities.rich_table(group), log=False)


def _list_runs(command: str | None, last: int | None, sort: str | None) -> None:
    """One table of the runs under outputs/: status, headline test metric, params, lineage (no torch imported)."""
    from rich.console import Console

    from dlrun.core import run_index, rundir, ui

    entries = run_index.index(rundir.OUTPUTS, command)
    if sort is not None and sort not in run_index.sort_keys(entries):
        from dlrun.config.validate import unknown_choice

        fail(UsageError(unknown_choice("sort key", sort, run_index.sort_keys(entries))), verbose=False)
    entries = run_index.select(entries, last=last, sort=sort)
    if not entries:
        where = rundir.OUTPUTS / command if command else rundir.OUTPUTS
        print(f"no runs under {where}/")
        return
    title = f"runs under {rundir.OUTPUTS}/" + (f" (sorted by {sort}, best first)" if sort else "")
    # Not ui.print_table: its fitting takes unwrapped columns for numbers; here the run and date never wrap either.
    Console(width=ui.console_width()).print(run_index.rich_table(title, run_index.rows(entries)))


def main() -> None:
    try:
        try:
            app()
        except DlrunError as exc:  # raised before Hydra took over (validation)
            fail(exc, verbose="--verbose" in sys.argv or "-v" in sys.argv)
    except SystemExit as exit_:  # Typer's (Click's) way to end every command, and fail()'s
        process.exit_process(exit_.code)
    process.exit_process(0)
