"""Corpora as token ids, and the batch layout of truncated backpropagation through time.

Lives here: ``Vocabulary``, ``Corpus``, ``tokenize_file``, ``load_corpus``, ``batchify``,
``batchify_eval`` and ``get_batch``. Must not import Sacred or any other ``wordlm`` module but
``errors``.

Tokens follow the convention of PyTorch's word_language_model example: a line's tokens are
``line.split()`` followed by one ``<eos>``; every line counts, blank ones too. Unlike the example,
the vocabulary comes from the training split alone; words of valid/test that train lacks become
``<unk>`` (added to the vocabulary when needed), and how many there were is reported.

Shape letters used in comments: ``N`` tokens in a split, ``T`` chunk length (<= bptt), ``B`` batch.
"""

from __future__ import annotations

import array
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wordlm.errors import UserError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
_CHUNK_BYTES = 1 << 24  # text is tokenized 16 MiB at a time, so memory stays bounded


class Vocabulary:
    """A bijection between words and ids, ids given in order of first appearance."""

    def __init__(self, words: list[str] | None = None) -> None:
        self.idx2word: list[str] = []
        self.word2idx: dict[str, int] = {}
        for word in words or []:
            self.add(word)

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

    def encode(self, words: list[str], unk_ok: bool = True) -> list[int]:
        """Map words to ids; unknown words map to ``<unk>`` when the vocabulary has it."""
        unk = self.word2idx.get(UNK)
        ids = []
        for word in words:
            index = self.word2idx.get(word, unk)
            if index is None or (not unk_ok and word not in self.word2idx):
                raise KeyError(word)
            ids.append(index)
        return ids

    def decode(self, ids) -> list[str]:
        """Map ids (any iterable of ints) back to words."""
        return [self.idx2word[int(i)] for i in ids]


