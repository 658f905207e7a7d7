"""What every wordlm model is: the config that rebuilds it, and the base class of the models.

Main names: ``ModelConfig`` (what a checkpoint stores to rebuild the model; every ``model_type`` check),
``MODEL_TYPES``, ``TRANSFORMER`` and ``WordModel``, the type of "any wordlm model" elsewhere in the package:
``RNNModel`` (``wordlm.models.rnn``) and ``TransformerModel`` (``wordlm.models.transformer``) are its two kinds, and
``wordlm.models.build_model`` makes the one a config describes. Must not import Sacred.

Shape letters: ``T`` time steps, ``B`` batch, ``V`` vocabulary, ``H`` the top layer's width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from wordlm.models.decoder import AdaptiveInput, AdaptiveSoftmax, Decoder, build_decoder
from wordlm.models.hidden import Hidden
from wordlm.models.regularize import activation_penalties

__all__ = ["MODEL_TYPES", "TRANSFORMER", "ModelConfig", "WordModel"]

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")  # the recurrent ones
TRANSFORMER = "Transformer"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (``build_model``); stored in every checkpoint as a plain dict."""

    ntoken: int
    model_type: str = "LSTM"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = True
    init_range: float | None = None  # uniform(-r, r) for every weight (Zaremba et al.); None: the classic init
    # AWD-LSTM's regularizers (Merity et al. 2017); the defaults leave the classic model unchanged.
    locked_dropout: bool = False  # one dropout mask per sequence instead of per step
    dropouti: float | None = None  # dropout on the embeddings (None: dropout)
    dropouth: float | None = None  # dropout between layers (None: dropout)
    dropoute: float = 0.0  # drop whole words from the embedding matrix
    wdrop: float = 0.0  # DropConnect on the hidden-to-hidden weights
    alpha: float = 0.0  # activation regularization (AR)
    beta: float = 0.0  # temporal activation regularization (TAR)
    tied_projection: bool = False  # with tied and emsize != nhid, the last layer has emsize units
    # Adaptive softmax (Grave et al. 2017): cluster boundaries over the words sorted by frequency, e.g.
    # (2000, 10000); None is the full softmax. Its probabilities are exact and normalised. Tied, the word vectors
    # are its output vectors (an adaptive input, Baevski & Auli 2019: ``decoder.AdaptiveInput``).
    adaptive_softmax: tuple[int, ...] | None = None
    # The Transformer's (model_type='Transformer'; the RNNs ignore them): nhid is its feed-forward width.
    nhead: int = 2  # attention heads; emsize must be divisible by it
    window: int = 35  # each word attends to itself and the window - 1 words before it (training sets bptt)

    @property
    def layered(self) -> bool:
        """Whether the layers are separate one-layer RNNs (needed for locked dropout between layers,
        weight drop and a last layer of emsize units); otherwise one multi-layer ``nn.RNN`` module."""
        return self.locked_dropout or self.wdrop > 0 or (self.tied and self.emsize != self.nhid)

    @property
    def input_dropout(self) -> float:
        """The dropout on the embeddings: ``dropouti``, or ``dropout`` where that is None."""
        return self.dropout if self.dropouti is None else self.dropouti

    @property
    def layer_dropout(self) -> float:
        """The dropout between the RNNs' layers, or inside the Transformer's: ``dropouth``, or ``dropout``."""
        return self.dropout if self.dropouth is None else self.dropouth

    def layer_sizes(self) -> list[tuple[int, int]]:
        """(input, hidden) size of each layer."""
        sizes = []
        for layer in range(self.nlayers):
            inputs = self.emsize if layer == 0 else self.nhid
            last = layer == self.nlayers - 1
            sizes.append((inputs, self.emsize if last and self.tied_projection else self.nhid))
        return sizes

    def __post_init__(self) -> None:
        if self.model_type not in (*MODEL_TYPES, TRANSFORMER):
            raise ValueError(f"model_type={self.model_type!r} is not one of {', '.join((*MODEL_TYPES, TRANSFORMER))}")
        for key in ("ntoken", "emsize", "nhid", "nlayers", "nhead", "window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        for key in ("dropout", "dropouti", "dropouth", "dropoute", "wdrop"):
            value = getattr(self, key)
            if value is None and key in ("dropouti", "dropouth"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{key}={value!r} must be a number with 0 <= {key} < 1")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{key}={value!r} must be a number >= 0")
        for key in ("locked_dropout", "tied_projection"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be True or False")
        init_range = self.init_range
        if init_range is not None and (
            isinstance(init_range, bool) or not isinstance(init_range, (int, float)) or not init_range > 0
        ):
            raise ValueError(f"init_range={self.init_range!r} must be a positive number or None")
        if self.adaptive_softmax is not None:
            cutoffs = self.adaptive_softmax
            if (
                not isinstance(cutoffs, (list, tuple))
                or not cutoffs
                or any(isinstance(c, bool) or not isinstance(c, int) for c in cutoffs)
                or list(cutoffs) != sorted(set(cutoffs))
                or cutoffs[0] < 1
            ):
                raise ValueError(
                    f"adaptive_softmax={cutoffs!r} must be increasing word counts from 1 up, below the vocabulary "
                    "size, e.g. [2000, 10000], or None for the full softmax"
                )
            if cutoffs[-1] >= self.ntoken:
                raise ValueError(
                    f"adaptive_softmax={cutoffs!r} must be increasing word counts between 1 and the vocabulary "
                    f"size ({self.ntoken}), e.g. [{max(1, self.ntoken // 10)}], or None for the full softmax"
                )
            object.__setattr__(self, "adaptive_softmax", tuple(cutoffs))
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied={self.tied!r} must be True or False")
        if self.model_type == TRANSFORMER:
            self._check_transformer()
        elif self.tied and self.emsize != self.nhid and not self.tied_projection:
            raise ValueError(
                f"tied=True needs emsize == nhid (got emsize={self.emsize}, nhid={self.nhid}); "
                "set them equal, use tied=False, or tied_projection=True (the last layer gets emsize units)"
            )

    def _check_transformer(self) -> None:
        """Refuse what the Transformer cannot take, one line each (its decoder reads emsize-wide features, so
        ``tied`` needs no ``emsize == nhid``)."""
        if self.emsize % self.nhead:
            raise ValueError(
                f"emsize={self.emsize} must be divisible by nhead={self.nhead} (each head gets emsize / nhead "
                "dimensions); change emsize or nhead"
            )
        refused = {
            "wdrop": (self.wdrop > 0, "DropConnect on recurrent weights; the Transformer has none"),
            "locked_dropout": (self.locked_dropout, "one dropout mask per sequence of recurrent steps"),
            "tied_projection": (self.tied_projection, "its output is emsize wide already, so tied needs no projection"),
        }
        for key, (given, why) in refused.items():
            if given:
                value = getattr(self, key)
                raise ValueError(f"{key}={value!r} is for the RNNs ({why}); drop it for model_type=Transformer")

    def to_dict(self) -> dict:
        return asdict(self)


class WordModel(nn.Module):
    """A word-level language model: an embedding (``encoder``), a body, and the ``decoder`` it holds
    (``wordlm.models.decoder``: full or adaptive softmax).

    A subclass builds ``encoder`` and its body, then calls ``_add_decoder`` (last: building a layer draws from
    the random stream, so the order of construction is part of what a seed gives), and defines ``_run`` (the
    body) and ``init_hidden`` (the state at the start of a text).
    """

    config: ModelConfig
    encoder: nn.Embedding | AdaptiveInput
    decoder: Decoder

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_state_dict_post_hook(_store_adaptive_softmax_as_before)
        self.register_load_state_dict_pre_hook(_load_adaptive_softmax_as_before)

    @property
    def device(self) -> torch.device:
        """Where the weights are (a tied adaptive softmax leaves no ``encoder.weight`` to ask)."""
        return next(self.parameters()).device

    def _make_encoder(self) -> nn.Embedding | AdaptiveInput:
        """The word vectors: an embedding matrix, or with a tied adaptive softmax the softmax's own (no weights
        here, and no draw from the random stream)."""
        config = self.config
        if config.tied and config.adaptive_softmax is not None:
            return AdaptiveInput(config.ntoken, config.emsize)
        return nn.Embedding(config.ntoken, config.emsize)

    def _add_decoder(self, features: int) -> None:
        """Put the decoder on the body's ``features``-wide output, then initialise the model."""
        config = self.config
        tied_to = self.encoder if config.tied else None
        self.decoder = build_decoder(features, config.ntoken, config.adaptive_softmax, tied_to)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the classic example does: uniform(-0.1, 0.1) embedding and decoder, zero bias; the
        body keeps PyTorch's initialisation (a subclass's own zeros too).

        With ``init_range`` r, every parameter (the body's weights and biases, LayerNorm gains too) is
        uniform(-r, r) instead, as in Zaremba et al. (2014).
        """
        if self.config.init_range is not None:
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -self.config.init_range, self.config.init_range)
            return
        if isinstance(self.encoder, nn.Embedding):  # an adaptive input's weights are the decoder's
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        self.decoder.init_classic()

    def forward(
        self, inputs: torch.Tensor, hidden: Hidden, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Run ``inputs`` (T, B) of word ids from state ``hidden``.

        Returns:
            ``(scores, hidden)``: the decoder's scores (T, B, V) (logits, or the adaptive softmax's
            log-probabilities) and the state after the last step; or, given ``targets`` (T, B), ``(loss,
            hidden)`` with the training objective: the mean cross-entropy (also kept in
            ``last_cross_entropy``) plus AR/TAR on the top layer's output when set. Training goes through
            here with targets, so that wrappers such as DistributedDataParallel see the whole computation.
        """
        output, raw, hidden = self._run(inputs, hidden)  # (T, B, H) dropped and raw top-layer outputs
        if targets is None:
            return self.decoder.scores(output), hidden  # (T, B, V)
        cross_entropy = self.decoder.loss(output, targets)
        self.last_cross_entropy = cross_entropy.detach()
        if self.training:
            return cross_entropy + activation_penalties(output, raw, self.config.alpha, self.config.beta), hidden
        return cross_entropy, hidden

    def features(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Run everything but the decoder: the dropped-out top-layer output (T, B, H) and the new state."""
        output, _, hidden = self._run(inputs, hidden)
        return output, hidden

    def _run(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        """The body: the top layer's output (T, B, H) after dropout and before it, and the new state."""
        raise NotImplementedError

    def init_hidden(self, batch_size: int) -> Hidden:
        """The state at the start of a text, for ``batch_size`` columns (see ``wordlm.models.hidden``)."""
        raise NotImplementedError


# Checkpoints name an adaptive softmax's entries as they were when the models held its parts themselves:
# ``adaptive.*`` and ``word_rank``, where the module tree says ``decoder.adaptive.*`` and ``decoder.word_rank``.
# These two hooks translate, so that a checkpoint written before or after the decoder became a module loads in
# either version (a full softmax's ``decoder.weight`` and ``decoder.bias`` are the same in both).
_ADAPTIVE_PARTS = ("adaptive", "word_rank")


def _store_adaptive_softmax_as_before(model: WordModel, state: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict``'s hook: the adaptive softmax's entries under their old names and in their old order
    (``word_rank`` after the model's own entries, before its children's; ``adaptive.*`` last, where they are)."""
    if not isinstance(model.decoder, AdaptiveSoftmax):
        return
    inner = f"{prefix}decoder."
    rank = state.pop(f"{inner}word_rank")
    entries = list(state.items())
    state.clear()
    for key, value in entries:
        if rank is not None and key.startswith(prefix) and "." in key[len(prefix) :]:  # the first child's entry
            state[f"{prefix}word_rank"], rank = rank, None
        state[prefix + key[len(inner) :] if key.startswith(inner) else key] = value


def _load_adaptive_softmax_as_before(model: WordModel, state: dict, prefix: str, *_) -> None:
    """``load_state_dict``'s hook: the old names of the adaptive softmax's entries back under ``decoder.``."""
    if not isinstance(model.decoder, AdaptiveSoftmax):
        return
    for key in [key for key in state if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in _ADAPTIVE_PARTS]:
        state[f"{prefix}decoder.{key[len(prefix) :]}"] = state.pop(key)
