"""wordlm's version, in a module of its own: any module can record it without importing the package, whose
``__init__`` re-exports it and lazily imports the API built on those modules. pyproject.toml reads it here."""

__version__ = "0.1.0"
