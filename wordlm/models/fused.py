"""The decoder and its cross-entropy as one operation, for CPUs: same math, less time and memory.

Main names: ``linear_cross_entropy`` (training, with autograd), ``linear_nll_sum`` (evaluation) and
``fused_dtype`` (whether this path serves a call, and in which dtype). Must not import Sacred. Nothing is
computed at import: the run-time state (the switch that turns the path off, the matrix-product libraries and
their choice) is ``BACKEND``, filled in at first use.

Why: on a CPU, the classic path (``Linear`` → ``log_softmax`` → ``nll_loss``) spends about half of a
training step outside the decoder's matrix products: it materialises log-probabilities, zero-fills a
fresh vocabulary-sized gradient, broadcasts the bias, and maps fresh ~100 MB buffers every step. Here:

- logits are computed transposed, ``(V, N) = W @ hᵀ``, the layout in which the decoder's products
  run at the machine's matmul speed; ``h @ Wᵀ`` with these shapes runs at about 60 % of it;
- each product runs on whichever of torch's two float32 libraries is the faster for it on this CPU
  (``matmul_nt``, backend 'auto'): oneDNN, where torch has it, or ``torch.mm``'s BLAS (MKL), the same
  arithmetic. Which one depends on the CPU and the shapes (on the project's AMD EPYC oneDNN throughout,
  on its Intel Xeon MKL for the grad of h and for evaluation's logits), so both are timed on the first
  products of each shape class and the faster is kept, and remembered for the machine (``Backend``);
- the logits are computed one vocabulary chunk at a time, already shifted: the product runs over the
  weight with the bias and a column of ones appended, ``[W·log2(e) | b·log2(e) | 1]``, against
  ``[h | 1 | -s·log2(e)]``, so it yields ``(logit - s) · log2(e)`` with ``s`` the log-sum-exp of the
  chunks before, and ``exp2`` (about three times cheaper than ``exp`` here) turns the chunk into
  ``exp(logit - s)`` in place. No bias broadcast, no max pass, no subtraction pass, and one check per
  call, not per chunk: if some chunk's sum shows that ``s`` was too low (a new dominant word), every
  chunk is computed again with its own maximum. Each chunk keeps its exponentials, so the backward
  pass needs no other ``exp``;
- the backward pass feeds one chunk at a time to the products, then frees it. The softmax is
  ``block · factor``, with one factor per chunk and column, and a per-column factor commutes with the
  products: it scales their small sides (``[hᵀ; 1]``, and each chunk's ``N × H`` share of the grad of
  h), never a block, so there is no pass over the blocks to scale them. The weight gradient's product
  runs against ``[hᵀ; 1]``, so that its last column is the bias gradient (no separate sum); with
  oneDNN the grad of h is summed transposed, as ``Wᵀ · block``, oneDNN's fast form of that product,
  over the weight's chunks transposed in one pass per step (oneDNN would otherwise copy each
  transposed chunk itself, more slowly). The one-hot part of the gradient is a sparse update of the
  target rows. The chunks' blocks (``V × N`` floats in all) and the pooled ``V × (H+2)`` augmented
  weight and ``H × V`` transposed one (in chunks) are the only large buffers; with the allocator setting of
  ``wordlm.system`` the blocks reuse the same heap memory every step;
- evaluation never keeps the logits whole: each chunk of rows is computed, reduced and dropped;
- under ``amp='bf16'`` (CPU autocast to bfloat16) the same path runs its products in bfloat16, whose
  operands autocast would round alike, and keeps its blocks of exponentials and its chunk sums in
  bfloat16, while the shifts, log-sum-exp, softmax factors and gradients stay float32. The grad of h
  is summed transposed there too, over the forward pass's bfloat16 weight seen transposed (no copy).
  On a CPU with AMX the bfloat16 products run about five times faster than float32 ones (twice as
  fast with AVX-512 BF16 alone), and none of autocast's plain path's vocabulary-sized float32
  log-softmax, its gradient and their casts are made.

All figures (chunk sizes, backends) are in docs/PERFORMANCE.md with the commands that measured them.

Shapes: ``N`` tokens (T·B), ``H`` hidden size, ``V`` vocabulary, ``C`` vocabulary chunks.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from wordlm.files import atomic_file

__all__ = [
    "CHUNK", "LOG2E", "LN2", "SUM_LIMIT", "ROLES", "LIBRARIES", "TIMED_ROUNDS", "CHOICES_FILE", "machine",
    "Backend", "BACKEND", "available_backends", "set_backend", "matmul_backend", "set_enabled", "enabled",
    "fused_dtype", "matmul_nt", "linear_cross_entropy", "EVAL_CHUNK", "frozen_decoder", "linear_nll_sum"
]  # fmt: skip

CHUNK = 2048  # vocabulary rows per chunk in training (timed against 256-4096 in docs/PERFORMANCE.md)


class _BufferPool:
    """Reuse the weight-sized buffers (the ``V × (H+2)`` augmented weight, the transposed chunks)
    across steps: a fresh large tensor costs thousands of page faults each time.

    A buffer is taken by a forward or backward pass and given back when that pass is done with it (in
    evaluation, at the end of a ``frozen_decoder`` block), so two passes at the same time never share
    one; one made in inference mode only serves inference mode.
    """

    def __init__(self, keep: int = 4) -> None:
        self.free: list[torch.Tensor] = []
        self.keep = keep
        self.frozen: dict | None = None  # inside ``frozen_decoder``: the augmented weights built so far

    def take(self, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer of ``shape`` on ``like``'s device, of ``dtype`` (default ``like``'s)."""
        dtype = dtype or like.dtype
        inference = torch.is_inference_mode_enabled()  # a buffer made in inference mode cannot serve autograd
        for index, buffer in enumerate(self.free):
            if (
                buffer.shape == shape
                and buffer.dtype == dtype
                and buffer.device == like.device
                and buffer.is_inference() == inference
            ):
                return self.free.pop(index)
        return like.new_empty(shape, dtype=dtype)

    def give(self, buffer: torch.Tensor) -> None:
        self.free.insert(0, buffer)
        del self.free[self.keep :]


