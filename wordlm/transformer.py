"""The Transformer language model: causal self-attention over a sliding window that reaches into earlier chunks.

Lives here: ``TransformerModel``. Must not import Sacred. ``model.build_model`` builds it for
``model_type='Transformer'``; it offers ``RNNModel``'s interface, so training, evaluation, generation,
checkpoints, DDP and ONNX export treat both alike.

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

from wordlm.hidden import Hidden
from wordlm.model import ModelConfig, RNNModel
from wordlm.regularize import activation_penalties, embedding_dropout


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


class TransformerModel(nn.Module):
    """A causal Transformer language model with a sliding attention window of ``config.window`` words.

    With ``tied`` the decoder shares the embedding matrix (any ``nhid``: the features are ``emsize`` wide).
    ``dropout`` applies to the top layer's output (as in ``RNNModel``) and, unless ``dropouth`` says
    otherwise, inside the layers (attention weights, feed-forward, residual branches); ``dropouti`` (None:
    ``dropout``) to the scaled embeddings; ``dropoute`` drops whole words from the embedding matrix. The
    decoder (full or adaptive softmax, the fused CPU path) is ``RNNModel``'s own.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dropouti = config.dropout if config.dropouti is None else config.dropouti
        dropouth = config.dropout if config.dropouth is None else config.dropouth
        self.encoder = nn.Embedding(config.ntoken, config.emsize)
        self.drop_input = nn.Dropout(dropouti)
        self.distance_bias = nn.Parameter(torch.zeros(config.nhead, config.window))  # (N, window)
        self.layers = nn.ModuleList(
            _Layer(config.emsize, config.nhead, config.nhid, dropouth) for _ in range(config.nlayers)
        )
        self.norm = nn.LayerNorm(config.emsize)
        self.drop = nn.Dropout(config.dropout)
        if config.adaptive_softmax is None:
            self.decoder = nn.Linear(config.emsize, config.ntoken)
            if config.tied:
                self.decoder.weight = self.encoder.weight
        else:  # as in RNNModel: word_rank[id] is the id's place among the words sorted by frequency
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(config.emsize, config.ntoken, list(config.adaptive_softmax))
            self.register_buffer("word_rank", torch.arange(config.ntoken))
        self.reset_parameters()

    # The decoder and its losses are RNNModel's: they read only config, decoder / adaptive and word_rank.
    scores = RNNModel.scores
    decoder_loss = RNNModel.decoder_loss
    decoder_nll_sum = RNNModel.decoder_nll_sum
    sort_words_by_frequency = RNNModel.sort_words_by_frequency

    # The classic example's initialisation, as RNNModel's: embedding and untied decoder uniform(-0.1, 0.1), zero
    # bias; the layers keep PyTorch's, the distance biases their zeros (no preference). With ``init_range`` r,
    # every parameter is uniform(-r, r) instead (LayerNorm gains too: r is the user's).
    reset_parameters = RNNModel.reset_parameters

    def forward(
        self, inputs: torch.Tensor, hidden: Hidden, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Run ``inputs`` (T, B) of word ids after the memory ``hidden``; as ``RNNModel.forward``.

        Returns:
            ``(logits (T, B, V), memory)``, or given ``targets`` (T, B) ``(loss, memory)``: the mean
            cross-entropy (also in ``last_cross_entropy``) plus AR/TAR on the top layer's output when set.
        """
        output, raw, hidden = self._run(inputs, hidden)
        if targets is None:
            return self.scores(output), hidden
        cross_entropy = self.decoder_loss(output, targets)
        self.last_cross_entropy = cross_entropy.detach()
        if self.training:
            return cross_entropy + activation_penalties(output, raw, self.config.alpha, self.config.beta), hidden
        return cross_entropy, hidden

    def features(self, inputs: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Everything but the decoder: the dropped-out top-layer output (T, B, E) and the new memory."""
        output, _, hidden = self._run(inputs, hidden)
        return output, hidden

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
        weight = self.encoder.weight
        return [weight.new_zeros(self.config.window - 1, batch_size, self.config.emsize) for _ in self.layers]
