"""The `dlrun` Typer app: one sub-command per registry entry, plus `dlrun ls`.

Heavy modules (torch, executorch) are imported only inside the job (dlrun.cli.dispatch), so `dlrun --help`,
`dlrun ls` and `--cfg job` start in a fraction of a second.
"""

from __future__ import annotations

import sys

import typer

from dlrun import __version__
from dlrun.cli.dispatch import dispatch, fail
from dlrun.cli.registry import COMMANDS
from dlrun.config import compose
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
        dispatch(COMMANDS[name], overrides or [], multirun, cfg, verbose or (ctx.obj or {}).get("verbose", False))

    return command


for _command in COMMANDS.values():
    app.command(name=_command.name, help=_command.help, context_settings=PASS_THROUGH)(_hydra_command(_command.name))


@app.command(name="ls")
def list_configs(group: str | None = typer.Argument(None, help="Only this config group.")):
    """List config groups and their options (e.g. [bold]dlrun ls model[/bold])."""
    from rich.table import Table

    from dlrun.core import ui

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


def main() -> None:
    try:
        app()
    except DlrunError as exc:  # raised before Hydra took over (validation)
        fail(exc, verbose="--verbose" in sys.argv or "-v" in sys.argv)
