"""The recurrent language model: embedding → dropout → RNN/GRU/LSTM → dropout → linear decoder.

Lives here: ``ModelConfig`` (what a checkpoint stores to rebuild the model), ``RNNModel``, ``build_model``
(an ``RNNModel`` or, for ``model_type='Transformer'``, a ``wordlm.transformer.TransformerModel``), ``unwrap``
and ``detach_hidden``. Must not import Sacred. Every ``model_type`` branch of the project is here or in
``build_model``'s choice.

Shape letters: ``T`` time steps, ``B`` batch, ``V`` vocabulary, ``E`` emsize, ``H`` nhid, ``L`` nlayers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wordlm import fused
from wordlm.fused import linear_cross_entropy, linear_nll_sum
from wordlm.hidden import Hidden, map_hidden
from wordlm.regularize import LockedDropout, activation_penalties, embedding_dropout, weight_dropped_call

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
    # (2000, 10000); None is the full softmax. Its probabilities are exact and normalised.
    adaptive_softmax: tuple[int, ...] | None = None
    # The Transformer's (model_type='Transformer'; the RNNs ignore them): nhid is its feed-forward width.
    nhead: int = 2  # attention heads; emsize must be divisible by it
    window: int = 35  # each word attends to itself and the window - 1 words before it (training sets bptt)

    @property
    def layered(self) -> bool:
        """Whether the layers are separate one-layer RNNs (needed for locked dropout between layers,
        weight drop and a last layer of emsize units); otherwise one multi-layer ``nn.RNN`` module."""
        return self.locked_dropout or self.wdrop > 0 or (self.tied and self.emsize != self.nhid)

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
            if self.tied:
                raise ValueError(
                    f"adaptive_softmax={list(cutoffs)!r} has output weights of its own, so it cannot be tied; "
                    "add tied=False"
                )
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


def build_model(config: ModelConfig) -> nn.Module:
    """The model ``config`` describes: an ``RNNModel``, or a ``TransformerModel`` for ``model_type='Transformer'``.

    Both offer the same interface to the rest of wordlm: ``config``, ``encoder``, ``forward``, ``features``,
    ``scores``, ``decoder_loss``, ``decoder_nll_sum``, ``init_hidden`` and ``sort_words_by_frequency``.
    """
    if config.model_type == TRANSFORMER:
        from wordlm.transformer import TransformerModel  # it builds on this module

        return TransformerModel(config)
    return RNNModel(config)


class RNNModel(nn.Module):
    """An Elman RNN, GRU or LSTM language model over a word vocabulary.

    The recurrent layers are ``nn.RNN``/``nn.GRU``/``nn.LSTM`` so that cuDNN (CUDA) and oneDNN (CPU)
    run them as fused kernels. With ``tied`` the decoder shares the embedding matrix ("Using the Output
    Embedding to Improve Language Models", Press & Wolf 2016; "Tying Word Vectors and Word Classifiers",
    Inan et al. 2016).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dropouti = config.dropout if config.dropouti is None else config.dropouti
        dropouth = config.dropout if config.dropouth is None else config.dropouth
        make_dropout = LockedDropout if config.locked_dropout else nn.Dropout
        self.drop = make_dropout(config.dropout)  # on the last layer's output
        self.drop_input = make_dropout(dropouti)
        self.encoder = nn.Embedding(config.ntoken, config.emsize)
        if config.layered:
            self.drop_between = make_dropout(dropouth)
            self.rnns = nn.ModuleList(_make_rnn(config.model_type, i, h, 1, 0.0) for i, h in config.layer_sizes())
        else:
            inter_layer_dropout = dropouth if config.nlayers > 1 else 0.0
            self.rnn = _make_rnn(config.model_type, config.emsize, config.nhid, config.nlayers, inter_layer_dropout)
        features = config.layer_sizes()[-1][1]
        if config.adaptive_softmax is None:
            self.decoder = nn.Linear(features, config.ntoken)
            if config.tied:
                self.decoder.weight = self.encoder.weight
        else:  # the words sorted by frequency: word_rank[id] is the id's place in that order
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(features, config.ntoken, list(config.adaptive_softmax))
            self.register_buffer("word_rank", torch.arange(config.ntoken))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the classic example does: uniform(-0.1, 0.1) embedding and decoder, zero bias.

        With ``init_range`` r, every parameter (recurrent weights and biases too) is uniform(-r, r), as in
        Zaremba et al. (2014).
        """
        if self.config.init_range is not None:
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -self.config.init_range, self.config.init_range)
            return
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if self.config.adaptive_softmax is not None:
            return  # the adaptive softmax keeps PyTorch's initialisation of its layers
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def sort_words_by_frequency(self, counts: torch.Tensor) -> None:
        """Give the adaptive softmax its word order: ``counts`` (V,) of each id in the training text, the
        most frequent first (ties by id). Stored in the state dict, so a checkpoint keeps it."""
        order = torch.sort(-counts.to(torch.float64), stable=True).indices  # ids, most frequent first
        self.word_rank.copy_(torch.empty_like(order).scatter_(0, order, torch.arange(order.numel())))

    def forward(
        self, inputs: torch.Tensor, hidden: Hidden, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Run ``inputs`` (T, B) of word ids from state ``hidden``.

        Returns:
            ``(logits, hidden)``: unnormalised scores (T, B, V) and the state after the last step; or,
            given ``targets`` (T, B), ``(loss, hidden)`` with the training objective: the mean
            cross-entropy (``decoder_loss``, also kept in ``last_cross_entropy``) plus AR/TAR when set.
            Training goes through here with targets, so that wrappers such as DistributedDataParallel
            see the whole computation.
        """
        output, raw, hidden = self._run(inputs, hidden)  # (T, B, H) dropped and raw top-layer outputs
        if targets is None:
            return self.scores(output), hidden  # (T, B, V)
        cross_entropy = self.decoder_loss(output, targets)
        self.last_cross_entropy = cross_entropy.detach()
        if self.training:
            return cross_entropy + activation_penalties(output, raw, self.config.alpha, self.config.beta), hidden
        return cross_entropy, hidden

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities (..., V) of the next word given ``features`` (..., H): the
        logits, or with the adaptive softmax its (normalised) log-probabilities, in id order."""
        if self.config.adaptive_softmax is None:
            return self.decoder(features)
        flat = features.reshape(-1, features.size(-1))
        return self.adaptive.log_prob(flat)[:, self.word_rank].view(*features.shape[:-1], -1)

    def features(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Run everything but the decoder: the dropped-out top-layer states (T, B, H) and the new state."""
        output, _, hidden = self._run(inputs, hidden)
        return output, hidden

    def _run(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        embedded = embedding_dropout(self.encoder, inputs, self.config.dropoute, self.training)  # (T, B, E)
        layer_input = self.drop_input(embedded)
        if not self.config.layered:
            raw, hidden = self.rnn(layer_input, hidden)  # (T, B, H)
            return self.drop(raw), raw, hidden
        new_hidden = []
        for index, rnn in enumerate(self.rnns):
            raw, state = weight_dropped_call(rnn, layer_input, hidden[index], self.config.wdrop, self.training)
            new_hidden.append(state)
            if index < len(self.rnns) - 1:
                layer_input = self.drop_between(raw)
        return self.drop(raw), raw, new_hidden

    def decoder_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the decoder's softmax over ``features`` (T, B, H) against ``targets`` (T, B).

        On the CPU this runs the fused path of ``wordlm.fused`` (same math, about half the non-matmul
        time; in bfloat16 under ``amp='bf16'``); elsewhere the plain ``cross_entropy`` of the logits,
        which cuDNN/cuBLAS already serve well.
        """
        flat = features.reshape(-1, features.size(-1))  # (T·B, H)
        if self.config.adaptive_softmax is not None:
            return self.adaptive(flat, self.word_rank[targets.reshape(-1)]).loss
        dtype = _fused_dtype(flat)
        if dtype is not None:
            return linear_cross_entropy(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1), dtype)
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1))

    def decoder_nll_sum(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets`` (T, B) given ``features`` (T, B, H); no autograd."""
        flat = features.reshape(-1, features.size(-1))
        if self.config.adaptive_softmax is not None:
            return -self.adaptive(flat, self.word_rank[targets.reshape(-1)]).output.sum()
        if _fused_dtype(flat) == torch.float32:
            return linear_nll_sum(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1))
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1), reduction="sum")

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero state for ``batch_size`` columns: (L, B, H), a pair of them for the LSTM, or in the
        layered mode a list with one such state (1, B, H_l) per layer."""
        weight = self.encoder.weight

        def zeros(layers: int, size: int):
            shape = (layers, batch_size, size)
            if self.config.model_type == "LSTM":
                return weight.new_zeros(shape), weight.new_zeros(shape)
            return weight.new_zeros(shape)

        if self.config.layered:
            return [zeros(1, size) for _, size in self.config.layer_sizes()]
        return zeros(self.config.nlayers, self.config.nhid)


def _make_rnn(model_type: str, inputs: int, hidden: int, layers: int, dropout: float) -> nn.RNNBase:
    if model_type in ("LSTM", "GRU"):
        return getattr(nn, model_type)(inputs, hidden, layers, dropout=dropout)
    nonlinearity = model_type.removeprefix("RNN_").lower()
    return nn.RNN(inputs, hidden, layers, nonlinearity=nonlinearity, dropout=dropout)


def _fused_dtype(features: torch.Tensor) -> torch.dtype | None:
    """The dtype of the fused CPU path's products for ``features``, or None for the plain path.

    float32 outside autocast; bfloat16 under CPU autocast to bfloat16, where the fused path rounds the
    operands and logits as autocast does and keeps the log-sum-exp and the gradients float32 (details
    in ``wordlm.fused``). The plain path under any other autocast, and under torch.compile, which
    fuses it itself, and where ``wordlm.fused.set_enabled(False)`` turned the fused path off.
    """
    if features.device.type != "cpu" or torch.compiler.is_compiling() or not fused.BACKEND.enabled:
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if features.dtype == torch.float32 else None
    if torch.get_autocast_dtype("cpu") == torch.bfloat16 and features.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return None


def unwrap(model: nn.Module) -> RNNModel:
    """The ``RNNModel`` inside ``torch.compile``'s and DistributedDataParallel's wrappers (or ``model`` itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph behind the hidden state.

    Truncated BPTT carries the state from one chunk to the next, but gradients must stop at the chunk
    boundary; without this, backward would run through the whole history of the epoch.
    """
    return map_hidden(torch.Tensor.detach, hidden)
