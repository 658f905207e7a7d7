"""The decoder and its cross-entropy as one operation, for CPUs: same math, less time and memory.

Lives here: ``linear_cross_entropy`` (training, with autograd) and ``linear_nll_sum`` (evaluation).
Must not import Sacred.

Why: on a CPU, the classic path (``Linear`` → ``log_softmax`` → ``nll_loss``) spends about half of a
training step outside the decoder's matrix products: it materialises log-probabilities, zero-fills a
fresh vocabulary-sized gradient, broadcasts the bias, and maps fresh ~100 MB buffers every step. Here:

- logits are computed transposed, ``(V, N) = W @ hᵀ``, the layout in which all three decoder
  products (forward, grad of h, grad of W) run at the machine's matmul speed; ``h @ Wᵀ`` with these
  shapes runs at about half of it (figures in docs/PERFORMANCE.md);
- the softmax statistics are taken in vocabulary chunks while each chunk is in cache; each chunk keeps
  ``exp(logit - chunk max)`` in place, so the backward pass needs one multiply, not another ``exp``;
- the backward pass scales one chunk at a time and feeds it to the two gradient products while it is
  still in cache; the one-hot part of the gradient is a sparse update of the target rows. One ``V × N``
  buffer per training step, no other;
- evaluation never writes the logits out whole: chunks of rows are computed into a small buffer and
  reduced in cache.

Shapes: ``N`` tokens (T·B), ``H`` hidden size, ``V`` vocabulary, ``C`` vocabulary chunks.
"""

from __future__ import annotations

import torch

CHUNK = 256  # vocabulary rows per chunk: 256 × N floats stay in L2 cache for N up to ~1,000


