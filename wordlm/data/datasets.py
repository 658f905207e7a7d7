"""Where corpora come from: known corpora by name, local folders, the ``./data`` default.

Main names: ``KNOWN_CORPORA``, ``SHIPPED_CORPORA``, ``unpack_shipped``, ``resolve_dataset``, ``check_dataset``
and ``load_dataset``. Must not import Sacred.

``dataset`` may be
- a folder holding ``train.txt``, ``valid.txt`` and ``test.txt``: any such folder is a corpus;
- a known corpus name (``wikitext-2``, ``penn`` or an alias), or ``./data/<name>``: looked up in
  ``$WORDLM_DATA/<name>``, then in ``./data/<name>``; when neither holds it, WikiText-2 comes from the
  copy shipped inside the package (no network), and PTB is downloaded into ``./data/<name>``;
- the spec's default ``./data``: the folder itself when it holds a corpus, else WikiText-2 as above.

The shipped copy is xz-compressed package data (``wordlm/data/corpora-data/<name>/<split>.txt.xz``). It is
unpacked once into the cache folder (``<cache>/<name>-<tag>/``, the tag naming the pinned sums), and
the unpacked files are checked against the SHA-256 sums pinned in ``wordlm.data.download.SOURCES`` at every
start (about 10 ms for WikiText-2): a damaged or edited file is unpacked again. From there on it is an
ordinary corpus folder, so the tokenized-corpus cache, checkpoints' ``corpus_folder`` and resume treat
it like any other. Unpacking costs about 0.2 s once; reading the xz stream at every start would cost
that every time, even when the tokenized corpus is already cached.
"""

from __future__ import annotations

import atexit
import hashlib
import lzma
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from wordlm.checks import check_readable_path
from wordlm.data.cache import cache_folder, file_sha256, load_corpus_cached
from wordlm.data.corpus import SPLITS, Corpus
from wordlm.data.download import SOURCES, download_corpus
from wordlm.errors import UserError
from wordlm.files import atomic_file

__all__ = [
    "DEFAULT_CORPUS", "KNOWN_CORPORA", "DATA_ENV", "SHIPPED_CORPORA", "unpack_shipped", "NotDownloaded",
    "resolve_dataset", "check_dataset", "load_dataset"
]  # fmt: skip

DEFAULT_CORPUS = "wikitext-2"
KNOWN_CORPORA = {"wikitext-2": "wikitext-2", "wikitext2": "wikitext-2", "wt2": "wikitext-2",
                 "penn": "penn", "ptb": "penn"}  # fmt: skip
DATA_ENV = "WORDLM_DATA"  # a folder of corpora, e.g. one holding wikitext-2/ and penn/
SHIPPED_CORPORA = ("wikitext-2",)  # in the package, xz-compressed; PTB's licence does not allow shipping it
_SHIPPED_DATA = "corpora-data"  # the package-data folder that holds them


def _is_corpus(folder: Path) -> bool:
    return all((folder / f"{split}.txt").is_file() for split in SPLITS)


def _lacks(folder: Path) -> str:
    names = [f"{split}.txt" for split in SPLITS if not (folder / f"{split}.txt").is_file()]
    missing = [name for name in names if not os.path.lexists(folder / name)]
    parts = [f"lacks {', '.join(missing)}"] if missing else []
    parts += [f"{name} is {_what(folder / name)}" for name in names if name not in missing]
    return (
        f"dataset folder {folder}{' ' if missing else ': '}{'; '.join(parts)}; "
        "a corpus folder needs train.txt, valid.txt and test.txt as plain files"
    )


def _what(path: Path) -> str:
    """What stands where a corpus file should be, for the error: a folder, a FIFO, a broken link, ..."""
    if path.is_symlink() and not path.exists():
        return "a symbolic link to nothing (or a link loop), not a file"
    try:
        mode = path.stat().st_mode
    except OSError as problem:
        return f"unreadable ({problem.strerror or problem})"
    kinds = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
             stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}  # fmt: skip
    return f"{kinds.get(stat.S_IFMT(mode), 'no regular file')}, not a file"


