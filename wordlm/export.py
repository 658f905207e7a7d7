"""One step of a trained model as an ONNX file, for runtimes without PyTorch.

Main names: ``state_names``, ``flatten_state``, ``unflatten_state``, ``export_onnx``, ``check_export_available``.
Must not import Sacred. Needs the optional ``onnx`` extra (``.venv/bin/pip install -e '.[onnx]'`` in the
clone: onnx and onnxscript export, onnxruntime runs the result).

What is exported is one time step with the recurrent state passed in and out, so a caller drives
generation (or scoring) one token at a time, exactly as ``generation.sample_ids`` does:

    inputs   tokens      (B,)      int64, one word id per column
             hidden      (L, B, H) float32, the state (zeros to start)
             cell        (L, B, H) float32, LSTM only: the cell state
    outputs  logits      (B, V)    float32, unnormalised scores of the next word
             hidden_out  (L, B, H) and, LSTM only, cell_out (L, B, H): the state to feed back

A layered model (locked dropout, weight drop, ``tied_projection``) keeps one state per layer, of its own
width: its inputs are ``hidden_0`` (1, B, H_0), ``cell_0`` (LSTM only), ``hidden_1``, ... and its outputs
the same names with ``_out``, layer by layer (``state_names`` lists them in order). The Transformer's
state is its memory, ``hidden_0`` ... ``hidden_{L-1}`` (window - 1, B, E), zeros to start, as for training.

``B`` is dynamic. The model runs in eval mode (no dropout). The file's metadata holds the
vocabulary (``wordlm.vocab``, a JSON list, index = id) and the model config (``wordlm.model_config``),
so the file alone is enough to turn ids back into words.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from wordlm.data.corpus import Vocabulary
from wordlm.errors import UserError
from wordlm.files import atomic_path
from wordlm.models import WordModel
from wordlm.models.hidden import Hidden, map_hidden

__all__ = ["state_names", "flatten_state", "unflatten_state", "export_onnx", "check_export_available"]

_EXPORT_NEEDS = ("onnx", "onnxscript")
_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # each logs every optimisation pass at INFO
_SINGLE_FILE_BYTES = 1 << 30  # ONNX protobufs stop at 2 GiB: larger weights go to a .data file beside it


def state_names(model: WordModel) -> tuple[str, ...]:
    """Names of the state inputs, in order: ``("hidden",)``, ``("hidden", "cell")`` when the state is a
    pair, and for a layered model ``("hidden_0", "cell_0", "hidden_1", ...)``."""
    state = model.init_hidden(1)
    layers = state if isinstance(state, list) else [state]
    per_layer = ("hidden", "cell") if isinstance(layers[0], tuple) else ("hidden",)
    if not isinstance(state, list):
        return per_layer
    return tuple(f"{name}_{layer}" for layer in range(len(layers)) for name in per_layer)


def flatten_state(state: Hidden) -> list[torch.Tensor]:
    """The tensors of a hidden state in ``state_names`` order."""
    tensors = []
    map_hidden(lambda tensor: tensors.append(tensor) or tensor, state)
    return tensors


def unflatten_state(tensors, like: Hidden) -> Hidden:
    """The state of ``like``'s shape (tensor, pair or list of layers) made of ``tensors``, in order."""
    parts = iter(tensors)
    return map_hidden(lambda _: next(parts), like)


class _Step(nn.Module):
    """The model as a function of one token per column and the flattened state."""

    def __init__(self, model: WordModel) -> None:
        super().__init__()
        self.model = model
        self.shape = model.init_hidden(1)  # what the flat state is put back into

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, hidden = self.model(tokens.unsqueeze(0), unflatten_state(state, self.shape))  # (1, B, V)
        return (logits[0], *flatten_state(hidden))


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (deprecation notes, optional-package notices) for one export."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: WordModel, path: str | os.PathLike, vocab: Vocabulary | None = None) -> Path:
    """Write one step of ``model`` (see the module docstring) to ``path`` as ONNX.

    Args:
        model: the model to export; it is copied to the CPU, so the caller's model is not changed.
        path: the ``.onnx`` file to write; its folder is created if needed.
        vocab: stored in the file's metadata when given.

    Returns:
        The path written.

    Raises:
        UserError: the ``onnx`` extra is not installed.
        OSError: the file cannot be written (``path`` a folder, device or FIFO, the disk full); the previous
            file is untouched: the export is written beside it, then renamed into place.
    """
    check_export_available()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = _Step(copy.deepcopy(model).cpu()).eval()
    names = state_names(model)
    example_batch = 2  # not 1: the exporter would fix a batch of 1 as a constant
    state = flatten_state(step.model.init_hidden(example_batch))
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(
            step,
            (torch.zeros(example_batch, dtype=torch.long), *state),
            input_names=["tokens", *names],
            output_names=["logits", *(f"{name}_out" for name in names)],
            dynamic_shapes={"tokens": {0: batch}, "state": tuple({1: batch} for _ in names)},
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props["wordlm.model_config"] = json.dumps(model.config.to_dict())
    if vocab is not None:
        program.model.metadata_props["wordlm.vocab"] = json.dumps(vocab.idx2word, ensure_ascii=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_path(path) as temporary:  # a write cut short leaves the previous file, never half a new one
        program.save(temporary, external_data=weight_bytes > _SINGLE_FILE_BYTES)
    return path


def check_export_available() -> None:
    """Raise ``UserError`` when the ``onnx`` extra is missing: to be asked before training, not after."""
    missing = [name for name in _EXPORT_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed; "
            "run .venv/bin/pip install -e '.[onnx]' in the wordlm clone"
        )
