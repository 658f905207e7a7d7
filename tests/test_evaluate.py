"""Scoring text with a checkpoint: every target exactly once, by hand; per-line scores; bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from wordlm.checkpoint import save_checkpoint
from wordlm.data import EOS, UNK, Vocabulary
from wordlm.experiment import error, ex
from wordlm.generation import score_lines, target_log_probs
from wordlm.model import ModelConfig, RNNModel
from wordlm.training import evaluate_loss

# Blank line, a word the vocabulary lacks (-> <unk>), and lines of different lengths.
TEXT = "the cat sat\n\non the mat with a hat\nthe zebra sat\na cat\n"
VOCAB = ["hat", "a", "with", EOS, "sat", "on", "cat", UNK, "mat", "the"]  # not in the text's order


def context_free_model(vocab: Vocabulary) -> RNNModel:
    """A model whose next-word distribution is softmax(bias) whatever came before: decoder weight 0."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(len(vocab), "GRU", emsize=6, nhid=6, nlayers=1, dropout=0.0, tied=False))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.linspace(-2.0, 3.0, len(vocab)))  # a distinct probability per word
    return model.eval()


def hand_ids(text: str, vocab: Vocabulary) -> list[int]:
    words = text.replace("\n", f" {EOS} ").split()
    return [vocab.word2idx.get(word, vocab.word2idx[UNK]) for word in words]


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


@pytest.mark.parametrize("batch_size, bptt", [(1, 35), (1, 1), (3, 2), (4, 35), (5, 3), (30, 4), (1000, 35)])
def test_every_target_is_scored_exactly_once(scored, batch_size, bptt):
    """Against a hand sum over all N-1 targets: a skipped or doubled target changes the total."""
    ids = torch.tensor(scored["ids"])
    loss, count = evaluate_loss(scored["model"], ids, batch_size, bptt)
    assert count == len(ids) - 1 == 18
    assert loss * count == pytest.approx(-sum(scored["per_target"]), rel=1e-6)
    per_token = target_log_probs(scored["model"], ids, batch_size, bptt)
    assert per_token.tolist() == pytest.approx(scored["per_target"], rel=1e-6)  # in text order


@pytest.mark.parametrize("model_type", ["LSTM", "RNN_RELU"])
def test_per_token_scores_add_up_to_evaluate_loss_for_a_model_with_memory(model_type):
    torch.manual_seed(1)
    model = RNNModel(ModelConfig(20, model_type, emsize=8, nhid=8, nlayers=2, dropout=0.0, tied=True)).eval()
    ids = torch.randint(0, 20, (103,))
    for batch_size, bptt in ((1, 7), (4, 5), (10, 35)):
        loss, count = evaluate_loss(model, ids, batch_size, bptt)
        per_token = target_log_probs(model, ids, batch_size, bptt)
        assert per_token.numel() == count == 102
        assert float(per_token.sum()) == pytest.approx(-loss * count, rel=1e-6)  # loss sums float32 chunks


def test_line_scores_split_the_total_by_line():
    eos = 0
    ids = torch.tensor([5, 6, eos, eos, 7, eos, 8])  # lines: "5 6", "", "7", "8" (no final <eos>)
    log_probs = torch.tensor([-1.0, -2.0, -4.0, -8.0, -16.0, -32.0], dtype=torch.float64)
    assert score_lines(ids, log_probs, eos) == [
        {"line": 1, "tokens": 2, "logprob": -3.0},  # 6 and <eos>: the first token is context only
        {"line": 2, "tokens": 1, "logprob": -4.0},
        {"line": 3, "tokens": 2, "logprob": -24.0},
        {"line": 4, "tokens": 1, "logprob": -32.0},
    ]


def test_cli_scores_a_text_file_with_line_scores(scored, tmp_path):
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
     ({"eval_batch_size": 0}, "eval_batch_size=0 must be"), ({"text": "empty.txt"}, "needs at least two")],
)  # fmt: skip
def test_bad_evaluate_input_is_a_user_error(scored, tmp_path, monkeypatch, updates, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(error, match=fragment):
        ex.run("evaluate", config_updates={"checkpoint": str(scored["checkpoint"]), **updates},
               options={"--loglevel": "ERROR"})  # fmt: skip


def test_words_a_vocabulary_without_unk_cannot_score_are_one_error_line(tmp_path):
    vocab = Vocabulary(["the", "cat", EOS])
    save_checkpoint(tmp_path / "m.pt", context_free_model(vocab), vocab)
    (tmp_path / "t.txt").write_text("the dog\n", encoding="utf-8")
    result = run_cli("evaluate", "-u", "with", "checkpoint=m.pt", "text=t.txt", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: t.txt: 1 tokens are not in the checkpoint's vocabulary, which has no <unk> to stand for them, "
        "so their probability is undefined; score text of the training corpus' vocabulary"
    ]
