"""The evaluate command: a text file or a split scored with a checkpoint, per-line scores, the cache pointer and
dynamic evaluation, bad input in one line (the scoring itself is tests/test_evaluation.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli
from test_evaluation import TEXT, VOCAB, context_free_model, hand_ids

from wordlm.data.corpus import EOS, Vocabulary
from wordlm.experiment import error, ex
from wordlm.training.checkpoint import save_checkpoint


@pytest.fixture
def scored(tmp_path):
    """A checkpoint of the context-free model, the text file, and the hand-computed log-probabilities."""
    vocab = Vocabulary(VOCAB)
    model = context_free_model(vocab)
    checkpoint = tmp_path / "m.pt"
    save_checkpoint(checkpoint, model, vocab)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    log_p = torch.log_softmax(model.decoder.bias.detach().double(), dim=0)
    ids = hand_ids(TEXT, vocab)
    per_target = [float(log_p[i]) for i in ids[1:]]  # the first token is context only
    return {"model": model, "vocab": vocab, "checkpoint": checkpoint, "text": text, "ids": ids,
            "per_target": per_target}  # fmt: skip


def test_cli_scores_a_text_file_with_line_scores(scored, tmp_path):
    """A subprocess, as a user runs it: main.py evaluate's witness of a perplexity printed by a real process."""
    result = run_cli("evaluate", "-u", "with", f"checkpoint={scored['checkpoint']}", f"text={scored['text']}",
                     "line_scores=lines.jsonl", "eval_batch_size=3", "bptt=4", cwd=tmp_path)  # fmt: skip
    total = sum(scored["per_target"])
    assert f"| tokens 18 | loss {-total / 18:5.2f} | ppl {math.exp(-total / 18):8.2f}" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "lines.jsonl").read_text().splitlines()]
    lengths = [len(line.split()) + 1 for line in TEXT.splitlines()]  # words and the <eos>
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in records] == [lengths[0] - 1, *lengths[1:]]
    starts = [sum(lengths[:n]) - 1 for n in range(len(lengths))]  # index of each line's first target
    for record, start, length in zip(records, [0, *starts[1:]], [lengths[0] - 1, *lengths[1:]], strict=True):
        assert record["logprob"] == pytest.approx(sum(scored["per_target"][start : start + length]), rel=1e-9)


def test_dataset_split_is_scored_with_the_checkpoints_vocabulary(scored, tiny_corpus):
    """Words of the corpus map to the checkpoint's ids (or <unk>); no vocabulary comes from the corpus."""
    log_p = torch.log_softmax(scored["model"].decoder.bias.detach().double(), dim=0)
    for split in ("test", "valid"):
        updates = {"checkpoint": str(scored["checkpoint"]), "dataset": str(tiny_corpus)}
        run = ex.run("evaluate", config_updates={**updates, **({"split": split} if split != "test" else {})},
                     options={"--loglevel": "ERROR"})  # fmt: skip
        ids = hand_ids((tiny_corpus / f"{split}.txt").read_text(encoding="utf-8"), scored["vocab"])
        assert run.info["tokens"] == len(ids) - 1
        assert run.result == pytest.approx(math.exp(-sum(float(log_p[i]) for i in ids[1:]) / (len(ids) - 1)))


@pytest.mark.parametrize(
    "updates, fragment",
    [({"split": "dev"}, "split='dev' is not a split"), ({"text": "nowhere.txt"}, "nowhere.txt does not exist"),
     ({"eval_batch_size": 0}, "eval_batch_size=0 must be"), ({"text": "empty.txt"}, "needs at least two"),
     ({"cache_window": -1}, r"^cache_window=-1 must be an integer >= 0$"),
     ({"cache_lambda": 1.5}, r"^cache_lambda=1.5 must be a number between 0 and 1$"),
     ({"dynamic_decay": -0.5}, r"^dynamic_decay=-0.5 must be a number >= 0$")],
)  # fmt: skip
def test_bad_evaluate_input_is_a_user_error(scored, tmp_path, monkeypatch, updates, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(error, match=fragment):
        ex.run("evaluate", config_updates={"checkpoint": str(scored["checkpoint"]), **updates},
               options={"--loglevel": "ERROR"})  # fmt: skip


def test_words_a_vocabulary_without_unk_cannot_score_are_one_error_line(tmp_path):
    """A subprocess, as a user runs it: main.py evaluate's witness of an error line from a real process."""
    vocab = Vocabulary(["the", "cat", EOS])
    save_checkpoint(tmp_path / "m.pt", context_free_model(vocab), vocab)
    (tmp_path / "t.txt").write_text("the dog\n", encoding="utf-8")
    result = run_cli("evaluate", "-u", "with", "checkpoint=m.pt", "text=t.txt", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: t.txt: 1 tokens are not in the checkpoint's vocabulary, which has no <unk> to stand for them, "
        "so their probability is undefined; score text of the training corpus' vocabulary"
    ]


def test_evaluate_command_options(tmp_path, tiny_corpus, cli_here):
    cli_here("with", "smoke", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    plain = cli_here("evaluate", "with", f"dataset={tiny_corpus}", "eval_batch_size=1", "-u", cwd=tmp_path).stdout
    cached = cli_here("evaluate", "with", f"dataset={tiny_corpus}", "cache_window=100", "cache_lambda=0.0", "-u",
                      cwd=tmp_path).stdout  # fmt: skip
    dynamic = cli_here("evaluate", "with", f"dataset={tiny_corpus}", "dynamic_lr=0.5", "-u", cwd=tmp_path).stdout
    ppl = lambda out: float(out.split("| ppl")[1].split()[0])  # noqa: E731
    assert ppl(cached) == pytest.approx(ppl(plain), rel=1e-4) and "cache pointer (window 100" in cached
    assert "dynamic evaluation (lr 0.5" in dynamic
    both = cli_here("evaluate", "with", f"dataset={tiny_corpus}", "cache_window=5", "dynamic_lr=0.1", "-u",
                    cwd=tmp_path, check=False)  # fmt: skip
    assert both.returncode != 0 and "error: use the cache pointer" in both.stderr
