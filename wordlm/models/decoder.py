"""The decoder every wordlm model ends in: top-layer features → scores of the next word, and its losses.

Main names: ``FullSoftmax``, ``AdaptiveSoftmax``, ``Decoder`` (either) and ``build_decoder``. Must not import
Sacred. Both models hold one as ``model.decoder``; it sees plain sizes, not a config.

Each decoder offers ``scores(features)`` (what ``model(inputs, hidden)`` returns), ``loss(features, targets)``
(the mean cross-entropy, training), ``nll_sum(features, targets)`` (the summed negative log-likelihood,
evaluation) and ``init_classic()`` (the classic example's initialisation). On the CPU the full softmax computes
its losses with ``wordlm.models.fused`` wherever ``fused.fused_dtype`` says that path serves.

Shape letters: ``N`` tokens, ``H`` feature size, ``V`` vocabulary; ``...`` any leading dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wordlm.models.fused import fused_dtype, linear_cross_entropy, linear_nll_sum

__all__ = ["FullSoftmax", "AdaptiveSoftmax", "Decoder", "build_decoder"]


class FullSoftmax(nn.Linear):
    """The full softmax over the vocabulary: logits ``features @ Wᵀ + b``.

    With ``tied_to`` the weight is that embedding's matrix ("Using the Output Embedding to Improve Language
    Models", Press & Wolf 2016; "Tying Word Vectors and Word Classifiers", Inan et al. 2016), so the features
    must be as wide as the embeddings. Its state is ``weight`` and ``bias``, as the ``nn.Linear`` it is.
    """

    def __init__(self, features: int, ntoken: int, tied_to: nn.Embedding | None = None) -> None:
        super().__init__(features, ntoken)
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The logits (..., V) of ``features`` (..., H)."""
        return self(features)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the softmax over ``features`` (..., H) against ``targets`` (...).

        On the CPU this runs the fused path of ``wordlm.models.fused`` (same math, about half the non-matmul time;
        in bfloat16 under ``amp='bf16'``); elsewhere the plain ``cross_entropy`` of the logits, which
        cuDNN/cuBLAS already serve well.
        """
        flat = features.reshape(-1, features.size(-1))  # (N, H)
        dtype = fused_dtype(flat)
        if dtype is not None:
            return linear_cross_entropy(flat, self.weight, self.bias, targets.reshape(-1), dtype)
        return F.cross_entropy(self(flat), targets.reshape(-1))

    def nll_sum(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets`` (...) given ``features`` (..., H); no autograd."""
        flat = features.reshape(-1, features.size(-1))
        if fused_dtype(flat) == torch.float32:
            return linear_nll_sum(flat, self.weight, self.bias, targets.reshape(-1))
        return F.cross_entropy(self(flat), targets.reshape(-1), reduction="sum")

    def init_classic(self) -> None:
        """Zero bias and, untied, a uniform(-0.1, 0.1) weight (a tied one is the embedding's)."""
        nn.init.zeros_(self.bias)
        if not self.tied:
            nn.init.uniform_(self.weight, -0.1, 0.1)


class AdaptiveSoftmax(nn.Module):
    """The adaptive softmax ("Efficient softmax approximation for GPUs", Grave et al. 2017): the frequent
    words in a head, the rarer ones in clusters behind it; its probabilities are exact and normalised.

    Its clusters are cut from the words sorted by frequency (``cutoffs`` counts them, e.g. (2000, 10000)):
    ``word_rank[id]`` is the id's place in that order (``sort_words_by_frequency`` sets it; the identity
    until then), a buffer, so a checkpoint keeps it.
    """

    def __init__(self, features: int, ntoken: int, cutoffs: tuple[int, ...]) -> None:
        super().__init__()
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(features, ntoken, list(cutoffs))
        self.register_buffer("word_rank", torch.arange(ntoken))

    def sort_words_by_frequency(self, counts: torch.Tensor) -> None:
        """Give the clusters their word order: ``counts`` (V,) of each id in the training text, the most
        frequent first (ties by id)."""
        order = torch.sort(-counts.to(torch.float64), stable=True).indices  # ids, most frequent first
        self.word_rank.copy_(torch.empty_like(order).scatter_(0, order, torch.arange(order.numel())))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The (normalised) log-probabilities (..., V) of ``features`` (..., H), in id order."""
        flat = features.reshape(-1, features.size(-1))
        return self.adaptive.log_prob(flat)[:, self.word_rank].view(*features.shape[:-1], -1)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy against ``targets`` (...) given ``features`` (..., H)."""
        flat = features.reshape(-1, features.size(-1))
        return self.adaptive(flat, self.word_rank[targets.reshape(-1)]).loss

    def nll_sum(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets`` (...) given ``features`` (..., H)."""
        flat = features.reshape(-1, features.size(-1))
        return -self.adaptive(flat, self.word_rank[targets.reshape(-1)]).output.sum()

    def init_classic(self) -> None:
        """Nothing: the adaptive softmax keeps PyTorch's initialisation of its layers."""


Decoder = FullSoftmax | AdaptiveSoftmax


def build_decoder(
    features: int, ntoken: int, adaptive_softmax: tuple[int, ...] | None, tied_to: nn.Embedding | None
) -> Decoder:
    """The decoder for ``features``-wide outputs over ``ntoken`` words: the adaptive softmax with the
    ``adaptive_softmax`` cutoffs, or (None) the full one, its weight ``tied_to``'s if given."""
    if adaptive_softmax is None:
        return FullSoftmax(features, ntoken, tied_to)
    return AdaptiveSoftmax(features, ntoken, adaptive_softmax)