_POOL = _BufferPool()


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUM_LIMIT = 2.0**64  # a chunk exp-sum past this (or not finite): the call is redone, each chunk with its own maximum


def _onednn_product():
    """oneDNN's float32 matrix product on plain tensors (``x @ wᵀ``), where this torch build has it.

    ``torch.ops.mkldnn._linear_pointwise`` is the entry point torch's compiler uses, not a public API:
    it is tried once on a small product and left unused (``torch.mm`` serves) if it is missing, fails,
    or disagrees with ``torch.mm``.
    """
    product = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if product is None or not torch.backends.mkldnn.is_available():
        return None
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    b = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 5 - 0.5
    try:
        agrees = torch.allclose(product(a, b, None, "none", [], ""), a @ b.t(), rtol=1e-5, atol=1e-6)
    except (RuntimeError, TypeError):  # an op whose signature changed, or a build without the kernel
        return None
    return product if agrees else None


# The decoder's products, by role: the training forward product ``W·hᵀ`` (kept blocks), the same product
# in evaluation (each block reduced and dropped), the weight gradient's ``block·hᵀ`` and the grad of h's
# ``Wᵀ·block``. Which library runs each one faster depends on the CPU (figures in docs/PERFORMANCE.md).
ROLES = ("logits", "eval_logits", "weight_grad", "hidden_grad")
LIBRARIES = ("onednn", "blas")
TIMED_ROUNDS = 5  # paired rounds per shape class, after one untimed call each (oneDNN builds its kernel then)
CHOICES_FILE = "matmul-choices.json"  # in the cache folder: the choices per machine, so that runs repeat


