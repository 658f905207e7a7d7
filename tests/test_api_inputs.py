"""The Python API's input checks: every method that takes text, ids or sampling sizes refuses what it cannot use
with one ``UserError`` line naming the argument, before the model runs or anything is allocated."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import wordlm
from wordlm.data.corpus import EOS, UNK, Vocabulary
from wordlm.models import ModelConfig, RNNModel
from wordlm.training.checkpoint import save_checkpoint

WORDS = [EOS, "the", "cat", "sat", "on", "a", "mat", UNK]
ANY_TEXT = "a str (text), a pathlib.Path (a file) or a 1-D tensor of word ids"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> wordlm.LanguageModel:
    """A small LSTM, loaded from a checkpoint as a user would: the checks are the API's, whatever the weights."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(len(WORDS), "LSTM", emsize=8, nhid=8, nlayers=1, dropout=0.0, tied=True))
    path = tmp_path_factory.mktemp("inputs") / "m.pt"
    save_checkpoint(path, model, Vocabulary(WORDS))
    return wordlm.load(path, "cpu")


def user_error(call, *args, **kwargs) -> str:
    with pytest.raises(wordlm.UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


class Tripwire:
    """Fails the test the moment the model runs: a refusal must come before any sampling (and any allocation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.handle = model.register_forward_pre_hook(self.fire)

    @staticmethod
    def fire(module, args):
        raise AssertionError("the model ran: sampling started before the values were checked")

    def __enter__(self) -> Tripwire:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize(
    "keys, message",
    [({"words": 10**18}, "words=1000000000000000000 is more than 1,000,000, the most tokens one sample may have"),
     ({"words": 10**9}, "words=1000000000 is more than 1,000,000"),
     ({"samples": 10**12}, "samples=1000000000000 is more than 1,000, the most sampled side by side"),
     ({"words": 10_001, "samples": 1_000}, "words=10001 with samples=1000 make 10,001,000 tokens, more than the "
                                           "10,000,000 one call may sample")],
)  # fmt: skip
def test_huge_sampling_is_refused_before_the_model_runs(lm, keys, message):
    with Tripwire(lm.model):
        for call in (lm.generate, lm.sample):
            assert user_error(call, **keys).startswith(message)
    assert lm.generate(words=5, seed=1) == lm.generate(words=5, seed=1)  # the hook is gone, sampling works


@pytest.mark.parametrize("prompt", [123, b"the cat", Path("prompt.txt"), ["the", "cat"]], ids=repr)
def test_a_prompt_that_is_no_str_is_refused(lm, prompt):
    for call in (lm.generate, lm.sample):
        assert user_error(call, words=3, prompt=prompt) == f"prompt={prompt!r} must be a str (text)"
    assert lm.generate(words=3, prompt=None, seed=2) == lm.generate(words=3, prompt="", seed=2)  # None: no prompt


@pytest.mark.parametrize("text", [123, 4.5, b"the cat", ["the", "cat"], np.array([1, 2, 3])],
                         ids=lambda text: type(text).__name__)  # fmt: skip
def test_text_of_another_type_is_refused_naming_it(lm, text):
    shown = " ".join(repr(text).split())
    for method in (lm.perplexity, lm.loss, lm.line_scores):
        assert user_error(method, text) == f"text={shown} must be {ANY_TEXT}"
    message = user_error(lm.tokenize, text)
    assert message == f"text={shown} must be a str (text) or a pathlib.Path (a file)"


def test_tokenize_takes_no_ids_and_scoring_takes_its_ids(lm):
    assert user_error(lm.tokenize, torch.tensor([1, 2])) == (
        "text=tensor([1, 2]) must be a str (text) or a pathlib.Path (a file)"
    )
    text = "the cat sat on a mat\nthe cat sat\n"
    ids, _ = lm.tokenize(text)
    assert lm.perplexity(ids) == lm.perplexity(text) and lm.perplexity(Path(__file__)) > 1
    assert lm.line_scores(ids.int()) == lm.line_scores(ids)  # any integer dtype, read as long
    assert math.isfinite(lm.loss(ids[:2])[0])


@pytest.mark.parametrize(
    "ids, message",
    [(torch.tensor([1, 2, 8]), "text (a tensor of shape (3,), torch.int64) holds the id 8; word ids run from 0 to 7"),
     (torch.tensor([1, -1, 2]), "text (a tensor of shape (3,), torch.int64) holds the id -1; word ids run from 0 to 7"),
     (torch.tensor([1.0, 2.0]), "text (a tensor of shape (2,), torch.float32) must hold integer word ids"),
     (torch.tensor([True, False]), "text (a tensor of shape (2,), torch.bool) must hold integer word ids"),
     (torch.tensor([[1, 2], [3, 4]]), "text (a tensor of shape (2, 2), torch.int64) must be a 1-D tensor of word ids"),
     (torch.tensor(3), "text (a tensor of shape (), torch.int64) must be a 1-D tensor of word ids"),
     (torch.tensor([], dtype=torch.long), "text (a tensor of shape (0,), torch.int64) has 0 id(s); scoring needs at "
                                          "least two (the first is only context)"),
     (torch.tensor([3]), "text (a tensor of shape (1,), torch.int64) has 1 id(s); scoring needs at least two")],
    ids=["too-large", "negative", "float", "bool", "2-D", "0-D", "empty", "one"],
)  # fmt: skip
def test_ids_the_model_cannot_score_are_refused(lm, ids, message):
    for method in (lm.perplexity, lm.loss, lm.line_scores):
        assert user_error(method, ids).startswith(message)


@pytest.mark.parametrize(
    "lines, message",
    [(123, "lines=123 must be a list of lines of text (each a str)"),
     (torch.tensor([1, 2]), "lines=tensor([1, 2]) must be a list of lines of text (each a str)"),
     (Path("t.txt"), "lines=PosixPath('t.txt') must be a list of lines of text (each a str)"),
     ("the cat", "lines must be a list of lines, not one string; split it first, e.g. text.splitlines()")],
    ids=["int", "tensor", "path", "str"],
)  # fmt: skip
def test_score_refuses_what_is_no_list_of_lines(lm, lines, message):
    assert user_error(lm.score, lines) == message


def test_scoring_takes_no_bptt(lm):
    """The scores carry the state across chunks, so bptt changed nothing: it is no argument of theirs."""
    for method in (lm.loss, lm.perplexity, lm.line_scores, lm.score):
        assert "bptt" not in inspect.signature(method).parameters
    with pytest.raises(TypeError, match="bptt"):
        lm.perplexity("the cat sat\n", bptt=7)
