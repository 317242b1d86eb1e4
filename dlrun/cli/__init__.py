"""The `dlrun` command line: Typer parses the command, Hydra composes the config, a recipe in dlrun.commands runs it."""

from dlrun.cli.app import app, main

__all__ = ["app", "main"]
