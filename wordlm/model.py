"""The recurrent language model: embedding → dropout → RNN/GRU/LSTM → dropout → linear decoder.

Lives here: ``ModelConfig`` (what a checkpoint stores to rebuild the model), ``RNNModel`` and
``detach_hidden``. Must not import Sacred. Every ``model_type`` branch of the project is in this file.

Shape letters: ``T`` time steps, ``B`` batch, ``V`` vocabulary, ``E`` emsize, ``H`` nhid, ``L`` nlayers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wordlm.fused import linear_cross_entropy, linear_nll_sum

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an ``RNNModel``; stored in every checkpoint as a plain dict."""

    ntoken: int
    model_type: str = "LSTM"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = True
    init_range: float | None = None  # uniform(-r, r) for every weight (Zaremba et al.); None: the classic init

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        for key in ("ntoken", "emsize", "nhid", "nlayers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be a number with 0 <= dropout < 1")
        if self.init_range is not None and (
            isinstance(self.init_range, bool) or not isinstance(self.init_range, (int, float)) or not self.init_range > 0
        ):
            raise ValueError(f"init_range={self.init_range!r} must be a positive number or None")
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied={self.tied!r} must be True or False")
        if self.tied and self.emsize != self.nhid:
            raise ValueError(
                f"tied=True needs emsize == nhid (got emsize={self.emsize}, nhid={self.nhid}); "
                "set them equal or use tied=False"
            )

    def to_dict(self) -> dict:
        return asdict(self)


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
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.Embedding(config.ntoken, config.emsize)
        inter_layer_dropout = config.dropout if config.nlayers > 1 else 0.0
        if config.model_type in ("LSTM", "GRU"):
            rnn_class = getattr(nn, config.model_type)
            self.rnn = rnn_class(config.emsize, config.nhid, config.nlayers, dropout=inter_layer_dropout)
        else:
            nonlinearity = config.model_type.removeprefix("RNN_").lower()
            self.rnn = nn.RNN(
                config.emsize, config.nhid, config.nlayers, nonlinearity=nonlinearity, dropout=inter_layer_dropout
            )
        self.decoder = nn.Linear(config.nhid, config.ntoken)
        if config.tied:
            self.decoder.weight = self.encoder.weight
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
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(
        self, inputs: torch.Tensor, hidden: Hidden, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Run ``inputs`` (T, B) of word ids from state ``hidden``.

        Returns:
            ``(logits, hidden)``: unnormalised scores (T, B, V) and the state after the last step; or,
            given ``targets`` (T, B), ``(loss, hidden)`` with the mean cross-entropy (``decoder_loss``).
            Training goes through here with targets, so that wrappers such as DistributedDataParallel
            see the whole computation.
        """
        output, hidden = self.features(inputs, hidden)  # (T, B, H)
        if targets is not None:
            return self.decoder_loss(output, targets), hidden
        return self.decoder(output), hidden  # (T, B, V)

    def features(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Run everything but the decoder: the dropped-out top-layer states (T, B, H) and the new state."""
        embedded = self.drop(self.encoder(inputs))  # (T, B, E)
        output, hidden = self.rnn(embedded, hidden)  # (T, B, H)
        return self.drop(output), hidden

    def decoder_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the decoder's softmax over ``features`` (T, B, H) against ``targets`` (T, B).

        On the CPU this runs the fused path of ``wordlm.fused`` (same math, about half the non-matmul
        time); elsewhere the plain ``cross_entropy`` of the logits, which cuDNN/cuBLAS already serve well.
        """
        flat = features.reshape(-1, features.size(-1))  # (T·B, H)
        if _use_fused(flat):
            return linear_cross_entropy(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1))
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1))

    def decoder_nll_sum(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets`` (T, B) given ``features`` (T, B, H); no autograd."""
        flat = features.reshape(-1, features.size(-1))
        if _use_fused(flat):
            return linear_nll_sum(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1))
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1), reduction="sum")

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero state for ``batch_size`` columns: (L, B, H), or a pair of them for the LSTM."""
        weight = self.encoder.weight
        shape = (self.config.nlayers, batch_size, self.config.nhid)
        if self.config.model_type == "LSTM":
            return weight.new_zeros(shape), weight.new_zeros(shape)
        return weight.new_zeros(shape)


def _use_fused(features: torch.Tensor) -> bool:
    return features.device.type == "cpu" and features.dtype == torch.float32


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph behind the hidden state.

    Truncated BPTT carries the state from one chunk to the next, but gradients must stop at the chunk
    boundary; without this, backward would run through the whole history of the epoch.
    """
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return tuple(detach_hidden(h) for h in hidden)