@dataclass
class Corpus:
    """Three splits of token ids (1-D int64 tensors) and the training vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    unknown_counts: dict[str, int] = field(default_factory=dict)  # split -> tokens mapped to <unk>

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UserError(f"split={name!r} is not a split; use one of {', '.join(SPLITS)}")
        return getattr(self, name)


def _text_chunks(path: Path):
    """Yield ``(first_line_number, text)`` for whole-line chunks of a UTF-8 file.

    A UTF-8 byte-order mark is dropped, CRLF and lone CR end lines as in Python's universal newlines,
    and a last line without a newline still counts as a line.
    """
    line_number = 1
    leftover = b""
    first = True
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_CHUNK_BYTES)
            data = leftover + block
            if not block:
                if data:
                    yield line_number, _decode(data, path, line_number, first) + "\n"
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                leftover = data
                continue
            text, leftover = data[:cut], data[cut:]
            yield line_number, _decode(text, path, line_number, first)
            first = False
            line_number += text.count(b"\n")


def _decode(data: bytes, path: Path, line_number: int, first: bool) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_line = line_number + data.count(b"\n", 0, error.start)
        raise UserError(
            f"{path}: line {bad_line} is not valid UTF-8 (byte {data[error.start]:#04x}); "
            "convert the file to UTF-8, e.g. with iconv"
        ) from None
    if first and text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def tokenize_file(path: Path, vocab: Vocabulary, grow: bool) -> tuple[np.ndarray, int]:
    """Tokenize a text file in one pass, in bounded memory.

    Args:
        path: a UTF-8 text file.
        vocab: ids come from here; when ``grow`` new words are added, else they map to ``<unk>``
            (which is added to ``vocab`` the first time it is needed).
        grow: whether unseen words extend the vocabulary (the training split) or not.

    Returns:
        ``(ids, unknown)``: the ids as a 1-D int32 array, and how many tokens became ``<unk>``.
    """
    ids = array.array("i")  # 4 bytes a token; no Python list of all tokens is ever built
    unknown = 0
    if grow:
        # defaultdict calls len(mapping) for a missing word: the next free id, in first-seen order.
        mapping = defaultdict(None, vocab.word2idx)
        mapping.default_factory = mapping.__len__
        for _, text in _text_chunks(path):
            ids.extend(map(mapping.__getitem__, text.replace("\n", f" {EOS} ").split()))
        for word, index in mapping.items():
            if index >= len(vocab):
                vocab.idx2word.append(word)
                vocab.word2idx[word] = index
    else:
        lookup = vocab.word2idx
        for _, text in _text_chunks(path):
            words = text.replace("\n", f" {EOS} ").split()
            chunk = [lookup.get(word, -1) for word in words]
            misses = chunk.count(-1)
            if misses:
                unk = vocab.add(UNK)
                chunk = [unk if index < 0 else index for index in chunk]
                unknown += misses
            ids.extend(chunk)
    return np.frombuffer(ids, dtype=np.int32).copy(), unknown


def restrict_vocabulary(
    vocab: Vocabulary, train: np.ndarray, min_freq: int = 1, max_size: int | None = None
) -> tuple[Vocabulary, np.ndarray]:
    """Keep the words seen at least ``min_freq`` times (and at most ``max_size`` words, the most frequent).

    The others map to ``<unk>``. Kept words keep their first-seen order; ``<unk>`` keeps its place
    if train has it, else it is appended. Returns the new vocabulary and the id map (old id -> new id).
    """
    counts = np.bincount(train, minlength=len(vocab))
    keep = counts >= min_freq
    keep[vocab.word2idx.get(EOS, 0)] |= EOS in vocab
    if max_size is not None and keep.sum() > max_size:
        order = np.argsort(-counts, kind="stable")
        ranked = order[keep[order]]
        keep[:] = False
        keep[ranked[: max_size - (UNK not in vocab)]] = True
    if UNK in vocab:
        keep[vocab.word2idx[UNK]] = True
    new = Vocabulary([w for w, k in zip(vocab.idx2word, keep) if k])
    unk = new.add(UNK)
    remap = np.array(
        [new.word2idx.get(w, unk) for w in vocab.idx2word], dtype=np.int32
    )  # old id -> new id
    return new, remap


def load_corpus(
    folder: str | os.PathLike, min_freq: int = 1, max_vocab: int | None = None
) -> Corpus:
    """Tokenize ``folder/{train,valid,test}.txt`` with a vocabulary built from train alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist; point dataset= at a folder with train.txt, valid.txt and test.txt")
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    for split, path in paths.items():
        if not path.is_file():
            raise UserError(f"{path} is missing; a corpus folder needs train.txt, valid.txt and test.txt")
    vocab = Vocabulary()
    arrays, unknown = {}, {}
    arrays["train"], _ = tokenize_file(paths["train"], vocab, grow=True)
    if min_freq > 1 or (max_vocab is not None and len(vocab) > max_vocab):
        had_unk = np.count_nonzero(arrays["train"] == vocab.word2idx[UNK]) if UNK in vocab else 0
        vocab, remap = restrict_vocabulary(vocab, arrays["train"], min_freq, max_vocab)
        arrays["train"] = remap[arrays["train"]]
        unknown["train"] = int(np.count_nonzero(arrays["train"] == vocab.word2idx[UNK]) - had_unk)
    for split in ("valid", "test"):
        arrays[split], unknown[split] = tokenize_file(paths[split], vocab, grow=False)
    eos = vocab.word2idx.get(EOS)
    for split, ids in arrays.items():
        if ids.size == 0 or bool(np.all(ids == eos)):
            raise UserError(f"{paths[split]} has no words; every split needs text")
        if split != "train" and unknown.get(split, 0) == ids.size - np.count_nonzero(ids == eos):
            raise UserError(
                f"{paths[split]}: every word is unknown to train.txt's vocabulary; "
                "is it the same language and tokenization as train.txt?"
            )
    return Corpus(
        vocab=vocab,
        unknown_counts=unknown,
        **{split: torch.from_numpy(ids.astype(np.int64)) for split, ids in arrays.items()},
    )


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
