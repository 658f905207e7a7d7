"""benchmarks/budget.py runs both sides for the same short budget and writes the record RESULTS.md reads."""

import json
from pathlib import Path

import pytest
from conftest import cut_corpus, run_cli


@pytest.mark.wallclock
def test_the_budget_benchmark_trains_both_for_the_budget_and_writes_its_record(tmp_path):
    corpus = cut_corpus(tmp_path / "corpus", lines=(300, 60, 60))
    out = tmp_path / "runs" / "budget.json"
    result = run_cli("--minutes", "0.15", "--dataset", str(corpus), "--preset", "smoke", "--out", str(out),
                     "max_batches=None", "optimizer=adam", "lr=0.003", "lr_schedule=cosine",
                     cwd=tmp_path, script="benchmarks/budget.py", timeout=600)  # fmt: skip
    record = json.loads(out.read_text())
    for key in ("minutes", "dataset", "cpu", "torch", "classic_test_ppl", "classic_epochs", "wordlm_test_ppl",
                "wordlm_epochs", "wordlm_config", "commit"):  # fmt: skip
        assert record[key] is not None, key
    assert record["minutes"] == 0.15 and record["wordlm_preset"] == "smoke"
    assert 1 < record["classic_test_ppl"] < 5000 and 1 < record["wordlm_test_ppl"] < 5000
    assert record["classic_epochs"] > 0 and record["wordlm_epochs"] > 0
    assert record["valid_ppl_by_epoch"] and record["wordlm_best_valid_ppl"] == pytest.approx(
        min(record["valid_ppl_by_epoch"]), abs=0.005)  # fmt: skip
    for side in ("classic_seconds", "wordlm_seconds"):  # each within its 9 seconds, to a batch and a validation
        assert 5 < record[side] <= 9 + 3, side
    config = record["wordlm_config"]  # what differs from the defaults: the preset's keys, the given ones, the budget
    assert config["emsize"] == 32 and config["optimizer"] == "adam" and config["lr_schedule"] == "cosine"
    assert config["time_budget"] == 0.15 and "max_batches" not in config and "save" not in config
    assert f"record in {out}" in result.stdout.splitlines()[-1]


def test_the_budget_benchmark_keeps_wordlms_checkpoint_where_save_says(tmp_path):
    """--save keeps the trained model for adapt.py (else it goes with a temporary folder); --skip-classic: no
    classic side in the record."""
    import wordlm

    corpus = cut_corpus(tmp_path / "corpus", lines=(200, 40, 40))
    out, save = tmp_path / "budget.json", tmp_path / "kept" / "budget.pt"
    save.parent.mkdir()
    run_cli("--minutes", "0.05", "--dataset", str(corpus), "--preset", "smoke", "--skip-classic", "--save", str(save),
            "--out", str(out), cwd=tmp_path, script="benchmarks/budget.py", timeout=300)  # fmt: skip
    record = json.loads(out.read_text())
    assert record["classic_test_ppl"] is None and "save" not in record["wordlm_config"]
    lm = wordlm.load(save, "cpu")  # the run's best model: it scores valid as the run did
    assert lm.perplexity(corpus / "valid.txt") == pytest.approx(record["wordlm_best_valid_ppl"], rel=1e-4)


def test_the_committed_30_minute_records_are_complete_and_quoted_in_results():
    root = Path(__file__).resolve().parents[1]
    records = sorted((root / "docs" / "runs" / "budget_30min").glob("*.json"))
    assert records, "no 30-minute record in docs/runs/budget_30min/"
    results = (root / "docs" / "RESULTS.md").read_text()
    for path in records:
        record = json.loads(path.read_text())
        assert record["minutes"] == 30 and record["dataset"] == "wikitext-2" and record["commit"], path.name
        assert 25 <= record["wordlm_seconds"] / 60 <= 30.5, path.name  # the budget, to a batch and a validation
        assert f"{record['wordlm_test_ppl']:.2f}" in results, path.name
        if record["classic_test_ppl"] is not None:
            assert f"{record['classic_test_ppl']:.2f}" in results, path.name


def test_the_committed_2_hour_records_are_complete_and_quoted_in_results():
    root = Path(__file__).resolve().parents[1]
    records = sorted((root / "docs" / "runs" / "budget_2h").glob("*.json"))
    assert records, "no 2-hour record in docs/runs/budget_2h/"
    results = (root / "docs" / "RESULTS.md").read_text()
    for path in records:
        record = json.loads(path.read_text())
        assert record["minutes"] == 120 and record["commit"] and record["cpu"] and record["meanwhile"], path.name
        if record.get("status", "").startswith("stopped"):  # a try ended early on purpose: says so, and why
            assert record["wordlm_seconds"] / 60 < 115 and record["note"], path.name
            assert f"{min(record['valid_ppl_by_epoch']):.2f}" in results, path.name
            continue
        assert 115 <= record["wordlm_seconds"] / 60 <= 120.5, path.name  # the budget, to a batch and a validation
        assert (root / "wordlm").is_dir() and record["wordlm_preset"] in (root / "README.md").read_text(), path.name
        for key in ("wordlm_test_ppl", "wordlm_best_valid_ppl"):
            assert f"{record[key]:.2f}" in results, (path.name, key)
