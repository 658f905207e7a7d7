"""``python -m wordlm ...``: the same as ``python main.py ...`` and the ``wordlm`` command (see README.md)."""

from wordlm.experiment import main

if __name__ == "__main__":
    main()
