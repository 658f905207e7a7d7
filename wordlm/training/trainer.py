"""Truncated-BPTT training of a language model.

Main names: ``TrainState`` (everything a resume needs besides weights), ``train_epoch`` (one pass of truncated
BPTT), the ``Trainer`` (the loop and its policies: lr schedule, NT-ASGD, divergence, stops, checkpoints) and
the console reporter; validation is ``wordlm.evaluation.evaluate_loss``. Must not import Sacred: every knob is
an argument.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from wordlm.data.corpus import get_batch
from wordlm.errors import UserError, warn
from wordlm.evaluation import evaluate_loss, perplexity
from wordlm.models import WordModel, detach_hidden, unwrap
from wordlm.models.hidden import Hidden, map_hidden
from wordlm.training.checkpoint import NoCheckpoints
from wordlm.training.distributed import SINGLE, World, rank_rng_state
from wordlm.training.signals import StopRequests

__all__ = [
    "MetricLogger", "BatchHook", "TrainState", "Diverged", "capture_rng_state", "restore_rng_state", "Reporter",
    "AMP_DTYPES", "amp_problem", "Precision", "FLOAT32", "count_batches", "sample_bptt", "OPTIMIZERS",
    "make_optimizer", "averaging_optimizer", "averaged_weights", "train_epoch", "set_lr", "TrainOptions",
    "MAX_RELOADS", "Trainer", "resume_training"
]  # fmt: skip

MetricLogger = Callable[[str, float, int], None]
BatchHook = Callable[[], None]


@dataclass
class TrainState:
    """Where training stands. Mutated in place by ``fit``, so a caller sees it after an interrupt.

    Together with the weights, the optimizer state and the RNG states (``capture_rng_state``) this is
    everything an exact resume needs, including mid-epoch: the hidden state carried into the next
    chunk and the loss accumulated since the last progress line.
    """

    lr: float
    epoch: int = 1  # the epoch being trained (1-based)
    batch: int = 0  # batches finished in that epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0  # 0: no epoch finished yet, so nothing was saved as best
    tokens_seen: int = 0
    divergences: int = 0  # how often training diverged and was rolled back
    position: int = 0  # row of the batchified data where the next batch starts
    val_history: list = field(default_factory=list)  # validation loss of every epoch so far
    averaging: bool = False  # NT-ASGD has switched to averaged SGD
    hidden: Hidden | None = None  # state carried into batch ``batch`` (None: start of an epoch)
    interval_loss: float | torch.Tensor = 0.0  # sum of batch losses since the last progress line
    interval_batches: int = 0
    seconds: float = 0.0  # time spent training and validating, over every session of the run (time_budget's)
    finished: bool = False  # the last epoch, or the time budget, is done: nothing is left to train

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (the hidden state as CPU tensors)."""
        data = asdict(self)
        data["interval_loss"] = float(self.interval_loss)
        data["hidden"] = map_hidden(lambda h: h.detach().cpu(), self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict, device: torch.device | str = "cpu") -> TrainState:
        state = cls(**data)
        state.hidden = map_hidden(lambda h: h.to(device), state.hidden)
        return state


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, batch: int, loss: float, lr: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, batch {batch} (loss {loss}, lr {lr:g})")
        self.epoch, self.batch, self.loss, self.lr = epoch, batch, loss, lr


