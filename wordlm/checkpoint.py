"""Checkpoints as plain data: written atomically, loaded without ever running code from the file.

Lives here: ``save_checkpoint``, ``load_checkpoint``, ``model_from_checkpoint``. Must not import Sacred.

A checkpoint is one ``torch.save`` file holding a dict of tensors, numbers, strings and lists:

    format_version   int, ``FORMAT_VERSION`` of the writer
    model_config     ModelConfig as a dict (rebuilds the model without the corpus)
    model_state      the model's state_dict
    vocab            list of words, index = id
    training         optional: optimizer state, epoch, batch, lr, best loss, RNG states (for resume)
    meta             optional: free-form facts (config, wordlm version, validation loss)

It always loads with ``torch.load(..., weights_only=True)``: a pickle that would build arbitrary
objects (and so could run code) is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from wordlm.data import Vocabulary
from wordlm.errors import UserError
from wordlm.files import atomic_file
from wordlm.model import ModelConfig, RNNModel

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: RNNModel, vocab: Vocabulary, **extra) -> None:
    """Write a checkpoint atomically (``wordlm.files.atomic_file``): a temporary file, fsync, rename.

    A reader (or a crash at any moment) sees either the previous file or the complete new one.
    ``extra`` entries (``training``, ``meta``) are stored beside the model.

    Raises:
        OSError: the write failed (disk full, permission denied); the previous file is untouched.
    """
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": list(vocab.idx2word),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as stream:
        torch.save(payload, stream)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict safely, or raise ``UserError`` with one line saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with `python main.py with save={path}`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise UserError(
            f"{path} was refused: it holds objects other than plain data, which could run code when loaded "
            f"({first[:160]}); only wordlm checkpoints can be loaded"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure to parse means: not a checkpoint
        raise UserError(
            f"{path} is not a readable wordlm checkpoint ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    if not isinstance(payload, dict) or "format_version" not in payload or "model_state" not in payload:
        raise UserError(f"{path} is not a wordlm checkpoint (it holds no format_version/model_state)")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}, newer than this wordlm understands ({FORMAT_VERSION}); "
            "upgrade wordlm to load it"
        )
    return payload


def model_from_checkpoint(payload: dict) -> tuple[RNNModel, Vocabulary]:
    """Rebuild the model (in eval mode) and its vocabulary from a loaded checkpoint."""
    model = RNNModel(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["model_state"])
    model.eval()
    return model, Vocabulary(payload["vocab"])
