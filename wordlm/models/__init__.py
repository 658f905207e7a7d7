"""The models, by ``model_type``: the one place the package chooses between them.

The model layer (``wordlm.models``): ``word_model`` (the base class and its config), ``rnn`` and ``transformer``
(the two kinds), ``decoder`` (full or adaptive softmax), ``fused`` (its CPU loss kernels), ``regularize`` and
``hidden``. It imports nothing above it: only its own modules and the leaf ``wordlm.files`` (and, inside one
function of ``fused``, the cache folder of ``wordlm.data.cache``); never training, tracking or Sacred.

Main names: ``build_model`` (the model a ``ModelConfig`` describes), ``unwrap`` and ``detach_hidden``; and, so
that the rest of the package imports them from one place, ``ModelConfig``, ``MODEL_TYPES``, ``TRANSFORMER`` and
``WordModel`` (``wordlm.models.word_model``: the type of any wordlm model), ``RNNModel`` (``wordlm.models.rnn``) and
``TransformerModel`` (``wordlm.models.transformer``). Both models hold the decoder of ``wordlm.models.decoder``. Must
not import Sacred.
"""

from __future__ import annotations

import torch
from torch import nn

from wordlm.models.hidden import Hidden, map_hidden
from wordlm.models.rnn import RNNModel
from wordlm.models.transformer import TransformerModel
from wordlm.models.word_model import MODEL_TYPES, TRANSFORMER, ModelConfig, WordModel

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