def capture_rng_state() -> dict:
    """The states of Python's, numpy's and torch's (CPU and CUDA) generators, as checkpointable data."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Undo ``capture_rng_state``: the next random draws repeat those after the capture."""
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *others = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *others))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Reporter:
    """Progress lines in the classic example's format, a tqdm bar on a terminal, metrics to a logger."""

    def __init__(self, interactive: bool = False, log_metric: MetricLogger | None = None, stream=None) -> None:
        self.interactive = interactive
        self.log_metric = log_metric or (lambda name, value, step: None)
        self.stream = stream or sys.stdout
        self.bar = None

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def epoch_start(self, epoch: int, total: int, done: int) -> None:
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="batch", leave=False)

    def batch_end(self, state: TrainState, total: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def interval(self, state: TrainState, total: int, ms_per_batch: float, loss: float) -> None:
        self.write(
            f"| epoch {state.epoch:3d} | {state.batch:5d}/{total:5d} batches | lr {_lr_text(state.lr)} | "
            f"ms/batch {ms_per_batch:5.2f} | loss {loss:5.2f} | ppl {perplexity(loss):8.2f}"
        )
        self.log_metric("train.loss", loss, state.tokens_seen)
        self.log_metric("train.ppl", perplexity(loss), state.tokens_seen)

    def interval_figures(self, state: TrainState, grad_norm: float | None, tokens_per_second: float | None) -> None:
        """The figures of the interval just reported besides its loss, logged at the same step (tokens seen): the lr,
        the mean gradient norm before clipping over the interval's batches (those whose norm was finite: fp16's
        overflowed steps are skipped), and the tokens per second of its timed batches."""
        self.log_metric("train.lr", state.lr, state.tokens_seen)
        if grad_norm is not None:
            self.log_metric("train.grad_norm", grad_norm, state.tokens_seen)
        if tokens_per_second is not None:
            self.log_metric("train.tokens_per_second", tokens_per_second, state.tokens_seen)

    def epoch_end(self, state: TrainState, seconds: float, val_loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.write("-" * 89)
        self.write(
            f"| end of epoch {state.epoch:3d} | time: {seconds:5.2f}s | valid loss {val_loss:5.2f} | "
            f"valid ppl {perplexity(val_loss):8.2f}"
        )
        self.write("-" * 89)
        self.log_metric("valid.loss", val_loss, state.epoch)
        self.log_metric("valid.ppl", perplexity(val_loss), state.epoch)
        self.log_metric("lr", state.lr, state.epoch)
        self.log_metric("tokens_per_second", tokens_per_second, state.epoch)
        self.log_metric("tokens_seen", state.tokens_seen, state.epoch)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _lr_text(lr: float) -> str:
    """The classic example's ``02.2f``, or for the small lrs of Adam and a cosine's tail, two significant digits."""
    return f"{lr:02.2f}" if lr >= 0.01 or lr == 0 else f"{lr:.1e}"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_problem(amp) -> str | None:
    """What is wrong with an ``amp`` value, in one line, or None: the one rule of the config and ``Precision``."""
    if amp is None or (isinstance(amp, str) and amp in AMP_DTYPES):
        return None
    return f"amp={amp!r} must be {', '.join(map(repr, AMP_DTYPES))} or None"


class Precision:
    """How a training step computes: float32 (``amp`` None), or the forward pass under autocast to
    bfloat16 or float16 (``amp`` 'bf16' / 'fp16'), float16 with dynamic loss scaling. Parameters,
    gradients and the optimizer stay float32; evaluation always runs in float32."""

    def __init__(self, amp: str | None = None, device_type: str = "cpu") -> None:
        if problem := amp_problem(amp):
            raise ValueError(problem)
        self.amp, self.device_type = amp, device_type
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list, clip: float) -> torch.Tensor:
        """Backward, clip the gradients' global norm to ``clip``, and take the optimizer's step. Returns the global
        norm before clipping, a tensor on the device (inf or nan where fp16's scaled gradients overflowed)."""
        if self.scaler is None:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
            return norm
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()
        return norm


FLOAT32 = Precision()


def count_batches(rows: int, bptt: int, max_batches: int | None = None) -> int:
    """How many chunks one epoch over ``rows`` batchified rows has (capped by ``max_batches``)."""
    total = len(range(0, rows - 1, bptt))
    return total if max_batches is None else min(total, max_batches)


def sample_bptt(bptt: int) -> int:
    """A chunk length for variable-length BPTT (Merity et al. 2017): around ``bptt`` with probability
    0.95, else around ``bptt / 2``; normal with deviation 5, at least 5. Uses numpy's global generator,
    whose state checkpoints keep."""
    base = bptt if np.random.random() < 0.95 else bptt / 2
    return max(5, int(np.random.normal(base, 5)))


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(name: str, parameters, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A key of ``OPTIMIZERS``: 'sgd' (plain SGD, the classic update), 'adam' or 'adamw'; the lr schedule reaches
    all of them (the config's check, ``validate_training_config``, names them)."""
    return OPTIMIZERS[name](list(parameters), lr=lr, weight_decay=weight_decay)


def averaging_optimizer(parameters, lr: float, weight_decay: float = 0.0) -> torch.optim.ASGD:
    """Averaged SGD as NT-ASGD switches to it: plain SGD steps, and in each parameter's ``ax`` state the
    average of the iterates since the switch (torch's ASGD with t0=0, lambd=0, as Merity et al. 2017
    used it: the average starts from the iterate after the second step; the first one's is left out)."""
    return torch.optim.ASGD(parameters, lr=lr, t0=0, lambd=0.0, weight_decay=weight_decay)


@contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer):
    """Within the block the model's parameters hold their averages (ASGD's ``ax``), if there are any."""
    swapped = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            average = optimizer.state.get(parameter, {}).get("ax")
            if average is not None:
                saved = parameter.data.clone()
                parameter.data.copy_(average)
                swapped.append((parameter, saved))
    try:
        yield
    finally:
        for parameter, saved in swapped:
            parameter.data.copy_(saved)


def train_epoch(
    model: WordModel,
    data: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    bptt: int,
    clip: float,
    log_interval: int,
    max_batches: int | None,
    reporter: Reporter,
    after_batch: BatchHook | None = None,
    variable_bptt: bool = False,
    world: World = SINGLE,
    precision: Precision = FLOAT32,
) -> None:
    """Train one epoch over batchified ``data`` (rows, B), carrying the hidden state between chunks.

    With ``variable_bptt`` each chunk's length is drawn by ``sample_bptt`` and the learning rate scaled
    to it. Starts from ``state.position`` and ``state.hidden`` (a resumed mid-epoch state) and keeps both current
    after every batch, so that ``after_batch`` (stop checks, timed checkpoints) sees a consistent state.
    In a ``world`` of several processes ``model`` is the DistributedDataParallel wrapper, ``data`` this
    rank's block of columns, and the loss that is logged and checked is the global batch's. ``precision``
    says whether the forward pass runs under autocast.

    Raises:
        Diverged: a batch's loss was NaN or infinite; the optimizer step was not taken.
    """
    model.train()
    total = count_batches(data.size(0), bptt, max_batches)
    if state.hidden is None:
        state.hidden = unwrap(model).init_hidden(data.size(1))
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The running loss stays on the device (no sync per batch); state holds the same tensor.
    interval_loss = torch.tensor(float(state.interval_loss), dtype=torch.float64, device=data.device)
    state.interval_loss = interval_loss
    interval_start = time.perf_counter()
    timed_batches = timed_tokens = 0
    # The gradient norms of the interval's batches, summed on the device as the loss is (finite ones only)
    norm_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    norm_count = torch.zeros((), dtype=torch.int64, device=data.device)
    reporter.epoch_start(state.epoch, total, state.batch)
    while state.position < data.size(0) - 1 and state.batch < total:
        length = sample_bptt(bptt) if variable_bptt else bptt
        inputs, targets = get_batch(data, state.position, length)  # (T, B) each
        if variable_bptt:  # longer sequences, larger steps: lr scaled to the sequence length (AWD-LSTM)
            set_lr(optimizer, state.lr * inputs.size(0) / bptt)
        hidden = detach_hidden(state.hidden)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss, hidden = model(inputs, hidden, targets)
        batch_loss = world.mean(loss.detach())  # the whole batch's: every rank decides alike below
        if not torch.isfinite(batch_loss):
            reporter.close()
            raise Diverged(state.epoch, state.batch + 1, batch_loss.item(), state.lr)
        norm = precision.step(loss, optimizer, parameters, clip).detach()
        finite = torch.isfinite(norm)
        norm_sum += torch.where(finite, norm, 0).double()
        norm_count += finite
        interval_loss += batch_loss
        state.hidden = detach_hidden(hidden)
        state.interval_batches += 1
        timed_batches += 1
        state.batch += 1
        state.position += inputs.size(0)
        state.tokens_seen += targets.numel() * world.size
        timed_tokens += targets.numel() * world.size
        reporter.batch_end(state, total)
        last = state.batch == total or state.position >= data.size(0) - 1
        if state.batch % log_interval == 0 or last:
            elapsed = time.perf_counter() - interval_start
            mean_loss = interval_loss.item() / state.interval_batches
            reporter.interval(state, total, elapsed * 1000 / max(timed_batches, 1), mean_loss)
            norms = int(norm_count.item())
            reporter.interval_figures(state, norm_sum.item() / norms if norms else None,
                                      timed_tokens / elapsed if elapsed > 0 else None)  # fmt: skip
            interval_loss.zero_()
            norm_sum.zero_()
            norm_count.zero_()
            state.interval_batches = timed_batches = timed_tokens = 0
            interval_start = time.perf_counter()
        if after_batch is not None:
            after_batch()
    if variable_bptt:
        set_lr(optimizer, state.lr)
    state.interval_loss, state.interval_batches = 0.0, 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class TrainOptions:
    """How the loop trains: the config keys it reads, as plain values (``from_config`` picks them from a config)."""

    epochs: int
    bptt: int = 35
    clip: float = 0.25
    eval_batch_size: int = 10
    log_interval: int = 200
    max_batches: int | None = None
    lr_decay: float | None = None  # multiply lr by this after each epoch from lr_decay_start on
    lr_decay_start: int = 1
    variable_bptt: bool = False
    nonmono: int | None = None  # NT-ASGD's patience, in epochs (None: no switch to averaging)
    wdecay: float = 0.0
    optimizer: str = "sgd"  # the optimizer a resume rebuilds: "sgd", "adam" or "adamw" (``make_optimizer``)
    on_divergence: str = "stop"  # or "reload": the best model, lr / 4
    checkpoint_every: float | None = None  # minutes between writes of the latest state within an epoch
    anneal: float = 4.0  # without lr_decay, lr / anneal after an epoch that did not improve (the classic example)
    lr: float = 20.0  # the initial lr: where lr_schedule="cosine" starts
    lr_schedule: str | None = None  # "cosine": lr falls along a half cosine to 0 over the epochs or time_budget
    time_budget: float | None = None  # minutes of training and validation; then the epoch ends and training stops

    @classmethod
    def from_config(cls, cfg: dict) -> TrainOptions:
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


MAX_RELOADS = 3  # on_divergence="reload" gives up after this many reloads in one run


class _BudgetSpent(Exception):
    """The time budget is spent: the epoch under way ends at this batch."""


class Trainer:
    """The training loop and every policy it follows, in one place.

    ``fit`` trains for ``state.epoch .. options.epochs``, validating after each epoch. It owns:

    - the lr schedule: lr / ``anneal`` after an epoch that did not improve, as in the classic example; or, with
      ``lr_decay``, lr * ``lr_decay`` after every epoch from ``lr_decay_start`` on, as in Zaremba et al. (2014).
      With ``nonmono`` (NT-ASGD) and no ``lr_decay`` the lr is kept, before the switch and after (Merity et al. 2017);
    - the NT-ASGD switch to averaged SGD once validation is worse than the best before the last ``nonmono`` epochs
      (validation and the best model then use the average);
    - the time budget: with ``time_budget``, training ends when its minutes (over every session of a resumed run)
      are spent, keeping enough for one more validation: the epoch under way ends early, is validated, and the
      best model is kept as after any epoch. With ``lr_schedule="cosine"`` the lr falls from ``lr`` to 0 along a
      half cosine over the budget (else over the epochs), updated after every batch;
    - divergence: a NaN/inf loss stops with one line, or with ``on_divergence="reload"`` reloads the best model
      and divides the lr by 4 (at most ``MAX_RELOADS`` times);
    - stop requests: a signal to any rank stops every rank at the same batch (``KeyboardInterrupt``), ``state``
      telling where training stood;
    - checkpoints: it hands ``checkpoints`` (a ``wordlm.training.checkpoint.CheckpointKeeper``; by default
      ``NoCheckpoints``, which keeps nothing) the state to write (``training_payload``) when validation improves,
      after each epoch and every ``checkpoint_every`` minutes;
    - ending early: ``end_early``, asked after each validated epoch that leaves more to train, may give a reason
      (a sweep's pruner: ``wordlm.tracking.sweeps``) to end training there, as after the last epoch.

    In a ``world`` of several processes ``network`` is the DistributedDataParallel wrapper (``model`` the model
    inside it), ``train_data`` this rank's block of columns, and every rank sees the same losses, so all take
    the same decisions. ``network`` may also be ``torch.compile``'s wrapper. ``stop`` is the ``StopRequests`` whose
    handlers are installed (by default one that is not: no signal reaches it).
    """

    def __init__(
        self, model: WordModel, train_data: torch.Tensor, valid_ids: torch.Tensor, optimizer: torch.optim.Optimizer,
        state: TrainState, options: TrainOptions, *, reporter: Reporter | None = None, checkpoints=None,
        world: World = SINGLE, precision: Precision = FLOAT32, network: torch.nn.Module | None = None,
        stop: StopRequests | None = None, log: Callable[..., None] | None = None,
        end_early: Callable[[], str | None] = lambda: None,
    ) -> None:  # fmt: skip
        self.model, self.network = model, network if network is not None else model
        self.train_data, self.valid_ids = train_data, valid_ids
        self.optimizer, self.state, self.options = optimizer, state, options
        self.reporter = reporter or Reporter()
        self.checkpoints = checkpoints or NoCheckpoints()
        self.world, self.precision, self.stop = world, precision, stop or StopRequests()
        self.log = log or (lambda *args: None)
        self._last_write = time.monotonic()
        self.budget_spent = False  # whether the time budget ended training
        self.end_early, self.ended_early = end_early, None  # asked after each epoch; why it ended training early
        self._clock = (time.perf_counter(), state.seconds, state.tokens_seen)  # this session's start
        self._valid_seconds: float | None = None  # how long the last validation took

    def fit(self) -> TrainState:
        """Train to the last epoch or the time budget's end (a stop request propagates as ``KeyboardInterrupt``)."""
        state, options = self.state, self.options
        while state.epoch <= options.epochs and not self.budget_spent and not self.ended_early:
            if self._budget_left() is not None and self._budget_left() <= 0:
                self.budget_spent = True  # (a resumed run whose budget was spent)
                break
            start = time.perf_counter()
            tokens_before = state.tokens_seen
            self._schedule_lr()
            try:
                train_epoch(
                    self.network, self.train_data, self.optimizer, state,
                    bptt=options.bptt, clip=options.clip, log_interval=options.log_interval,
                    max_batches=options.max_batches, reporter=self.reporter, after_batch=self.after_batch,
                    variable_bptt=options.variable_bptt, world=self.world, precision=self.precision,
                )  # fmt: skip
            except Diverged as divergence:
                self.recover(divergence)
                continue
            except _BudgetSpent:
                self._end_early()
            train_seconds = time.perf_counter() - start
            with averaged_weights(self.optimizer):  # NT-ASGD: validation and the best model see the average
                with self.stop.immediate() if self.world.size == 1 else nullcontext():
                    valid_start = time.perf_counter()
                    val_loss, _ = evaluate_loss(self.network, self.valid_ids, options.eval_batch_size, options.bptt,
                                                self.world)  # fmt: skip
                    self._valid_seconds = self._agreed_clock(time.perf_counter() - valid_start)
                seconds = time.perf_counter() - start
                self.reporter.epoch_end(state, seconds, val_loss, (state.tokens_seen - tokens_before) / train_seconds)
                improved = self.end_epoch(val_loss)
                if state.epoch <= options.epochs and not self.budget_spent:
                    self.ended_early = self.end_early()
                    if self.ended_early:
                        self.reporter.write(f"| training ends after epoch {state.epoch - 1}: {self.ended_early} |")
                state.finished = state.epoch > options.epochs or self.budget_spent or bool(self.ended_early)
                if improved:
                    self.checkpoints.write_best(self.training_payload())  # the next epoch's start: resumes as save_last
            self.checkpoints.write_last(self.training_payload())
        return state

    def end_epoch(self, val_loss: float) -> bool:
        """Take the epoch's validation loss: the best so far, the lr schedule, the NT-ASGD switch; the state then
        points at the next epoch's start. Returns whether validation improved."""
        state, options = self.state, self.options
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch = val_loss, state.epoch
        if options.lr_decay is not None:
            if state.epoch >= options.lr_decay_start:
                state.lr *= options.lr_decay
        elif not improved and not options.nonmono and not state.averaging and not options.lr_schedule:
            state.lr /= options.anneal  # (NT-ASGD keeps the lr, as Merity et al.; a cosine follows its curve)
        set_lr(self.optimizer, state.lr)
        history, patience = state.val_history, options.nonmono
        if patience and not state.averaging and len(history) > patience and val_loss > min(history[:-patience]):
            self.switch_to_averaging()
        history.append(val_loss)
        state.epoch += 1
        state.batch = state.position = 0
        state.hidden = None
        return improved

    def switch_to_averaging(self) -> None:
        """NT-ASGD's switch: averaged SGD from the next step on, at the current lr."""
        self.state.averaging = True
        self.optimizer = averaging_optimizer(self.model.parameters(), self.state.lr, self.options.wdecay)
        self.log("NT-ASGD: validation stopped improving; averaging the weights from epoch %d on", self.state.epoch + 1)

    def recover(self, divergence: Diverged) -> None:
        """After a NaN/inf loss: reload the best model at lr / 4 (``on_divergence="reload"``), else one line."""
        state, keeper = self.state, self.checkpoints
        best = keeper.best_weights
        if self.options.on_divergence == "stop" or best is None or state.divergences >= MAX_RELOADS:
            kept = f"{keeper.save} keeps the best model (epoch {state.best_epoch})" if best else "no model was saved"
            if self.options.on_divergence == "stop":
                raise UserError(f"{divergence}; {kept}; lower lr or clip, or set on_divergence=reload")
            tried = f"still diverging after {state.divergences} reloads of the best model" if best else ""
            raise UserError(f"{divergence}; {tried or 'no best model to reload yet'}; {kept}; lower lr or clip")
        self.model.load_state_dict(best)
        self.optimizer.state.clear()  # (an averaging optimizer restarts its average too)
        state.lr /= 4
        if self.world.is_main:  # every rank reloads alike; one says so
            warn(f"{divergence}: reloaded the best model (epoch {state.best_epoch}), lr now {state.lr:g}")
        state.divergences += 1
        state.hidden = None  # the carried state came from the diverged weights
        state.interval_loss, state.interval_batches = 0.0, 0

    def after_batch(self) -> None:
        """Stop every rank at this batch if any got a signal, or end the epoch here if the time budget is spent;
        write the latest state when ``checkpoint_every`` minutes have passed; set the next batch's lr. Decided
        on values all ranks agree on."""
        every = self.options.checkpoint_every
        due = every is not None and time.monotonic() - self._last_write >= 60 * every
        started, seconds, _ = self._clock
        signum, due, milliseconds = self.world.agree(
            self.stop.requested or 0, due, round(1000 * (seconds + time.perf_counter() - started))
        )
        self.state.seconds = milliseconds / 1000  # every rank's clock alike: the budget and lr follow it
        if signum:  # a signal landing after the agreement waits for the next batch
            self.stop.request(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)
        left = self._budget_left()
        if left is not None and left <= self._validation_estimate():
            raise _BudgetSpent
        if due:
            self.checkpoints.write_last(self.training_payload())
        if self.options.lr_schedule:
            self._schedule_lr()

    def _agreed_clock(self, valid_seconds: float) -> float:
        """Bring ``state.seconds`` up to now after a validation, and return how long it took, as every rank sees
        them (the slowest rank's)."""
        started, seconds, _ = self._clock
        now, valid = self.world.agree(
            round(1000 * (seconds + time.perf_counter() - started)), round(1000 * valid_seconds)
        )
        self.state.seconds = now / 1000
        return valid / 1000

    def _budget_left(self) -> float | None:
        """Seconds of the time budget left (None: no budget)."""
        if self.options.time_budget is None:
            return None
        return 60 * self.options.time_budget - self.state.seconds

    def _validation_estimate(self) -> float:
        """Seconds the next validation will take: as long as the last one, or before any, a forward pass over the
        validation tokens at half this session's training time per token (a forward pass is about a third of a
        step; half leaves a margin: on a busy 2-core VM a third fell 12 s short of a 10-minute budget)."""
        if self._valid_seconds is not None:
            return self._valid_seconds
        started, seconds, tokens = self._clock
        trained = self.state.tokens_seen - tokens
        return self.valid_ids.numel() * (self.state.seconds - seconds) / max(trained, 1) / 2

    def _schedule_lr(self) -> None:
        """The lr for the next batch: ``state.lr``, or where the cosine schedule has come to."""
        state, options = self.state, self.options
        if options.lr_schedule == "cosine":
            if options.time_budget is not None:
                progress = state.seconds / (60 * options.time_budget)
            else:
                progress = (state.epoch - 1 + state.position / max(self.train_data.size(0) - 1, 1)) / options.epochs
            state.lr = options.lr * 0.25**state.divergences * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        set_lr(self.optimizer, state.lr)

    def _end_early(self) -> None:
        """The time budget is spent: this epoch ends here, to be validated like any other."""
        self.budget_spent = True
        self.reporter.close()
        minutes = self.state.seconds / 60
        self.reporter.write(f"| time budget spent ({minutes:.1f} of {self.options.time_budget:g} minutes): epoch "
                            f"{self.state.epoch} ends at batch {self.state.batch} |")  # fmt: skip
        if self.options.variable_bptt:
            set_lr(self.optimizer, self.state.lr)
        self.state.interval_loss, self.state.interval_batches = 0.0, 0

    def run(self) -> bool:
        """``fit``, with stop requests taken at batch boundaries. A stop ends training with the latest state
        written (and, before any epoch finished, the current model as the best). Returns whether it stopped."""
        try:
            with self.stop.deferred():
                self.fit()
            return False
        except KeyboardInterrupt:
            self.reporter.close()
            how = f" by {self.stop.name}" if self.stop.name else ""
            self.reporter.write("-" * 89)
            self.reporter.write(
                f"Exiting from training early{how} (epoch {self.state.epoch}, batch {self.state.batch})"
            )
            self.checkpoints.write_stopped(self.training_payload())
            return True

    def whole_state(self) -> dict:
        """The state as checkpoint data, with every rank's columns of the hidden state (a collective)."""
        return dataclasses.replace(self.state, hidden=self.world.gather_columns(self.state.hidden)).to_dict()

    def training_payload(self) -> dict:
        """What a resume needs besides the weights, as plain data for the checkpoint keeper: optimizer, state, every
        rank's RNG states (a collective)."""
        self._last_write = time.monotonic()
        rng = self.world.gather_data(capture_rng_state())
        by_rank = {"rng_by_rank": rng} if self.world.size > 1 else {}
        return {"optimizer": self.optimizer.state_dict(), "state": self.whole_state(), "rng": rng[0], **by_rank}


def resume_training(
    training: dict, model: WordModel, options: TrainOptions, *, lr: float | None, finetune: bool, world: World = SINGLE
) -> tuple[TrainState, torch.optim.Optimizer, bool]:
    """Where a checkpoint's ``training`` payload left off: its ``TrainState`` (this rank's columns of the hidden
    state), the optimizer to go on with (with its saved state; with ``finetune``, a fresh average from the loaded
    weights, as AWD-LSTM's finetune.py does), and the random streams. ``lr``, when given, replaces the saved one.

    Returns:
        ``(state, optimizer, own_rng)``: whether this rank goes on with the random stream it saved (else
        ``split_rng_streams`` must follow).
    """
    state = TrainState.from_dict(training["state"], model.device)
    if finetune:
        state.averaging, state.val_history = True, []
        optimizer = averaging_optimizer(model.parameters(), state.lr, options.wdecay)
    else:
        if state.averaging:
            optimizer = averaging_optimizer(model.parameters(), state.lr, options.wdecay)
        else:
            optimizer = make_optimizer(options.optimizer, model.parameters(), state.lr, options.wdecay)
        optimizer.load_state_dict(training["optimizer"])
    state.hidden = world.take_columns(state.hidden)  # the checkpoint holds every column's state
    if lr is not None:
        state.lr = lr
    rng, own_rng = rank_rng_state(training, world)
    restore_rng_state(rng)
    return state, optimizer, own_rng
