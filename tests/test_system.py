"""What this CPU can run: ``amp='bf16'`` is refused in one line where torch has no bfloat16 kernels.

A CPU without AVX-512 or AMX is reproduced on any x86-64 machine by capping oneDNN's instruction set
(``ONEDNN_MAX_CPU_ISA=AVX2``) and torch's (``ATEN_CPU_CAPABILITY=avx2``) in a subprocess: its bfloat16
LSTM then fails with the very error an AVX2-only AMD EPYC gave ("could not create a primitive descriptor
for the LSTM forward propagation primitive").
"""

import os
import platform
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, run_cli

from wordlm.system import bfloat16_emulated, bfloat16_unavailable

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
x86_with_onednn = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
    reason="caps oneDNN's x86 instruction set",
)


def test_bf16_runs_where_torch_has_bfloat16_kernels():
    if torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert bfloat16_unavailable() is None  # AVX-512 (this project's CPUs): oneDNN serves bfloat16


def test_a_torch_without_the_bfloat16_op_is_refused_with_what_the_cpu_lacks(monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # a build without the internal op
    lacking = bfloat16_unavailable()
    assert "oneDNN has no bfloat16 support here" in lacking
    assert f"torch reports its instructions as {torch.backends.cpu.get_cpu_capability()}" in lacking
    if platform.machine() in ("x86_64", "AMD64"):
        assert lacking.startswith("this CPU lacks the AVX-512 or AMX that torch's bfloat16 kernels (oneDNN's) need")


@x86_with_onednn
def test_a_bfloat16_lstm_that_fails_is_caught_even_where_torch_claims_support():
    """The second check measures: a tiny bfloat16 LSTM is run, so a CPU on which torch's answer is wrong
    still gets the line, not oneDNN's traceback at the first batch."""
    script = """
import torch, types
torch.ops.mkldnn = types.SimpleNamespace(_is_mkldnn_bf16_supported=lambda: True)  # a wrong answer
from wordlm.system import bfloat16_unavailable
print(bfloat16_unavailable())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **AVX2_ONLY})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "torch reports its instructions as AVX2; a bfloat16 LSTM fails: could not create a primitive " \
           "descriptor for the LSTM forward propagation primitive)" in result.stdout  # fmt: skip


@x86_with_onednn
def test_on_a_cpu_without_avx512_amp_bf16_is_one_error_line_and_float32_trains(tmp_path, tiny_corpus):
    refused = run_cli("with", "smoke", f"dataset={tiny_corpus}", "amp=bf16", "-u", cwd=tmp_path, check=False,
                      **AVX2_ONLY)  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: amp='bf16' cannot train on this CPU: this CPU lacks the AVX-512 or AMX that torch's bfloat16 "
        "kernels (oneDNN's) need (torch reports its instructions as AVX2; oneDNN has no bfloat16 support here); "
        "leave amp unset to train in float32"
    ]
    assert not (tmp_path / "model.pt").exists()
    trained = run_cli("with", "smoke", f"dataset={tiny_corpus}", "-u", cwd=tmp_path, **AVX2_ONLY)  # as it says
    assert "End of training" in trained.stdout


@pytest.mark.parametrize("avx512_bf16, amx, slow", [(False, False, True), (True, False, False), (False, True, False)])
def test_bf16_without_bfloat16_arithmetic_is_named_as_emulated(monkeypatch, avx512_bf16, amx, slow):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    said = bfloat16_emulated()
    assert (said is not None) == slow
    if slow:
        assert said.startswith("this CPU has neither AVX-512 BF16 nor AMX")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert bfloat16_emulated() is None  # nothing assumed where it was never measured


def test_a_bf16_run_on_a_cpu_that_emulates_bfloat16_says_so_and_trains(tmp_path, tiny_corpus, cli_here, monkeypatch):
    if bfloat16_unavailable():
        pytest.skip("amp='bf16' is refused on this CPU (the test above)")
    import wordlm.run as run

    monkeypatch.setattr(run, "bfloat16_emulated", lambda: "this CPU has neither AVX-512 BF16 nor AMX, so ...")
    result = cli_here("with", "smoke", f"dataset={tiny_corpus}", "amp=bf16", "max_batches=2", "-u", cwd=tmp_path)
    warned = [line for line in result.stderr.splitlines() if "amp='bf16' trains slower than float32 here" in line]
    assert len(warned) == 1 and "leave amp unset for float32" in warned[0] and "test ppl" in result.stdout
    monkeypatch.setattr(run, "bfloat16_emulated", lambda: None)
    result = cli_here("with", "smoke", f"dataset={tiny_corpus}", "amp=bf16", "max_batches=2", "-u", cwd=tmp_path)
    assert "slower than float32" not in result.stderr
