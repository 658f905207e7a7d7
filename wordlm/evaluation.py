"""Scoring text with a trained model: perplexity, per-token and per-line scores, the cache pointer, dynamic evaluation.

Main names: ``perplexity``, ``eval_chunk_tokens``, ``target_chunks`` (the one walk over a text that makes every
token but the first a target exactly once), ``evaluate_loss``, ``target_log_probs``, ``tokenize_for_scoring``,
``score_lines``, ``cache_pointer_loss`` (``cache_pointer_states``, the model's one pass, then
``cache_mixed_loss``, the cache for one setting), ``dynamic_evaluation_loss``, ``check_evaluation_options`` and
``evaluate_text`` (what ``main.py evaluate`` computes). Must not import Sacred: every knob is an argument.

Every scorer here is a consumer of ``target_chunks``: the plain loss sums the fused decoder's negative
log-likelihood over its chunks, the per-token scores write each chunk's log-probabilities back in text order,
the cache pointer and dynamic evaluation read the text as one stream (batch 1, as their papers and
AWD-LSTM's pointer.py do). So they all score the same targets, with the same hidden state before each.

Shape letters: ``T`` time steps of a chunk, ``B`` columns, ``H`` top-layer units, ``V`` vocabulary,
``N`` tokens in a scored text.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wordlm.checks import check_number_in, check_positive_int
from wordlm.data.corpus import UNK, Vocabulary, batchify_eval, get_batch, tokenize_file, tokenize_text
from wordlm.errors import UserError
from wordlm.models import WordModel, detach_hidden, unwrap
from wordlm.models.fused import frozen_decoder
from wordlm.training.distributed import SINGLE, World

__all__ = [
    "EVAL_TOKENS", "EVAL_BUFFER_BYTES", "perplexity", "eval_chunk_tokens", "target_chunks", "evaluate_loss",
    "target_log_probs", "tokenize_for_scoring", "score_lines", "cache_pointer_states", "cache_mixed_loss",
    "cache_pointer_loss", "dynamic_evaluation_loss", "check_evaluation_options", "evaluate_text"
]  # fmt: skip

EVAL_TOKENS = 1024  # tokens per decoder call in evaluation: matmul-sized, yet a modest buffer ...
EVAL_BUFFER_BYTES = 128 << 20  # ... unless the (V, tokens) float32 buffer would pass this


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows."""
    return math.exp(loss) if loss < 709 else math.inf


