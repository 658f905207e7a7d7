"""Sample text from a trained checkpoint: `python generate.py with checkpoint=model.pt words=200` (see README.md).

The same as `python main.py generate with ...`: this script only supplies the command name, unless
one is given (`python generate.py print_config`).
"""

import sys

from wordlm.experiment import ex, main


def with_default_command(argv: list[str], command: str) -> list[str]:
    """Insert ``command`` after the script name unless the arguments before ``with`` name a command."""
    head = argv[1 : argv.index("with")] if "with" in argv else argv[1:]
    if any(arg in ex.commands or arg in ("help", "-h", "--help") for arg in head):
        return list(argv)
    return [argv[0], command, *argv[1:]]


if __name__ == "__main__":
    main(with_default_command(sys.argv, "generate"))
