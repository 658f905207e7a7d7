"""wordlm: word-level recurrent language models (RNN, GRU, LSTM) trained, tracked and sampled.

The package is plain PyTorch and knows nothing of Sacred: ``wordlm.experiment`` is the one module
that reads config keys and wires the pieces (``data``, ``model``, ``training``, ``checkpoint``).

The Python API: ``wordlm.load(path)`` gives a ``wordlm.LanguageModel`` (``generate``, ``perplexity``,
``score``, ``save``); bad input raises ``wordlm.UserError``. ``import wordlm`` alone imports no torch:
``load`` and ``LanguageModel`` are imported from ``wordlm.api`` when first used.
"""

from wordlm.errors import UserError

__version__ = "0.1.0"
__all__ = ["LanguageModel", "UserError", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "LanguageModel"):
        from wordlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'wordlm' has no attribute {name!r}")
