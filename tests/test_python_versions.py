"""The Python versions pyproject.toml declares: no standard-library name newer than the oldest one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCANNER = Path(__file__).resolve().parent / "stdlib_names.py"


def oldest_declared() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (version,) = re.findall(r'^requires-python = ">=(3\.\d+)"$', pyproject, re.MULTILINE)
    assert f'target-version = "py{version.replace(".", "")}"' in pyproject, "ruff must check for the same version"
    return version


def interpreter(version: str) -> str | None:
    """A working ``python<version>``: on PATH, or one that pyenv keeps (its shims fail for versions not selected)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(path) for path in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.startswith(f"Python {version}."):
            return candidate
    return None


def test_the_code_uses_only_standard_library_names_the_oldest_declared_python_has(tmp_path):
    version = oldest_declared()
    if sys.version_info[:2] == tuple(map(int, version.split("."))):
        python = sys.executable  # the suite runs under it anyway
    else:
        python = interpreter(version)
        if python is None:
            pytest.skip(f"no Python {version} here to check the standard-library names against")
    scan = subprocess.run([python, str(SCANNER), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert scan.returncode == 0, scan.stdout + scan.stderr
    # and the scan does see a name that version lacks (logging.getLevelNamesMapping is 3.11+, tomllib too)
    (tmp_path / "newer.py").write_text("import logging\nimport tomllib\nnames = logging.getLevelNamesMapping()\n")
    scan = subprocess.run([python, str(SCANNER), str(tmp_path)], capture_output=True, text=True, timeout=300)
    if version == "3.10":
        assert scan.returncode == 1 and "newer.py:3: logging.getLevelNamesMapping" in scan.stdout, scan.stdout
        assert "newer.py:2: tomllib" in scan.stdout, scan.stdout
