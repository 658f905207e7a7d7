"""Where corpora come from: known corpora by name, local folders, the ``./data`` default.

Lives here: ``KNOWN_CORPORA``, ``resolve_dataset`` and ``load_dataset``. Must not import Sacred.

``dataset`` may be
- a folder holding ``train.txt``, ``valid.txt`` and ``test.txt``;
- a known corpus name (``wikitext-2``, ``penn``), looked up in ``$WORDLM_DATA/<name>`` and then in
  ``./data/<name>``;
- the spec's default ``./data``: the folder itself when it holds a corpus, else ``./data/wikitext-2``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from wordlm.data import SPLITS, Corpus, load_corpus
from wordlm.errors import UserError

DEFAULT_CORPUS = "wikitext-2"
KNOWN_CORPORA = {"wikitext-2": "wikitext-2", "wikitext2": "wikitext-2", "wt2": "wikitext-2",
                 "penn": "penn", "ptb": "penn"}  # fmt: skip
DATA_ENV = "WORDLM_DATA"  # a folder of corpora, e.g. one holding wikitext-2/ and penn/


def _is_corpus(folder: Path) -> bool:
    return all((folder / f"{split}.txt").is_file() for split in SPLITS)


def resolve_dataset(dataset: str, data_root: str | os.PathLike = "data") -> Path:
    """Find the corpus folder that ``dataset`` names (see the module docstring)."""
    path = Path(dataset).expanduser()
    if _is_corpus(path):
        return path
    name = KNOWN_CORPORA.get(str(dataset).lower())
    if name is None and path.resolve() == Path(data_root).resolve():
        name = DEFAULT_CORPUS
    if name is None:
        if path.is_dir():
            missing = [f"{s}.txt" for s in SPLITS if not (path / f"{s}.txt").is_file()]
            raise UserError(f"dataset folder {path} lacks {', '.join(missing)}; a corpus folder needs train.txt, valid.txt and test.txt")
        raise UserError(
            f"dataset={dataset!r} is neither a folder nor a known corpus ({', '.join(sorted(set(KNOWN_CORPORA.values())))}); "
            "point it at a folder with train.txt, valid.txt and test.txt"
        )
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]) / name)
    candidates.append(Path(data_root) / name)
    for folder in candidates:
        if _is_corpus(folder):
            return folder
    places = " or ".join(str(c) for c in candidates)
    raise UserError(
        f"corpus {name!r} not found in {places}; put train.txt, valid.txt and test.txt there "
        f"(or set {DATA_ENV} to a folder holding {name}/)"
    )


def load_dataset(dataset: str, log: Callable[[str], None] = lambda message: None, **options) -> Corpus:
    """Resolve ``dataset`` and tokenize it, logging what was loaded."""
    folder = resolve_dataset(dataset)
    corpus = load_corpus(folder, **options)
    log(
        f"corpus {folder}: vocabulary {len(corpus.vocab)}, tokens train {corpus.train.numel()} / "
        f"valid {corpus.valid.numel()} / test {corpus.test.numel()}"
    )
    unknown = {split: n for split, n in corpus.unknown_counts.items() if n}
    if unknown:
        log("tokens mapped to <unk> (not in train's vocabulary): " + ", ".join(f"{s} {n}" for s, n in unknown.items()))
    return corpus