class _BufferPool:
    """Reuse the ``V × N`` buffer across steps: a fresh 100+ MB tensor costs ~30,000 page faults each time.

    A buffer is taken by a forward pass and given back by its backward pass (or at once in evaluation),
    so two graphs alive at the same time never share one.
    """

    def __init__(self, keep: int = 2) -> None:
        self.free: list[torch.Tensor] = []
        self.keep = keep

    def take(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        for index, buffer in enumerate(self.free):
            if buffer.shape == (rows, columns) and buffer.dtype == like.dtype and buffer.device == like.device:
                return self.free.pop(index)
        return like.new_empty(rows, columns)

    def give(self, buffer: torch.Tensor) -> None:
        self.free.insert(0, buffer)
        del self.free[self.keep :]


_POOL = _BufferPool()


def _logits_t(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(V, N)`` logits, transposed, in a pooled buffer."""
    out = _POOL.take(weight.size(0), hidden.size(0), hidden)
    if bias is None:
        return torch.mm(weight, hidden.t(), out=out)
    return torch.addmm(bias.unsqueeze(1), weight, hidden.t(), out=out)


def _exp_shifted_(block: torch.Tensor, maxima: torch.Tensor, sums: torch.Tensor) -> None:
    """Turn ``block`` (rows, N) in place into ``exp(logit - column max)``; write the maxima and sums (N,)."""
    torch.amax(block, 0, out=maxima)
    block.sub_(maxima).exp_()
    torch.sum(block, 0, out=sums)


def _logsumexp(maxima: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Per column ``log Σ exp(logit)`` (N,) from the chunks' maxima and shifted sums (C, N)."""
    top = maxima.amax(0)
    return top + (sums * torch.exp(maxima - top)).sum(0).log()


def _exp_and_logsumexp_(logits_t: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``logits_t`` (V, N) in place into ``exp(logit - max of its chunk)``.

    Returns:
        ``(logsumexp, maxima)``: per column ``log Σ exp(logit)`` (N,) and the chunk maxima (C, N).
    """
    vocab, columns = logits_t.shape
    count = (vocab + chunk - 1) // chunk
    maxima = logits_t.new_empty(count, columns)
    sums = logits_t.new_empty(count, columns)
    for index, start in enumerate(range(0, vocab, chunk)):
        _exp_shifted_(logits_t[start : start + chunk], maxima[index], sums[index])
    return _logsumexp(maxima, sums), maxima


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        columns = torch.arange(targets.numel(), device=targets.device)
        logits_t = _logits_t(hidden, weight, bias)  # (V, N)
        target_logits = logits_t[targets, columns]  # (N,)
        logsumexp, maxima = _exp_and_logsumexp_(logits_t)
        ctx.save_for_backward(hidden, weight, targets, logits_t, maxima, logsumexp)
        ctx.has_bias = bias is not None
        return (logsumexp - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        """d loss / d logits = (softmax - one-hot) · scale. The softmax part is formed chunk by chunk and
        used at once, while the chunk is in cache, by the three products; the one-hot part touches only
        the target rows, so it is added as a sparse update instead of being written into the buffer."""
        hidden, weight, targets, exps, maxima, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        scale = grad_loss / targets.numel()
        factors = torch.exp(maxima - logsumexp) * scale  # (C, N): softmax·scale = exps · factor of the chunk
        grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None  # (N, H)
        grad_weight = torch.empty_like(weight) if need_weight else None  # (V, H)
        grad_bias = weight.new_empty(weight.size(0)) if need_bias else None  # (V,)
        for index, start in enumerate(range(0, exps.size(0), CHUNK)):
            rows = slice(start, start + CHUNK)
            block = exps[rows].mul_(factors[index])  # (≤CHUNK, N): this chunk's softmax·scale
            if need_weight:
                torch.mm(block, hidden, out=grad_weight[rows])
            if need_hidden:
                grad_hidden.addmm_(block.t(), weight[rows])
            if need_bias:
                torch.sum(block, 1, out=grad_bias[rows])
        _POOL.give(exps)
        minus = -scale  # the one-hot part: -scale at (target, column)
        if need_weight:
            grad_weight.index_add_(0, targets, hidden * minus)
        if need_hidden:
            grad_hidden.add_(weight[targets] * minus)
        if need_bias:
            grad_bias.index_add_(0, targets, minus.expand(targets.numel()))
        return grad_hidden, grad_weight, grad_bias, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ weightᵀ + bias)`` against ``targets``.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` to float tolerance.

    Args:
        hidden: (N, H) features.
        weight: (V, H) decoder weight.
        bias: (V,) decoder bias, or None.
        targets: (N,) ids.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


EVAL_CHUNK = 512  # vocabulary rows per product in evaluation: the (512, N) block stays in cache


@torch.no_grad()
def linear_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` (N,) under the decoder, without autograd.

    Nothing is kept for a backward pass, so the logits are never written out whole: each chunk of
    ``EVAL_CHUNK`` vocabulary rows is computed into one small buffer and reduced while in cache. This
    also bounds evaluation's memory at ``EVAL_CHUNK × N`` floats, whatever the vocabulary.
    """
    vocab, columns = weight.size(0), hidden.size(0)
    count = (vocab + EVAL_CHUNK - 1) // EVAL_CHUNK
    maxima = hidden.new_empty(count, columns)
    sums = hidden.new_empty(count, columns)
    buffer = _POOL.take(min(EVAL_CHUNK, vocab), columns, hidden)
    hidden_t = hidden.t()
    for index, start in enumerate(range(0, vocab, EVAL_CHUNK)):
        rows = slice(start, start + EVAL_CHUNK)
        block = buffer[: min(EVAL_CHUNK, vocab - start)]
        if bias is None:
            torch.mm(weight[rows], hidden_t, out=block)
        else:
            torch.addmm(bias[rows].unsqueeze(1), weight[rows], hidden_t, out=block)
        _exp_shifted_(block, maxima[index], sums[index])
    _POOL.give(buffer)
    target_logits = (hidden * weight[targets]).sum(1)  # (N,)
    if bias is not None:
        target_logits += bias[targets]
    return (_logsumexp(maxima, sums) - target_logits).sum()
