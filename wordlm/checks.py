"""Checks of values shared by the Python API and the command line, each raising one ``UserError`` line.

Main names: ``check_int``, ``check_positive_int``, ``check_positive_number``, ``check_number_in``,
``check_within_float32``, ``check_seed``, ``check_checkpoint_path``, ``check_readable_path``, ``check_path``,
``check_output`` and ``write_output`` (every output path, by the one policy of ``wordlm.files``), ``path_problem`` and
``resolve_device``. Must not import Sacred: ``wordlm.experiment`` turns a ``UserError`` into its one-line ``error``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import tempfile
from pathlib import Path

import torch

from wordlm.errors import UserError
from wordlm.files import atomic_file, output_kind, same_file, write_target, write_through

__all__ = [
    "check_int", "check_positive_int", "check_within_float32", "check_positive_number", "check_number_in",
    "check_seed", "check_checkpoint_path", "path_problem", "check_readable_path", "check_path", "Output",
    "check_output", "standard_stream", "write_output", "resolve_device"
]  # fmt: skip


def check_int(key: str, value, low: int = 1, allow_none: bool = False, hint: str = "") -> None:
    """``value`` an ``int`` (not a ``bool``) of at least ``low`` (``None`` too where allowed), else one line naming
    ``key``, with ``hint`` (what a value means) in brackets: the one rule for every integer key."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
        what = f"None or {what}" if allow_none and low != 1 else what + (" or None" if allow_none else "")
        raise UserError(f"{key}={value!r} must be {what}" + (f" ({hint})" if hint else ""))


def check_positive_int(key: str, value, allow_none: bool = False) -> None:
    """``value`` a positive ``int`` (``None`` too where allowed), else one line naming ``key``."""
    check_int(key, value, 1, allow_none)


_FLOAT32 = torch.finfo(torch.float32)  # what the weights, and so every number multiplied into them, can hold


def check_within_float32(key: str, value) -> None:
    """A number float32 holds (0, or between its smallest normal and its largest), else one line naming ``key``."""
    if value > _FLOAT32.max or 0 < value < _FLOAT32.smallest_normal:
        raise UserError(
            f"{key}={value!r} is beyond what float32 holds ({_FLOAT32.smallest_normal:.3g} to {_FLOAT32.max:.3g}): "
            "the training math would turn it into inf or 0; give a value in that range"
        )


def check_positive_number(key: str, value, allow_none: bool = False) -> None:
    """``value`` a positive, finite number that float32 holds (``None`` too where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{key}={value!r} must be a positive, finite number" + (" or None" if allow_none else ""))
    check_within_float32(key, value)


def check_number_in(key: str, value, low: float = 0.0, high: float = float("inf"), integer: bool = False) -> None:
    """``low <= value <= high`` (``high`` excluded when infinite), else one line saying so."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high or value == float("inf"):
        what = "an integer" if integer else "a number"
        bounds = f">= {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
        raise UserError(f"{key}={value!r} must be {what} {bounds}")
    if not integer:
        check_within_float32(key, value)


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


def check_path(key: str, value, example: str = "model.pt") -> None:
    """``value`` a non-empty path string that is not a folder, else one line naming ``key``."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key}={value!r} must be a file path (a non-empty string)")
    if os.path.isdir(value):
        raise UserError(f"{key}={value!r} is a folder; give a file path such as {os.path.join(value, example)}")


@dataclasses.dataclass(frozen=True)
class Output:
    """An output path, checked: ``kind`` is "file" (written atomically, through symbolic links), "stdout" or
    "stderr" (this process's own: ``-``, ``/dev/stdout``) or "special" (a device or FIFO, written into as it is)."""

    key: str
    path: str
    kind: str


def check_output(key: str, path, example: str = "out.txt", text: bool = True, inputs: tuple = ()) -> Output:
    """Check an output path before any work, by the one policy of ``wordlm.files``, and make its folder.

    Args:
        key: the config key, named in the error.
        path: its value.
        example: a file name the error suggests.
        text: a text output may be a device, FIFO or this process's stdout (written into); a binary one may not.
        inputs: ``(what, path)`` of the files this command reads: an output that is one of them is refused.

    Raises:
        UserError: one line saying why ``path`` cannot be written and what to give instead.
    """
    check_path(key, path, example=example)
    shown = f"{key}={str(path)!r}"
    try:
        kind = output_kind(path)
        target = write_target(path) if kind in ("new", "file") else Path(path)
    except NotADirectoryError:
        blocking = next((folder for folder in Path(path).parents if folder.is_file()), Path(path).parent)
        raise UserError(f"cannot write {shown}: {blocking} is a file, not a folder") from None
    except OSError as problem:
        raise UserError(f"cannot write {shown}: {path_problem(problem)}") from None
    for what, source in inputs:
        if source is not None and same_file(path, source):
            raise UserError(f"{shown} is the same file as {what}, which this command reads; write {key} elsewhere")
    stream = standard_stream(path) if text and kind != "new" else None
    if stream:  # /dev/stdout, even when it is a file the shell opened: written into, never renamed over
        return Output(key, str(path), stream)
    if kind in ("new", "file"):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"cannot write {shown}: {target.parent} is a file, not a folder") from None
        except OSError as problem:
            raise UserError(f"cannot write {shown}: {path_problem(problem)}") from None
        if not _can_create_in(target.parent):  # tried, not os.access: root may "write" where nothing can be made
            raise UserError(f"cannot write {shown}: its folder {target.parent} is not writable")
        return Output(key, str(path), "file")
    if text and kind in ("a character device", "a FIFO", "a socket"):
        return Output(key, str(path), "special")
    allowed = "" if text else " (it is written to a temporary file, then renamed into place)"
    raise UserError(f"{shown} is {kind}, not a file; {key} must name a file{allowed}, such as {example}")


def standard_stream(path) -> str | None:
    """The name "stdout" or "stderr" when ``path`` is where this process's stdout or stderr goes (``/dev/stdout``)."""
    for name in ("stdout", "stderr"):
        try:
            if os.path.samestat(os.stat(path), os.fstat(getattr(sys, name).fileno())):
                return name
        except (OSError, ValueError, AttributeError):
            continue
    return None


def write_output(output: Output, text: str) -> None:
    """Write ``text`` whole or not at all (an earlier file of that name stays until the new one is complete);
    into this process's stdout, a device or a FIFO as it is."""
    if output.kind in ("stdout", "stderr"):
        stream = getattr(sys, output.kind)
        stream.write(text)
        stream.flush()
        return
    try:
        if output.kind == "special":
            write_through(output.path, text.encode("utf-8"))
        else:
            with atomic_file(output.path) as stream:
                stream.write(text.encode("utf-8"))
    except OSError as problem:
        reason = "no process reads that FIFO; start its reader first" if problem.errno == errno.ENXIO else None
        raise UserError(f"cannot write {output.key}={output.path!r}: {reason or path_problem(problem)}") from None


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


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (made and removed at once), as an atomic write will."""
    try:
        descriptor, name = tempfile.mkstemp(prefix=".wordlm-probe-", dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(name)
    return True
