"""The training loop: loss falls, the learning rate anneals, runs repeat bit for bit (evaluation: test_evaluation)."""

import dataclasses
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import write_corpus

from wordlm.data.corpus import batchify, load_corpus
from wordlm.evaluation import evaluate_loss
from wordlm.models import ModelConfig, RNNModel
from wordlm.training import trainer as training
from wordlm.training.trainer import Reporter, Trainer, TrainOptions, TrainState, make_optimizer, train_epoch


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


class BestEpochs:
    """A checkpoint keeper that notes the best epoch of each ``write_best`` and writes nothing."""

    best_weights = None

    def __init__(self, saved: list) -> None:
        self.saved = saved

    def write_best(self, training: dict) -> None:
        self.saved.append(training["state"]["best_epoch"])

    def write_last(self, training: dict) -> None:
        pass


def test_learning_rate_is_divided_by_four_when_validation_does_not_improve(tiny_corpus, monkeypatch):
    corpus = load_corpus(tiny_corpus)
    model = make_model(len(corpus.vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    valid_losses = iter([5.0, 4.0, 4.5, 3.0, 3.0])
    monkeypatch.setattr(training, "evaluate_loss", lambda *args: (next(valid_losses), 1))
    saved = []
    reporter = Recorder()
    keeper = BestEpochs(saved)
    options = TrainOptions(epochs=5, bptt=10, clip=0.25, eval_batch_size=10, log_interval=100, max_batches=2)
    state = Trainer(model, batchify(corpus.train, 8), corpus.valid, optimizer, TrainState(lr=20.0), options,
                    reporter=reporter, checkpoints=keeper).fit()  # fmt: skip
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


# -- NT-ASGD, the lr schedules and the optimizers on real training runs


def first_lines(path, tokens: int) -> str:
    """The first lines of ``path`` that hold at least ``tokens`` tokens (each line ends in one <eos>)."""
    lines, count = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        lines.append(line)
        count += len(line.split()) + 1
        if count >= tokens:
            break
    return "".join(lines)


@pytest.fixture
def short_corpora(tiny_corpus, tmp_path):
    """Two small corpora cut from ``tiny_corpus``. 'unseen': 600 training tokens, validated on other text, which a
    32-unit model overfits from its second epoch on (validation gets worse). 'seen': 1,500 training tokens,
    validated on themselves, so validation keeps improving as the model learns them."""
    short, longer = first_lines(tiny_corpus / "train.txt", 600), first_lines(tiny_corpus / "train.txt", 1500)
    unseen = (tiny_corpus / "valid.txt").read_text(encoding="utf-8")
    return {
        "unseen": load_corpus(write_corpus(tmp_path / "unseen", short, unseen, unseen)),
        "seen": load_corpus(write_corpus(tmp_path / "seen", longer, longer, longer)),
    }


def switch_epoch(valid_losses: list[float], nonmono: int) -> int | None:
    """The epoch at whose end NT-ASGD switches: the first whose loss is worse than the best before the last
    ``nonmono`` epochs (Merity et al. 2017), computed here from the validation losses alone."""
    for epoch in range(nonmono + 2, len(valid_losses) + 1):
        if valid_losses[epoch - 1] > min(valid_losses[: epoch - 1 - nonmono]):
            return epoch
    return None


class WeightsAtValidation(Recorder):
    """Also keeps a copy of the model's parameters as each epoch's validation saw them."""

    def __init__(self, model):
        super().__init__()
        self.model, self.validated = model, []

    def epoch_end(self, state, seconds, val_loss, tokens_per_second):
        self.validated.append([p.detach().clone() for p in self.model.parameters()])
        super().epoch_end(state, seconds, val_loss, tokens_per_second)


def nt_asgd_fit(corpus, lr, epochs, nonmono=1, max_batches=None) -> SimpleNamespace:
    """Train with NT-ASGD and say what happened: the epochs it switched at, the iterates after each averaged
    step, the weights each validation saw and each best-model write got, the metrics, the model and its state."""
    model = make_model(len(corpus.vocab))
    parameters = list(model.parameters())
    run = SimpleNamespace(model=model, state=TrainState(lr=lr), switches=[], iterates=[], saved=[])

    class Watched(Trainer):
        def switch_to_averaging(self):
            run.switches.append(run.state.epoch)
            super().switch_to_averaging()
            step = self.optimizer.step
            self.optimizer.step = lambda: (step(), run.iterates.append([p.detach().clone() for p in parameters]))

    class Saved:
        best_weights = None

        def write_best(self, training):
            run.saved.append((training["state"]["best_epoch"], [p.detach().clone() for p in parameters]))

        def write_last(self, training):
            pass

    reporter = WeightsAtValidation(model)
    options = TrainOptions(epochs=epochs, bptt=10, clip=0.25, eval_batch_size=10, log_interval=1000,
                           max_batches=max_batches, nonmono=nonmono)  # fmt: skip
    Watched(model, batchify(corpus.train, 8), corpus.valid, torch.optim.SGD(parameters, lr=lr), run.state, options,
            reporter=reporter, checkpoints=Saved()).fit()  # fmt: skip
    run.validated = reporter.validated
    run.metrics = {name: [v for n, v, _ in reporter.metrics if n == name] for name in ("valid.loss", "lr")}
    run.per_epoch = training.count_batches(batchify(corpus.train, 8).size(0), 10, max_batches)
    return run


def averages(run, epoch) -> list[torch.Tensor]:
    """What ASGD's average holds at the end of ``epoch``: the mean of the iterates since the switch, from the
    second on (torch's ASGD with t0=0 leaves the first out, as in Merity et al.'s code)."""
    steps = run.iterates[1 : (epoch - run.switches[0]) * run.per_epoch]
    return [torch.stack(column).mean(0) for column in zip(*steps)]


def same(weights, others, exact=True) -> bool:
    close = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-6)
    return all(close(a, b) for a, b in zip(weights, others))


def test_nt_asgd_switches_to_averaging_when_validation_stops_improving(short_corpora):
    """600 tokens overfit from the second epoch on: NT-ASGD switches, and validation sees the average from then on."""
    run = nt_asgd_fit(short_corpora["unseen"], lr=20.0, epochs=5)
    valid = run.metrics["valid.loss"]
    epoch = switch_epoch(valid, nonmono=1)
    assert epoch is not None and epoch < 5, valid  # the premise: validation got worse early on
    assert run.switches == [epoch] and run.state.averaging
    assert run.metrics["lr"] == [20.0] * 5  # NT-ASGD keeps the lr: no division by 4 on the worse epochs
    assert len(run.iterates) == (5 - epoch) * run.per_epoch  # every step after the switch is an averaging one
    for later in range(epoch + 1, 6):  # validation saw the average of the iterates since the switch
        assert same(averages(run, later), run.validated[later - 1], exact=False), later
    raw = [p.detach() for p in run.model.parameters()]  # the model itself goes on from the last iterate
    assert same(raw, run.iterates[-1]) and not same(raw, run.validated[-1], exact=False)


def test_nt_asgd_does_not_switch_while_validation_improves(short_corpora):
    """Validated on its own training text, the model keeps improving: plain SGD throughout."""
    run = nt_asgd_fit(short_corpora["seen"], lr=20.0, epochs=4)
    valid = run.metrics["valid.loss"]
    assert all(later < earlier for earlier, later in zip(valid, valid[1:])), valid  # the premise
    assert run.switches == [] and run.iterates == [] and not run.state.averaging
    assert run.metrics["lr"] == [20.0] * 4


@pytest.mark.parametrize(
    "valid, nonmono, expected",
    [
        ([5.0, 6.0, 7.0, 4.0], 1, 3),  # worse than the best before the last epoch; then the average does better
        ([5.0, 4.0, 3.0, 3.5, 2.9], 1, None),  # worse than the last epoch only: no switch
        ([5.0, 4.0, 3.0, 3.5, 4.5], 1, 5),
        ([5.0, 6.0, 7.0, 8.0], 2, 4),  # nonmono=2 looks further back, and waits for 3 epochs of history
        ([5.0, 4.0, 4.5, 4.2, 3.9], 2, None),
    ],
)
def test_the_nt_asgd_rule_on_given_validation_losses(short_corpora, monkeypatch, valid, nonmono, expected):
    """The rule alone, on validation losses chosen to tell its variants apart (the runs above test it for real),
    and the best model saved after the switch is the average."""
    assert switch_epoch(valid, nonmono) == expected
    losses = iter(valid)
    monkeypatch.setattr(training, "evaluate_loss", lambda *args: (next(losses), 1))
    run = nt_asgd_fit(short_corpora["seen"], lr=1.0, epochs=len(valid), nonmono=nonmono, max_batches=4)
    assert run.switches == ([] if expected is None else [expected]) and run.state.averaging == (expected is not None)
    assert run.state.lr == 1.0  # never divided by 4, though most of these epochs did not improve
    after = [(best, weights) for best, weights in run.saved if expected is not None and best > expected]
    assert bool(after) == (expected is not None and min(valid[expected:], default=math.inf) < min(valid[:expected]))
    for best, weights in after:  # saved after the switch: the average, as validated
        assert same(weights, run.validated[best - 1]) and same(weights, averages(run, best), exact=False)
        assert not same(weights, run.iterates[-1], exact=False)


@pytest.mark.parametrize(
    "name, kind, lr",
    [("sgd", torch.optim.SGD, 20.0), ("adam", torch.optim.Adam, 0.01), ("adamw", torch.optim.AdamW, 0.01)],
)
def test_lr_decay_reaches_every_optimizer_and_each_lowers_the_loss(tiny_corpus, name, kind, lr):
    corpus = load_corpus(tiny_corpus)
    model = make_model(len(corpus.vocab))
    optimizer = make_optimizer(name, model.parameters(), lr, weight_decay=1e-4)
    assert type(optimizer) is kind and optimizer.param_groups[0]["weight_decay"] == 1e-4
    state = TrainState(lr=lr)
    used = []  # (epoch, lr) of every step taken
    step = optimizer.step
    optimizer.step = lambda: (used.append((state.epoch, optimizer.param_groups[0]["lr"])), step())
    before, _ = evaluate_loss(model, corpus.valid, 10)
    reporter = Recorder()
    options = TrainOptions(epochs=4, bptt=10, clip=0.25, eval_batch_size=10, log_interval=100, max_batches=5,
                           lr_decay=0.5, lr_decay_start=2)  # fmt: skip
    Trainer(model, batchify(corpus.train, 8), corpus.valid, optimizer, state, options, reporter=reporter).fit()
    # lr * 0.5 after each epoch from the 2nd on, whether validation improved or not
    assert [v for n, v, _ in reporter.metrics if n == "lr"] == [lr, lr, lr / 2, lr / 4]
    assert used == [(epoch, lr * 0.5 ** max(0, epoch - 2)) for epoch in range(1, 5) for _ in range(5)]
    assert state.lr == lr / 8 and optimizer.param_groups[0]["lr"] == lr / 8
    after, _ = evaluate_loss(model, corpus.valid, 10)
    assert after < before - 0.5


class Clock:
    """A ``time.perf_counter`` for training/trainer.py alone that moves ``step`` seconds at every reading: training time
    as a count of the loop's events, the same on every machine."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_the_time_budget_ends_the_epoch_under_way_validates_it_and_stops(tiny_corpus, monkeypatch):
    corpus = load_corpus(tiny_corpus)
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=Clock(0.25), monotonic=time.monotonic))
    model = make_model(len(corpus.vocab))
    reporter, saved = Recorder(), []
    options = TrainOptions(epochs=100, bptt=10, clip=0.25, eval_batch_size=10, log_interval=1000, time_budget=0.5)
    trainer = Trainer(model, batchify(corpus.train, 8), corpus.valid, torch.optim.SGD(model.parameters(), lr=20.0),
                      TrainState(lr=20.0), options, reporter=reporter, checkpoints=BestEpochs(saved))  # fmt: skip
    state = trainer.fit()
    per_epoch = training.count_batches(batchify(corpus.train, 8).size(0), 10)
    assert trainer.budget_spent and 1 < state.epoch < 100
    valid = [step for name, _, step in reporter.metrics if name == "valid.loss"]
    assert valid == list(range(1, state.epoch))  # every epoch validated, the cut one too
    assert state.seconds <= 30 + 4 * 0.25  # within the budget (to the clock's readings), the last validation included
    (line,) = [line for line in reporter.lines if "time budget spent" in line]
    batch = int(re.search(r"ends at batch (\d+)", line).group(1))
    assert 0 < batch < per_epoch  # the epoch under way ended early
    # resumed with the same budget, what is left is a batch or so; with more, training goes on from there
    again = Trainer(model, batchify(corpus.train, 8), corpus.valid, torch.optim.SGD(model.parameters(), lr=20.0),
                    state, options, reporter=Recorder())  # fmt: skip
    seen = state.tokens_seen
    again.fit()
    assert again.budget_spent and state.tokens_seen - seen <= 2 * 8 * 10 and state.seconds <= 30 + 4 * 0.25
    seen = state.tokens_seen
    more = Trainer(model, batchify(corpus.train, 8), corpus.valid, torch.optim.SGD(model.parameters(), lr=20.0),
                   state, dataclasses.replace(options, time_budget=1.0), reporter=Recorder())  # fmt: skip
    more.fit()
    assert more.budget_spent and state.tokens_seen > seen and 30 < state.seconds <= 60 + 4 * 0.25  # (4 readings)


@pytest.mark.parametrize("budget", [None, 0.5])
def test_the_cosine_schedule_falls_from_lr_to_zero_over_the_epochs_or_over_the_budget(tiny_corpus, monkeypatch, budget):
    corpus = load_corpus(tiny_corpus)
    data = batchify(corpus.train, 8)
    if budget:
        monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=Clock(0.05), monotonic=time.monotonic))
    model = make_model(len(corpus.vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    used = []
    step = optimizer.step
    optimizer.step = lambda: (used.append(optimizer.param_groups[0]["lr"]), step())
    options = TrainOptions(epochs=3 if budget is None else 100, bptt=10, clip=0.25, log_interval=1000, lr=20.0,
                           lr_schedule="cosine", time_budget=budget)  # fmt: skip
    Trainer(model, data, corpus.valid, optimizer, TrainState(lr=20.0), options, reporter=Recorder()).fit()
    assert used[0] == 20.0 and all(later <= earlier for earlier, later in zip(used, used[1:]))
    assert used[-1] < 0.5 and any(abs(lr - 10.0) < 1.0 for lr in used)  # passes the midpoint on its way to 0
    if budget is None:
        assert len(used) == 3 * training.count_batches(data.size(0), 10)
        middle = used[len(used) // 2]  # the step at half the epochs: lr / 2
        assert middle == pytest.approx(10.0, abs=20 * math.pi / len(used))


def test_progress_lines_show_small_learning_rates_instead_of_zero():
    reporter = Recorder()
    for lr in (20.0, 0.001):
        reporter.interval(TrainState(lr=lr, batch=200), 1865, 12.5, 5.0)
    assert [line.split(" | ")[2] for line in reporter.lines] == ["lr 20.00", "lr 1.0e-03"]
