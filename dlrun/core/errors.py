"""The one exception type that reaches the user as a single line instead of a traceback."""

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
