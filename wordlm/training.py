"""Truncated-BPTT training of a language model.

Lives here: ``TrainState`` (everything a resume needs besides weights), ``fit``, ``train_epoch`` and the
console reporter; validation is ``wordlm.evaluation.evaluate_loss``. Must not import Sacred: every knob is an
argument.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from wordlm.data import get_batch
from wordlm.distributed import SINGLE, World
from wordlm.evaluation import evaluate_loss, perplexity
from wordlm.hidden import Hidden, map_hidden
from wordlm.model import RNNModel, detach_hidden

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
            f"| epoch {state.epoch:3d} | {state.batch:5d}/{total:5d} batches | lr {state.lr:02.2f} | "
            f"ms/batch {ms_per_batch:5.2f} | loss {loss:5.2f} | ppl {perplexity(loss):8.2f}"
        )
        self.log_metric("train.loss", loss, state.tokens_seen)
        self.log_metric("train.ppl", perplexity(loss), state.tokens_seen)

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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How a training step computes: float32 (``amp`` None), or the forward pass under autocast to
    bfloat16 or float16 (``amp`` 'bf16' / 'fp16'), float16 with dynamic loss scaling. Parameters,
    gradients and the optimizer stay float32; evaluation always runs in float32."""

    def __init__(self, amp: str | None = None, device_type: str = "cpu") -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp={amp!r} must be 'bf16', 'fp16' or None")
        self.amp, self.device_type = amp, device_type
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list, clip: float) -> None:
        """Backward, clip the gradients' global norm to ``clip``, and take the optimizer's step."""
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


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


def make_optimizer(name: str, parameters, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """'sgd' (plain SGD, the classic update), 'adam' or 'adamw'; the lr schedule reaches all of them."""
    parameters = list(parameters)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not one of sgd, adam, adamw")


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
    model: RNNModel,
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
        state.hidden = _unwrapped(model).init_hidden(data.size(1))
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The running loss stays on the device (no sync per batch); state holds the same tensor.
    interval_loss = torch.tensor(float(state.interval_loss), dtype=torch.float64, device=data.device)
    state.interval_loss = interval_loss
    interval_start = time.perf_counter()
    timed_batches = 0
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
        precision.step(loss, optimizer, parameters, clip)
        interval_loss += batch_loss
        state.hidden = detach_hidden(hidden)
        state.interval_batches += 1
        timed_batches += 1
        state.batch += 1
        state.position += inputs.size(0)
        state.tokens_seen += targets.numel() * world.size
        reporter.batch_end(state, total)
        last = state.batch == total or state.position >= data.size(0) - 1
        if state.batch % log_interval == 0 or last:
            elapsed = time.perf_counter() - interval_start
            mean_loss = interval_loss.item() / state.interval_batches
            reporter.interval(state, total, elapsed * 1000 / max(timed_batches, 1), mean_loss)
            interval_loss.zero_()
            state.interval_batches = timed_batches = 0
            interval_start = time.perf_counter()
        if after_batch is not None:
            after_batch()
    if variable_bptt:
        set_lr(optimizer, state.lr)
    state.interval_loss, state.interval_batches = 0.0, 0


def _unwrapped(model: torch.nn.Module) -> RNNModel:
    """The ``RNNModel`` inside ``torch.compile``'s and DistributedDataParallel's wrappers (or ``model`` itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fit(
    model: RNNModel,
    train_data: torch.Tensor,
    valid_ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    epochs: int,
    bptt: int,
    clip: float,
    eval_batch_size: int,
    log_interval: int,
    max_batches: int | None,
    save_best: Callable[[TrainState], None],
    reporter: Reporter,
    anneal: float = 4.0,
    lr_decay: float | None = None,
    lr_decay_start: int = 0,
    after_batch: BatchHook | None = None,
    after_epoch: Callable[[TrainState], None] | None = None,
    on_diverged: Callable[[Diverged], None] | None = None,
    pause_deferral: Callable[[], AbstractContextManager] = nullcontext,
    variable_bptt: bool = False,
    nonmono: int | None = None,
    switch_to_averaging: Callable[[], torch.optim.Optimizer] | None = None,
    world: World = SINGLE,
    precision: Precision = FLOAT32,
) -> TrainState:
    """Train for ``state.epoch .. epochs``, validating after each epoch.

    The model is saved (``save_best``) whenever validation loss improves. The learning rate is divided
    by ``anneal`` when it does not, as in the classic example; or, with ``lr_decay``, multiplied by it
    after every epoch from epoch ``lr_decay_start`` on, as in Zaremba et al. (2014). ``after_epoch`` runs
    once the epoch's bookkeeping is done (the state then points at the next epoch). A ``KeyboardInterrupt``
    propagates with ``state`` telling where training stood. On divergence ``on_diverged`` may restore weights and
    lower ``state.lr`` to carry on (it re-raises to stop); without it, ``Diverged`` propagates. In a
    ``world`` of several processes ``model`` is the DistributedDataParallel wrapper and every rank
    validates on its share and sees the same validation loss, so all take the same decisions.

    With ``nonmono`` (NT-ASGD) and no ``lr_decay`` the learning rate is never divided by ``anneal``: it
    stays as it is, before the switch to averaging and after, as in Merity et al. (2017).
    """
    while state.epoch <= epochs:
        start = time.perf_counter()
        tokens_before = state.tokens_seen
        set_lr(optimizer, state.lr)
        try:
            train_epoch(
                model, train_data, optimizer, state,
                bptt=bptt, clip=clip, log_interval=log_interval, max_batches=max_batches,
                reporter=reporter, after_batch=after_batch, variable_bptt=variable_bptt, world=world,
                precision=precision,
            )  # fmt: skip
        except Diverged as divergence:
            if on_diverged is None:
                raise
            on_diverged(divergence)  # restores weights and lowers state.lr, or re-raises
            state.divergences += 1
            state.hidden = None  # the carried state came from the diverged weights
            state.interval_loss, state.interval_batches = 0.0, 0
            continue
        train_seconds = time.perf_counter() - start
        with averaged_weights(optimizer):
            with pause_deferral():
                val_loss, _ = evaluate_loss(model, valid_ids, eval_batch_size, bptt, world)
            seconds = time.perf_counter() - start
            reporter.epoch_end(state, seconds, val_loss, (state.tokens_seen - tokens_before) / train_seconds)
            improved = val_loss < state.best_val_loss
            if improved:
                state.best_val_loss = val_loss
                state.best_epoch = state.epoch
            if lr_decay is not None:
                if state.epoch >= lr_decay_start:
                    state.lr *= lr_decay
            elif not improved and not nonmono and not state.averaging:  # NT-ASGD keeps the lr (Merity et al.)
                state.lr /= anneal
            set_lr(optimizer, state.lr)
            history = state.val_history
            if nonmono and not state.averaging and len(history) > nonmono and val_loss > min(history[:-nonmono]):
                state.averaging = True
                optimizer = switch_to_averaging()
            history.append(val_loss)
            state.epoch += 1
            state.batch = state.position = 0
            state.hidden = None
            if improved:  # saved with the state of the next epoch's start, so it resumes like save_last
                save_best(state)
        if after_epoch is not None:
            after_epoch(state)
    return state
