"""Files that appear whole or not at all.

Lives here: ``atomic_file``. Must not import Sacred or any other ``wordlm`` module.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a hidden temporary file in the same folder, renamed over it at the end.

    The temporary file is flushed to disk before the rename, and the folder after it, so a reader, or
    a crash at any moment, sees the previous ``path`` (or none) or the complete new one. When the block raises, the
    temporary file is deleted and ``path`` is left as it was: a check that fails inside the block
    (a wrong checksum, say) keeps what was written from ever looking valid.

    Args:
        path: the file to write.
        mode: its permissions (a temporary file starts private to its owner).

    Yields:
        The temporary file, open for binary writing.

    Raises:
        OSError: the folder is not writable, or the disk is full.
    """
    path = Path(path)
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
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # some file systems cannot sync a folder; the file itself is safe
        pass
