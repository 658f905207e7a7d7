"""The regularizers of AWD-LSTM (Merity, Keskar & Socher 2017), as plain functions and modules.

Main names: ``LockedDropout``, ``embedding_dropout``, ``weight_dropped_call``, ``activation_penalties``.
Must not import Sacred.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["LockedDropout", "embedding_dropout", "weight_dropped_call", "activation_penalties"]


class LockedDropout(nn.Module):
    """Variational dropout (Gal & Ghahramani 2016): one mask per sequence, shared by every time step.

    Standard dropout draws a new mask at each step, so a unit dropped at t may be kept at t+1; here a
    dropped unit of column b stays dropped for the whole chunk. Identity in eval mode.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Drop units of ``inputs`` (T, B, H) with one (1, B, H) mask."""
        if not self.training or self.p == 0:
            return inputs
        mask = inputs.new_empty(1, inputs.size(1), inputs.size(2)).bernoulli_(1 - self.p) / (1 - self.p)
        return inputs * mask


def embedding_dropout(embedding: nn.Module, inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Look up ``inputs`` (T, B) with whole words dropped: a dropped word's vector is zero everywhere.

    Gal & Ghahramani (2016), as used by AWD-LSTM; kept rows are scaled by 1 / (1 - p). One mask value per word of
    the vocabulary, applied to the looked-up rows only: scaling the whole (V, E) matrix first, as AWD-LSTM does,
    gives the same vectors but costs two dense passes over it a batch (+15-25% per batch at 33k x 650).
    """
    vectors = embedding(inputs)  # (T, B, E): the module itself (an nn.Embedding or an adaptive input), so hooks see it
    if not training or p == 0:
        return vectors
    mask = vectors.new_empty(embedding.num_embeddings).bernoulli_(1 - p) / (1 - p)  # (V,)
    return vectors * mask[inputs].unsqueeze(-1)


def weight_dropped_call(rnn: nn.RNNBase, inputs: torch.Tensor, hidden, p: float, training: bool):
    """Run a one-layer ``rnn`` with DropConnect on its hidden-to-hidden matrix (Wan et al. 2013).

    The dropped matrix is passed in for this call only (``functional_call``), so the RNN still runs as
    one fused cuDNN/oneDNN kernel and gradients reach the raw weight. The same mask serves every time
    step of the call. Off in eval mode.
    """
    if not training or p == 0:
        return rnn(inputs, hidden)
    dropped = F.dropout(rnn.weight_hh_l0, p, training=True)
    return functional_call(rnn, {"weight_hh_l0": dropped}, (inputs, hidden))


def activation_penalties(dropped: torch.Tensor, raw: torch.Tensor, alpha: float, beta: float) -> torch.Tensor | float:
    """AR + TAR (Merity et al. 2017) of the last layer's outputs (T, B, H).

    AR = alpha · mean(dropped²) keeps activations small; TAR = beta · mean((raw_t - raw_{t-1})²) keeps
    them slowly changing. Returns 0.0 when both are off.
    """
    penalty = 0.0
    if alpha:
        penalty = penalty + alpha * dropped.pow(2).mean()
    if beta and raw.size(0) > 1:
        penalty = penalty + beta * (raw[1:] - raw[:-1]).pow(2).mean()
    return penalty
