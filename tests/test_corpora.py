"""Finding and loading corpora (wordlm.corpora): the real WikiText-2 and PTB, names, paths, ./data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, shared_corpus, write_corpus

from wordlm.corpora import load_dataset, resolve_dataset
from wordlm.data import EOS, SPLITS
from wordlm.errors import UserError

# Published sizes: vocabulary (with <eos> and <unk>) and tokens per split (with one <eos> a line).
PUBLISHED = {
    "wikitext-2": (33_278, {"train": 2_088_628, "valid": 217_646, "test": 245_569}),
    "penn": (10_000, {"train": 929_589, "valid": 73_760, "test": 82_430}),
}


def classic_tokenization(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The classic example's vocabulary (first appearance over train, valid, test) and ids, in one pass."""
    word2idx: dict[str, int] = {}
    ids = {}
    for split in SPLITS:
        with open(folder / f"{split}.txt", encoding="utf8") as handle:
            words = (word for line in handle for word in line.split() + [EOS])
            ids[split] = np.fromiter((word2idx.setdefault(word, len(word2idx)) for word in words), dtype=np.int64)
    return list(word2idx), ids


@pytest.mark.parametrize("name", ["wikitext-2", "penn"])
def test_real_corpora_have_the_published_counts_and_the_classic_ids(name, monkeypatch):
    monkeypatch.setenv("WORDLM_DATA", str(SHARED_DATA))  # read-only: the cache goes to $WORDLM_CACHE
    corpus = load_dataset(name)
    vocabulary, tokens = PUBLISHED[name]
    assert len(corpus.vocab) == vocabulary
    assert {split: corpus.split(split).numel() for split in SPLITS} == tokens
    assert corpus.unknown_counts == {"valid": 0, "test": 0}
    words, ids = classic_tokenization(shared_corpus(name))
    assert corpus.vocab.idx2word == words
    for split in SPLITS:
        assert np.array_equal(corpus.split(split).numpy(), ids[split])


def test_the_same_corpus_loads_from_the_cache_the_second_time(small_corpus):
    messages = []
    first = load_dataset(small_corpus, log=messages.append, max_vocab=1000)
    second = load_dataset(small_corpus, log=messages.append, max_vocab=1000)
    assert first.vocab.idx2word == second.vocab.idx2word and len(first.vocab) == 1000
    assert "(tokenized in" in messages[0] and "(read from the cache in" in messages[2]
    assert messages[1].startswith("tokens mapped to <unk> (words outside the vocabulary): train ")


@pytest.mark.parametrize(
    "dataset, name",
    [
        ("wikitext-2", "wikitext-2"),
        ("WT2", "wikitext-2"),
        ("wikitext2", "wikitext-2"),
        ("penn", "penn"),
        ("PTB", "penn"),
    ],
)
def test_known_names_resolve_in_wordlm_data(dataset, name, monkeypatch):
    monkeypatch.setenv("WORDLM_DATA", str(SHARED_DATA))
    assert resolve_dataset(dataset) == SHARED_DATA / name


def test_any_folder_with_three_splits_is_a_corpus(tmp_path):
    folder = write_corpus(tmp_path / "mine", "a\n", "a\n", "a\n")
    assert resolve_dataset(str(folder)) == folder


def test_the_default_dot_data_is_the_corpus_in_it_else_wikitext_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORDLM_DATA", str(SHARED_DATA))
    assert resolve_dataset("./data") == SHARED_DATA / "wikitext-2"
    write_corpus(tmp_path / "data" / "wikitext-2", "local\n", "local\n", "local\n")
    monkeypatch.delenv("WORDLM_DATA")
    assert resolve_dataset("./data") == Path("data") / "wikitext-2"
    write_corpus(tmp_path / "data", "own\n", "own\n", "own\n")
    assert resolve_dataset("./data") == Path("data")


def test_wordlm_data_comes_before_dot_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "data" / "penn", "local\n", "local\n", "local\n")
    monkeypatch.setenv("WORDLM_DATA", str(SHARED_DATA))
    assert resolve_dataset("penn") == SHARED_DATA / "penn"


def test_a_half_made_corpus_in_dot_data_is_not_replaced_by_wikitext_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("a\n")
    with pytest.raises(UserError, match=r"^dataset folder data lacks valid.txt, test.txt; a corpus folder needs"):
        resolve_dataset("./data")


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("wikitext-3", r"^dataset='wikitext-3' is neither a folder nor a known corpus \(penn, wikitext-2\); point"),
        ("{tmp}", r"^dataset folder \S+ lacks train.txt, valid.txt, test.txt; a corpus folder needs"),
    ],
)
def test_unknown_names_and_empty_folders_are_refused(tmp_path, dataset, message):
    with pytest.raises(UserError, match=message):
        resolve_dataset(dataset.format(tmp=tmp_path))
