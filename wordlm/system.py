"""Process-level settings that make CPU training fast by default, and what this CPU can run. Must not
import Sacred.

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
import platform
import sys

import torch

__all__ = ["tune_cpu_allocator", "bfloat16_unavailable", "bfloat16_emulated"]

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


def bfloat16_unavailable() -> str | None:
    """Why ``amp='bf16'`` cannot run on this CPU, or None where it can.

    torch runs bfloat16 through oneDNN, whose bfloat16 kernels need AVX-512 or AMX on x86-64 (the BF16
    extension on aarch64). On a CPU without them its LSTM fails outright ("could not create a primitive
    descriptor for the LSTM forward propagation primitive", seen on an AVX2-only AMD EPYC) and torch
    computes bfloat16 matrix products in a plain loop of its own, several times slower than float32.
    So this asks torch whether oneDNN serves bfloat16 here, and runs a tiny bfloat16 LSTM forward and
    backward pass under CPU autocast, as ``amp='bf16'`` training does (a few milliseconds): a CPU that
    nobody here has seen is measured, not assumed.

    Returns:
        None, or one phrase naming what the CPU lacks and what torch reports about it.
    """
    needs = (
        "AVX-512 or AMX" if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else "the BF16 extension"
    )
    lacks = f"this CPU lacks the {needs} that torch's bfloat16 kernels (oneDNN's) need"
    seen = f"torch reports its instructions as {torch.backends.cpu.get_cpu_capability()}"
    try:
        supported = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an internal op: missing in some builds
        supported = False
    if not supported:
        return f"{lacks} ({seen}; oneDNN has no bfloat16 support here)"
    try:
        lstm = torch.nn.LSTM(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = lstm(torch.randn(3, 2, 8))
        output.float().sum().backward()
    except RuntimeError as failure:
        first = str(failure).split(". ")[0].splitlines()[0] if str(failure) else type(failure).__name__
        return f"{lacks} ({seen}; a bfloat16 LSTM fails: {first})"
    return None


def bfloat16_emulated() -> str | None:
    """Why ``amp='bf16'`` runs slower than float32 on this CPU though it runs, or None where it has bfloat16 arithmetic.

    On x86-64 only AVX-512 BF16 and AMX compute in bfloat16; a CPU with AVX-512 alone (Ice Lake, Cascade Lake)
    converts each operand to float32 and back. Measured on an Ice Lake Xeon (2 cores, WikiText-2, the default
    size): training ran at 0.31x the speed of float32 (benchmarks/speed.py --options bf16, docs/PERFORMANCE.md).
    Elsewhere (aarch64) nothing is assumed: None.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # an internal check: missing in some builds
        return None
    if native:
        return None
    return "this CPU has neither AVX-512 BF16 nor AMX, so bfloat16 is converted to float32 and back at every product"
