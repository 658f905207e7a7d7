"""Tokenizing text files (wordlm.data.corpus): line ends, encodings, unknown words, vocabulary limits."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpus
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wordlm.data.corpus import (
    EOS,
    UNK,
    Vocabulary,
    _text_pieces,
    load_corpus,
    restrict_vocabulary,
    tokenize_corpus,
    tokenize_file,
)
from wordlm.errors import UserError


def tokenize_bytes(folder: Path, raw: bytes, chunk_bytes: int = 1 << 22) -> list[str]:
    """Tokenize ``raw`` as a training file and return its words, ``<eos>`` included."""
    path = folder / "train.txt"
    path.write_bytes(raw)
    vocab = Vocabulary()
    ids, _ = tokenize_file(path, vocab, grow=True, chunk_bytes=chunk_bytes)
    return vocab.decode(ids)


def joined_lines(words: list[str]) -> list[str]:
    """Undo tokenizing as far as it can be undone: each line's words joined by one space."""
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    assert line == [], "the last line has no <eos>"
    return lines


def classic_lines(raw: bytes) -> list[str]:
    """What the classic example reads: universal newlines, ``line.split()``, a leading BOM dropped."""
    return [" ".join(line.split()) for line in io.StringIO(raw.decode("utf-8-sig"), newline=None)]


TRICKY = list(" \t\r\n\x0b\x0c\x1c\x1d\x85\xa0\u2028\u2029\u3000\ufeff") + ["ab", "é", "<unk>", "日本"]


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8")), max_size=60).map("".join),
    bom=st.booleans(),
    chunk_bytes=st.sampled_from([1, 2, 3, 5, 8, 64, 1 << 22]),
)
def test_tokenizing_arbitrary_text_and_decoding_gives_back_its_lines(text, bom, chunk_bytes):
    assume(EOS not in text)
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    with tempfile.TemporaryDirectory() as folder:
        words = tokenize_bytes(Path(folder), raw, chunk_bytes)
    assert joined_lines(words) == classic_lines(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"a b\r\nc\r\n\r\nd\r\n",  # CRLF
        b"a b\rc\r\rd\r",  # old Mac lone CR
        b"\xef\xbb\xbfa b\nc\n\nd\n",  # UTF-8 byte-order mark
        b"a\tb \n c\t\n\t\nd",  # tabs, stray spaces, no line break at the end
    ],
)
def test_crlf_bom_tabs_and_a_missing_last_line_break_read_like_plain_lines(tmp_path, raw):
    assert tokenize_bytes(tmp_path, raw) == ["a", "b", EOS, "c", EOS, EOS, "d", EOS]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 22])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_bytes_that_are_not_utf8_are_refused_naming_the_file_and_line(tmp_path, chunk_bytes, newline):
    path = tmp_path / "train.txt"
    path.write_bytes(newline.join([b"fine", "caf\u00e9".encode(), b"caf\xe9 latin-1", b"fine"]))
    with pytest.raises(UserError, match=rf"^{path}: line 3 is not valid UTF-8 \(byte 0xe9\); convert") as caught:
        tokenize_file(path, Vocabulary(), grow=True, chunk_bytes=chunk_bytes)
    assert "\n" not in str(caught.value)


def test_a_file_without_line_breaks_is_read_in_bounded_pieces(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("word " * 10_000, encoding="utf-8")
    pieces = list(_text_pieces(path, chunk_bytes=64))
    assert max(len(piece) for piece in pieces) <= 2 * 64
    assert "".join(pieces).split() == ["word"] * 10_000


def test_vocabulary_comes_from_train_and_unknown_words_become_unk(tmp_path):
    folder = write_corpus(tmp_path, "the cat sat\nthe dog\n", "the cow sat\n", "a bird\nthe cat\n")
    corpus = load_corpus(folder)
    assert corpus.vocab.idx2word == ["the", "cat", "sat", EOS, "dog", UNK]  # <unk> added when first needed
    assert corpus.vocab.decode(corpus.valid) == ["the", UNK, "sat", EOS]
    assert corpus.vocab.decode(corpus.test) == [UNK, UNK, EOS, "the", "cat", EOS]
    assert corpus.unknown_counts == {"valid": 1, "test": 2}
    assert corpus.train.dtype == corpus.valid.dtype == corpus.test.dtype == torch.int64


def test_unk_is_not_added_when_every_word_is_known(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path, "a b\nb a\n", "a\n", "b\n"), min_freq=2)
    assert corpus.vocab.idx2word == ["a", "b", EOS]
    assert corpus.unknown_counts == {"valid": 0, "test": 0}


def test_min_freq_and_max_vocab_send_rare_words_to_unk_keeping_first_seen_order(tmp_path):
    train = "c c c b b a\nd d d d\n"  # counts: d 4, c 3, b 2, <eos> 2, a 1
    folder = write_corpus(tmp_path, train, "a b c d\n", "c\n")
    by_freq = tokenize_corpus(folder, min_freq=2)
    assert by_freq.vocab.idx2word == ["c", "b", EOS, "d", UNK]
    assert by_freq.unknown_counts == {"train": 1, "valid": 1, "test": 0}
    by_size = tokenize_corpus(folder, max_vocab=4)  # <eos> and <unk> count: room for d and c
    assert by_size.vocab.idx2word == ["c", EOS, "d", UNK]
    assert by_size.vocab.decode(by_size.arrays["valid"]) == [UNK, UNK, "c", "d", EOS]
    assert by_size.unknown_counts == {"train": 3, "valid": 2, "test": 0}


def test_max_vocab_counts_an_unk_that_train_already_has(tmp_path):
    train = "x x x y y <unk>\nz z\n"  # <unk> is the rarest word, yet kept, with <eos>: room for x only
    vocab = tokenize_corpus(write_corpus(tmp_path, train, "x y\n", "x z\n"), max_vocab=3).vocab
    assert vocab.idx2word == ["x", UNK, EOS]


def test_restrict_vocabulary_breaks_frequency_ties_by_first_appearance():
    vocab = Vocabulary(["p", "q", "r", EOS])
    train = np.array([2, 1, 0, 3], dtype=np.int32)  # every word once
    new, remap = restrict_vocabulary(vocab, train, max_size=3)
    assert new.idx2word == ["p", EOS, UNK]
    assert remap.tolist() == [0, 2, 2, 1]
    assert restrict_vocabulary(vocab, train, max_size=4) == (vocab, None)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_freq": 0}, r"min_freq=0 must be a positive integer"),
        ({"min_freq": True}, r"min_freq=True must be a positive integer"),
        ({"max_vocab": 1}, r"max_vocab=1 must be None or an integer >= 2"),
        ({"max_vocab": "5"}, r"max_vocab='5' must be None or an integer >= 2"),
    ],
)
def test_impossible_vocabulary_options_are_refused(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        tokenize_corpus(write_corpus(tmp_path, "a\n", "a\n", "a\n"), **options)


@pytest.mark.parametrize(
    "texts, message",
    [
        (("a b\n", "\n \n\t\n", "a\n"), r"valid.txt has no words"),
        (("", "a\n", "a\n"), r"train.txt has no words"),
        (("a b\n", "a\n", "x y\nz\n"), r"test.txt: every word is unknown to train.txt's vocabulary"),
    ],
)
def test_splits_without_usable_words_are_refused(tmp_path, texts, message):
    with pytest.raises(UserError, match=message):
        tokenize_corpus(write_corpus(tmp_path, *texts))
