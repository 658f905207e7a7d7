"""Process-level settings that make CPU training fast by default. Must not import Sacred.

glibc serves allocations above its mmap threshold (at most 32 MB by default, adjusted dynamically)
with fresh ``mmap`` pages, and returns them on ``free``: every vocabulary-sized tensor of every step
is then mapped and first-touched again, ~30,000 minor page faults for a 100 MB buffer. Raising the
threshold keeps such buffers in the heap, where the next step reuses them. Users get this without
setting anything (an environment variable such as ``THP_MEM_ALLOC_ENABLE`` would have to be set
before Python starts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Keep allocations below ``mmap_threshold`` bytes in glibc's heap for reuse; True if applied."""
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        applied = applied and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    _TUNED = applied
    return applied
