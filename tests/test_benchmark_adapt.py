"""benchmarks/adapt.py tunes the cache pointer and dynamic evaluation on valid, tests each once, and adds its figures
to a record; its plain figures are main.py evaluate's, its cache figures evaluate's although the model runs once a
split; a method can be left out, and dynamic evaluation's grid given on the command line."""

import json
import re
from pathlib import Path

import pytest
from conftest import cut_corpus, run_cli

import wordlm
from wordlm.evaluation import evaluate_text, perplexity

QUICK_GRIDS = {  # adapt.py's --quick grids
    "window": [20, 50], "theta": [0.3, 1.0], "lambda": [0.1, 0.2], "lr": [0.1, 1.0], "decay": [0.0, 0.01],
}  # fmt: skip
FIELDS = (
    "test_ppl_plain", "valid_ppl_plain", "test_ppl_cache", "valid_ppl_cache", "cache_params", "cache_seconds_test",
    "test_ppl_dynamic_eval", "valid_ppl_dynamic_eval", "dynamic_eval_params", "dynamic_eval_seconds_test",
    "adapt_tuning_seconds", "adapt_command", "adapt_cpu", "adapt_threads",
)  # fmt: skip
CACHE_FIELDS = ("test_ppl_cache", "valid_ppl_cache", "cache_params", "cache_seconds_test", "cache_states_seconds_valid",
                "cache_states_seconds_test")  # fmt: skip
