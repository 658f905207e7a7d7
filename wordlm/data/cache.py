"""A cache of tokenized corpora, keyed by what the text files hold.

Main names: ``cache_folder``, ``file_sha256``, ``corpus_key`` and ``load_corpus_cached``. Must not
import Sacred.

The second start on a corpus reads its ids from the cache folder (``$WORDLM_CACHE``, default
``~/.cache/wordlm``) instead of tokenizing the text again. The key is a SHA-256 over the three files'
contents, the vocabulary options and ``CACHE_VERSION``, so an edited file never finds an old entry,
even one with the same size and time, while a copy of a corpus in another folder finds the same one.
The corpus folder itself is only read: it may be read-only.

An entry is one ``torch.save`` file of plain data, read with ``torch.load(weights_only=True)``:

    version           int, ``CACHE_VERSION``
    key               str, the key it was written for
    vocab             (bytes,) uint8 tensor: the words in id order, UTF-8, joined by LF
                      (words never hold whitespace)
    train/valid/test  (N,) int32 tensors of ids
    unknown_counts    dict, split -> tokens mapped to <unk>
    sha256            dict, split -> SHA-256 of the text file the ids came from
    checksum          SHA-256 over vocab and ids, so a damaged entry is noticed

An entry is written atomically. One that cannot be read or does not check out is ignored, and
written again. Entries are never deleted: removing the cache folder is safe at any time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from wordlm.data.corpus import (
    SPLITS,
    Corpus,
    TokenizedCorpus,
    Vocabulary,
    check_vocabulary_options,
    corpus_paths,
    tokenize_corpus,
)
from wordlm.files import atomic_file

__all__ = ["CACHE_ENV", "CACHE_VERSION", "cache_folder", "file_sha256", "corpus_key", "load_corpus_cached"]

CACHE_ENV = "WORDLM_CACHE"  # the cache folder; default ~/.cache/wordlm
CACHE_VERSION = 1  # bump whenever tokenizing or the entry layout changes: old entries are then never read


def cache_folder() -> Path:
    """The folder of cached corpora: ``$WORDLM_CACHE``, else ``~/.cache/wordlm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wordlm").expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def corpus_key(sha256: dict[str, str], min_freq: int, max_vocab: int | None) -> str:
    """The cache key of a corpus: its files' digests (``split -> hex``), the options and the version."""
    key = hashlib.sha256(f"wordlm corpus {CACHE_VERSION} min_freq={min_freq} max_vocab={max_vocab}".encode())
    for split in SPLITS:
        key.update(f"\n{split} {sha256[split]}".encode())
    return key.hexdigest()


def _checksum(vocab: torch.Tensor, arrays: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(vocab.numpy().tobytes())
    for split in SPLITS:
        digest.update(arrays[split].numpy().tobytes())
    return digest.hexdigest()


def _write_entry(path: Path, key: str, tokenized: TokenizedCorpus) -> None:
    vocab = torch.frombuffer(bytearray("\n".join(tokenized.vocab.idx2word).encode()), dtype=torch.uint8)
    arrays = {split: torch.from_numpy(tokenized.arrays[split]) for split in SPLITS}  # (N,) int32, shared
    entry = {
        "version": CACHE_VERSION,
        "key": key,
        "vocab": vocab,
        **arrays,
        "unknown_counts": dict(tokenized.unknown_counts),
        "sha256": dict(tokenized.sha256),
        "checksum": _checksum(vocab, arrays),
    }
    with atomic_file(path) as stream:
        torch.save(entry, stream)


def _read_entry(path: Path, key: str) -> TokenizedCorpus:
    """Read a cache entry, raising ``ValueError`` (or whatever ``torch.load`` raises) unless it checks out."""
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION or entry.get("key") != key:
        raise ValueError("written by another version of wordlm, or for other files")
    vocab, arrays = entry["vocab"], {split: entry[split] for split in SPLITS}
    for tensor, dtype in [(vocab, torch.uint8)] + [(ids, torch.int32) for ids in arrays.values()]:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != 1:
            raise ValueError("a field has the wrong type")
    if _checksum(vocab, arrays) != entry["checksum"]:
        raise ValueError("its checksum does not match: the file is damaged")
    words = Vocabulary.from_words(bytes(vocab.numpy()).decode().split("\n"))
    numpy_arrays = {split: ids.numpy() for split, ids in arrays.items()}
    if any(ids.size and (ids.min() < 0 or ids.max() >= len(words)) for ids in numpy_arrays.values()):
        raise ValueError("an id is outside the vocabulary")
    return TokenizedCorpus(words, numpy_arrays, dict(entry["unknown_counts"]), dict(entry["sha256"]))


def load_corpus_cached(
    folder: str | os.PathLike,
    min_freq: int = 1,
    max_vocab: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[Corpus, bool]:
    """Load a corpus folder from the cache, or tokenize it (``tokenize_corpus``) and cache it.

    Args:
        folder: the corpus folder (only read).
        min_freq: see ``tokenize_corpus``.
        max_vocab: see ``tokenize_corpus``.
        cache_dir: the cache folder (None: ``cache_folder()``).
        log: told when an entry is ignored or cannot be written; neither stops the load.

    Returns:
        ``(corpus, from_cache)``.

    Raises:
        UserError: as ``tokenize_corpus`` does.
    """
    check_vocabulary_options(min_freq, max_vocab)
    paths = corpus_paths(folder)
    key = corpus_key({split: file_sha256(path) for split, path in paths.items()}, min_freq, max_vocab)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_folder()
    entry = cache_dir / f"corpus-{key}.pt"
    if entry.is_file():
        try:
            return _read_entry(entry, key).to_corpus(), True
        except Exception as problem:  # anything wrong with a disposable file means: build it again
            reason = " ".join(str(problem).split())[:120]
            log(f"ignoring the corpus cache {entry} ({type(problem).__name__}: {reason}); tokenizing again")
    tokenized = tokenize_corpus(folder, min_freq, max_vocab)
    # The key of what was tokenized: it differs from ``key`` only if a file changed meanwhile.
    key = corpus_key(tokenized.sha256, min_freq, max_vocab)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_entry(cache_dir / f"corpus-{key}.pt", key, tokenized)
    except OSError as problem:
        log(f"cannot write the corpus cache in {cache_dir} ({problem}); set {CACHE_ENV} to a writable folder")
    return tokenized.to_corpus(), False
