"""The training loop: loss falls, the learning rate anneals, runs repeat bit for bit, evaluation is exact."""

import math

import torch

from wordlm import training
from wordlm.data import batchify, load_corpus
from wordlm.model import ModelConfig, RNNModel
from wordlm.training import Reporter, TrainState, evaluate_loss, fit, train_epoch


def make_model(ntoken, seed=0, model_type="LSTM"):
    torch.manual_seed(seed)
    return RNNModel(ModelConfig(ntoken=ntoken, model_type=model_type, emsize=32, nhid=32, nlayers=1, dropout=0.0))


class Recorder(Reporter):
    def __init__(self):
        super().__init__(log_metric=self.record)
        self.metrics = []
        self.lines = []

    def record(self, name, value, step):
        self.metrics.append((name, value, step))

    def write(self, line):
        self.lines.append(line)


def train_some(corpus, seed, batches=30):
    model = make_model(len(corpus.vocab), seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    reporter = Recorder()
    state = TrainState(lr=20.0)
    train_epoch(model, batchify(corpus.train, 16), optimizer, state,
                bptt=20, clip=0.25, log_interval=10, max_batches=batches, reporter=reporter)  # fmt: skip
    return model, [v for name, v, _ in reporter.metrics if name == "train.loss"], reporter


def test_loss_falls_on_a_small_corpus(small_corpus):
    corpus = load_corpus(small_corpus)
    model = make_model(len(corpus.vocab))
    before, _ = evaluate_loss(model, corpus.valid, 10, 35)
    assert before == __import__("pytest").approx(math.log(len(corpus.vocab)), abs=0.05)  # near-uniform start
    model, losses, reporter = train_some(corpus, seed=0, batches=60)
    after, _ = evaluate_loss(model, corpus.valid, 10, 35)
    # the loss plateaus near 6.8 after 40 batches, and float-equivalent runs (oneDNN's or MKL's products)
    # differ there by up to 0.07 in one interval: the mean of the last three intervals is compared
    assert sum(losses[-3:]) / 3 < losses[0] - 0.75
    assert after < before - 1.0
    assert reporter.lines[0].startswith("| epoch   1 |    10/   60 batches | lr 20.00 | ms/batch")


def test_same_seed_gives_the_same_losses_bit_for_bit(tiny_corpus):
    corpus = load_corpus(tiny_corpus)
    first, losses_a, _ = train_some(corpus, seed=3, batches=12)
    second, losses_b, _ = train_some(corpus, seed=3, batches=12)
    _, losses_c, _ = train_some(corpus, seed=4, batches=12)
    assert losses_a == losses_b and losses_a != losses_c
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_learning_rate_is_divided_by_four_when_validation_does_not_improve(tiny_corpus, monkeypatch):
    corpus = load_corpus(tiny_corpus)
    model = make_model(len(corpus.vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    valid_losses = iter([5.0, 4.0, 4.5, 3.0, 3.0])
    monkeypatch.setattr(training, "evaluate_loss", lambda *args: (next(valid_losses), 1))
    saved = []
    reporter = Recorder()
    state = fit(model, batchify(corpus.train, 8), corpus.valid, optimizer, TrainState(lr=20.0),
                epochs=5, bptt=10, clip=0.25, eval_batch_size=10, log_interval=100, max_batches=2,
                save_best=lambda s: saved.append(s.best_epoch), reporter=reporter)  # fmt: skip
    assert saved == [1, 2, 4]
    assert [v for name, v, _ in reporter.metrics if name == "lr"] == [
        20.0,
        20.0,
        20.0,
        5.0,
        5.0,
    ]  # the lr each epoch trained with
    assert state.lr == 1.25 and optimizer.param_groups[0]["lr"] == 1.25
    assert state.best_val_loss == 3.0 and state.best_epoch == 4 and state.epoch == 6


def test_evaluation_covers_every_target_once_and_matches_a_direct_sum():
    torch.manual_seed(0)
    model = make_model(13).eval()
    ids = torch.randint(13, (103,))
    loss, count = evaluate_loss(model, ids, batch_size=4, bptt=7)
    assert count == 102
    # Direct computation: the same columns, each run in one piece from a zero state.
    columns = [ids[j * 25 : j * 25 + 26] for j in range(4)] + [ids[100:]]
    total = 0.0
    with torch.no_grad():
        for column in columns:
            logits, _ = model(column[:-1].view(-1, 1), model.init_hidden(1))
            total += torch.nn.functional.cross_entropy(logits.view(-1, 13), column[1:], reduction="sum").item()
    assert loss == __import__("pytest").approx(total / 102, rel=1e-6)


def test_evaluation_does_not_depend_on_its_chunk_size(monkeypatch):
    torch.manual_seed(7)
    model = make_model(17).eval()
    ids = torch.randint(17, (401,))
    reference, count = evaluate_loss(model, ids, batch_size=3)
    monkeypatch.setattr(training, "EVAL_TOKENS", 7)  # many short chunks instead of one long one
    chunked, chunked_count = evaluate_loss(model, ids, batch_size=3)
    assert chunked_count == count == 400
    assert chunked == __import__("pytest").approx(reference, rel=1e-6)


def test_eval_chunks_keep_the_logits_buffer_bounded():
    assert training.eval_chunk_tokens(10_000) == training.EVAL_TOKENS
    assert training.eval_chunk_tokens(33_278) == training.EVAL_BUFFER_BYTES // (4 * 33_278)
    assert training.eval_chunk_tokens(267_735) * 267_735 * 4 <= training.EVAL_BUFFER_BYTES
    assert training.eval_chunk_tokens(10**9) == 64  # never fewer than 64 tokens


def test_an_evaluation_pass_builds_the_decoders_augmented_weight_once(monkeypatch):
    """Columns and tail, every chunk: one augmented copy of the decoder weight for the whole pass."""
    import wordlm.fused as fused

    built = []
    original = fused._scaled_augmented
    monkeypatch.setattr(fused, "_scaled_augmented", lambda w, b: built.append(1) or original(w, b))
    monkeypatch.setattr(training, "EVAL_TOKENS", 7)  # many chunks
    torch.manual_seed(3)
    model = make_model(17).eval()
    loss, count = evaluate_loss(model, torch.randint(17, (103,)), batch_size=4)  # 4 columns of 25 and a tail
    assert count == 102 and math.isfinite(loss)
    assert len(built) == 1
