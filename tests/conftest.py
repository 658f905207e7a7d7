"""Fixtures shared by the tests: the real corpora, small corpora cut from WikiText-2, the CLI.

The tests need nothing beside the clone: WikiText-2 ships inside the package, and small corpora are
cut from it. The few tests that are about the real PTB take it from ``$WORDLM_DATA``, ``../shared/data``
or ``./data/penn`` (where a download puts it); without it they skip, saying so in the summary.
"""

from __future__ import annotations

import functools
import logging
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist's workers share the cores: each worker, and every command it starts (the environment is inherited),
# computes on its share of them. With torch's default of a thread per core, two workers' OpenMP threads contend for
# the same cores and spin waiting for each other: a small training that takes 2.5 s alone took 9-12 s beside one
# busy process and 46-56 s in the suite (Ice Lake Xeon, 2 cores), and 2.5-2.9 s on one thread beside it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _workers))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items) -> None:
    """A test that uses a module's shared fixture (a trained checkpoint, a reference run) goes with the rest of its
    file to one xdist worker (``make test`` runs ``--dist loadgroup``): split between two workers, each would
    build the fixture, and some take 10-20 s (test_elastic's reference torchrun run)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = info and any(d.scope in ("module", "package", "session") for defs in info.name2fixturedefs.values()
                              for d in defs if d.baseid)  # fmt: skip
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # this project's machines keep the real corpora there
SHIPPED_WT2 = ROOT / "wordlm" / "data" / "corpora-data" / "wikitext-2"  # <split>.txt.xz
_WORDLM_DATA = os.environ.get("WORDLM_DATA")  # as the session started, before any test changes it
PTB_MEAN_TOKENS_PER_LINE = 22  # 929,589 tokens in 42,068 lines of PTB's train.txt


def _is_corpus(folder: Path) -> bool:
    return all((folder / f"{split}.txt").is_file() for split in ("train", "valid", "test"))


def ptb_folder() -> Path | None:
    """A folder holding the real PTB: ``$WORDLM_DATA/penn``, ``../shared/data/penn`` or ``./data/penn``."""
    places = ([Path(_WORDLM_DATA) / "penn"] if _WORDLM_DATA else []) + [SHARED_DATA / "penn", ROOT / "data" / "penn"]
    return next((folder for folder in places if _is_corpus(folder)), None)


def real_ptb() -> Path:
    """The real PTB (tests never download), or skip the test saying where it was looked for."""
    folder = ptb_folder()
    if folder is None:
        pytest.skip(
            "needs the real Penn Treebank, which wordlm cannot ship: put it in ../shared/data/penn or ./data/penn, "
            "or set WORDLM_DATA to a folder holding penn/ (docs/DATA.md)"
        )
    return folder


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


def cut_corpus(
    folder: Path, tokens: tuple[int, int, int] = (66_000, 6_600, 6_600), lines: tuple[int, int, int] | None = None
) -> Path:
    """Write the first whole lines of each split of the shipped WikiText-2 to ``folder``: small, real text.

    Each split gets the fewest lines that hold at least its number of ``tokens`` (words and one ``<eos>``
    a line). ``lines`` gives the sizes as lines of PTB instead (the corpus cut before WikiText-2 shipped):
    22 tokens each.
    """
    if lines is not None:
        tokens = tuple(count * PTB_MEAN_TOKENS_PER_LINE for count in lines)
    texts = []
    for split, budget in zip(("train", "valid", "test"), tokens):
        kept, count = [], 0
        with lzma.open(SHIPPED_WT2 / f"{split}.txt.xz", "rt", encoding="utf-8", newline="") as handle:
            for line in handle:
                if count >= budget:
                    break
                kept.append(line)
                count += len(line.split()) + 1
        texts.append("".join(kept))
    return write_corpus(folder, *texts)


@pytest.fixture(autouse=True)
def no_columns(monkeypatch) -> None:
    """Tables are as wide as their content unless a test asks for a width: pytest-xdist's workers have COLUMNS set
    (80), which the runs table would fit itself to, in-process and in the command lines the tests start."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture(autouse=True)
