"""List the standard-library names that Python files use and the running Python lacks.

Run it with the oldest Python that pyproject.toml allows: ``python3.10 tests/stdlib_names.py FOLDER``.
It reads every ``*.py`` under FOLDER (``.venv`` excepted) without importing it, and checks each
``import m``, ``from m import name`` and ``m.attr.attr`` of a standard-library module against the
modules of the Python it runs under. It prints one line per name missing there and exits 1 if any
is. Names reached otherwise (``getattr``, methods of objects) are not seen.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from types import ModuleType

# Standard-library modules newer than 3.10, which its sys.stdlib_module_names cannot list: 3.11, 3.14.
NEWER_MODULES = {"tomllib", "annotationlib", "compression"}


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _lacks(module: str, names: list[str]) -> str | None:
    """The first of ``module.names[0].names[1]...`` missing, walking submodules; None when all are there."""
    for name in names:
        parent = _module(module)
        if parent is None:
            return module
        if isinstance(getattr(parent, name, None), ModuleType) or _module(f"{module}.{name}") is not None:
            module = f"{module}.{name}"
            continue
        return None if hasattr(parent, name) else f"{module}.{name}"
    return None if _module(module) is not None else module


def missing_names(path: Path) -> list[str]:
    """``file:line: name`` for each standard-library name in ``path`` that this Python lacks."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    stdlib = sys.stdlib_module_names | NEWER_MODULES
    modules: dict[str, str] = {}  # local name -> the standard-library module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in stdlib:
                    found.append((node.lineno, _lacks(alias.name, [])))
                    modules[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in stdlib:
            for alias in node.names:
                found.append((node.lineno, _lacks(node.module, [alias.name])))
                if _module(f"{node.module}.{alias.name}") is not None:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [], node
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                found.append((node.lineno, _lacks(modules[value.id], chain[::-1])))
    return sorted({f"{path}:{line}: {name}" for line, name in found if name is not None})


def main(folder: str) -> int:
    files = [path for path in sorted(Path(folder).rglob("*.py")) if ".venv" not in path.parts]
    missing = [line for path in files for line in missing_names(path)]
    for line in missing:
        print(line)
    print(f"Python {sys.version.split()[0]}: {len(files)} files, {len(missing)} standard-library names missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