def _known_name(dataset: str, path: Path, data_root: Path) -> str | None:
    """The known corpus ``dataset`` names, if any: an alias, ``<data_root>/<name>`` or ``data_root`` itself."""
    name = KNOWN_CORPORA.get(str(dataset).lower())
    if name is not None:
        return name
    where = path.resolve()
    if where.parent == data_root.resolve() and path.name in KNOWN_CORPORA.values():
        return path.name
    if where == data_root.resolve():
        if any((path / f"{split}.txt").exists() for split in SPLITS):
            raise UserError(_lacks(path))  # a corpus of one's own, half there: not a reason to download
        return DEFAULT_CORPUS
    return None


def _shipped_file(name: str, filename: str):
    """The packaged ``<filename>.xz`` of corpus ``name`` (an ``importlib.resources`` traversable)."""
    return resources.files("wordlm.data") / _SHIPPED_DATA / name / f"{filename}.xz"


def _damaged(name: str, what: str) -> UserError:
    return UserError(
        f"the copy of {name} shipped with wordlm {what}; reinstall wordlm, "
        f"or set {DATA_ENV} to a folder holding {name}/"
    )


def _unpack(name: str, filename: str, target: Path, sha256: str) -> None:
    """Decompress one shipped file to ``target`` atomically, keeping it only if its SHA-256 is ``sha256``."""
    source = _shipped_file(name, filename)
    digest = hashlib.sha256()
    with source.open("rb") as packed, lzma.open(packed) as stream, atomic_file(target) as out:
        try:
            while block := stream.read(1 << 20):
                digest.update(block)
                out.write(block)
        except (lzma.LZMAError, EOFError) as problem:
            raise _damaged(name, f"is damaged ({source}: {problem})") from None
        if digest.hexdigest() != sha256:
            raise _damaged(
                name, f"is damaged ({source} unpacks to SHA-256 {digest.hexdigest()[:16]}..., not {sha256[:16]}...)"
            )


def unpack_shipped(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """The folder of the corpus shipped with wordlm as ``name``, unpacked into the cache when need be.

    Files already there are kept when their SHA-256 is the pinned one (``wordlm.data.download.SOURCES``);
    missing or altered ones are unpacked (again). When the cache folder cannot be written, the files
    go to a temporary folder that is removed when the process exits.

    Args:
        name: one of ``SHIPPED_CORPORA``.
        cache_dir: the cache folder (None: ``$WORDLM_CACHE`` or ``~/.cache/wordlm``).
        log: told when files are unpacked, or where to when the cache folder is not writable.

    Returns:
        A folder holding ``train.txt``, ``valid.txt`` and ``test.txt``, byte for byte the pinned ones.

    Raises:
        UserError: the packaged files are missing or damaged (one line: reinstall, or use ``WORDLM_DATA``).
    """
    sums = {filename: sha256 for filename, (_, sha256) in SOURCES[name].items()}
    if not all(_shipped_file(name, filename).is_file() for filename in sums):
        raise _damaged(name, f"is missing ({resources.files('wordlm.data') / _SHIPPED_DATA / name} lacks a file)")
    tag = hashlib.sha256(" ".join(sums[filename] for filename in sorted(sums)).encode()).hexdigest()[:16]
    folder = (Path(cache_dir) if cache_dir is not None else cache_folder()) / f"{name}-{tag}"
    stale = [f for f in sums if not ((folder / f).is_file() and file_sha256(folder / f) == sums[f])]
    if not stale:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log(f"unpacking the {name} shipped with wordlm into {folder}")
        for filename in stale:
            _unpack(name, filename, folder / filename, sums[filename])
    except OSError as problem:
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"wordlm-{name}-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            log(
                f"cannot write the cache folder ({problem}); unpacking {name} into {folder} for this run only "
                "(set WORDLM_CACHE to a writable folder to keep it)"
            )
            for filename in sums:
                _unpack(name, filename, folder / filename, sums[filename])
        except OSError as again:
            raise UserError(
                f"cannot unpack the {name} shipped with wordlm ({again}); set WORDLM_CACHE to a writable folder, "
                f"or {DATA_ENV} to a folder holding {name}/"
            ) from None
    return folder


class NotDownloaded(UserError):
    """A known corpus that is not on this machine yet (``resolve_dataset(..., fetch=False)``)."""


