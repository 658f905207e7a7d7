"""The data layer: text to token ids, and where corpora come from.

``corpus`` (vocabulary, tokenizing, batching), ``datasets`` (corpora by name or folder, the WikiText-2 copy
shipped in ``corpora-data/``, PTB), ``cache`` (tokenized corpora cached on disk) and ``download``. It imports
nothing from ``wordlm.models``, ``wordlm.training`` or ``wordlm.tracking``, nor Sacred: only its own modules and
the top-level leaves (``errors``, ``checks``, ``files``). Importing the package imports none of its modules.
"""
