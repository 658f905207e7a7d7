"""benchmarks/ablations.py runs end to end: paired on/off steps in one process, a JSON last line."""

import json

from conftest import cut_corpus, run_cli

from wordlm.models.fused import available_backends


def test_the_ablation_benchmark_pairs_each_speed_up_and_counts_page_faults(tmp_path):
    corpus = cut_corpus(tmp_path / "corpus", lines=(400, 60, 60))
    result = run_cli("--dataset", str(corpus), "--pairs", "2", "--eval-pairs", "1", "--eval-tokens", "300",
                     cwd=tmp_path, script="benchmarks/ablations.py", timeout=600)  # fmt: skip
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"train_fused", "train_allocator", "eval_fused"} <= summary.keys()
    if "onednn" in available_backends():  # the oneDNN products, against torch.mm's, in training and evaluation
        assert {"train_onednn", "eval_onednn"} <= summary.keys()
    for row in summary.values():
        assert row["pairs"] >= 1 and row["ratio_median"] > 0 and row["on_ms_median"] > 0
        low, high = row["ratio_quartiles"]
        assert low <= high
    # with the setting on, no step maps a buffer afresh (off, the count depends on what the heap kept): a fresh
    # vocabulary-sized buffer here is ~1,850 pages (1,692 words x 1,120 tokens x 4 bytes); a stray page or two (a
    # Python arena, a thread's stack) is not one (seen: a median of 0.5 against 0 on an Ice Lake Xeon)
    allocator = summary["train_allocator"]
    assert allocator["faults_per_step_on"] <= allocator["faults_per_step_off"] + 8
