"""The one exception type users see as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a bad key value, a corrupt corpus.

    The command-line entry points print ``error: <message>`` and exit with status 1; the message
    must say what is wrong and how to fix it, in one line.
    """
