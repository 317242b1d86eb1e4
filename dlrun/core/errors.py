"""The exceptions that reach the user as a single `error:` line instead of a traceback (dlrun.cli.dispatch prints
them). Library code raises these where it finds the problem; no caller re-types or parses messages."""

USAGE = 2  # exit code for bad command lines and configs, as argparse/click use
FAILURE = 1


class DlrunError(Exception):
    """A problem the user can fix; printed as `error: <message>` with `exit_code`."""

    def __init__(self, message: str, exit_code: int = FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(DlrunError):
    def __init__(self, message: str):
        super().__init__(message, USAGE)


class Unsupported(UsageError, ValueError):
    """A model, setting or combination dlrun cannot handle (an unknown module name, a capability not in the tables,
    a model torch.export cannot capture): exit 2. Also a ValueError for code that uses the library directly."""


class ExportFailed(DlrunError, ValueError):
    """A lowering or a runtime could not turn a valid model into a working artifact: exit 1."""
