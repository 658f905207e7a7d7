"""The models, by ``model_type``: the one place the package chooses between them.

Lives here: ``build_model`` (the model a ``ModelConfig`` describes), ``unwrap`` and ``detach_hidden``; and, so
that the rest of the package imports them from one place, ``ModelConfig``, ``MODEL_TYPES``, ``TRANSFORMER`` and
``WordModel`` (``wordlm.word_model``: the type of any wordlm model), ``RNNModel`` (``wordlm.rnn``) and
``TransformerModel`` (``wordlm.transformer``). Both models hold the decoder of ``wordlm.decoder``. Must not
import Sacred.
"""

from __future__ import annotations

import torch
from torch import nn

from wordlm.hidden import Hidden, map_hidden
from wordlm.rnn import RNNModel
from wordlm.transformer import TransformerModel
from wordlm.word_model import MODEL_TYPES, TRANSFORMER, ModelConfig, WordModel

__all__ = ["MODEL_TYPES", "TRANSFORMER", "ModelConfig", "RNNModel", "TransformerModel", "WordModel", "build_model",
           "detach_hidden", "unwrap"]  # fmt: skip


def build_model(config: ModelConfig) -> WordModel:
    """The model ``config`` describes: an ``RNNModel``, or a ``TransformerModel`` for ``model_type='Transformer'``."""
    if config.model_type == TRANSFORMER:
        return TransformerModel(config)
    return RNNModel(config)


def unwrap(model: nn.Module) -> WordModel:
    """The ``WordModel`` inside ``torch.compile``'s and DistributedDataParallel's wrappers (or ``model`` itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph behind the hidden state.

    Truncated BPTT carries the state from one chunk to the next, but gradients must stop at the chunk
    boundary; without this, backward would run through the whole history of the epoch.
    """
    return map_hidden(torch.Tensor.detach, hidden)