DYNAMIC_FIELDS = ("test_ppl_dynamic_eval", "valid_ppl_dynamic_eval", "dynamic_eval_params", "dynamic_eval_seconds_test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke-preset model on a tiny cut of WikiText-2: (corpus folder, checkpoint)."""
    folder = tmp_path_factory.mktemp("adapt")
    corpus = cut_corpus(folder / "corpus", tokens=(6_600, 900, 900))
    checkpoint = folder / "tiny.pt"
    wordlm.train(preset="smoke", dataset=str(corpus), save=str(checkpoint), log_interval=1000)
    return corpus, checkpoint


def test_adapt_tunes_on_valid_tests_once_and_adds_its_fields_to_the_record(trained, tmp_path):
    corpus, checkpoint = trained
    record_path = tmp_path / "runs" / "record.json"
    record_path.parent.mkdir()
    record_path.write_text(json.dumps({"minutes": 120, "wordlm_test_ppl": 99.5}))  # a budget record's fields stay
    result = run_cli("--checkpoint", str(checkpoint), "--dataset", str(corpus), "--record", str(record_path),
                     "--quick", cwd=tmp_path, script="benchmarks/adapt.py", timeout=300)  # fmt: skip
    record = json.loads(record_path.read_text())
    assert record["minutes"] == 120 and record["wordlm_test_ppl"] == 99.5
    for field in (*FIELDS, *CACHE_FIELDS, *DYNAMIC_FIELDS):
        assert record[field] is not None, field
    assert record["adapt_skipped"] == []

    # the plain figures are those of main.py evaluate and of the API, split by split
    lm = wordlm.load(checkpoint, "cpu")
    assert record["valid_ppl_plain"] == pytest.approx(lm.perplexity(corpus / "valid.txt"), rel=1e-9)
    evaluate = run_cli("evaluate", "-u", "with", f"checkpoint={checkpoint}", f"dataset={corpus}", "split=test",
                       "device=cpu", cwd=tmp_path)  # fmt: skip
    printed = float(re.search(r"\| ppl +([\d.]+)", evaluate.stdout).group(1))
    assert f"{record['test_ppl_plain']:8.2f}".strip() == f"{printed:.2f}"

    # the chosen settings are grid points, and their test figures are evaluate's with those keys
    cache, dynamic = record["cache_params"], record["dynamic_eval_params"]
    for name, value in {**cache, **{k: v for k, v in dynamic.items() if k != "bptt"}}.items():
        assert value in QUICK_GRIDS[name], (name, value)
    ids = lm.tokenize(corpus / "test.txt")[0]
    with_cache = evaluate_text(lm.model, ids, cache_window=cache["window"], cache_theta=cache["theta"],
                               cache_lambda=cache["lambda"])[0]  # fmt: skip
    dynamic_loss = evaluate_text(lm.model, ids, bptt=dynamic["bptt"], dynamic_lr=dynamic["lr"],
                                 dynamic_decay=dynamic["decay"])[0]  # fmt: skip
    assert record["test_ppl_cache"] == pytest.approx(perplexity(with_cache), rel=1e-9)
    assert record["test_ppl_dynamic_eval"] == pytest.approx(perplexity(dynamic_loss), rel=1e-6)

    # tuned on valid: the chosen point is the best valid pass of its method, and every pass was timed
    grid = record["adapt_grid"]
    valid_ids = lm.tokenize(corpus / "valid.txt")[0]
    for entry in [entry for entry in grid if entry["method"] == "cache"][:2]:  # one model pass, evaluate's figures
        loss = evaluate_text(lm.model, valid_ids, **entry["params"])[0]
        assert entry["valid_ppl"] == pytest.approx(perplexity(loss), rel=1e-9), entry
    for method, field in (("cache", "valid_ppl_cache"), ("dynamic_eval", "valid_ppl_dynamic_eval")):
        passes = [entry for entry in grid if entry["method"] == method]
        assert 2 <= len(passes) <= 8 and all(entry["seconds"] >= 0 for entry in passes)
        assert record[field] == min(entry["valid_ppl"] for entry in passes)
    assert record["adapt_threads"] >= 1 and record["adapt_command"].startswith("python benchmarks/adapt.py")
    assert record["cache_seconds_test"] > 0 and record["dynamic_eval_seconds_test"] > 0
    # the cache's model pass is timed once a split; on test it is part of the cache's seconds
    assert 0 <= record["cache_states_seconds_test"] <= record["cache_seconds_test"]
    timed = record["cache_states_seconds_valid"] + sum(entry["seconds"] for entry in grid)  # every valid pass
    assert record["cache_states_seconds_valid"] >= 0 and record["adapt_tuning_seconds"] >= timed - 0.5
    lines = result.stdout.splitlines()
    assert any(line.startswith("cache pointer ") for line in lines) and f"record in {record_path}" in lines[-1]


@pytest.mark.parametrize(
    "options, skipped",
    [(["--skip-dynamic", "--cache-theta", "2,0.5", "--cache-lambda", "0.15"], ["dynamic_eval"]),
     (["--skip-cache", "--dynamic-lr", "0.5", "--dynamic-decay", "0.02,0", "--dynamic-tune-tokens", "300"], ["cache"])],
)  # fmt: skip
def test_adapt_skips_a_method_and_takes_the_dynamic_grid_from_the_command_line(trained, tmp_path, options, skipped):
    corpus, checkpoint = trained
    record_path = tmp_path / "record.json"
    record_path.write_text(json.dumps({"test_ppl_dynamic_eval": 1.0, "cache_params": {"window": 1}}))  # an old run's
    result = run_cli("--checkpoint", str(checkpoint), "--dataset", str(corpus), "--record", str(record_path),
                     "--quick", *options, cwd=tmp_path, script="benchmarks/adapt.py", timeout=300)  # fmt: skip
    record = json.loads(record_path.read_text())
    assert record["adapt_skipped"] == skipped and record["test_ppl_plain"] > 1
    left_out, kept = (CACHE_FIELDS, DYNAMIC_FIELDS) if skipped == ["cache"] else (DYNAMIC_FIELDS, CACHE_FIELDS)
    assert all(record[field] is None for field in left_out)  # not the old run's figures beside this run's
    assert all(record[field] is not None for field in kept)
    methods = {entry["method"] for entry in record["adapt_grid"]}
    lines = result.stdout.splitlines()
    if skipped == ["cache"]:
        assert methods == {"dynamic_eval"}
        assert {(e["params"]["dynamic_lr"], e["params"]["dynamic_decay"]) for e in record["adapt_grid"]} == {
            (0.5, 0.0), (0.5, 0.02)}  # the command line's grid, from decay 0  # fmt: skip
        assert record["dynamic_eval_params"]["lr"] == 0.5 and record["dynamic_eval_params"]["decay"] in (0.0, 0.02)
        # tuned on valid's first 300 tokens: each grid point is evaluate's figure on that slice, beside its plain one
        lm = wordlm.load(checkpoint, "cpu")
        head = lm.tokenize(corpus / "valid.txt")[0][:300]
        assert record["dynamic_tune_tokens"] == 300
        assert record["valid_ppl_plain_dynamic_tune"] == pytest.approx(perplexity(evaluate_text(lm.model, head)[0]))
        entry = record["adapt_grid"][0]
        loss = evaluate_text(lm.model, head, **entry["params"])[0]
        assert entry["valid_ppl"] == pytest.approx(perplexity(loss), rel=1e-6)
        assert record["valid_ppl_plain"] != pytest.approx(record["valid_ppl_plain_dynamic_tune"])  # not all of valid
        assert not any(line.startswith("cache pointer ") for line in lines)
    else:
        assert methods == {"cache"} and record["cache_states_seconds_test"] <= record["cache_seconds_test"]
        # θ and λ from the command line, the windows from --quick's grid; the search starts at each list's middle
        tried = [entry["params"] for entry in record["adapt_grid"]]
        assert {p["cache_theta"] for p in tried} == {0.5, 2.0} and {p["cache_lambda"] for p in tried} == {0.15}
        assert {p["cache_window"] for p in tried} == {20, 50} and tried[0]["cache_theta"] == 2.0
        assert record["cache_params"]["theta"] in (0.5, 2.0) and record["cache_params"]["lambda"] == 0.15
        assert record["dynamic_tune_tokens"] is None and record["valid_ppl_plain_dynamic_tune"] is None
        assert not any(line.startswith("dynamic evaluation ") for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.pt"], "missing.pt"),
        (["--dataset", "no-such-corpus"], "no-such-corpus"),
        (["--dynamic-lr", "0,1"], "--dynamic-lr"),
        (["--dynamic-decay", "0,2"], "--dynamic-decay"),
        (["--dynamic-decay", "0,x"], "'0,x'"),
        (["--dynamic-tune-tokens", "1"], "--dynamic-tune-tokens"),
        (["--cache-theta", "0,1"], "--cache-theta"),
        (["--cache-lambda", "0.1,1.5"], "--cache-lambda"),
        (["--cache-lambda", "0"], "--cache-lambda"),
    ],
)
def test_adapt_refuses_bad_input_in_one_line(trained, tmp_path, args, message):
    corpus, checkpoint = trained
    for flag, value in (("--checkpoint", str(checkpoint)), ("--dataset", str(corpus))):
        args = args if flag in args else [flag, value, *args]
    result = run_cli(*args, "--record", str(tmp_path / "r.json"), cwd=tmp_path, script="benchmarks/adapt.py",
                     check=False)  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not Path(tmp_path / "r.json").exists()
