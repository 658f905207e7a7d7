"""Corpora as token ids, and the batch layout of truncated backpropagation through time.

Main names: ``Vocabulary``, ``Corpus``, ``TokenizedCorpus``, ``tokenize_file``, ``tokenize_text``, ``tokenize_corpus``,
``load_corpus``, ``restrict_vocabulary``, ``batchify``, ``batchify_eval`` and ``get_batch``. Must not import Sacred or
any other ``wordlm`` module but ``errors``.

Tokens follow the convention of PyTorch's word_language_model example: a file's lines are those
Python's universal newlines give (LF, CRLF or a lone CR ends a line, and a last line without one
still counts); a line's tokens are ``line.split()`` followed by one ``<eos>``; every line counts,
blank ones too. A UTF-8 byte-order mark opening a file is dropped. Unlike the example, the
vocabulary comes from the training split alone; words of valid/test that train lacks become
``<unk>`` (added to the vocabulary when needed), and how many there were is reported.

Shape letters used in comments: ``N`` tokens in a split, ``V`` vocabulary size, ``T`` chunk length
(<= bptt), ``B`` batch.
"""

from __future__ import annotations

import array
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wordlm.checks import check_int
from wordlm.errors import UserError

__all__ = [
    "EOS", "UNK", "SPLITS", "Vocabulary", "Corpus", "TokenizedCorpus", "tokenize_file", "tokenize_text",
    "check_vocabulary_options", "restrict_vocabulary", "corpus_paths", "tokenize_corpus", "load_corpus", "batchify",
    "get_batch", "batchify_eval"
]  # fmt: skip

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
_CHUNK_BYTES = 1 << 22  # text is tokenized 4 MiB at a time, so memory stays bounded at any corpus size
_BOM = b"\xef\xbb\xbf"
_COUNT_SLICE = 1 << 24  # ids counted 16M at a time


class Vocabulary:
    """A bijection between words and ids, ids given in order of first appearance."""

    def __init__(self, words: list[str] | None = None) -> None:
        self.idx2word: list[str] = []
        self.word2idx: dict[str, int] = {}
        for word in words or []:
            self.add(word)

    @classmethod
    def from_words(cls, words: list[str]) -> Vocabulary:
        """Build a vocabulary from distinct words listed in id order, without a call per word.

        Raises:
            ValueError: a word is listed twice.
        """
        vocab = cls()
        vocab.idx2word = list(words)
        vocab.word2idx = {word: index for index, word in enumerate(vocab.idx2word)}
        if len(vocab.word2idx) != len(vocab.idx2word):
            raise ValueError("the word list repeats a word")
        return vocab

    def add(self, word: str) -> int:
        """Return the id of ``word``, adding it if it is new."""
        index = self.word2idx.get(word)
        if index is None:
            index = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return index

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def encode(self, words: list[str]) -> list[int]:
        """Map words to ids; unknown words map to ``<unk>`` when the vocabulary has it, else raise KeyError."""
        unk = self.word2idx.get(UNK)
        ids = []
        for word in words:
            index = self.word2idx.get(word, unk)
            if index is None:
                raise KeyError(word)
            ids.append(index)
        return ids

    def decode(self, ids) -> list[str]:
        """Map ids (any iterable of ints) back to words."""
        return [self.idx2word[int(i)] for i in ids]


@dataclass
class Corpus:
    """Three splits of token ids (1-D int64 tensors) and the training vocabulary.

    The ids are int64 because ``cross_entropy`` takes its targets as int64; tokenizing and the
    cache keep them as int32 (``TokenizedCorpus``), half the memory.
    """

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    unknown_counts: dict[str, int] = field(default_factory=dict)  # split -> tokens mapped to <unk>

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UserError(f"split={name!r} is not a split; use one of {', '.join(SPLITS)}")
        return getattr(self, name)


@dataclass
class TokenizedCorpus:
    """A corpus as ``tokenize_corpus`` makes it and the cache stores it: compact ids and file digests."""

    vocab: Vocabulary
    arrays: dict[str, np.ndarray]  # split -> (N,) int32 ids
    unknown_counts: dict[str, int]  # split -> tokens mapped to <unk>
    sha256: dict[str, str]  # split -> SHA-256 (hex) of the file's bytes, as read while tokenizing

    def to_corpus(self) -> Corpus:
        """Widen the ids to the int64 tensors of a ``Corpus``."""
        tensors = {split: torch.from_numpy(self.arrays[split]).long() for split in SPLITS}  # (N,) each
        return Corpus(vocab=self.vocab, unknown_counts=dict(self.unknown_counts), **tensors)


