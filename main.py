"""Train a word-level language model: `python main.py with key=value ...` (see README.md)."""

from wordlm.experiment import main

if __name__ == "__main__":
    main()
