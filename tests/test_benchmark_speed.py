"""benchmarks/speed.py still runs end to end and its last line is the JSON the docs and the issue read."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cut_corpus, run_cli

from wordlm.models.fused import available_backends

BACKENDS = available_backends()
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # a CPU without AVX-512 or AMX (test_system)
x86_with_onednn = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
    reason="caps oneDNN's x86 instruction set",
)


def speed_module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_config() -> dict:
    """The benchmark's own default config (its sizes are what the bound's arithmetic must use)."""
    return speed_module().CONFIGS["default"]


def test_the_matmul_ceiling_counts_the_products_split_into_wordlms_chunks(monkeypatch):
    """The whole vocabulary-sized product slows with the memory; wordlm.models.fused runs chunks. The ceiling
    must take each of the three products' chunked form as a candidate, or the bound is too low."""
    speed = speed_module()
    seen = []

    def fake_rate(product, flops, repeats):  # a chunked candidate returns one output per chunk
        chunked = isinstance(product(), list)
        seen.append(chunked)
        return 100.0 if chunked else 1.0

    monkeypatch.setattr(speed, "best_gflops", fake_rate)
    assert speed.matmul_ceiling(tokens=6, hidden=4, ntoken=5000, repeats=1) == pytest.approx(100.0)
    assert seen.count(True) == 3 * len([name for name in BACKENDS if name != "auto"])  # each library, each product


