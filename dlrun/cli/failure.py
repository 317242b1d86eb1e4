"""How a command ends on an error: `error: <one line>` on stderr (the traceback only with --verbose), the same line
in the run's log when there is one, and the error's exit code. Imported by `dlrun --help` and `dlrun ls`, so it
stays light."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import NoReturn

from dlrun.core.errors import DlrunError


def first_line(exc: DlrunError) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def log_error(message: str) -> None:
    """Keep the error in the run's log: inside a run the root logger writes to <run_dir>/<command>.log."""
    root = logging.getLogger()
    if any(isinstance(handler, logging.FileHandler) for handler in root.handlers):
        root.error("error: %s", message)


def fail(exc: DlrunError, verbose: bool) -> NoReturn:
    """Print `error: <one line>` (and keep it in the run's log when there is one), then exit."""
    if verbose and exc.__traceback__ is not None:
        traceback.print_exception(exc)
    message = first_line(exc)
    log_error(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exc.exit_code)
