"""wordlm as a package: ``python -m wordlm`` and the ``wordlm`` command, a wheel that ships WikiText-2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

# The spec's keys with their defaults, as print_config shows them.
SPEC_CONFIG = {"batch_size": "32", "bptt": "35", "clip": "0.25", "dataset": "'./data'", "dropout": "0.2",
               "emsize": "200", "epochs": "40", "log_interval": "200", "lr": "20.0", "model_type": "'LSTM'",
               "nhid": "200", "nlayers": "2", "save": "'model.pt'", "seed": "257", "tied": "True"}  # fmt: skip
SHIPPED = [f"wordlm/data/corpora-data/wikitext-2/{name}" for name in ("README.md", "test.txt.xz", "train.txt.xz",
                                                                 "valid.txt.xz")]  # fmt: skip


def run(*command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def assert_spec_config(output: str) -> None:
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # Sacred colours print_config
    assert output.startswith("Configuration (modified, added, typechanged, doc):"), output[:200]
    for key, value in SPEC_CONFIG.items():
        assert re.search(rf"^  {key} = {re.escape(value)} +# ", output, re.MULTILINE), key


def test_python_m_wordlm_is_main_py(tmp_path):
    as_module = run(sys.executable, "-m", "wordlm", "print_config", cwd=tmp_path, PYTHONPATH=str(ROOT))
    as_script = run(sys.executable, str(ROOT / "main.py"), "print_config", cwd=tmp_path)
    assert_spec_config(as_module.stdout)
    assert as_module.stdout == as_script.stdout
    usage = run(sys.executable, "-m", "wordlm", "--help", cwd=tmp_path, PYTHONPATH=str(ROOT)).stdout
    assert usage.startswith("Usage:\n  python -m wordlm [(with UPDATE...)] [options]\n"), usage[:200]
    usage = run(sys.executable, str(ROOT / "main.py"), "--help", cwd=tmp_path).stdout
    assert usage.startswith("Usage:\n  main.py [(with UPDATE...)] [options]\n"), usage[:200]


def test_a_built_and_installed_wheel_has_the_command_and_wikitext_2(tmp_path):
    """``pip install .`` (not editable): the wheel holds the compressed corpus and a working ``wordlm`` command."""
    pytest.importorskip("pip", reason="building a wheel needs pip")
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the checkout
    shutil.copytree(ROOT / "wordlm", source / "wordlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path), str(source),
        cwd=tmp_path)  # fmt: skip
    (wheel,) = tmp_path.glob("wordlm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        assert "wordlm = wordlm.experiment:main" in archive.read(entry_points).decode().splitlines()
    assert sorted(name for name in names if "/corpora-data/" in name) == SHIPPED
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any(name.endswith(".txt") and "corpora-data" in name for name in names)  # only compressed

    installed, elsewhere = tmp_path / "installed", tmp_path / "elsewhere"
    run(*pip, "install", "--no-deps", "--no-index", "--target", str(installed), str(wheel), cwd=tmp_path)
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(installed), "WORDLM_CACHE": str(tmp_path / "cache")}
    command = (sys.executable, str(installed / "bin" / "wordlm"))  # its #! line names this Python
    assert_spec_config(run(*command, "print_config", cwd=elsewhere, **env).stdout)
    usage = run(*command, "--help", cwd=elsewhere, **env).stdout
    assert usage.startswith("Usage:\n  wordlm [(with UPDATE...)] [options]\n"), usage[:200]
    where = "import wordlm.data.datasets as c; print(c.__file__); print(c.resolve_dataset('./data'))"
    found = run(sys.executable, "-c", where, cwd=elsewhere, **env).stdout.split()
    assert Path(found[0]).is_relative_to(installed) and Path(found[1]).parent == tmp_path / "cache"
    assert (Path(found[1]) / "train.txt").stat().st_size == 10_797_148