def eval_chunk_tokens(ntoken: int) -> int:
    """Tokens per decoder call in evaluation: ``EVAL_TOKENS``, fewer for vocabularies so large that the
    logits buffer would pass ``EVAL_BUFFER_BYTES`` (at least 64)."""
    return max(64, min(EVAL_TOKENS, EVAL_BUFFER_BYTES // (4 * ntoken)))


def target_chunks(
    model: WordModel, ids: torch.Tensor, batch_size: int, *, tokens: int | None = None, world: World = SINGLE
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Walk ``ids`` (N,) so that every token but the first is a target exactly once, in chunks.

    The text is laid out by ``data.batchify_eval``: ``batch_size`` columns, then a tail column of the
    targets left over. Each column runs from a zero state and carries its hidden state from chunk to
    chunk (detached between chunks, so a caller may backpropagate through one chunk), so what a target
    is scored from does not depend on the chunking: a chunk of about ``tokens`` tokens (by default
    ``eval_chunk_tokens``) keeps the decoder's matrix products large. In a ``world`` of several
    processes this rank walks its block of the columns (the last rank also the tail). The model is in
    eval mode during the walk and goes back to its mode after it.

    Yields:
        ``(features, targets, where)``: the model's top-layer states (T, B, H), the targets they predict
        (T, B), and the index of each target among the text's N - 1 targets (T, B): ``ids[where + 1]``.
    """
    was_training = model.training
    model.eval()
    try:
        columns, tail = batchify_eval(ids, batch_size)
        where_columns, where_tail = batchify_eval(torch.arange(-1, ids.numel() - 1, device=ids.device), batch_size)
        if columns is not None:
            share = world.share(columns.size(1))
            columns, where_columns = columns[:, share], where_columns[:, share]
        last = world.rank == world.size - 1
        for source, where in ((columns, where_columns), (tail if last else None, where_tail)):
            if source is None or source.size(1) == 0:
                continue
            hidden = model.init_hidden(source.size(1))
            steps = max(1, (tokens or eval_chunk_tokens(model.config.ntoken)) // source.size(1))
            for i in range(0, source.size(0) - 1, steps):
                inputs, targets = get_batch(source, i, steps)  # (T, B) each
                features, hidden = model.features(inputs, detach_hidden(hidden))
                yield features, targets, get_batch(where, i, steps)[1]
    finally:
        model.train(was_training)


@torch.inference_mode()
def evaluate_loss(
    model: WordModel, ids: torch.Tensor, batch_size: int, bptt: int | None = None, world: World = SINGLE
) -> tuple[float, int]:
    """Mean cross-entropy (nats per token) of ``ids`` (1-D) with every token but the first a target once.

    The targets are those of ``target_chunks``, so the result does not depend on how the columns are cut
    into chunks (``bptt`` is accepted for symmetry with training and ignored). The decoder is the fused
    one of ``wordlm.models.fused``, its weights frozen for the pass. In a ``world`` of several processes each rank
    scores its share and the sums are added up: every rank returns the figure one process would.

    Returns:
        ``(loss, targets)``: the mean loss and how many targets it covers (``len(ids) - 1``).
    """
    model = unwrap(model)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    count = 0
    with frozen_decoder():  # the weights stay as they are for the whole pass: columns and tail
        for features, targets, _ in target_chunks(model, ids, batch_size, world=world):
            total += model.decoder.nll_sum(features, targets)
            count += targets.numel()
    total, count = world.total(torch.stack([total, total.new_tensor(count)])).tolist()
    return (total / count if count else math.nan), int(count)


@torch.inference_mode()
def target_log_probs(model: WordModel, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probability (nats) of every token of ``ids`` (N,) but the first, in text order.

    The targets are those of ``evaluate_loss``, scored from the same states: each value is that token's
    share of the loss ``evaluate_loss`` reports, so their sum is ``-loss * targets``. Computed in float64
    from the logits, in chunks a quarter of evaluation's (the float64 copies are the larger buffers).

    Returns:
        ``(N-1,)`` float64 log-probabilities; entry ``i`` scores ``ids[i + 1]``.
    """
    model = unwrap(model)
    scores = torch.zeros(max(ids.numel() - 1, 0), dtype=torch.float64, device=ids.device)
    tokens = max(1, eval_chunk_tokens(model.config.ntoken) // 4)
    for features, targets, where in target_chunks(model, ids, batch_size, tokens=tokens):
        log_probs = F.log_softmax(model.decoder.scores(features).double(), dim=-1)  # (T, B, V)
        scores[where.reshape(-1)] = log_probs.gather(-1, targets.unsqueeze(-1)).reshape(-1)
    return scores


def tokenize_for_scoring(source: str | os.PathLike, vocab: Vocabulary, ntoken: int) -> tuple[torch.Tensor, int]:
    """Tokenize a text file, or text itself, with a checkpoint's vocabulary, which is never changed.

    Args:
        source: a path (``os.PathLike``) names a UTF-8 text file; a ``str`` is the text itself. Either is
            tokenized as the training text was (``data.tokenize_file``): each line's words, then ``<eos>``.
        vocab: the checkpoint's vocabulary; words it lacks become ``<unk>``.
        ntoken: the model's vocabulary size; a word the model cannot score is an error.

    Returns:
        ``(ids, unknown)``: ``(N,)`` int64 ids and how many tokens became ``<unk>``.
    """
    if UNK not in vocab:  # tokenizing adds <unk> to the vocabulary it is given
        vocab = Vocabulary.from_words(vocab.idx2word)
    if isinstance(source, str):
        name = "the text"
        ids, unknown = tokenize_text(source, vocab)
    else:
        name = path = Path(source)
        if not path.is_file():
            raise UserError(f"{path} does not exist or is not a file; give a plain UTF-8 text file to score")
        ids, unknown = tokenize_file(path, vocab, grow=False)
    if len(vocab) > ntoken:  # <unk> was appended, a word the model never learned
        raise UserError(
            f"{name}: {unknown} tokens are not in the checkpoint's vocabulary, which has no {UNK} to stand for "
            "them, so their probability is undefined; score text of the training corpus' vocabulary"
        )
    if ids.size < 2:
        raise UserError(f"{name} has {ids.size} token(s); scoring needs at least two (the first is only context)")
    return torch.from_numpy(ids.astype(np.int64)), unknown


def score_lines(ids: torch.Tensor, log_probs: torch.Tensor, eos_id: int) -> list[dict]:
    """Sum per-token log-probabilities by line; a line's tokens are its words and its ``<eos>``.

    Args:
        ids: ``(N,)`` token ids of the text.
        log_probs: ``(N-1,)`` from ``target_log_probs``; the text's first token is never a target, so
            line 1 has one scored token fewer than it has tokens.
        eos_id: the id of ``<eos>``.

    Returns:
        One dict per line: ``line`` (1-based), ``tokens`` (how many were scored) and ``logprob``
        (their summed log-probability, nats).
    """
    ends = (ids == eos_id).long()  # (N,)
    line_of = (ends.cumsum(0) - ends)[1:].cpu()  # (N-1,): the line of each target
    lines = int(line_of[-1]) + 1 if line_of.numel() else 1
    totals = torch.zeros(lines, dtype=torch.float64).index_add_(0, line_of, log_probs.cpu().double())
    counts = torch.bincount(line_of, minlength=lines)
    return [
        {"line": n + 1, "tokens": int(count), "logprob": float(total)}
        for n, (total, count) in enumerate(zip(totals, counts, strict=True))
    ]


@torch.inference_mode()
def cache_pointer_states(
    model: WordModel, ids: torch.Tensor, chunk: int = 500
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache pointer reads of the model: one pass over ``ids`` (N,) as one stream (batch 1).

    None of it depends on the cache's window, θ or λ, so one pass serves any number of settings
    (``cache_mixed_loss``). The text is walked by ``target_chunks``, ``chunk`` tokens a model call, and each
    target's log-probability is the float64 log-softmax of ``model.decoder.scores`` of its state, gathered at
    the target. ``cache_mixed_loss`` given the same ``chunk`` returns ``cache_pointer_loss``'s float exactly.

    Returns:
        ``(states, log_probs, targets)``: the top-layer states (N-1, H) in the model's dtype, the model's
        float64 log-probability of each target (N-1,), and the targets (N-1,), ``ids[1:]``; all on ``ids``'
        device. Row ``i`` of each is the step that predicts ``ids[i + 1]``.
    """
    model = unwrap(model)
    states, log_probs, targets = [], [], []
    for features, chunk_targets, _ in target_chunks(model, ids, 1, tokens=chunk):
        chunk_states, chunk_targets = features.squeeze(1), chunk_targets.squeeze(1)  # (T, H), (T,)
        log_model = torch.log_softmax(model.decoder.scores(chunk_states).double(), dim=-1)  # (T, V)
        log_probs.append(log_model.gather(1, chunk_targets.view(-1, 1)).squeeze(1))  # (T,)
        states.append(chunk_states)
        targets.append(chunk_targets)
    if not states:  # fewer than two tokens: nothing to predict
        return ids.new_empty(0, 0, dtype=torch.float32), ids.new_empty(0, dtype=torch.float64), ids.new_empty(0)
    return torch.cat(states), torch.cat(log_probs), torch.cat(targets)


@torch.inference_mode()
def cache_mixed_loss(
    states: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor, window: int, theta: float,
    lambdah: float, chunk: int = 500,
) -> tuple[float, int]:  # fmt: skip
    """Mean loss with the continuous cache pointer, from what ``cache_pointer_states`` returned.

    Reads ``chunk`` targets at a time, in text order, each scored from the cache of the ``window`` states
    before it (see ``cache_pointer_loss``); the score matrix is float64. No model runs here, so tuning the
    window, θ and λ costs one model pass in all, not one a setting.

    Args:
        states: ``(N-1, H)`` top-layer states; row ``t`` predicts ``targets[t]``.
        log_probs: ``(N-1,)`` float64, the model's log-probability of each target.
        targets: ``(N-1,)`` the word each state predicts.
        window, theta, lambdah: the cache's size, the flatness θ of its softmax and its weight λ in the mix.
        chunk: targets a step; the same ``chunk`` as the states' pass gives ``cache_pointer_loss``'s float
            exactly.

    Returns:
        ``(loss, targets)``: mean negative log-likelihood and the number of targets (N-1).
    """
    memory_states = states.new_empty(0, states.size(1))  # (≤window, H)
    memory_words = targets.new_empty(0)  # (≤window,) the word that followed each cached state
    total, count = 0.0, 0
    for start in range(0, targets.numel(), chunk):
        chunk_states = states[start : start + chunk]  # (T, H)
        chunk_targets = targets[start : start + chunk]  # (T,)
        model_log_prob = log_probs[start : start + chunk]  # (T,)
        if window > 0 and lambdah > 0:
            keys = torch.cat([memory_states, chunk_states])  # (M + T, H): cache, then this chunk
            words = torch.cat([memory_words, chunk_targets])
            steps = torch.arange(chunk_states.size(0), device=states.device)
            positions = torch.arange(keys.size(0), device=states.device) - memory_states.size(0)
            # state t sees the states of the `window` steps before it, not itself or later ones
            visible = (positions[None, :] < steps[:, None]) & (positions[None, :] >= steps[:, None] - window)
            scores = (theta * chunk_states.double() @ keys.double().t()).masked_fill(~visible, -math.inf)  # (T, M+T)
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no cache yet: all zero
            cache_prob = (weights * (words[None, :] == chunk_targets[:, None])).sum(-1)  # (T,)
            has_cache = visible.any(-1)
            mixed = (1 - lambdah) * model_log_prob.exp() + lambdah * cache_prob
            log_prob = torch.where(has_cache, mixed.log(), model_log_prob)
            memory_states, memory_words = keys[-window:], words[-window:]
        else:
            log_prob = model_log_prob
        total -= log_prob.sum().item()
        count += chunk_targets.numel()
    return total / count, count


def cache_pointer_loss(
    model: WordModel, ids: torch.Tensor, window: int, theta: float, lambdah: float, chunk: int = 500
) -> tuple[float, int]:
    """Mean loss with the continuous cache pointer (Grave, Joulin & Usunier 2017).

    The probability of the next word mixes the model's softmax with a cache of the last ``window``
    top-layer states: ``p = (1 - λ) p_model + λ p_cache``, where ``p_cache(w)`` is the softmax of
    ``θ · h_t · h_i`` over the cached states ``h_i`` whose next word was ``w``. With λ = 0 it is the plain
    model. Typical values on WikiText-2 (AWD-LSTM): window 3785, θ 0.662, λ 0.1279. The text is read as
    one stream, ``chunk`` tokens at a time: ``cache_pointer_states`` runs the model, ``cache_mixed_loss``
    mixes in the cache (call the two yourself to try several settings on one model pass).

    Returns:
        ``(loss, targets)``: mean negative log-likelihood and the number of targets (``len(ids) - 1``).
    """
    return cache_mixed_loss(*cache_pointer_states(model, ids, chunk), window, theta, lambdah, chunk)


def dynamic_evaluation_loss(
    model: WordModel, ids: torch.Tensor, bptt: int, lr: float, decay: float = 0.0
) -> tuple[float, int]:
    """Mean loss with dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018), SGD variant.

    The text is read as one stream and scored ``bptt`` tokens at a time; after each segment is scored,
    the model takes one gradient step on it, ``θ ← θ - lr · ∇ + decay · (θ₀ - θ)``, so later text is
    predicted by a model adapted to the text so far. Each segment is scored before the model learns from
    it. With ``lr`` 0 and ``decay`` 0 it is plain evaluation at batch 1. The caller's model is not changed.

    Returns:
        ``(loss, targets)``: mean negative log-likelihood and the number of targets.
    """
    adapted = copy.deepcopy(unwrap(model))  # in eval mode while it is walked: no dropout in the gradient step
    original = [p.detach().clone() for p in adapted.parameters()]
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for features, targets, _ in target_chunks(adapted, ids, 1, tokens=bptt):
        loss = F.cross_entropy(adapted.decoder.scores(features.squeeze(1)), targets.squeeze(1), reduction="sum")
        total += loss.detach().double().cpu()
        count += targets.numel()
        if lr > 0 or decay > 0:
            adapted.zero_grad(set_to_none=True)
            (loss / targets.numel()).backward()
            with torch.no_grad():
                for parameter, start_value in zip(adapted.parameters(), original):
                    if parameter.grad is not None and lr > 0:
                        parameter.sub_(lr * parameter.grad)
                    if decay > 0:
                        parameter.add_(decay * (start_value - parameter))
    return total.item() / count, count


def check_evaluation_options(
    *, eval_batch_size: int, bptt: int, cache_window: int, cache_theta: float, cache_lambda: float,
    dynamic_lr: float, dynamic_decay: float,
) -> None:  # fmt: skip
    """Raise ``UserError`` naming the first of ``evaluate_text``'s options whose value cannot be used."""
    check_positive_int("eval_batch_size", eval_batch_size)
    check_number_in("cache_window", cache_window, integer=True)  # 0: no cache
    check_number_in("cache_lambda", cache_lambda, high=1.0)
    for key, value in (("cache_theta", cache_theta), ("dynamic_lr", dynamic_lr), ("dynamic_decay", dynamic_decay)):
        check_number_in(key, value)
    if cache_window and (dynamic_lr or dynamic_decay):
        raise UserError("use the cache pointer (cache_window) or dynamic evaluation (dynamic_lr), not both at once")
    check_positive_int("bptt", bptt)


def evaluate_text(
    model: WordModel, ids: torch.Tensor, *, eval_batch_size: int = 10, bptt: int = 35, cache_window: int = 0,
    cache_theta: float = 0.662, cache_lambda: float = 0.1279, dynamic_lr: float = 0.0, dynamic_decay: float = 0.0,
) -> tuple[float, int, str]:  # fmt: skip
    """Score ``ids`` as ``main.py evaluate`` does, with its keys and defaults.

    Plain evaluation (``evaluate_loss``, ``eval_batch_size`` columns) unless ``cache_window`` turns on the
    cache pointer (``cache_pointer_loss``: window, θ ``cache_theta``, λ ``cache_lambda``) or ``dynamic_lr``
    or ``dynamic_decay`` dynamic evaluation (``dynamic_evaluation_loss`` on ``bptt``-token segments).

    Returns:
        ``(loss, targets, method)``: the mean loss, how many targets it covers, and the method in the words
        the command's line ends with (``""`` for plain evaluation).

    Raises:
        UserError: an option's value cannot be used (``check_evaluation_options``), in the command line's words.
    """
    check_evaluation_options(
        eval_batch_size=eval_batch_size, bptt=bptt, cache_window=cache_window, cache_theta=cache_theta,
        cache_lambda=cache_lambda, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
    )  # fmt: skip
    if cache_window:
        loss, count = cache_pointer_loss(model, ids, cache_window, cache_theta, cache_lambda)
        return loss, count, f" | cache pointer (window {cache_window}, theta {cache_theta:g}, lambda {cache_lambda:g})"
    if dynamic_lr or dynamic_decay:
        loss, count = dynamic_evaluation_loss(model, ids, bptt, dynamic_lr, dynamic_decay)
        return loss, count, f" | dynamic evaluation (lr {dynamic_lr:g}, decay {dynamic_decay:g})"
    loss, count = evaluate_loss(model, ids, eval_batch_size, bptt)
    return loss, count, ""