def _seconds(run: Callable[[], object], library: str, key: str) -> float:
    """Wall time of one call of ``run``, a product by ``library`` in shape class ``key``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine() -> str:
    """What the choice of library depends on: the CPU's model, torch's view of its instructions, the
    torch version and the thread count (the key of the remembered choices)."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            model = next((line.partition(":")[2].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{model or platform.processor() or platform.machine()}; {torch.backends.cpu.get_cpu_capability()}; "
            f"torch {torch.__version__}; {torch.get_num_threads()} threads")  # fmt: skip


_UNPROBED = object()


class Backend:
    """The fused decoder's run-time state, in one object made empty at import (nothing is probed or
    timed until the decoder first runs).

    - ``enabled``: whether the decoder uses the fused path at all (``set_enabled``); off, it computes
      the plain ``cross_entropy`` of the logits;
    - ``name``: which libraries run the float32 products (``set_backend``): 'auto' (the default where
      torch has oneDNN), 'onednn' or 'blas' (``torch.mm``, MKL on x86) throughout;
    - under 'auto', each product's library, chosen per role (``ROLES``) and shape class (each size
      rounded up to a power of two) by timing both libraries on that call's own matrices, the first time
      the class is met: ``TIMED_ROUNDS`` rounds of one product each, back to back; MKL is kept where
      its time over oneDNN's has a median below 1 (a median of paired ratios, which a slow spell of a
      shared machine moves far less than a best or a mean time), else oneDNN. The two compute the same
      float32 arithmetic but round differently in the last bits, so a choice is remembered in the cache
      folder (``CHOICES_FILE``, per ``machine()``; a process that moves to another ``WORDLM_CACHE``
      reads that folder's): every later process on this machine makes the same
      one, and a seed repeats bit for bit (a resumed run included; only two processes that meet a new
      class at the same moment may choose differently).

    Args:
        timer: the seconds one call of a product takes, given the product, its library and its role and
            shape class (tests give fake timings).
        remember: read and write the remembered choices (False: choose in this process only).
    """

    def __init__(self, timer: Callable[[Callable[[], object], str, str], float] = _seconds, remember: bool = True):
        self.enabled = True
        self.timer = timer
        self.remember = remember
        self._name: str | None = None  # None: the first available one
        self._onednn = _UNPROBED
        self._chosen: dict[str, str] | None = None  # shape class -> library, once read
        self._chosen_for: tuple | None = None  # the cache setting (_cache_setting) they were read for

    def onednn(self):
        """oneDNN's product (see ``_onednn_product``), probed on the first call; None where it is unusable."""
        if self._onednn is _UNPROBED:
            self._onednn = _onednn_product()
        return self._onednn

    def available(self) -> tuple[str, ...]:
        """The backends this torch build offers, the default first."""
        return ("auto", "onednn", "blas") if self.onednn() is not None else ("blas",)

    @property
    def name(self) -> str:
        return self._name or self.available()[0]

    @name.setter
    def name(self, name: str) -> None:
        if name not in self.available():
            raise ValueError(
                f"matmul backend {name!r} is not available here; choose one of {', '.join(self.available())}"
            )
        self._name = name

    def library(self, role: str, a: torch.Tensor, b: torch.Tensor) -> str:
        """The library that runs ``a @ bᵀ`` in ``role``: 'onednn' or 'blas' (always 'blas' in bfloat16)."""
        name = self._name or self.available()[0]
        if a.dtype != torch.float32 or name == "blas":
            return "blas"
        if name == "onednn":
            return name
        key = f"{role} {'x'.join(str(1 << (size - 1).bit_length()) for size in (a.size(0), b.size(0), a.size(1)))}"
        chosen = self.choices()
        if key not in chosen:
            chosen[key] = self._faster(key, a, b)
            self._save(key)
        return chosen[key]

    def choices(self) -> dict[str, str]:
        """The library chosen so far (or remembered) for each role and shape class, e.g.
        ``{'logits 2048x2048x256': 'onednn'}`` (rows of ``a`` and of ``b``, and their length, rounded up)."""
        setting = _cache_setting() if self.remember else None
        if self._chosen is None or setting != self._chosen_for:  # (another cache folder: its own choices)
            self._chosen, self._chosen_for = {}, setting
            if self.remember:
                saved = self._read().get(machine(), {})
                self._chosen.update({k: v for k, v in saved.items() if isinstance(k, str) and v in LIBRARIES})
        return self._chosen

    def _faster(self, key: str, a: torch.Tensor, b: torch.Tensor) -> str:
        onednn = self.onednn()
        runs = {"onednn": lambda: onednn(a, b, None, "none", [], ""), "blas": lambda: torch.mm(a, b.t())}
        for run in runs.values():
            run()
        ratios = []  # MKL's time over oneDNN's, one per round: a slow spell of a shared machine hits both alike
        for index in range(TIMED_ROUNDS):
            order = LIBRARIES if index % 2 == 0 else LIBRARIES[::-1]  # neither always runs on the warmer cache
            seconds = {library: self.timer(runs[library], library, key) for library in order}
            ratios.append(seconds["blas"] / max(seconds["onednn"], 1e-9))
        return "blas" if statistics.median(ratios) < 1 else "onednn"

    def _read(self) -> dict:
        try:
            saved = json.loads(_choices_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, unreadable, or not JSON: measured afresh
            return {}
        return saved if isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values()) else {}

    def _save(self, key: str) -> None:
        """Add this machine's choice for ``key`` to the file (merged with what other processes wrote)."""
        if not self.remember:
            return
        saved = self._read()
        saved.setdefault(machine(), {})[key] = self._chosen[key]
        path = _choices_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as stream:
                stream.write(json.dumps(saved, indent=1, sort_keys=True).encode())
        except OSError:  # a read-only cache: the choice holds for this process only
            pass


