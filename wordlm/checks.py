"""Checks of values shared by the Python API and the command line, each raising one ``UserError`` line.

Lives here: ``check_positive_int``, ``check_seed``, ``check_checkpoint_path``, ``check_readable_path``,
``path_problem`` and ``resolve_device``. Must not import Sacred: ``wordlm.experiment`` turns a ``UserError``
into its one-line ``error``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from wordlm.errors import UserError


def check_positive_int(key: str, value, allow_none: bool = False) -> None:
    """``value`` a positive ``int`` (``None`` too where allowed), else one line naming ``key``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r} must be a positive integer" + (" or None" if allow_none else ""))


def check_seed(seed) -> None:
    """A seed numpy accepts (the command line seeds random, numpy and torch with it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} must be an integer from 0 to 2**32 - 1 (numpy's range), e.g. seed=257")


def check_checkpoint_path(checkpoint) -> str:
    """The checkpoint path as a ``str`` (a path-like is accepted), or one line when it is no path at all."""
    if isinstance(checkpoint, os.PathLike):
        checkpoint = os.fspath(checkpoint)
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise UserError(f"checkpoint={checkpoint!r} must be a checkpoint file path, e.g. checkpoint=model.pt")
    return checkpoint


def path_problem(problem: OSError) -> str:
    """Why a path cannot be used, in words a user can act on."""
    if problem.errno == errno.ELOOP:
        return "it is a symbolic link loop (a link that leads back to itself); point it at a real file or folder"
    if problem.errno == errno.ENAMETOOLONG:
        return "the path is longer than this system allows (255 bytes a name, 4096 a path on Linux); shorten it"
    return problem.strerror or str(problem)


def check_readable_path(key: str, path) -> None:
    """A path that cannot even be looked at (a symbolic link loop, a name too long) is one line, before any work.

    A missing path passes: what reads it says what is missing.
    """
    try:
        os.stat(Path(str(path)).expanduser())
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as problem:
        raise UserError(f"cannot read {key}={str(path)!r}: {path_problem(problem)}") from None


def resolve_device(device: str) -> torch.device:
    """Turn the ``device`` key into a torch device, refusing ones this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} asks for CUDA, which this machine lacks; use device=cpu or device=auto")
    return chosen
