"""Where corpora come from: known corpora by name, local folders, the ``./data`` default.

Lives here: ``KNOWN_CORPORA``, ``resolve_dataset`` and ``load_dataset``. Must not import Sacred.

``dataset`` may be
- a folder holding ``train.txt``, ``valid.txt`` and ``test.txt``: any such folder is a corpus;
- a known corpus name (``wikitext-2``, ``penn`` or an alias), or ``./data/<name>``: looked up in
  ``$WORDLM_DATA/<name>``, then in ``./data/<name>``, and downloaded into ``./data/<name>`` when
  neither has it;
- the spec's default ``./data``: the folder itself when it holds a corpus, else WikiText-2 as above.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from wordlm.cache import load_corpus_cached
from wordlm.data import SPLITS, Corpus
from wordlm.download import download_corpus
from wordlm.errors import UserError

DEFAULT_CORPUS = "wikitext-2"
KNOWN_CORPORA = {"wikitext-2": "wikitext-2", "wikitext2": "wikitext-2", "wt2": "wikitext-2",
                 "penn": "penn", "ptb": "penn"}  # fmt: skip
DATA_ENV = "WORDLM_DATA"  # a folder of corpora, e.g. one holding wikitext-2/ and penn/


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


def resolve_dataset(
    dataset: str | os.PathLike,
    data_root: str | os.PathLike = "data",
    sources: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Find the corpus folder that ``dataset`` names, downloading a known corpus if need be.

    Args:
        dataset: a folder, a known corpus name, or ``data_root`` (see the module docstring).
        data_root: the folder of downloaded corpora (``./data``).
        sources: the download table (None: ``wordlm.download.SOURCES``).
        log: told about downloads.

    Returns:
        A folder holding ``train.txt``, ``valid.txt`` and ``test.txt``.

    Raises:
        UserError: ``dataset`` is neither a corpus folder nor a known corpus, or the download failed.
    """
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
    return download_corpus(name, Path(data_root) / name, sources=sources, log=log)


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
        sources: the download table (None: ``wordlm.download.SOURCES``).

    Raises:
        UserError: one line saying what is wrong with the corpus and how to fix it.
    """
    folder = resolve_dataset(dataset, sources=sources, log=log)
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
