"""Finding and loading corpora (wordlm.data.datasets): the real WikiText-2 (shipped) and PTB, names, paths, ./data."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cut_corpus, real_ptb, write_corpus

from wordlm.data import datasets as corpora
from wordlm.data import download as download_module
from wordlm.data.corpus import EOS, SPLITS
from wordlm.data.datasets import load_dataset, resolve_dataset, unpack_shipped
from wordlm.data.download import SOURCES
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
    if name == "penn":
        monkeypatch.setenv("WORDLM_DATA", str(real_ptb().parent))  # read-only: the cache goes to $WORDLM_CACHE
    else:
        monkeypatch.delenv("WORDLM_DATA", raising=False)  # the copy shipped with wordlm
    corpus = load_dataset(name)
    vocabulary, tokens = PUBLISHED[name]
    assert len(corpus.vocab) == vocabulary
    assert {split: corpus.split(split).numel() for split in SPLITS} == tokens
    assert corpus.unknown_counts == {"valid": 0, "test": 0}
    words, ids = classic_tokenization(resolve_dataset(name))
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


@pytest.fixture
def corpora_folder(tmp_path) -> Path:
    """A WORDLM_DATA folder holding a (tiny, written) wikitext-2/ and penn/."""
    for name in ("wikitext-2", "penn"):
        write_corpus(tmp_path / "corpora" / name, f"{name}\n", f"{name}\n", f"{name}\n")
    return tmp_path / "corpora"


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
def test_known_names_resolve_in_wordlm_data(dataset, name, monkeypatch, corpora_folder):
    monkeypatch.setenv("WORDLM_DATA", str(corpora_folder))
    assert resolve_dataset(dataset) == corpora_folder / name


def test_any_folder_with_three_splits_is_a_corpus(tmp_path):
    folder = write_corpus(tmp_path / "mine", "a\n", "a\n", "a\n")
    assert resolve_dataset(str(folder)) == folder


def test_the_default_dot_data_is_the_corpus_in_it_else_wikitext_2(tmp_path, monkeypatch, corpora_folder):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORDLM_DATA", str(corpora_folder))
    assert resolve_dataset("./data") == corpora_folder / "wikitext-2"
    monkeypatch.delenv("WORDLM_DATA")
    assert resolve_dataset("./data") == unpack_shipped("wikitext-2")  # no corpus anywhere: the shipped copy
    write_corpus(tmp_path / "data" / "wikitext-2", "local\n", "local\n", "local\n")
    assert resolve_dataset("./data") == Path("data") / "wikitext-2"
    write_corpus(tmp_path / "data", "own\n", "own\n", "own\n")
    assert resolve_dataset("./data") == Path("data")


def test_wordlm_data_comes_before_dot_data(tmp_path, monkeypatch, corpora_folder):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "data" / "penn", "local\n", "local\n", "local\n")
    write_corpus(tmp_path / "data" / "wikitext-2", "local\n", "local\n", "local\n")
    monkeypatch.setenv("WORDLM_DATA", str(corpora_folder))
    assert resolve_dataset("penn") == corpora_folder / "penn"
    assert resolve_dataset("wikitext-2") == corpora_folder / "wikitext-2"


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_wikitext_2_is_unpacked_once_into_the_cache_with_the_pinned_sums(
    corpus_cache, tmp_path, monkeypatch
):
    messages = []
    folder = unpack_shipped("wikitext-2", log=messages.append)
    assert folder.parent == corpus_cache and folder.name.startswith("wikitext-2-")
    pinned = {filename: sha for filename, (_, sha) in SOURCES["wikitext-2"].items()}
    assert {path.name: sha256(path) for path in folder.iterdir()} == pinned
    assert messages == [f"unpacking the wikitext-2 shipped with wordlm into {folder}"]
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert unpack_shipped("wikitext-2", log=messages.append) == folder and len(messages) == 1
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == written  # checked, not rewritten
    monkeypatch.chdir(tmp_path)  # a half-made ./data/wikitext-2 (an interrupted download) is no corpus: shipped
    write_corpus(tmp_path / "data" / "wikitext-2", "a\n", "a\n", "a\n").joinpath("test.txt").unlink()
    assert resolve_dataset("wikitext-2") == folder


def test_an_altered_unpacked_file_is_unpacked_again_and_only_that_one(corpus_cache):
    folder = unpack_shipped("wikitext-2")
    train = (folder / "train.txt").stat().st_mtime_ns
    (folder / "valid.txt").write_text("edited by hand\n")
    messages = []
    assert unpack_shipped("wikitext-2", log=messages.append) == folder and len(messages) == 1
    assert sha256(folder / "valid.txt") == SOURCES["wikitext-2"]["valid.txt"][1]
    assert (folder / "train.txt").stat().st_mtime_ns == train


def test_an_unwritable_cache_folder_unpacks_into_a_temporary_folder(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    messages = []
    folder = unpack_shipped("wikitext-2", cache_dir=tmp_path / "blocker" / "cache", log=messages.append)
    assert folder.name.startswith("wordlm-wikitext-2-") and tmp_path not in folder.parents
    assert sha256(folder / "test.txt") == SOURCES["wikitext-2"]["test.txt"][1]
    assert messages[-1].startswith("cannot write the cache folder (") and "for this run only" in messages[-1]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "blocker" / "tmp"))  # and no temporary folder either
    with pytest.raises(UserError, match=r"^cannot unpack the wikitext-2 shipped with wordlm \(.*\); set WORDLM_CACHE"):
        unpack_shipped("wikitext-2", cache_dir=tmp_path / "blocker" / "cache")


@pytest.mark.parametrize(
    "packed, why",
    [
        (lambda text: lzma.compress(text)[:-40], r"train.txt.xz: .*"),  # cut short
        (lambda text: lzma.compress(text + b"more\n"), r"train.txt.xz unpacks to SHA-256 [0-9a-f]{16}\.\.\., not"),
    ],
)
def test_a_damaged_shipped_file_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, packed, why):
    (tmp_path / "packed").mkdir()
    for filename in ("train.txt", "valid.txt", "test.txt"):
        (tmp_path / "packed" / f"{filename}.xz").write_bytes(packed(b"some text\n"))
    monkeypatch.setattr(corpora, "_shipped_file", lambda name, filename: tmp_path / "packed" / f"{filename}.xz")
    with pytest.raises(UserError, match=r"^the copy of wikitext-2 shipped with wordlm is damaged \(\S+/" + why):
        unpack_shipped("wikitext-2", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"\); reinstall wordlm, or set WORDLM_DATA to a folder holding wikitext-2/$"):
        unpack_shipped("wikitext-2", cache_dir=tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []


def test_the_shipped_files_readme_gives_the_pinned_sums_and_the_credit():
    readme = (Path(corpora.__file__).parent / "corpora-data" / "wikitext-2" / "README.md").read_text(encoding="utf-8")
    readme = " ".join(readme.split())
    assert all(sha in readme for _, sha in SOURCES["wikitext-2"].values())
    assert "Pointer Sentinel Mixture Models" in readme and "CC BY-SA 3.0" in readme


def test_a_run_on_the_shipped_copy_resumes_elsewhere_and_after_the_cache_is_gone(tmp_path, monkeypatch, corpus_cache):
    from wordlm.config import resumed_config

    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    folder = resolve_dataset("./data")  # what training does, and records as the checkpoint's corpus_folder
    config = {"dataset": "./data", "save": "model.pt", "save_last": "model.last.pt", "resume": "model.last.pt"}
    payload = {"training": {"epoch": 1}, "meta": {"config": dict(config), "corpus_folder": str(folder.resolve())}}
    monkeypatch.chdir(tmp_path / "elsewhere")
    merged = resumed_config(config, {"resume"}, payload, "model.last.pt")
    assert merged["dataset"] == str(folder.resolve()) and resolve_dataset(merged["dataset"]) == folder
    shutil.rmtree(corpus_cache)  # the unpacked folder is gone: ./data finds the shipped copy again, same place
    merged = resumed_config(config, {"resume"}, payload, "model.last.pt")
    assert merged["dataset"] == "./data" and resolve_dataset(merged["dataset"]) == folder
    assert sha256(folder / "train.txt") == SOURCES["wikitext-2"]["train.txt"][1]
    # the corpus named as it is found: the same folder, not a change of dataset
    typed = resumed_config({**config, "dataset": "wikitext-2"}, {"resume", "dataset"}, payload, "model.last.pt")
    assert typed["dataset"] == "wikitext-2" and resolve_dataset(typed["dataset"]) == folder
    downloads = []

    def fetch(url, *args):
        downloads.append(url)
        raise UserError("no network in tests")

    monkeypatch.delenv("WORDLM_OFFLINE")  # downloads on, but every fetch is seen and fails
    monkeypatch.setattr(download_module, "_fetch", fetch)
    with pytest.raises(UserError, match=r"resume cannot change dataset='penn' \(checkpoint: './data'\)"):
        resumed_config({**config, "dataset": "penn"}, {"resume", "dataset"}, {**payload}, "model.last.pt")
    assert downloads == []  # refused without fetching PTB just to compare folders
    penn = cut_corpus(tmp_path / "elsewhere" / "data" / "penn")  # a downloaded PTB is found, as before
    saved = {**payload, "meta": {"config": {**config, "dataset": "./data/penn"}, "corpus_folder": str(penn.resolve())}}
    typed = resumed_config({**config, "dataset": "penn"}, {"resume", "dataset"}, saved, "model.last.pt")
    assert typed["dataset"] == "penn" and downloads == []


def test_a_dataset_that_cannot_be_looked_at_is_one_line_from_the_library_too(tmp_path):
    """resolve_dataset itself (not only the command line) turns a link loop or an over-long name into UserError."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match=r"^cannot read dataset='.*loop': it is a symbolic link loop"):
        resolve_dataset(loop)
    with pytest.raises(UserError, match=r"^cannot read dataset='x+': the path is longer than this system allows"):
        resolve_dataset("x" * 300)
