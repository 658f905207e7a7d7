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
        "import wordlm.models\nfrom wordlm.models import fused, build_model\nfrom . import hidden\n"
        "from wordlm import __version__\n"
        "def f():\n    from wordlm.models.decoder import FullSoftmax\n"
        "if TYPE_CHECKING:\n    from wordlm.data.corpus import Vocabulary\n"
    )
    modules = {"wordlm", "wordlm.models", "wordlm.models.fused", "wordlm.models.hidden", "wordlm.models.decoder",
               "wordlm.data.corpus", "wordlm.models.x"}  # fmt: skip
    assert imported_modules("wordlm.models.x", source, modules) == modules - {"wordlm.models.x"}


def test_no_wordlm_module_imports_itself_back():
    """No cycle, counting imports inside functions: each module can be read with only the ones below it."""
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert graph["wordlm.models"] >= {
        "wordlm.models.rnn",
        "wordlm.models.transformer",
    }  # (the walker does see the package)


def test_the_model_layer_imports_nothing_above_it():
    """The models, their decoder and its fused kernel import only each other and the leaves they build on."""
    graph = import_graph()
    layer = {
        "wordlm.models",
        "wordlm.models.rnn",
        "wordlm.models.transformer",
        "wordlm.models.word_model",
        "wordlm.models.decoder",
        "wordlm.models.fused",
    }
    leaves = {
        "wordlm.models.hidden",
        "wordlm.models.regularize",
        "wordlm.files",
        "wordlm.data.cache",
    }  # cache: inside a function
    for module in layer:
        assert graph[module] <= layer | leaves, (module, graph[module] - layer - leaves)
    assert (
        "wordlm.data.cache"
        not in graph["wordlm.models"] | graph["wordlm.models.decoder"] | graph["wordlm.models.word_model"]
    )


def test_importing_a_model_imports_no_corpus_cache():
    script = (
        "import sys, wordlm.models\n"
        "assert 'wordlm.data.cache' not in sys.modules, sorted(name for name in sys.modules if 'wordlm' in name)"
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
    from wordlm.models import ModelConfig, RNNModel, TransformerModel, WordModel, build_model
    from wordlm.models.decoder import AdaptiveSoftmax, FullSoftmax

    for options in ({}, {"model_type": "Transformer"}, {"tied": False, "adaptive_softmax": (5,)}):
        model = build_model(ModelConfig(ntoken=12, emsize=4, nhid=4, nlayers=1, **options))
        assert isinstance(model, WordModel) and isinstance(model, (RNNModel, TransformerModel))
        assert isinstance(model.decoder, AdaptiveSoftmax if "adaptive_softmax" in options else FullSoftmax)
    assert RNNModel.__bases__ == TransformerModel.__bases__ == (WordModel,)


def public_names(tree: ast.Module) -> list[str]:
    """The names a module's top level defines (functions, classes, assignments) that do not start with ``_``."""
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [name for name in names if not name.startswith("_")]


def declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def test_every_module_declares_all_its_public_names_in_all():
    """``__all__`` is the complete list of a module's public names (a private one starts with ``_``) and every name
    in it exists: the docstrings' "Main names:" introduce the chief ones, ``__all__`` is the list that cannot drift."""
    problems = []
    for name, path in wordlm_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined, declared = public_names(tree), declared_all(tree)
        if declared is None:
            problems += [f"{name}: no __all__ for {defined}"] if defined else []
            continue
        module = importlib.import_module(name) if name != "wordlm.__main__" else None
        problems += [f"{name}: {n} is public but not in __all__" for n in defined if n not in declared]
        lacking = [n for n in declared if module is not None and not hasattr(module, n)]
        problems += [f"{name}: __all__ names {n}, which it lacks" for n in lacking]
    assert problems == []
