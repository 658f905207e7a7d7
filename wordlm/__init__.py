"""wordlm: word-level recurrent language models (RNN, GRU, LSTM) trained, tracked and sampled.

The package is plain PyTorch and knows nothing of Sacred: ``wordlm.experiment`` is the one module
that reads config keys and wires the pieces (``data``, ``model``, ``training``, ``checkpoint``).
"""

__version__ = "0.1.0"