def corpus_cache(monkeypatch, tmp_path_factory) -> Path:
    """Give every test its own empty corpus cache, and make any download attempt fail at once.

    ``cli_env`` copies ``os.environ``, so the command-line runs inherit both settings.
    """
    cache = tmp_path_factory.mktemp("wordlm-cache")
    monkeypatch.setenv("WORDLM_CACHE", str(cache))
    monkeypatch.setenv("WORDLM_OFFLINE", "1")
    return cache


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """About 66k/6.6k/6.6k tokens of WikiText-2 (the first lines of each split)."""
    return cut_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """About 6.6k/900/900 tokens of WikiText-2: enough for a few batches of the smoke config."""
    return cut_corpus(tmp_path / "tiny", tokens=(6_600, 900, 900))


def cli_env(**extra: str) -> dict[str, str]:
    """The CLI's environment: this one (with the autouse fixture's cache and WORDLM_OFFLINE), no WORDLM_DATA.

    Without WORDLM_DATA a run of the default ``./data`` uses the WikiText-2 shipped with wordlm, on
    every machine alike.
    """
    env = dict(os.environ)
    env.pop("WORDLM_DATA", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, script: str = "main.py", timeout: float = 300, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run one of the root scripts as a user would, in ``cwd``, and return what it printed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture
def cli_here(monkeypatch, capfd):
    """``run_cli`` in this process: the script's ``main`` with its arguments, in ``cwd``, with ``run_cli``'s
    environment, giving the same ``CompletedProcess`` (exit status, stdout, stderr; an exception that would have
    ended the process is printed as its traceback, status 1).

    For the many tests of what a command refuses and says: each is a few milliseconds here and 2-4 s as a process
    (most of it importing torch). What only a process shows stays with ``run_cli``: signals, exit statuses set by
    the interpreter, torchrun, and the output a run observed by Sacred keeps in cout.txt (Sacred reads it from the
    file descriptors, while capfd's ``sys.stdout`` never reaches them: in-process that file stays empty; its
    run.json, config.json, metrics.json and info.json are written as usual).
    """
    import traceback

    import wordlm.experiment as experiment

    def run(*args: str, cwd: Path, script: str = "main.py", check: bool = True, **env: str):
        argv = [str(ROOT / script), *args]
        if script == "generate.py":
            argv = [argv[0], *_generate_arguments(args)]
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            patch.delenv("WORDLM_DATA", raising=False)
            for key, value in env.items():
                patch.setenv(key, value)
            patch.setattr(sys, "argv", argv)
            patch.setattr(experiment.ex, "observers", [])
            root = logging.getLogger()  # as in a new process: no handlers, so that Sacred's logging.basicConfig
            patch.setattr(root, "handlers", [])  # sends the log lines to stderr (pytest's own handlers are kept there)
            patch.setattr(root, "level", root.level)
            capfd.readouterr()  # what earlier code printed is not this command's
            try:
                experiment.main(argv)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
            out, err = capfd.readouterr()
        result = subprocess.CompletedProcess(argv, code, out, err)
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{out}\nstderr:\n{err}")
        return result

    return run


def _generate_arguments(args: tuple[str, ...]) -> list[str]:
    """generate.py's arguments as it hands them to main: its command inserted (``with_default_command``)."""
    return _generate_script().with_default_command(["generate.py", *args], "generate")[1:]


@functools.cache
def _generate_script():
    """generate.py as a module, read once (it only defines ``with_default_command`` and calls main as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_until(process, pattern: str, timeout: float = 180) -> str:
    """Read a running CLI's stdout line by line until a line matches ``pattern``; return all read so far."""
    import re
    import time

    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    process.kill()
    raise AssertionError(f"never saw {pattern!r}; output:\n{''.join(seen)}")
