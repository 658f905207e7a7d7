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
- the gradient is written into the same buffer: one ``V × N`` buffer per step, no other.

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
        block = logits_t[start : start + chunk]  # (≤chunk, N), a view
        torch.amax(block, 0, out=maxima[index])
        block.sub_(maxima[index]).exp_()
        torch.sum(block, 0, out=sums[index])
    top = maxima.amax(0)  # (N,)
    logsumexp = top + (sums * torch.exp(maxima - top)).sum(0).log()
    return logsumexp, maxima


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
        hidden, weight, targets, exps, maxima, logsumexp = ctx.saved_tensors
        scale = grad_loss / targets.numel()
        factors = torch.exp(maxima - logsumexp) * scale  # (C, N): softmax = exps · factor of the chunk
        grad_t = exps  # the buffer becomes d loss / d logits, transposed
        for index, start in enumerate(range(0, grad_t.size(0), CHUNK)):
            grad_t[start : start + CHUNK].mul_(factors[index])
        columns = torch.arange(targets.numel(), device=targets.device)
        grad_t.index_put_((targets, columns), -scale.expand(targets.numel()), accumulate=True)
        grad_hidden = torch.mm(grad_t.t(), weight) if ctx.needs_input_grad[0] else None  # (N, H)
        grad_weight = torch.mm(grad_t, hidden) if ctx.needs_input_grad[1] else None  # (V, H)
        grad_bias = grad_t.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (V,)
        _POOL.give(grad_t)
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


@torch.no_grad()
def linear_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` (N,) under the decoder, without autograd."""
    columns = torch.arange(targets.numel(), device=targets.device)
    logits_t = _logits_t(hidden, weight, bias)
    target_logits = logits_t[targets, columns]
    logsumexp, _ = _exp_and_logsumexp_(logits_t)
    _POOL.give(logits_t)
    return (logsumexp - target_logits).sum()