def resolve_dataset(
    dataset: str | os.PathLike,
    data_root: str | os.PathLike = "data",
    sources: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
    cache_dir: str | os.PathLike | None = None,
    fetch: bool = True,
) -> Path:
    """Find the corpus folder that ``dataset`` names, unpacking or downloading a known corpus if need be.

    Args:
        dataset: a folder, a known corpus name, or ``data_root`` (see the module docstring).
        data_root: the folder of downloaded corpora (``./data``).
        sources: the download table (None: ``wordlm.data.download.SOURCES``).
        log: told about unpacking and downloads.
        cache_dir: where a shipped corpus is unpacked (None: ``$WORDLM_CACHE`` or ``~/.cache/wordlm``).
        fetch: whether a known corpus not on disk may be downloaded (False: ``NotDownloaded`` instead).

    Returns:
        A folder holding ``train.txt``, ``valid.txt`` and ``test.txt``.

    Raises:
        UserError: ``dataset`` is neither a corpus folder nor a known corpus, or the download failed.
    """
    check_readable_path("dataset", dataset)  # a link loop or an over-long name: one line, not an OSError
    path = Path(dataset).expanduser()
    if _is_corpus(path):
        return path
    name = _known_name(str(dataset), path, Path(data_root))
    if name is None:
        if path.is_dir():
            raise UserError(_lacks(path))
        raise UserError(
            f"dataset={str(dataset)!r} is neither a folder nor a known corpus "
            f"({', '.join(sorted(set(KNOWN_CORPORA.values())))}); "
            "point it at a folder with train.txt, valid.txt and test.txt"
        )
    if os.environ.get(DATA_ENV) and _is_corpus(Path(os.environ[DATA_ENV]) / name):
        return Path(os.environ[DATA_ENV]) / name
    if name in SHIPPED_CORPORA and not _is_corpus(Path(data_root) / name):
        return unpack_shipped(name, cache_dir=cache_dir, log=log)
    if not fetch and not _is_corpus(Path(data_root) / name):
        raise NotDownloaded(f"dataset={str(dataset)!r} is not downloaded yet")
    return download_corpus(name, Path(data_root) / name, sources=sources, log=log)


def check_dataset(dataset) -> Path | None:
    """Before any work: ``dataset`` must name a corpus. Returns its folder when it is on this machine (a shipped
    corpus is unpacked), None for a known corpus that training will download.

    Raises:
        UserError: ``dataset`` names neither a corpus folder nor a known corpus.
    """
    try:
        return resolve_dataset(dataset, fetch=False)
    except NotDownloaded:
        return None


def load_dataset(
    dataset: str | os.PathLike,
    log: Callable[[str], None] = lambda message: None,
    min_freq: int = 1,
    max_vocab: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    sources: dict | None = None,
) -> Corpus:
    """Resolve ``dataset``, then load it from the cache or tokenize it, logging what was loaded.

    Args:
        dataset: see ``resolve_dataset``.
        log: told what was loaded, how fast, and how many tokens became ``<unk>``.
        min_freq: words of train seen fewer times become ``<unk>``.
        max_vocab: keep at most this many words, the most frequent (None: all).
        cache_dir: the cache folder (None: ``$WORDLM_CACHE`` or ``~/.cache/wordlm``).
        sources: the download table (None: ``wordlm.data.download.SOURCES``).

    Raises:
        UserError: one line saying what is wrong with the corpus and how to fix it.
    """
    folder = resolve_dataset(dataset, sources=sources, log=log, cache_dir=cache_dir)
    started = time.perf_counter()
    corpus, from_cache = load_corpus_cached(folder, min_freq, max_vocab, cache_dir=cache_dir, log=log)
    log(
        f"corpus {folder}: vocabulary {len(corpus.vocab)}, tokens train {corpus.train.numel()} / "
        f"valid {corpus.valid.numel()} / test {corpus.test.numel()} "
        f"({'read from the cache' if from_cache else 'tokenized'} in {time.perf_counter() - started:.2f} s)"
    )
    unknown = {split: n for split, n in corpus.unknown_counts.items() if n}
    if unknown:
        log(
            "tokens mapped to <unk> (words outside the vocabulary): "
            + ", ".join(f"{s} {n}" for s, n in unknown.items())
        )
    return corpus
