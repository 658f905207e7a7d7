"""The one exception type users see as a single line instead of a traceback, and the warning line."""

import sys

__all__ = ["UserError", "warn"]


class UserError(Exception):
    """Bad input from the user: a missing file, a bad key value, a corrupt corpus.

    The command-line entry points print ``error: <message>`` and exit with status 1; the message
    must say what is wrong and how to fix it, in one line.
    """


def warn(message: str) -> None:
    """One ``warning: <message>`` line on stderr, for what goes on despite a problem."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
