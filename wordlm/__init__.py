"""wordlm: word-level recurrent language models (RNN, GRU, LSTM) trained, tracked and sampled.

The Python API (the command line is a thin client of it):

    import wordlm
    run = wordlm.train(preset="smoke", dataset="wikitext-2")   # any key of `main.py with ...`
    run.test_ppl, run.best_valid_ppl, run.history["valid.ppl"]
    lm = run.model                     # or wordlm.load("model.pt"): a wordlm.LanguageModel
    lm.generate(words=50, prompt="the", seed=1), lm.perplexity("some text"), lm.score(["a line"]), lm.save("m.pt")
    wordlm.sweep("smoke", sweep_space={"lr": {"low": 1, "high": 40, "log": True}}, sweep_trials=10)   # Optuna

Bad input raises ``wordlm.UserError`` (an unknown key ``TypeError``). ``import wordlm`` alone imports no torch:
the names below are imported from ``wordlm.api`` and ``wordlm.config`` when first used. The package knows
nothing of Sacred: ``wordlm.experiment`` is the one module that does.
"""

from wordlm.errors import UserError
from wordlm.version import __version__

__all__ = ["PRESETS", "LanguageModel", "TrainingRun", "UserError", "__version__", "load", "sweep", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainingRun", "load", "LanguageModel"):
        from wordlm import api

        return getattr(api, name)
    if name == "sweep":  # (its module is wordlm.tracking.sweeps: a submodule named sweep would replace the function)
        from wordlm.tracking.sweeps import sweep

        return sweep
    if name == "PRESETS":
        from wordlm.config import PRESETS

        return PRESETS
    raise AttributeError(f"module 'wordlm' has no attribute {name!r}")
