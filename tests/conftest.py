"""Fixtures shared by the tests: real corpora from ../shared/data, small corpora cut from them, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_corpus(name: str) -> Path:
    """A real corpus folder from ../shared/data (tests never download)."""
    folder = SHARED_DATA / name
    if not (folder / "train.txt").is_file():
        pytest.fail(f"{folder} is missing: the tests read the corpora from ../shared/data")
    return folder


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


def cut_corpus(folder: Path, source: str = "penn", lines: tuple[int, int, int] = (3000, 300, 300)) -> Path:
    """Write the first lines of each split of a real corpus to ``folder``: small, real text."""
    texts = []
    for split, count in zip(("train", "valid", "test"), lines):
        with open(shared_corpus(source) / f"{split}.txt", encoding="utf-8") as handle:
            texts.append("".join(line for _, line in zip(range(count), handle)))
    return write_corpus(folder, *texts)


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
    """3,000/300/300 lines of PTB (about 64k/6k/6k tokens)."""
    return cut_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """300/40/40 lines of PTB: enough for a few batches of the smoke config."""
    return cut_corpus(tmp_path / "tiny", lines=(300, 40, 40))


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # WORDLM_CACHE and WORDLM_OFFLINE included, as the autouse fixture set them
    env.update({"WORDLM_DATA": str(SHARED_DATA), "PYTHONUNBUFFERED": "1"})
    env.update(extra)  # may override the two above
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
