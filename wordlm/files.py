"""Files that appear whole or not at all, and what an output path names before anything is written to it.

Main names: ``atomic_file``, ``atomic_path``, ``output_kind``, ``write_through`` and ``same_file``. Must not import
Sacred or any other ``wordlm`` module.

The one policy for every output (checkpoints, text, ONNX, pictures):
- a regular file, or a name not yet taken, is written atomically: a temporary file beside it, renamed over it;
- a symbolic link is written through: the file it finally names gets the new content (atomically, the temporary
  file beside that file), and the link stays a link, as a shell's ``>`` or ``cp`` treat it;
- a character device, FIFO or socket (``/dev/stdout``, a named pipe) is never replaced: text is written into it
  as it is (``write_through``), and a binary output refuses it;
- a folder or a block device is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["output_kind", "write_target", "atomic_file", "atomic_path", "write_through", "same_file"]

_SPECIAL = {stat.S_IFCHR: "a character device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
            stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}  # fmt: skip


def output_kind(path: str | os.PathLike) -> str:
    """What writing ``path`` would meet: ``"new"``, ``"file"``, or ``"a FIFO"``, ``"a folder"``, ... (see ``_SPECIAL``).

    Symbolic links are followed; a dangling one is ``"new"`` (writing creates the file it names).

    Raises:
        OSError: the path cannot be looked at: a symbolic link loop (ELOOP), a name too long (ENAMETOOLONG),
            a folder on the way that is a file (ENOTDIR), no permission.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "new"
    if stat.S_ISREG(mode):
        return "file"
    return _SPECIAL.get(stat.S_IFMT(mode), "no regular file")


def write_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` changes: ``path`` itself, or the file its symbolic links finally name."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath gives up on a loop and returns a link
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    if os.path.exists(path) and not same_file(path, target):  # e.g. a /proc link to a deleted file or a pipe
        raise OSError(errno.EINVAL, "its symbolic link names no file that can be replaced", str(path))
    return target


def _refuse_special(path: Path) -> None:
    kind = output_kind(path)
    if kind not in ("new", "file"):
        raise OSError(errno.EEXIST, f"it is {kind}, not a regular file, and is never replaced", str(path))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a hidden temporary file in the same folder, renamed over it at the end.

    The temporary file is flushed to disk before the rename, and the folder after it, so a reader, or
    a crash at any moment, sees the previous ``path`` (or none) or the complete new one. When the block raises, the
    temporary file is deleted and ``path`` is left as it was: a check that fails inside the block
    (a wrong checksum, say) keeps what was written from ever looking valid. A symbolic link is written through
    (see the module docstring).

    Args:
        path: the file to write.
        mode: its permissions (a temporary file starts private to its owner).

    Yields:
        The temporary file, open for binary writing.

    Raises:
        OSError: the folder is not writable, the disk is full, or ``path`` is a device, FIFO, socket or folder
            (never replaced) or a symbolic link loop.
    """
    _refuse_special(path)
    path = write_target(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name rather than a stream: yield a name to write in a hidden folder beside
    ``path``; at the end, move every file written there beside ``path`` (``path`` itself last), each by a rename.

    A writer that adds files named after its own (ONNX's ``model.onnx.data``) gets them moved too. When the block
    raises, the hidden folder is deleted and ``path`` is left as it was. Symbolic links are written through.

    Raises:
        OSError: as ``atomic_file``.
    """
    _refuse_special(path)
    path = write_target(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield folder / path.name
        written = sorted(folder.iterdir(), key=lambda file: file.name == path.name)  # path itself last
        for file in written:
            with open(file, "rb") as stream:
                os.fsync(stream.fileno())
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:  # make the rename itself durable
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:  # some file systems cannot sync a folder; the file itself is safe
        pass


def write_through(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` into an existing character device, FIFO or socket as it is: no temporary file, no rename.

    Raises:
        OSError: ENXIO for a FIFO that no process reads (rather than waiting for one forever), or the device's
            own error (``/dev/full``: ENOSPC).
    """
    handle = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        os.set_blocking(handle, True)
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view) :]
    finally:
        os.close(handle)


def same_file(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether both paths name one existing file (through links, hard links included); False if either is missing."""
    try:
        return os.path.samefile(path, other)
    except (OSError, ValueError):
        return False
