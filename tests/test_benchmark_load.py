"""benchmarks/load.py still runs: a tiny corpus and a tiny synthetic one, so the docs' command keeps working."""

from __future__ import annotations

import re

from conftest import run_cli


def test_the_load_benchmark_runs_and_reports_every_figure(tiny_corpus, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run_cli(
        "--corpus", str(tiny_corpus), "--repeat", "1", "--big-tokens", "3000", "--tmp", str(scratch),
        cwd=tmp_path, script="benchmarks/load.py",
    )  # fmt: skip
    out = result.stdout
    for method in ("classic two-pass tokenizer", "wordlm cold", "wordlm tokenizing alone", "wordlm warm"):
        assert re.search(rf"{method}.* +\d+\.\d{{3}} +\d+\.\dx", out), out
    assert re.search(r"synthetic WikiText-103-sized corpus: [\d,]+ tokens \(train 3,\d{3}\)", out), out
    assert re.search(
        r"cold: +[\d.]+ s, .*peak RSS [\d,]+ MB \([\d,]+ MB after imports, [\d,]+ MB when tokenized\)", out
    ), out
    assert re.search(r"warm: +[\d.]+ s, .*peak RSS [\d,]+ MB", out), out
    assert list(scratch.iterdir()) == [], "the synthetic corpus was not cleaned up"