def _line_breaks(data: bytes) -> int:
    """Count the lines that end in ``data``: LF, CRLF and a lone CR each end one."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _cut_point(data: bytes) -> int:
    """Where to cut ``data`` so that the head ends on whitespace: 0 when it holds none.

    After the last LF when there is one (whole lines), else after the last space, tab or lone CR; a
    CR that ends ``data`` is never a cut, since the LF of its CRLF may come in the next read. These
    are one-byte characters in UTF-8, so no word, character or CRLF is ever cut in two.
    """
    cut = data.rfind(b"\n") + 1
    if cut == 0:
        cut = max(data.rfind(b" "), data.rfind(b"\t"), data.rfind(b"\r", 0, len(data) - 1)) + 1
    return cut


def _decode(data: bytes, path: Path, line_number: int) -> str:
    """Decode UTF-8 and turn CRLF and lone CR into LF; ``line_number`` is that of ``data``'s first line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as problem:
        bad_line = line_number + _line_breaks(data[: problem.start])
        raise UserError(
            f"{path}: line {bad_line} is not valid UTF-8 (byte {data[problem.start]:#04x}); "
            "convert the file to UTF-8, e.g. with iconv -f latin1 -t utf-8"
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _text_pieces(path: Path, chunk_bytes: int = _CHUNK_BYTES, digest=None) -> Iterator[str]:
    """Yield a UTF-8 file's text in pieces of about ``chunk_bytes`` that end on whitespace, lines ending in LF.

    Read piece by piece, a file of any size (even one long line) takes bounded memory. The last piece
    ends with LF, so a last line without a line break still counts. Every byte read is also fed to
    ``digest`` (a ``hashlib`` object) when one is given.

    Raises:
        UserError: bytes that are not UTF-8, naming the file and the line.
    """
    line_number = 1  # the line that ``leftover`` starts on
    at_line_start = True  # whether the text yielded so far ends a line
    with open(path, "rb") as handle:
        leftover = handle.read(len(_BOM))
        if digest is not None:
            digest.update(leftover)
        if leftover == _BOM:
            leftover = b""
        while True:
            block = handle.read(chunk_bytes)
            if digest is not None:
                digest.update(block)
            data = leftover + block
            if not block:  # end of file: a last line counts even without a line break
                tail = _decode(data, path, line_number)
                if tail or not at_line_start:
                    yield tail if tail.endswith("\n") else tail + "\n"
                return
            cut = _cut_point(data)
            piece, leftover = data[:cut], data[cut:]
            if piece:
                text = _decode(piece, path, line_number)
                yield text
                at_line_start = text.endswith("\n")
                line_number += _line_breaks(piece)


def _words(text: str) -> list[str]:
    """Split text into words, each line's words followed by ``<eos>``."""
    return text.replace("\n", f" {EOS} ").split()


def tokenize_file(
    path: Path, vocab: Vocabulary, grow: bool, chunk_bytes: int = _CHUNK_BYTES, digest=None
) -> tuple[np.ndarray, int]:
    """Tokenize a text file in one pass, in bounded memory.

    Args:
        path: a UTF-8 text file.
        vocab: ids come from here; when ``grow`` new words are added, else they map to ``<unk>``
            (which is added to ``vocab`` the first time it is needed).
        grow: whether unseen words extend the vocabulary (the training split) or not.
        chunk_bytes: how much of the file to read at a time.
        digest: a ``hashlib`` object fed every byte read, if given.

    Returns:
        ``(ids, unknown)``: the ``(N,)`` int32 ids, and how many tokens became ``<unk>``.

    Raises:
        UserError: the file is not UTF-8 (the message names the line).
    """
    return _tokenize_pieces(_text_pieces(path, chunk_bytes, digest), vocab, grow)


def tokenize_text(text: str, vocab: Vocabulary) -> tuple[np.ndarray, int]:
    """Tokenize ``text`` exactly as ``tokenize_file`` reads a UTF-8 file holding it, never growing ``vocab``.

    Words ``vocab`` lacks map to ``<unk>``, added to ``vocab`` the first time it is needed.

    Returns:
        ``(ids, unknown)``: the ``(N,)`` int32 ids, and how many tokens became ``<unk>``.
    """
    text = text.removeprefix(_BOM.decode("utf-8")).replace("\r\n", "\n").replace("\r", "\n")
    return _tokenize_pieces([text if not text or text.endswith("\n") else text + "\n"], vocab, grow=False)


def _tokenize_pieces(pieces: Iterable[str], vocab: Vocabulary, grow: bool) -> tuple[np.ndarray, int]:
    """``tokenize_file``'s work on text already read: pieces that each end on whitespace."""
    ids = array.array("i")  # 4 bytes a token; no Python list of all tokens is ever built
    unknown = 0
    if grow:
        # defaultdict calls len(mapping) for a missing word: the next free id, in first-seen order.
        mapping = defaultdict(None, vocab.word2idx)
        mapping.default_factory = mapping.__len__
        for text in pieces:
            ids.extend(map(mapping.__getitem__, _words(text)))
        for word, index in mapping.items():
            if index >= len(vocab):
                vocab.idx2word.append(word)
                vocab.word2idx[word] = index
    else:
        lookup = vocab.word2idx
        for text in pieces:
            chunk = [lookup.get(word, -1) for word in _words(text)]
            misses = chunk.count(-1)
            if misses:
                unk = vocab.add(UNK)
                chunk = [unk if index < 0 else index for index in chunk]
                unknown += misses
            ids.extend(chunk)
    return np.frombuffer(ids, dtype=np.int32), unknown  # shares the array's memory: no copy


def check_vocabulary_options(min_freq: int, max_vocab: int | None) -> None:
    """Refuse a ``min_freq`` or ``max_vocab`` that cannot work, with one line saying why."""
    check_int("min_freq", min_freq, 1, hint="1 keeps every word of train.txt")
    check_int("max_vocab", max_vocab, 2, allow_none=True, hint="room for <eos> and <unk>")


def restrict_vocabulary(
    vocab: Vocabulary, train: np.ndarray, min_freq: int = 1, max_size: int | None = None
) -> tuple[Vocabulary, np.ndarray | None]:
    """Drop the words seen fewer than ``min_freq`` times, then all but the ``max_size`` most frequent.

    ``<eos>`` and ``<unk>`` are always kept, and ``max_size`` counts them. Ties in frequency go to the
    word seen first. Kept words keep their order; ``<unk>`` keeps its place when train has it, else it
    comes last (and only when a word was dropped).

    Args:
        vocab: the vocabulary of ``train``.
        train: ``(N,)`` ids of the training split.
        min_freq: the fewest times a word must occur in ``train`` to be kept.
        max_size: the largest vocabulary to keep (None: no limit).

    Returns:
        ``(vocabulary, remap)``: the new vocabulary and a ``(V,)`` int32 array from old ids to new
        ones; ``(vocab, None)`` when every word is kept.
    """
    counts = np.zeros(len(vocab), dtype=np.int64)  # (V,)
    for start in range(0, train.size, _COUNT_SLICE):  # bincount widens ids to int64: a slice at a time
        counts += np.bincount(train[start : start + _COUNT_SLICE], minlength=len(vocab))
    keep = counts >= min_freq  # (V,)
    always = [vocab.word2idx[word] for word in (EOS, UNK) if word in vocab]
    keep[always] = True
    if max_size is not None and np.count_nonzero(keep) > max_size:
        room = max_size - len(always) - (UNK not in vocab)
        ranked = np.argsort(-counts, kind="stable")  # most frequent first; ties by first appearance
        ranked = ranked[keep[ranked] & ~np.isin(ranked, always)]
        keep[:] = False
        keep[always] = True
        keep[ranked[:room]] = True
    if keep.all():
        return vocab, None
    new = Vocabulary.from_words([word for word, kept in zip(vocab.idx2word, keep, strict=True) if kept])
    remap = np.full(len(vocab), new.add(UNK), dtype=np.int32)  # (V,) dropped words -> <unk>
    remap[keep] = np.arange(np.count_nonzero(keep), dtype=np.int32)  # kept words, in order
    return new, remap


def corpus_paths(folder: str | os.PathLike) -> dict[str, Path]:
    """Return ``{split: folder/split.txt}``, or raise ``UserError`` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"dataset folder {folder} does not exist; point dataset= at a folder with train.txt, valid.txt and test.txt"
        )
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise UserError(f"{path} is missing; a corpus folder needs train.txt, valid.txt and test.txt")
    return paths


def _check_words(path: Path, ids: np.ndarray, vocab: Vocabulary, unknown: int) -> None:
    """Refuse a split without words, or one whose every word became ``<unk>``."""
    words = ids.size - (np.count_nonzero(ids == vocab.word2idx[EOS]) if EOS in vocab else 0)
    if words == 0:
        raise UserError(f"{path} has no words; every split needs some text")
    if unknown == words:
        raise UserError(
            f"{path}: every word is unknown to train.txt's vocabulary; "
            "is it the same language and tokenization as train.txt?"
        )


def tokenize_corpus(folder: str | os.PathLike, min_freq: int = 1, max_vocab: int | None = None) -> TokenizedCorpus:
    """Tokenize ``folder/{train,valid,test}.txt`` with a vocabulary built from train alone.

    Args:
        folder: the corpus folder.
        min_freq: words of train seen fewer times become ``<unk>``.
        max_vocab: keep at most this many words, the most frequent (None: all).

    Returns:
        The vocabulary, ``{split: (N,) int32 ids}``, how many tokens of each split became ``<unk>``
        (train counts only when a limit dropped words), and the SHA-256 of each file as read.

    Raises:
        UserError: a missing folder or split, a split without words, bytes that are not UTF-8, or a
            valid/test split in which no word is known to train.
    """
    check_vocabulary_options(min_freq, max_vocab)
    paths = corpus_paths(folder)
    digests = {split: hashlib.sha256() for split in SPLITS}
    full = Vocabulary()
    train, _ = tokenize_file(paths["train"], full, grow=True, digest=digests["train"])
    _check_words(paths["train"], train, full, unknown=0)
    vocab, remap, unknown = full, None, {}
    if min_freq > 1 or (max_vocab is not None and len(full) > max_vocab):
        vocab, remap = restrict_vocabulary(full, train, min_freq, max_vocab)
    if remap is not None:
        had_unk = np.count_nonzero(train == full.word2idx[UNK]) if UNK in full else 0
        np.take(remap, train, out=train, mode="clip")  # in place: ids are in range, so "clip" never clips
        unknown["train"] = int(np.count_nonzero(train == vocab.word2idx[UNK]) - had_unk)
    arrays = {"train": train}
    for split in ("valid", "test"):
        arrays[split], unknown[split] = tokenize_file(paths[split], vocab, grow=False, digest=digests[split])
        _check_words(paths[split], arrays[split], vocab, unknown[split])
    return TokenizedCorpus(vocab, arrays, unknown, {split: digest.hexdigest() for split, digest in digests.items()})


def load_corpus(folder: str | os.PathLike, min_freq: int = 1, max_vocab: int | None = None) -> Corpus:
    """Tokenize a corpus folder (see ``tokenize_corpus``) into int64 tensors, without any cache."""
    return tokenize_corpus(folder, min_freq, max_vocab).to_corpus()


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay a 1-D id sequence out in ``batch_size`` columns, dropping the remainder.

    Starting from the alphabet with batch_size 4 gives these columns, each one read top to bottom
    as a contiguous stream; the hidden state of column j is carried through column j only::

        ┌ a g m s ┐
        │ b h n t │
        │ c i o u │
        │ d j p v │
        │ e k q w │
        └ f l r x ┘

    The last two letters (y, z) do not fill a row and are dropped.

    Returns:
        A ``(N // batch_size, batch_size)`` tensor.
    """
    rows = ids.size(0) // batch_size
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()  # (N/B, B)


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut rows ``i .. i+bptt`` of a batchified source into inputs and next-token targets.

    With bptt 2 and the columns of ``batchify``, ``i = 0`` gives::

        inputs   ┌ a g m s ┐   targets  ┌ b h n t ┐
                 └ b h n t ┘            └ c i o u ┘

    The last chunk is shorter when fewer rows remain.

    Returns:
        ``(inputs, targets)``, each ``(T, B)`` with ``T = min(bptt, rows - 1 - i)``.
    """
    length = min(bptt, source.size(0) - 1 - i)
    return source[i : i + length], source[i + 1 : i + 1 + length]


def batchify_eval(ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lay ids out for evaluation so that every token but the first is a target exactly once.

    ``batchify`` never scores the first row (it is only ever an input), so each column's first token
    goes unscored. Here column j starts on the last token of column j-1 instead: with the alphabet
    and batch_size 4 (25 targets, 6 per column)::

        ┌ a g m s ┐
        │ b h n t │
        │ c i o u │     targets are rows 1..6: b..g, h..m, n..s, t..y
        │ d j p v │     the one target left over (z, after y) comes back as the tail
        │ e k q w │     column ``[y z]``, scored with a fresh hidden state
        │ f l r x │
        └ g m s y ┘

    Returns:
        ``(columns, tail)``: a ``(N-1)//B + 1, B)`` view (``None`` when that is empty) and a
        ``(K, 1)`` tail of the targets that do not fill a row (``None`` when there are none).
    """
    targets = ids.size(0) - 1
    rows = targets // batch_size
    columns = ids.as_strided((rows + 1, batch_size), (1, rows)) if rows > 0 else None
    start = rows * batch_size
    tail = ids[start:].view(-1, 1) if start < targets else None
    return columns, tail