_CACHE_ENV = "WORDLM_CACHE"  # wordlm.data.cache.CACHE_ENV, not imported here (see _choices_path)


def _cache_setting() -> tuple[str | None, str | None]:
    """What the cache folder, and so the choices file, follows (``cache_folder`` reads these): read for every
    product, so two environment lookups rather than the folder's path (15 us a product)."""
    return os.environ.get(_CACHE_ENV), os.environ.get("HOME")


def _choices_path() -> Path:
    """Where the remembered choices are: ``CHOICES_FILE`` in the corpus cache's folder, looked up when first
    read or written (so that a model, which imports this module, does not import the corpus cache)."""
    from wordlm.data.cache import cache_folder

    return cache_folder() / CHOICES_FILE


BACKEND = Backend()


def available_backends() -> tuple[str, ...]:
    """The matrix-product backends this torch build offers, the default first: ``('auto', 'onednn',
    'blas')`` where torch has a usable oneDNN, else ``('blas',)``."""
    return BACKEND.available()


def set_backend(name: str) -> str:
    """Run the decoder's products with ``name`` (one of ``available_backends()``) from now on; returns
    the one before."""
    previous = BACKEND.name
    BACKEND.name = name
    return previous


@contextmanager
def matmul_backend(name: str) -> Iterator[None]:
    """A block whose decoder products run with ``name`` (see ``set_backend``): for benchmarks and tests."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def set_enabled(on: bool) -> bool:
    """Whether the full softmax (``wordlm.models.decoder``) computes its losses on the CPU with this module (True, the
    default) or as the plain ``cross_entropy`` of the logits (False: for benchmarks and tests); returns the
    setting before."""
    previous, BACKEND.enabled = BACKEND.enabled, bool(on)
    return previous


@contextmanager
def enabled(on: bool) -> Iterator[None]:
    """A block in which the fused path is on or off (see ``set_enabled``)."""
    previous = set_enabled(on)
    try:
        yield
    finally:
        set_enabled(previous)


def fused_dtype(features: torch.Tensor) -> torch.dtype | None:
    """The dtype of this path's products for ``features``, or None where the plain path serves instead.

    float32 outside autocast; bfloat16 under CPU autocast to bfloat16, where this path rounds the operands
    and logits as autocast does and keeps the log-sum-exp and the gradients float32. The plain path under any
    other autocast, and under torch.compile, which fuses it itself, and where ``set_enabled(False)`` turned
    this path off.
    """
    if features.device.type != "cpu" or torch.compiler.is_compiling() or not BACKEND.enabled:
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if features.dtype == torch.float32 else None
    if torch.get_autocast_dtype("cpu") == torch.bfloat16 and features.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return None


def matmul_nt(a: torch.Tensor, b: torch.Tensor, role: str = "logits") -> torch.Tensor:
    """``a @ bᵀ`` (a fresh tensor) for CPU tensors ``a`` (M, K) and ``b`` (N, K) of one dtype, ``a``'s
    rows contiguous (or ``a`` the transposed view of a small matrix), ``b``'s rows or columns contiguous.

    In float32 runs the library chosen for ``role`` (one of ``ROLES``; see ``Backend``): oneDNN's product
    or the BLAS (MKL) one that ``torch.mm`` calls, the same arithmetic. In bfloat16 always ``torch.mm``,
    which hands the product to oneDNN where the CPU supports it (as fast as calling oneDNN directly)
    and computes it anyway where it does not.
    """
    if BACKEND.library(role, a, b) == "onednn":
        return BACKEND.onednn()(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


def _scaled_augmented(weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """``[W·log2(e) | b·log2(e) | 1]`` (V, H+2) of ``dtype`` in a pooled buffer (b = 0 without a bias).
    The last column is exactly 1 in any dtype, so the shift in ``hidden_aug`` enters the product as it
    is stored (``log2(e)`` would round to 1.445 in bfloat16)."""
    vocab, size = weight.shape
    out = _POOL.take((vocab, size + 2), weight, dtype)
    torch.mul(weight, LOG2E, out=out[:, :size])
    if bias is None:
        out[:, size].zero_()
    else:
        torch.mul(bias, LOG2E, out=out[:, size])
    out[:, size + 1].fill_(1.0)
    return out


def _transposed_chunks(weight: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each vocabulary chunk of ``weight`` transposed, ``W[rows]ᵀ`` (H, ≤CHUNK) with its rows contiguous:
    oneDNN's first operand must be so, and copies a transposed view on every call, one chunk at a time
    (slower than this single pass over the weight). Returns the pooled buffer (give it back when done)
    and the chunks, views into it."""
    vocab, size = weight.shape
    full, last = divmod(vocab, CHUNK)
    out = _POOL.take((full + (last > 0), size, CHUNK), weight)
    out[:full].copy_(weight[: full * CHUNK].view(full, CHUNK, size).transpose(1, 2))
    chunks = list(out[:full])
    if last:
        out[full, :, :last].copy_(weight[full * CHUNK :].t())
        chunks.append(out[full, :, :last])
    return out, chunks