def test_the_speed_benchmark_reports_its_ratios_the_loss_check_and_the_options_it_is_given(tmp_path):
    """One run (the suite's slowest test, so the checks share it): the ratios, the bound, the ablations,
    and ``--options NAMES`` timing just those options beside float32 wordlm."""
    corpus = cut_corpus(tmp_path / "corpus", lines=(300, 60, 60))  # a vocabulary below 2000 (1692 words)
    common = ("--dataset", str(corpus), "--configs", "default", "--batches", "2", "--warmup", "1",
              "--eval-tokens", "400")  # fmt: skip
    result = run_cli(*common, "--repeats", "2", "--ablations", "--options", "bf16,adaptive", "--square-size", "256",
                     cwd=tmp_path, script="benchmarks/speed.py", timeout=600)  # fmt: skip
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"train_ratio", "eval_ratio", "gflops_fraction", "loss_match"} <= summary.keys()
    assert summary["loss_match"] is True  # the same weights and dropout masks give the classic loop's losses
    row = summary["configs"]["default"]
    assert row["train_ratio"] > 0 and row["eval_ratio"] > 0 and row["matmul_ceiling_gflops"] > 0
    assert row["square_matmul_size"] == 256 and "large square matmul (256^3)" in result.stdout
    low, high = row["spread"]["classic"]["train"]
    assert 0 < low <= high == row["classic_train_tokens_per_s"]  # the fastest of the repeated runs counts
    assert "wordlm-unfused_train_tokens_per_s" in row and "without the fused decoder loss" in result.stdout
    if "onednn" in BACKENDS:  # the fused loss on torch.mm's products, the ablation of oneDNN's
        assert row["wordlm-blas_train_tokens_per_s"] > 0 and "torch.mm's products only" in result.stdout
    # the bound: the decoder's products at the measured ceiling plus the LSTM kernels timed alone
    assert row["lstm_train_step_ms"] > 0 and row["lstm_eval_ms"] > 0
    cfg = default_config()
    tokens = cfg["batch_size"] * cfg["bptt"]
    decoder_ms = 1000 * 3 * 2 * cfg["nhid"] * row["ntoken"] * tokens / (row["matmul_ceiling_gflops"] * 1e9)
    assert row["bound_train_tokens_per_s"] == pytest.approx(1000 * tokens / (decoder_ms + row["lstm_train_step_ms"]))
    bound, classic = row["bound_train_tokens_per_s"], row["classic_train_tokens_per_s"]
    assert row["bound_train_ratio"] == pytest.approx(bound / classic)
    ours_eval, bound_eval = row["wordlm_eval_tokens_per_s"], row["bound_eval_tokens_per_s"]
    assert row["eval_fraction_of_bound"] == pytest.approx(ours_eval / bound_eval)
    assert "bound tokens/s" in result.stdout
    # run by run: run i of each side ran back to back, and their ratio is the paired one
    rates = row["run_rates"]
    for phase in ("train", "eval"):
        expected = [ours / theirs for ours, theirs in zip(rates["wordlm"][phase], rates["classic"][phase])]
        assert len(expected) == 2 and row["paired_ratios"][phase] == pytest.approx(expected)
        assert row[f"paired_{phase}_ratio_median"] == pytest.approx(sum(expected) / 2)
        assert max(rates["classic"][phase]) == row[f"classic_{phase}_tokens_per_s"]  # the best run is the headline
    assert "run by run (train)" in result.stdout
    # the options named, and only those
    for option in ("wordlm-bf16", "wordlm-adaptive"):
        assert row[f"{option}_train_tokens_per_s"] > 0 and row[f"{option}_eval_tokens_per_s"] > 0
    assert "wordlm-compile_train_tokens_per_s" not in row  # only the options named run
    ntoken = row["ntoken"]  # a small corpus: adaptive softmax keeps the cutoffs inside its vocabulary
    assert row["wordlm-bf16_setting"] == {"amp": "bf16"} and '{"amp": "bf16"}' in result.stdout
    assert ntoken < 2000 and row["wordlm-adaptive_setting"] == {"adaptive_softmax": [ntoken // 2]}
    # bfloat16 rounds the same model's math (a small gap); adaptive softmax is another output layer
    assert 0 < row["wordlm-bf16_loss_gap"] < 0.1 < row["wordlm-adaptive_loss_gap"]
    failed = run_cli(*common, "--options", "bf16,fp8", cwd=tmp_path, script="benchmarks/speed.py", check=False)
    assert failed.returncode == 2 and "no option fp8; choose from bf16, adaptive, compile" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_adaptive_softmax_keeps_the_cutoffs_inside_the_vocabulary():
    setting = speed_module().option_setting
    assert setting("wordlm-adaptive", 33278) == {"adaptive_softmax": [2000, 10000]}  # WikiText-2's: as documented
    assert setting("wordlm-adaptive", 5000) == {"adaptive_softmax": [2000]}
    assert setting("wordlm-adaptive", 1954) == {"adaptive_softmax": [977]}
    assert setting("wordlm-bf16", 33278) == {"amp": "bf16"} and setting("wordlm", 33278) == {}


@x86_with_onednn
def test_bf16_is_unavailable_on_a_cpu_without_bfloat16_kernels_and_the_others_still_run():
    """The benchmark asks the library's own check (a subprocess: the instruction set is capped at start)."""
    script = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("speed", {str(ROOT / "benchmarks" / "speed.py")!r})
speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed)
print(json.dumps(speed.runnable(["wordlm-bf16", "wordlm-adaptive"])))
"""
    for env, bf16 in ((AVX2_ONLY, False), ({}, torch.backends.cpu.get_cpu_capability().startswith("AVX512"))):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **env})  # fmt: skip
        options, unavailable = json.loads(result.stdout.strip().splitlines()[-1])
        if bf16:
            assert options == ["wordlm-bf16", "wordlm-adaptive"] and unavailable == {}
        elif env:
            assert options == ["wordlm-adaptive"]
            assert unavailable["wordlm-bf16"].startswith("this CPU lacks the AVX-512 or AMX")


@pytest.mark.slow
@x86_with_onednn
def test_the_speed_benchmark_reports_bf16_unavailable_in_its_table_and_json(tmp_path):
    corpus = cut_corpus(tmp_path / "corpus", lines=(400, 60, 60))
    result = run_cli("--dataset", str(corpus), "--configs", "default", "--batches", "1", "--warmup", "1",
                     "--eval-tokens", "200", "--repeats", "1", "--options", "bf16", cwd=tmp_path,
                     script="benchmarks/speed.py", timeout=600, **AVX2_ONLY)  # fmt: skip
    row = json.loads(result.stdout.strip().splitlines()[-1])["configs"]["default"]
    assert row["wordlm-bf16_unavailable"].startswith("this CPU lacks the AVX-512 or AMX")
    assert "wordlm-bf16_train_tokens_per_s" not in row and row["wordlm_train_tokens_per_s"] > 0
    assert '{"amp": "bf16"}' in result.stdout and "unavailable: this CPU lacks" in result.stdout
