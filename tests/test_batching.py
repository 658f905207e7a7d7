"""The batch layout of truncated BPTT, with the alphabet diagrams of data/corpus.py as expected values."""

import string

import torch

from wordlm.data.corpus import batchify, batchify_eval, get_batch

ALPHABET = torch.arange(26)  # a=0 ... z=25


def letters(tensor: torch.Tensor) -> list[str]:
    return ["".join(string.ascii_lowercase[i] for i in row) for row in tensor.tolist()]


def test_batchify_lays_out_columns_and_drops_the_remainder():
    columns = batchify(ALPHABET, 4)
    assert columns.shape == (6, 4)
    assert letters(columns) == ["agms", "bhnt", "ciou", "djpv", "ekqw", "flrx"]


def test_get_batch_targets_are_the_next_row():
    inputs, targets = get_batch(batchify(ALPHABET, 4), 0, 2)
    assert letters(inputs) == ["agms", "bhnt"]
    assert letters(targets) == ["bhnt", "ciou"]


def test_get_batch_last_chunk_is_shorter():
    source = batchify(ALPHABET, 4)  # 6 rows: chunks start at 0, 4; the last has 1 step
    inputs, targets = get_batch(source, 4, 4)
    assert letters(inputs) == ["ekqw"]
    assert letters(targets) == ["flrx"]


def test_batchify_eval_scores_every_target_once():
    columns, tail = batchify_eval(ALPHABET, 4)
    assert letters(columns) == ["agms", "bhnt", "ciou", "djpv", "ekqw", "flrx", "gmsy"]
    assert letters(tail.t()) == ["yz"]
    targets = columns[1:].t().reshape(-1).tolist() + tail[1:].view(-1).tolist()
    assert sorted(targets) == list(range(1, 26))


def test_batchify_eval_without_tail_and_with_too_few_tokens():
    columns, tail = batchify_eval(torch.arange(9), 4)  # 8 targets: two rows, no tail
    assert tail is None and columns.shape == (3, 4)
    columns, tail = batchify_eval(torch.arange(3), 4)  # 2 targets: no full row
    assert columns is None and tail.view(-1).tolist() == [0, 1, 2]
