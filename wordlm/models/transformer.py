"""The Transformer language model: causal self-attention over a sliding window that reaches into earlier chunks.

Main names: ``TransformerModel``. Must not import Sacred. ``wordlm.models.build_model`` builds it for
``model_type='Transformer'``; a ``WordModel`` as ``RNNModel`` is, with the same decoder, so training,
evaluation, generation, checkpoints, DDP and ONNX export treat both alike.

What a word sees: itself and the ``window - 1`` words before it (``window`` is the training ``bptt``), in
every layer, whether those words are in this chunk or an earlier one. The "hidden state" carried from
chunk to chunk is the memory that makes this possible: each layer's inputs at the last ``window - 1``
positions, a list of ``nlayers`` tensors (window - 1, B, E). Like an RNN's state it starts as zeros
(``init_hidden``), is detached between training chunks (as in Transformer-XL, Dai et al. 2019), and its
batch dimension is dimension 1, so ``map_hidden`` and the DDP column split handle it as any state. Since
every word has the same window, a text's scores do not depend on how it is cut into chunks, and one
generation step costs the same at word 10 and at word 10,000 (one query against ``window`` keys per layer).

Positions are relative: each head adds a learned bias per distance 0 .. window - 1 to its attention
scores (as T5 does, without buckets). Absolute sinusoids (the classic example's) would give a word a
different position depending on where a chunk starts. A layer is pre-LayerNorm (``x + attention(norm(x))``,
then ``x + feed_forward(norm(x))``, ReLU, ``nhid`` wide), with a final LayerNorm before the decoder.

Shape letters: ``T`` time steps, ``B`` batch, ``M`` memory (window - 1), ``S`` keys (M + T), ``E`` emsize,
``V`` vocabulary, ``N`` nhead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wordlm.models.hidden import Hidden
from wordlm.models.regularize import embedding_dropout
from wordlm.models.word_model import ModelConfig, WordModel

__all__ = ["TransformerModel"]


class _Layer(nn.Module):
    """One pre-LayerNorm Transformer layer whose keys and values also cover the memory before the chunk."""

    def __init__(self, emsize: int, nhead: int, nhid: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(emsize)
        self.attention = nn.MultiheadAttention(emsize, nhead, dropout=dropout)
        self.norm_feed_forward = nn.LayerNorm(emsize)
        self.feed_forward = nn.Sequential(
            nn.Linear(emsize, nhid), nn.ReLU(), nn.Dropout(dropout), nn.Linear(nhid, emsize)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs`` (T, B, E) after ``memory`` (M, B, E), under the additive ``mask`` (B·N, T, S)."""
        normed = self.norm_attention(torch.cat([memory, inputs]))  # (S, B, E)
        attended, _ = self.attention(normed[memory.size(0) :], normed, normed, attn_mask=mask, need_weights=False)
        hidden = inputs + self.drop(attended)  # (T, B, E)
        return hidden + self.drop(self.feed_forward(self.norm_feed_forward(hidden)))


class TransformerModel(WordModel):
    """A causal Transformer language model with a sliding attention window of ``config.window`` words.

    With ``tied`` the decoder shares the embedding matrix (any ``nhid``: the features are ``emsize`` wide).
    ``dropout`` applies to the top layer's output (as in ``RNNModel``) and, unless ``dropouth`` says
    otherwise, inside the layers (attention weights, feed-forward, residual branches); ``dropouti`` (None:
    ``dropout``) to the scaled embeddings; ``dropoute`` drops whole words from the embedding matrix. The
    layers keep PyTorch's initialisation and the distance biases their zeros (no preference); see
    ``WordModel.reset_parameters``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = self._make_encoder()
        self.drop_input = nn.Dropout(config.input_dropout)
        self.distance_bias = nn.Parameter(torch.zeros(config.nhead, config.window))  # (N, window)
        self.layers = nn.ModuleList(
            _Layer(config.emsize, config.nhead, config.nhid, config.layer_dropout) for _ in range(config.nlayers)
        )
        self.norm = nn.LayerNorm(config.emsize)
        self.drop = nn.Dropout(config.dropout)
        self._add_decoder(config.emsize)

    def _run(self, inputs: torch.Tensor, memory: Hidden) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        embedded = embedding_dropout(self.encoder, inputs, self.config.dropoute, self.training)  # (T, B, E)
        layer_input = self.drop_input(embedded * math.sqrt(self.config.emsize))
        mask = self._attention_mask(inputs.size(0), inputs.size(1), layer_input.dtype)
        new_memory = []
        for layer, past in zip(self.layers, memory, strict=True):  # past (M, B, E): the layer's last M inputs
            new_memory.append(torch.cat([past, layer_input])[layer_input.size(0) :])  # (M, B, E) after this chunk
            layer_input = layer(layer_input, past, mask)
        raw = self.norm(layer_input)  # (T, B, E)
        return self.drop(raw), raw, new_memory

    def _attention_mask(self, steps: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask (B·N, T, S): the distance bias where query t may see key s (the
        ``window`` positions up to and including its own), -inf elsewhere."""
        kept = self.config.window - 1
        queries = torch.arange(steps, device=self.distance_bias.device).view(-1, 1) + kept  # (T, 1): positions in S
        keys = torch.arange(steps + kept, device=self.distance_bias.device).view(1, -1)  # (1, S)
        distance = queries - keys  # (T, S)
        visible = (distance >= 0) & (distance < self.config.window)
        bias = self.distance_bias[:, distance.clamp(0, kept)]  # (N, T, S)
        mask = bias.masked_fill(~visible, -math.inf).to(dtype)
        return mask.repeat(batch, 1, 1)  # (B·N, T, S): row b·N + h is head h of column b

    def init_hidden(self, batch_size: int) -> Hidden:
        """The memory at the start of a text: zeros, one (window - 1, B, E) tensor per layer."""
        weight = self.distance_bias  # the model's device and dtype
        return [weight.new_zeros(self.config.window - 1, batch_size, self.config.emsize) for _ in self.layers]
