"""The decoder every wordlm model ends in: top-layer features → scores of the next word, and its losses.

Main names: ``FullSoftmax``, ``AdaptiveSoftmax``, ``Decoder`` (either), ``AdaptiveInput`` (the word vectors of a
tied adaptive softmax) and ``build_decoder``. Must not import Sacred. Both models hold one as ``model.decoder``; it
sees plain sizes, not a config.

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

__all__ = ["FullSoftmax", "AdaptiveSoftmax", "Decoder", "AdaptiveInput", "build_decoder"]


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
        flat = _under_autocast(features.reshape(-1, features.size(-1)))
        return self.adaptive.log_prob(flat)[:, self.word_rank].view(*features.shape[:-1], -1)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy against ``targets`` (...) given ``features`` (..., H)."""
        flat = _under_autocast(features.reshape(-1, features.size(-1)))
        return self.adaptive(flat, self.word_rank[targets.reshape(-1)]).loss

    def nll_sum(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets`` (...) given ``features`` (..., H)."""
        flat = _under_autocast(features.reshape(-1, features.size(-1)))
        return -self.adaptive(flat, self.word_rank[targets.reshape(-1)]).output.sum()

    def init_classic(self) -> None:
        """Nothing: the adaptive softmax keeps PyTorch's initialisation of its layers."""


def _under_autocast(features: torch.Tensor) -> torch.Tensor:
    """``features`` in autocast's dtype while it is on: ``nn.AdaptiveLogSoftmaxWithLoss`` copies its clusters'
    results, computed in that dtype, into a tensor of its input's, and fails when they differ. An RNN's output is
    in autocast's dtype already; a Transformer's final LayerNorm gives float32."""
    kind = features.device.type
    if torch.is_autocast_enabled(kind):
        return features.to(torch.get_autocast_dtype(kind))
    return features


Decoder = FullSoftmax | AdaptiveSoftmax


class AdaptiveInput(nn.Module):
    """The word vectors of a tied adaptive softmax: the adaptive softmax's own output vectors, read as an embedding
    ("Adaptive Input Representations for Neural Language Modeling", Baevski & Auli 2019, with its input and output
    sides tied, words and projections).

    A head word's vector is its row of the head. A word of cluster i is its row of that cluster's output layer,
    ``features / 4^(i+1)`` wide, brought up to ``features`` by the transpose of the cluster's down-projection. So
    the rare words' vectors are narrow, as their output vectors are, and the model holds one set of word weights
    where an untied one holds two (the embedding matrix is V x E: 21.6M of a 2x650 WikiText-2 model's 32.1M).

    It has no weights of its own: ``softmax`` is kept as a plain attribute, not a child module, so a state dict
    names each weight once (under ``decoder.``) and moving the model moves what it reads. ``num_embeddings`` and
    ``embedding_dim`` are as ``nn.Embedding``'s.
    """

    def __init__(self, ntoken: int, features: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = ntoken, features
        self.softmax: AdaptiveSoftmax | None = None

    def tie(self, softmax: AdaptiveSoftmax) -> None:
        """Read the word vectors from ``softmax`` (of ``num_embeddings`` words over ``embedding_dim`` features)."""
        object.__setattr__(self, "softmax", softmax)  # not registered: its weights are the decoder's

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The vectors (..., E) of the word ids ``inputs`` (...)."""
        assert self.softmax is not None, "tie() first"
        adaptive = self.softmax.adaptive
        ranks = self.softmax.word_rank[inputs]  # (...) places in the frequency order
        # Every band is looked up for every word (indices clamped into it) and masked: no data-dependent shapes,
        # so torch.compile and the ONNX export see a fixed graph; the bands' products are small beside the model's.
        shortlist = adaptive.shortlist_size  # the head's first rows are its words' vectors
        vectors = F.embedding(ranks.clamp(max=shortlist - 1), adaptive.head.weight) * (ranks < shortlist)[..., None]
        bounds = adaptive.cutoffs  # the shortlist's size, each cluster's end, ..., V
        for (down, up), low, high in zip(adaptive.tail, bounds[:-1], bounds[1:]):
            narrow = F.embedding((ranks - low).clamp(0, high - low - 1), up.weight)  # (..., E / 4^(i+1))
            inside = (ranks >= low) & (ranks < high)
            vectors = vectors + (narrow @ down.weight).to(vectors.dtype) * inside[..., None]  # bfloat16 under amp
        return vectors


def build_decoder(
    features: int, ntoken: int, adaptive_softmax: tuple[int, ...] | None, tied_to: nn.Embedding | AdaptiveInput | None
) -> Decoder:
    """The decoder for ``features``-wide outputs over ``ntoken`` words: the adaptive softmax with the
    ``adaptive_softmax`` cutoffs, or (None) the full one, its weight ``tied_to``'s if given. A ``tied_to`` that is
    an ``AdaptiveInput`` is given the adaptive softmax's weights to read."""
    if adaptive_softmax is None:
        assert not isinstance(tied_to, AdaptiveInput), "an adaptive input ties to an adaptive softmax"
        return FullSoftmax(features, ntoken, tied_to)
    assert tied_to is None or isinstance(tied_to, AdaptiveInput), "a tied adaptive softmax needs an AdaptiveInput"
    softmax = AdaptiveSoftmax(features, ntoken, adaptive_softmax)
    if isinstance(tied_to, AdaptiveInput):
        tied_to.tie(softmax)
    return softmax
