"""The cache of tokenized corpora (wordlm.data.cache): hits, misses, and damaged entries."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

import wordlm.data.cache
from wordlm.data.cache import load_corpus_cached
from wordlm.data.corpus import Corpus, load_corpus


def assert_same(corpus: Corpus, expected: Corpus) -> None:
    assert corpus.vocab.idx2word == expected.vocab.idx2word
    assert corpus.vocab.word2idx == expected.vocab.word2idx
    for split in ("train", "valid", "test"):
        assert torch.equal(corpus.split(split), expected.split(split))
        assert corpus.split(split).dtype == torch.int64
    assert corpus.unknown_counts == expected.unknown_counts


def entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir())


def forbid_tokenizing(monkeypatch) -> None:
    """Make a cache miss fail loudly: whatever loads from now on must come from the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache should have served this corpus")

    monkeypatch.setattr(wordlm.data.cache, "tokenize_corpus", refuse)


def test_the_second_load_reads_the_cache_and_gives_the_same_corpus(small_corpus, corpus_cache, monkeypatch):
    first, from_cache = load_corpus_cached(small_corpus, max_vocab=2000)
    assert not from_cache
    [entry] = entries(corpus_cache)
    assert re.fullmatch(r"corpus-[0-9a-f]{64}\.pt", entry.name)
    forbid_tokenizing(monkeypatch)
    second, from_cache = load_corpus_cached(small_corpus, max_vocab=2000)
    assert from_cache
    assert_same(second, first)
    assert_same(second, load_corpus(small_corpus, max_vocab=2000))
    assert not any(path.name.endswith(".part") for path in entries(corpus_cache))


def test_a_copy_of_the_corpus_elsewhere_finds_the_same_entry(small_corpus, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    for split in ("train", "valid", "test"):
        (copy / f"{split}.txt").write_bytes((small_corpus / f"{split}.txt").read_bytes())
    load_corpus_cached(small_corpus)
    forbid_tokenizing(monkeypatch)
    assert load_corpus_cached(copy)[1]


def test_an_edited_file_with_the_same_size_and_time_is_tokenized_again(tmp_path, corpus_cache):
    folder = write_corpus(tmp_path, "a b c\nb c\n", "a b\n", "c\n")
    before, _ = load_corpus_cached(folder)
    valid = folder / "valid.txt"
    stat = valid.stat()
    valid.write_text("c b\n", encoding="utf-8")  # same size
    os.utime(valid, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time
    after, from_cache = load_corpus_cached(folder)
    assert not from_cache
    assert after.vocab.decode(after.valid) == ["c", "b", "<eos>"] != before.vocab.decode(before.valid)
    assert len(entries(corpus_cache)) == 2


def test_vocabulary_options_are_part_of_the_key(small_corpus, corpus_cache):
    everything, _ = load_corpus_cached(small_corpus)
    frequent, from_cache = load_corpus_cached(small_corpus, min_freq=5)
    assert not from_cache
    assert len(frequent.vocab) < len(everything.vocab)
    assert len(entries(corpus_cache)) == 2


def test_a_file_changed_while_being_tokenized_is_cached_under_what_was_read(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path, "a b\n", "a\n", "b\n")

    def edit_then_tokenize(*args, **kwargs):
        (folder / "test.txt").write_text("a a\n", encoding="utf-8")
        return wordlm.data.corpus.tokenize_corpus(*args, **kwargs)

    monkeypatch.setattr(wordlm.data.cache, "tokenize_corpus", edit_then_tokenize)
    load_corpus_cached(folder)  # hashed "b", tokenized "a a"
    (folder / "test.txt").write_text("b\n", encoding="utf-8")
    monkeypatch.setattr(wordlm.data.cache, "tokenize_corpus", wordlm.data.corpus.tokenize_corpus)
    corpus, from_cache = load_corpus_cached(folder)
    assert not from_cache, "the entry holds 'a a' and must not be served for 'b'"
    assert corpus.vocab.decode(corpus.test) == ["b", "<eos>"]
    (folder / "test.txt").write_text("a a\n", encoding="utf-8")
    corpus, from_cache = load_corpus_cached(folder)
    assert from_cache and corpus.vocab.decode(corpus.test) == ["a", "a", "<eos>"]


CODE_RAN = []


def _run_code() -> None:
    CODE_RAN.append("code ran")


class RunsCode:
    """Unpickling this calls ``_run_code``: what a hostile cache file would do."""

    def __reduce__(self):
        return (_run_code, ())


def test_a_hostile_entry_would_run_code_if_unpickled_but_is_refused(small_corpus, corpus_cache):
    load_corpus_cached(small_corpus)
    [entry] = entries(corpus_cache)
    torch.save(RunsCode(), entry)
    torch.load(entry, weights_only=False)
    assert CODE_RAN == ["code ran"], "the hostile file is not hostile: the test proves nothing"
    CODE_RAN.clear()
    messages = []
    assert not load_corpus_cached(small_corpus, log=messages.append)[1]
    assert CODE_RAN == []
    assert "ignoring the corpus cache" in messages[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte_of_ids(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _out_of_range_id(path: Path) -> None:
    entry = torch.load(path, weights_only=True)
    entry["valid"] = entry["valid"].clone()
    entry["valid"][0] = 10**6
    entry["checksum"] = wordlm.data.cache._checksum(entry["vocab"], {s: entry[s] for s in ("train", "valid", "test")})
    torch.save(entry, path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b""),
        lambda path: path.write_bytes(b"not a torch file at all"),
        _truncate,
        _flip_a_byte_of_ids,
        _out_of_range_id,
        lambda path: torch.save({"version": wordlm.data.cache.CACHE_VERSION, "key": "another key"}, path),
    ],
    ids=["empty", "garbage", "truncated", "flipped-byte", "id-out-of-range", "other-key"],
)
def test_a_damaged_entry_is_ignored_and_written_again(small_corpus, corpus_cache, damage):
    expected, _ = load_corpus_cached(small_corpus)
    [entry] = entries(corpus_cache)
    damage(entry)
    messages = []
    corpus, from_cache = load_corpus_cached(small_corpus, log=messages.append)
    assert not from_cache
    assert_same(corpus, expected)
    assert len(messages) == 1 and messages[0].startswith(f"ignoring the corpus cache {entry} (")
    assert load_corpus_cached(small_corpus)[1], "the entry was not written again"


def test_an_unwritable_cache_folder_does_not_stop_the_load(small_corpus, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    messages = []
    corpus, from_cache = load_corpus_cached(small_corpus, cache_dir=not_a_folder / "cache", log=messages.append)
    assert not from_cache and len(corpus.vocab) > 0
    assert len(messages) == 1 and messages[0].startswith(f"cannot write the corpus cache in {not_a_folder / 'cache'}")


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(small_corpus, corpus_cache, monkeypatch):
    def write_half_then_fail(obj, stream):
        stream.write(b"PK\x03\x04 half an entry")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    messages = []
    corpus, from_cache = load_corpus_cached(small_corpus, log=messages.append)
    assert not from_cache and len(corpus.vocab) > 0
    assert "No space left on device" in messages[0]
    assert entries(corpus_cache) == []


def test_the_cache_folder_comes_from_wordlm_cache(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WORDLM_CACHE", str(tmp_path / "elsewhere"))
    load_corpus_cached(small_corpus)
    assert len(entries(tmp_path / "elsewhere")) == 1
    monkeypatch.delenv("WORDLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wordlm.data.cache.cache_folder() == tmp_path / "home" / ".cache" / "wordlm"
