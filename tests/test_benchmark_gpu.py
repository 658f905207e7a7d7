"""benchmarks/gpu.sh, the GPU machine's script: its syntax, and its one-line refusal on a machine without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the script for real")


def run_script(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@needs_no_cuda
def test_without_cuda_it_refuses_in_one_line_before_any_work(tmp_path):
    result = run_script(tmp_path, sys.executable)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: no CUDA device: ") and torch.__version__ in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "gpu_out").exists()


def test_a_python_without_torch_is_refused_in_one_line_too(tmp_path):
    python = tmp_path / "python-without-site-packages"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    result = run_script(tmp_path, str(python))
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: no CUDA device: ") and "cannot import torch" in result.stderr
