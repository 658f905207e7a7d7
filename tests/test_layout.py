"""The package's layout: no import cycle among wordlm's modules, no class that borrows another's methods, and
a model that imports neither the corpus cache nor anything above the model layer."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "wordlm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wordlm_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, source: str, modules, is_package: bool = False) -> set[str]:
    """The ``modules`` that module ``name`` imports anywhere in its ``source``: at the top, in functions, under
    ``TYPE_CHECKING``. ``from wordlm.x import y`` is an edge to ``wordlm.x.y`` if that is a module, else to
    ``wordlm.x``; the parent packages Python imports on the way are not edges."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = wordlm_modules()
    return {
        name: imported_modules(name, path.read_text(encoding="utf-8"), modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next(filter(None, map(visit, sorted(graph))), None)


def test_the_import_graph_walker_sees_every_kind_of_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = (
        "import wordlm.model\nfrom wordlm import fused, __version__\nfrom . import hidden\n"
        "def f():\n    from wordlm.decoder import FullSoftmax\n"
        "if TYPE_CHECKING:\n    from wordlm.data import Vocabulary\n"
    )
    modules = {"wordlm", "wordlm.model", "wordlm.fused", "wordlm.hidden", "wordlm.decoder", "wordlm.data", "wordlm.x"}
    assert imported_modules("wordlm.x", source, modules) == modules - {"wordlm.x"}


def test_no_wordlm_module_imports_itself_back():
    """No cycle, counting imports inside functions: each module can be read with only the ones below it."""
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert graph["wordlm.model"] >= {"wordlm.rnn", "wordlm.transformer"}  # (the walker does see the package)


def test_the_model_layer_imports_nothing_above_it():
    """The models, their decoder and its fused kernel import only each other and the leaves they build on."""
    graph = import_graph()
    layer = {"wordlm.model", "wordlm.rnn", "wordlm.transformer", "wordlm.word_model", "wordlm.decoder", "wordlm.fused"}
    leaves = {"wordlm.hidden", "wordlm.regularize", "wordlm.files", "wordlm.cache"}  # cache: inside a function
    for module in layer:
        assert graph[module] <= layer | leaves, (module, graph[module] - layer - leaves)
    assert "wordlm.cache" not in graph["wordlm.model"] | graph["wordlm.decoder"] | graph["wordlm.word_model"]


def test_importing_a_model_imports_no_corpus_cache():
    script = (
        "import sys, wordlm.model\n"
        "assert 'wordlm.cache' not in sys.modules, sorted(name for name in sys.modules if 'wordlm' in name)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def functions_of(attribute) -> list:
    """The functions an entry of a class's ``__dict__`` holds: itself, a static/class method's, a property's."""
    if isinstance(attribute, (staticmethod, classmethod)):
        attribute = attribute.__func__
    if isinstance(attribute, property):
        return [part for part in (attribute.fget, attribute.fset, attribute.fdel) if inspect.isfunction(part)]
    return [attribute] if inspect.isfunction(attribute) else []


def test_no_class_takes_its_methods_from_another_class():
    """Every method a wordlm class has is written in it or in one of its bases: no ``scores = Other.scores``."""
    borrowed = []
    for name in wordlm_modules():
        if name == "wordlm.__main__":
            continue  # runs the CLI when imported as __main__; it holds no class
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            own = tuple(f"{base.__qualname__}." for base in cls.__mro__)
            for attribute, value in vars(cls).items():
                borrowed += [
                    f"{name}.{cls.__qualname__}.{attribute} is {function.__qualname__}"
                    for function in functions_of(value)
                    if not function.__qualname__.startswith(own)
                ]
    assert borrowed == []


def test_both_models_are_word_models_that_hold_one_decoder():
    from wordlm.decoder import AdaptiveSoftmax, FullSoftmax
    from wordlm.model import ModelConfig, RNNModel, TransformerModel, WordModel, build_model

    for options in ({}, {"model_type": "Transformer"}, {"tied": False, "adaptive_softmax": (5,)}):
        model = build_model(ModelConfig(ntoken=12, emsize=4, nhid=4, nlayers=1, **options))
        assert isinstance(model, WordModel) and isinstance(model, (RNNModel, TransformerModel))
        assert isinstance(model.decoder, AdaptiveSoftmax if "adaptive_softmax" in options else FullSoftmax)
    assert RNNModel.__bases__ == TransformerModel.__bases__ == (WordModel,)