def _augmented_hidden(hidden: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``[h | 1 | 0]`` (N, H+2) of ``dtype``; its last column takes the negated shift of each chunk."""
    out = hidden.new_empty(hidden.size(0), hidden.size(1) + 2, dtype=dtype)
    out[:, :-2].copy_(hidden)
    out[:, -2].fill_(1.0)
    out[:, -1].zero_()
    return out


def _exp_chunks(weight_aug, hidden_aug, chunk: int, keep: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``exp(logit - shift)`` of each vocabulary chunk, computed chunk by chunk.

    A chunk's shift is the log-sum-exp of the chunks before it (per column), so that its exponentials
    stay in range without a max pass. If some chunk's sum shows that this shift was too low (a word that
    towers over all the words before it), every chunk is computed again, each shifted by its own maximum.

    Returns:
        ``(shifts, sums, blocks)``: each chunk's shift and its sum of shifted exponentials (C, N), so
        that ``exp(logit) = block · exp(shift)`` and ``log Σ exp(logit) = _logsumexp(shifts, sums)``;
        with ``keep`` the chunks' blocks of exponentials (each ``(≤chunk, N)``), else an empty list.
    """
    shifts, sums, blocks = _exp_chunks_running(weight_aug, hidden_aug, chunk, keep)
    if bool(sums.max() < SUM_LIMIT):  # one check per call, not per chunk (NaN fails it too)
        return shifts, sums, blocks
    return _exp_chunks_own_max(weight_aug, hidden_aug, chunk, keep, shifts, sums)


def _logits_role(keep: bool) -> str:
    """The forward product's role (see ``ROLES``): training keeps its blocks, evaluation drops them."""
    return "logits" if keep else "eval_logits"


def _column_sums(block: torch.Tensor, out: torch.Tensor) -> None:
    """Each column's sum of ``block`` into ``out`` (float32). A bfloat16 block is summed in bfloat16
    (float accumulation, the sum rounded to bfloat16: relative error 2⁻⁹ at most, unbiased), which runs
    four times faster here than asking torch for a float32 sum of it."""
    if block.dtype == torch.float32:
        torch.sum(block, 0, out=out)
    else:
        out.copy_(torch.sum(block, 0))


def _own_max_chunk(weight_rows, hidden_aug, shift, total, role) -> torch.Tensor:
    """One chunk's ``exp(logit - max)``, its maximum per column into ``shift`` and its sum into ``total``;
    ``hidden_aug``'s last column must be zero."""
    block = matmul_nt(weight_rows, hidden_aug, role)  # logit · log2(e)
    shift.copy_(block.amax(0))  # exact: a maximum is one of the block's values
    block.sub_(shift).exp2_()
    _column_sums(block, total)
    shift.mul_(LN2)
    return block


def _exp_chunks_running(weight_aug, hidden_aug, chunk, keep):
    """The fast pass: the first chunk shifted by its own maximum, each later one by the running
    log-sum-exp, which is kept negated (in log2 units) in ``hidden_aug``'s last column, where the product
    picks it up; each chunk's recorded shift is the stored value, rounded as the product sees it."""
    vocab, columns = weight_aug.size(0), hidden_aug.size(0)
    count = (vocab + chunk - 1) // chunk
    shifts = hidden_aug.new_empty(count, columns, dtype=torch.float32)
    sums = hidden_aug.new_empty(count, columns, dtype=torch.float32)
    negated = hidden_aug[:, -1]  # -(log-sum-exp of the chunks so far) · log2(e) (N,)
    negated.zero_()
    role = _logits_role(keep)
    block = _own_max_chunk(weight_aug[:chunk], hidden_aug, shifts[0], sums[0], role)
    negated.copy_(torch.log(sums[0]).add_(shifts[0]).mul_(-LOG2E))
    blocks = [block] if keep else []
    for index, start in enumerate(range(chunk, vocab, chunk), start=1):
        shifts[index].copy_(negated).mul_(-LN2)  # the shift as the product sees it (in its dtype)
        block = matmul_nt(weight_aug[start : start + chunk], hidden_aug, role).exp2_()  # exp(logit - shift)
        _column_sums(block, sums[index])
        negated.sub_(torch.log1p(sums[index]).mul_(LOG2E))
        if keep:
            blocks.append(block)
    return shifts, sums, blocks


def _exp_chunks_own_max(weight_aug, hidden_aug, chunk, keep, shifts, sums):
    """The safe pass: each chunk shifted by its own maximum (one more pass over it)."""
    hidden_aug[:, -1].zero_()
    role = _logits_role(keep)
    blocks = []
    for index, start in enumerate(range(0, weight_aug.size(0), chunk)):
        block = _own_max_chunk(weight_aug[start : start + chunk], hidden_aug, shifts[index], sums[index], role)
        if keep:
            blocks.append(block)
    return shifts, sums, blocks


def _logsumexp(maxima: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Per column ``log Σ exp(logit)`` (N,) from the chunks' shifts and shifted sums (C, N)."""
    top = maxima.amax(0)
    return top + (sums * torch.exp(maxima - top)).sum(0).log()


def _target_logits(hidden, weight, bias, targets) -> torch.Tensor:
    """Each column's logit of its target (N,), computed directly: ``h · W[target] + b[target]``."""
    logits = (hidden * weight[targets]).sum(1)
    return logits if bias is None else logits + bias[targets]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):
        with torch.autocast("cpu", enabled=False):  # every dtype here is explicit
            weight_aug = _scaled_augmented(weight, bias, dtype)
            maxima, sums, blocks = _exp_chunks(weight_aug, _augmented_hidden(hidden, dtype), CHUNK, keep=True)
            logsumexp = _logsumexp(maxima, sums)
            target_logits = _target_logits(hidden.float(), weight, bias, targets)
        if dtype == torch.float32:
            _POOL.give(weight_aug)
            weight_aug = None
        ctx.weight_aug = weight_aug  # bfloat16: the backward pass's grad of h runs over it, then gives it back
        ctx.save_for_backward(hidden, weight, targets, maxima, logsumexp)
        ctx.blocks = blocks  # (≤CHUNK, N) each, of ``dtype``; the backward pass frees them, so it runs once
        ctx.has_bias = bias is not None
        return (logsumexp - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        """d loss / d logits = (softmax - one-hot) · scale, with softmax·scale = block · factor (one factor
        per chunk and column). Each chunk feeds the products unscaled: the factor scales ``[hᵀ; 1]`` for
        the weight and bias gradients, and the chunk's product for the grad of h. The one-hot part
        touches only the target rows, so it is added as a sparse update instead of being written into
        the blocks."""
        hidden, weight, targets, maxima, logsumexp = ctx.saved_tensors
        blocks, ctx.blocks = ctx.blocks, None
        if blocks is None:
            raise RuntimeError("linear_cross_entropy's backward pass ran twice: retain_graph is not supported")
        dtype = blocks[0].dtype  # the products' (float32, or bfloat16 under autocast); factors and grads float32
        weight_aug, ctx.weight_aug = ctx.weight_aug, None  # bfloat16's [W·log2(e) | b·log2(e) | 1]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        scale = grad_loss / targets.numel()
        factors = torch.exp(maxima - logsumexp) * scale  # (C, N): softmax·scale = block · factor of the chunk
        # grad of h = Σ factor · blockᵀ W over the chunks; its fast form is Wᵀ · block, the sum then kept (H, N):
        # in float32 over the weight's transposed chunks (with the role's library; backend 'blas' keeps blockᵀ·W);
        # in bfloat16 over the forward pass's [W·log2(e) | ...] as a transposed view, with no copy
        bfloat16 = weight_aug is not None
        transposed = bfloat16 or BACKEND.name != "blas"
        grad_sum = None
        if need_hidden:
            grad_sum = weight.new_zeros(hidden.shape[::-1] if transposed else hidden.shape)  # float32
        if need_hidden and transposed and not bfloat16:
            weight_t, weight_chunks = _transposed_chunks(weight)  # float32
        grad_weight = torch.empty_like(weight) if need_weight else None  # (V, H)
        grad_bias = weight.new_empty(weight.size(0)) if need_bias else None  # (V,)
        size = hidden.size(1)
        if need_weight or need_bias:  # [hᵀ; 1] (H+1, N) with a bias: the product's last column is its gradient
            hidden_t = hidden.new_empty(size + need_bias, hidden.size(0), dtype=dtype)
            hidden_t[:size].copy_(hidden.t())
            hidden_t[size:].fill_(1.0)
            scaled = torch.empty_like(hidden_t)
        for index, block in enumerate(blocks):
            rows = slice(index * CHUNK, index * CHUNK + block.size(0))
            if need_weight or need_bias:
                scaled_t = torch.mul(hidden_t, factors[index], out=scaled)
                product = matmul_nt(block, scaled_t, "weight_grad")  # (≤CHUNK, H or H+1)
                if need_weight:
                    grad_weight[rows] = product[:, :size]
                if need_bias:
                    grad_bias[rows] = product[:, size]
            if need_hidden and bfloat16:  # ln 2 undoes the weight's log2(e)
                product = torch.mm(weight_aug[rows].t(), block)[:size]  # (H, N)
                grad_sum.addcmul_(product, factors[index], value=LN2)
            elif need_hidden and transposed:
                grad_sum.addcmul_(matmul_nt(weight_chunks[index], block.t(), "hidden_grad"), factors[index])
            elif need_hidden:
                grad_sum.addcmul_(torch.mm(block.t(), weight[rows]), factors[index].unsqueeze(1))
            blocks[index] = None  # its memory is free for the next chunk's products
        if need_hidden and transposed and not bfloat16:
            _POOL.give(weight_t)
        if bfloat16:
            _POOL.give(weight_aug)
        grad_hidden = None if grad_sum is None else grad_sum.t() if transposed else grad_sum  # (N, H)
        minus = -scale  # the one-hot part: -scale at (target, column)
        if need_weight:
            grad_weight.index_add_(0, targets, hidden.float() * minus)
        if need_hidden:
            grad_hidden = grad_hidden.add_(weight[targets] * minus).to(hidden.dtype)
        if need_bias:
            grad_bias.index_add_(0, targets, minus.expand(targets.numel()))
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(hidden @ weightᵀ + bias)`` against ``targets``.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` to float tolerance. With
    ``dtype`` bfloat16 (``amp='bf16'``) the products take bfloat16 operands and give bfloat16 blocks,
    as under autocast, while the log-sum-exp and the gradients stay float32.

    Args:
        hidden: (N, H) features (float32, or bfloat16 from an autocast forward pass).
        weight: (V, H) decoder weight (float32).
        bias: (V,) decoder bias, or None.
        targets: (N,) ids.
        dtype: the products' operand type, float32 or bfloat16.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype)


EVAL_CHUNK = 1024  # vocabulary rows per product in evaluation: one (1024, N) block at a time


@contextmanager
def frozen_decoder() -> Iterator[None]:
    """A block in which the decoder's weights do not change (an evaluation pass): ``linear_nll_sum``
    builds each weight's augmented copy once for the block instead of once per call."""
    if _POOL.frozen is not None:  # nested: the outer block owns the copies
        yield
        return
    _POOL.frozen = {}
    try:
        yield
    finally:
        for weight_aug in _POOL.frozen.values():
            _POOL.give(weight_aug)
        _POOL.frozen = None


def _evaluation_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    frozen = _POOL.frozen
    if frozen is None:
        return _scaled_augmented(weight, bias)
    key = (weight.data_ptr(), tuple(weight.shape), None if bias is None else bias.data_ptr(),
           torch.is_inference_mode_enabled())  # fmt: skip
    if key not in frozen:
        frozen[key] = _scaled_augmented(weight, bias)
    return frozen[key]


@torch.no_grad()
def linear_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` (N,) under the decoder, without autograd.

    Nothing is kept for a backward pass, so the logits are never written out whole: each chunk of
    ``EVAL_CHUNK`` vocabulary rows is computed, reduced and dropped. This also bounds evaluation's
    memory at ``EVAL_CHUNK × N`` floats, whatever the vocabulary.
    """
    weight_aug = _evaluation_weight(weight, bias)
    maxima, sums, _ = _exp_chunks(weight_aug, _augmented_hidden(hidden), EVAL_CHUNK, keep=False)
    if _POOL.frozen is None:
        _POOL.give(weight_aug)
    target_logits = _target_logits(hidden, weight, bias, targets)
    return (_logsumexp(maxima, sums) - target_logits).sum()
