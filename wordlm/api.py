"""The Python API: train a model, load a checkpoint, sample text, score text, save it again.

Main names: ``train``, and the names it gives and takes (``TrainingRun`` from ``wordlm.run``, ``load``,
``LanguageModel`` and ``Text`` from ``wordlm.language_model``). Must not import Sacred: the
commands of ``wordlm.experiment`` are thin clients of the same code, so that a run of ``main.py with ...``
and ``train(...)`` with the same keys train alike, and the text ``generate.py`` writes and the perplexity
``main.py evaluate`` prints are what these methods return.

    run = wordlm.train(preset="smoke", dataset="wikitext-2")
    run.test_ppl, run.history["valid.ppl"]
    lm = wordlm.load("model.pt")
    print(lm.generate(words=50, prompt="the company", seed=1))
    lm.perplexity(Path("notes.txt")), lm.score(["the cat sat", "a dog"])
"""

from __future__ import annotations

import random

import numpy as np
import torch

from wordlm.checks import check_seed
from wordlm.config import make_config
from wordlm.language_model import LanguageModel, Text, load
from wordlm.run import TrainingRun, train_run

__all__ = ["LanguageModel", "Text", "TrainingRun", "load", "train"]


def train(preset: str | None = None, **config) -> TrainingRun:
    """Train a model: what ``main.py with [preset] key=value ...`` does, without recording a Sacred run.

    The keys, their defaults and their checks are the command line's (``python main.py print_config``). The
    progress lines go to stdout as there; Ctrl-C stops training, and the model is tested and returned.

    Args:
        preset: a name of ``wordlm.PRESETS`` (``print_named_configs``), e.g. ``"zaremba_small"``; keys given
            here take over from it.
        **config: training keys, e.g. ``dataset="penn", epochs=5, save="small.pt"``.

    Raises:
        TypeError: a key that is not a training key.
        UserError: a bad value, data or path, in the command line's words.
    """
    cfg, modified = make_config(preset, **config)
    check_seed(cfg["seed"])
    random.seed(cfg["seed"])  # as Sacred seeds a run of the command line
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    return train_run(cfg, modified=modified)
