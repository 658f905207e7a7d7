"""The recurrent language model: embedding → dropout → RNN/GRU/LSTM → dropout → decoder.

Main names: ``RNNModel``. Must not import Sacred. ``wordlm.models.build_model`` builds it for the recurrent
``model_type``s (``MODEL_TYPES``).

Shape letters: ``T`` time steps, ``B`` batch, ``E`` emsize, ``H`` nhid, ``L`` nlayers.
"""

from __future__ import annotations

import torch
from torch import nn

from wordlm.models.hidden import Hidden
from wordlm.models.regularize import LockedDropout, embedding_dropout, weight_dropped_call
from wordlm.models.word_model import ModelConfig, WordModel

__all__ = ["RNNModel"]


class RNNModel(WordModel):
    """An Elman RNN, GRU or LSTM language model over a word vocabulary.

    The recurrent layers are ``nn.RNN``/``nn.GRU``/``nn.LSTM`` so that cuDNN (CUDA) and oneDNN (CPU)
    run them as fused kernels. With ``tied`` the decoder shares the embedding matrix.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        make_dropout = LockedDropout if config.locked_dropout else nn.Dropout
        self.drop = make_dropout(config.dropout)  # on the last layer's output
        self.drop_input = make_dropout(config.input_dropout)
        self.encoder = self._make_encoder()
        if config.layered:
            self.drop_between = make_dropout(config.layer_dropout)
            self.rnns = nn.ModuleList(_make_rnn(config.model_type, i, h, 1, 0.0) for i, h in config.layer_sizes())
        else:
            inter_layer_dropout = config.layer_dropout if config.nlayers > 1 else 0.0
            self.rnn = _make_rnn(config.model_type, config.emsize, config.nhid, config.nlayers, inter_layer_dropout)
        self._add_decoder(config.layer_sizes()[-1][1])

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

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero state for ``batch_size`` columns: (L, B, H), a pair of them for the LSTM, or in the
        layered mode a list with one such state (1, B, H_l) per layer."""
        weight = next(self.parameters())  # the model's device and dtype

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
