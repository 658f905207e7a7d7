"""Scoring text: every target exactly once, by hand; the loss and the per-token scores agree on any layout and
chunking; per-line sums; the cache pointer and dynamic evaluation; evaluate_text's checks and methods."""

from __future__ import annotations

import math

import pytest
import torch

from wordlm import evaluation
from wordlm.data.corpus import EOS, UNK, Vocabulary
from wordlm.errors import UserError
from wordlm.evaluation import (
    cache_mixed_loss,
    cache_pointer_loss,
    cache_pointer_states,
    dynamic_evaluation_loss,
    eval_chunk_tokens,
    evaluate_loss,
    evaluate_text,
    perplexity,
    score_lines,
    target_chunks,
    target_log_probs,
)
from wordlm.models import ModelConfig, RNNModel, unwrap

# Blank line, a word the vocabulary lacks (-> <unk>), and lines of different lengths.
TEXT = "the cat sat\n\non the mat with a hat\nthe zebra sat\na cat\n"
VOCAB = ["hat", "a", "with", EOS, "sat", "on", "cat", UNK, "mat", "the"]  # not in the text's order


def context_free_model(vocab: Vocabulary) -> RNNModel:
    """A model whose next-word distribution is softmax(bias) whatever came before: decoder weight 0."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(len(vocab), "GRU", emsize=6, nhid=6, nlayers=1, dropout=0.0, tied=False))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.linspace(-2.0, 3.0, len(vocab)))  # a distinct probability per word
    return model.eval()


def hand_ids(text: str, vocab: Vocabulary) -> list[int]:
    words = text.replace("\n", f" {EOS} ").split()
    return [vocab.word2idx.get(word, vocab.word2idx[UNK]) for word in words]


def make_model(ntoken, seed=0, model_type="LSTM", **keys):
    torch.manual_seed(seed)
    keys = {"emsize": 32, "nhid": 32, "nlayers": 1, "dropout": 0.0, **keys}
    return RNNModel(ModelConfig(ntoken=ntoken, model_type=model_type, **keys)).eval()


@pytest.mark.parametrize("batch_size, bptt", [(1, 35), (1, 1), (3, 2), (4, 35), (5, 3), (30, 4), (1000, 35)])
def test_every_target_is_scored_exactly_once(batch_size, bptt):
    """Against a hand sum over all N-1 targets: a skipped or doubled target changes the total."""
    vocab = Vocabulary(VOCAB)
    model = context_free_model(vocab)
    log_p = torch.log_softmax(model.decoder.bias.detach().double(), dim=0)
    ids = torch.tensor(hand_ids(TEXT, vocab))
    per_target = [float(log_p[i]) for i in ids[1:]]  # the first token is context only
    loss, count = evaluate_loss(model, ids, batch_size, bptt)
    assert count == len(ids) - 1 == 18
    assert loss * count == pytest.approx(-sum(per_target), rel=1e-6)
    assert target_log_probs(model, ids, batch_size).tolist() == pytest.approx(per_target, rel=1e-6)  # text order


def test_evaluation_covers_every_target_once_and_matches_a_direct_sum():
    model = make_model(13)
    ids = torch.randint(13, (103,))
    loss, count = evaluate_loss(model, ids, batch_size=4, bptt=7)
    assert count == 102
    # Direct computation: the same columns, each run in one piece from a zero state.
    columns = [ids[j * 25 : j * 25 + 26] for j in range(4)] + [ids[100:]]
    total = 0.0
    with torch.no_grad():
        for column in columns:
            logits, _ = model(column[:-1].view(-1, 1), model.init_hidden(1))
            total += torch.nn.functional.cross_entropy(logits.view(-1, 13), column[1:], reduction="sum").item()
    assert loss == pytest.approx(total / 102, rel=1e-6)


MODELS = {
    "LSTM": {"model_type": "LSTM", "nlayers": 2},  # a pair (h, c) of (L, B, H)
    "RNN_RELU": {"model_type": "RNN_RELU", "nlayers": 2},  # one tensor
    "layered LSTM": {"model_type": "LSTM", "nlayers": 3, "wdrop": 0.3, "locked_dropout": True},  # a list of pairs
    "layered GRU, tied projection": {"model_type": "GRU", "nlayers": 2, "emsize": 12, "tied_projection": True},
}


@pytest.mark.parametrize("keys", MODELS.values(), ids=MODELS.keys())
def test_the_loss_and_the_per_token_scores_agree_on_every_layout_and_chunking(monkeypatch, keys):
    """Both walk the text the same way: the log-probabilities add up to -loss * targets, whatever the columns
    and however many tokens each chunk holds (a layered model carries a list of per-layer states)."""
    model = make_model(20, seed=1, **{"emsize": 8, "nhid": 8, **keys})
    ids = torch.randint(0, 20, (203,))
    reference = None
    for chunk_tokens in (1024, 37, 5):  # one chunk a column, several, few steps (one step with 202 columns)
        monkeypatch.setattr(evaluation, "eval_chunk_tokens", lambda ntoken, tokens=chunk_tokens: tokens)
        for batch_size in (1, 3, 10, 202, 500):
            loss, count = evaluate_loss(model, ids, batch_size)
            per_token = target_log_probs(model, ids, batch_size)
            assert per_token.numel() == count == 202 and per_token.dtype == torch.float64
            assert float(per_token.sum()) == pytest.approx(-loss * count, rel=1e-6)  # loss sums float32 chunks
            if batch_size == 1:  # one column: the same states for every chunking
                reference = per_token if reference is None else reference
                assert per_token.tolist() == pytest.approx(reference.tolist(), rel=1e-5, abs=1e-6)
    assert not model.training


def test_evaluation_does_not_depend_on_its_chunk_size(monkeypatch):
    model = make_model(17, seed=7)
    ids = torch.randint(17, (401,))
    reference, count = evaluate_loss(model, ids, batch_size=3)
    monkeypatch.setattr(evaluation, "EVAL_TOKENS", 7)  # many short chunks instead of one long one
    chunked, chunked_count = evaluate_loss(model, ids, batch_size=3)
    assert chunked_count == count == 400
    assert chunked == pytest.approx(reference, rel=1e-6)


def test_evaluation_leaves_the_model_in_its_mode():
    model = make_model(11, dropout=0.5).train()
    ids = torch.randint(11, (50,))
    evaluate_loss(model, ids, 2)
    target_log_probs(model, ids, 2)
    assert model.training
    model.eval()
    assert evaluate_loss(model.train(), ids, 2) == evaluate_loss(model.eval(), ids, 2)  # no dropout while scoring


def test_eval_chunks_keep_the_logits_buffer_bounded():
    assert eval_chunk_tokens(10_000) == evaluation.EVAL_TOKENS
    assert eval_chunk_tokens(33_278) == evaluation.EVAL_BUFFER_BYTES // (4 * 33_278)
    assert eval_chunk_tokens(267_735) * 267_735 * 4 <= evaluation.EVAL_BUFFER_BYTES
    assert eval_chunk_tokens(10**9) == 64  # never fewer than 64 tokens


def test_an_evaluation_pass_builds_the_decoders_augmented_weight_once(monkeypatch):
    """Columns and tail, every chunk: one augmented copy of the decoder weight for the whole pass."""
    import wordlm.models.fused as fused

    built = []
    original = fused._scaled_augmented
    monkeypatch.setattr(fused, "_scaled_augmented", lambda w, b: built.append(1) or original(w, b))
    monkeypatch.setattr(evaluation, "EVAL_TOKENS", 7)  # many chunks
    model = make_model(17, seed=3)
    loss, count = evaluate_loss(model, torch.randint(17, (103,)), batch_size=4)  # 4 columns of 25 and a tail
    assert count == 102 and math.isfinite(loss)
    assert len(built) == 1


def test_perplexity_is_exp_of_the_loss_and_inf_past_overflow():
    assert perplexity(0.0) == 1.0 and perplexity(math.log(120.0)) == pytest.approx(120.0)
    assert perplexity(710.0) == math.inf and perplexity(math.inf) == math.inf


def test_line_scores_split_the_total_by_line():
    eos = 0
    ids = torch.tensor([5, 6, eos, eos, 7, eos, 8])  # lines: "5 6", "", "7", "8" (no final <eos>)
    log_probs = torch.tensor([-1.0, -2.0, -4.0, -8.0, -16.0, -32.0], dtype=torch.float64)
    assert score_lines(ids, log_probs, eos) == [
        {"line": 1, "tokens": 2, "logprob": -3.0},  # 6 and <eos>: the first token is context only
        {"line": 2, "tokens": 1, "logprob": -4.0},
        {"line": 3, "tokens": 2, "logprob": -24.0},
        {"line": 4, "tokens": 1, "logprob": -32.0},
    ]


# -- the cache pointer and dynamic evaluation: exact at their neutral settings, and they do adapt


def model_and_text(seed=0):
    torch.manual_seed(seed)
    model = RNNModel(ModelConfig(ntoken=20, emsize=8, nhid=8, nlayers=1)).eval()
    ids = torch.randint(20, (301,))
    return model, ids


def test_cache_with_lambda_zero_or_no_window_is_the_plain_model():
    model, ids = model_and_text()
    plain, count = evaluate_loss(model, ids, batch_size=1)
    for window, theta, lambdah in ((50, 0.0, 0.0), (0, 1.0, 0.3), (50, 1.0, 0.0)):
        loss, n = cache_pointer_loss(model, ids, window, theta, lambdah, chunk=64)
        assert n == count == 300 and loss == pytest.approx(plain, rel=1e-6)


def test_cache_matches_its_definition_token_by_token():
    model, ids = model_and_text(1)
    window, theta, lambdah = 17, 3.0, 0.4
    loss, _ = cache_pointer_loss(model, ids, window, theta, lambdah, chunk=23)  # chunks cut across windows
    with torch.no_grad():
        states, _ = model.features(ids[:-1].view(-1, 1), model.init_hidden(1))
        states = states.squeeze(1).double()
        model_probs = torch.softmax(model.decoder(states.float()).double(), -1)
    targets = ids[1:]
    total = 0.0
    for t in range(targets.numel()):
        p_model = model_probs[t, targets[t]].item()
        cached = range(max(0, t - window), t)
        if not cached:
            total -= math.log(p_model)
            continue
        weights = torch.softmax(torch.stack([theta * states[t] @ states[i] for i in cached]), 0)
        p_cache = sum(w.item() for w, i in zip(weights, cached) if targets[i] == targets[t])
        total -= math.log((1 - lambdah) * p_model + lambdah * p_cache)
    assert loss == pytest.approx(total / targets.numel(), rel=1e-6)


@torch.inference_mode()
def one_pass_cache_pointer_loss(model, ids, window, theta, lambdah, chunk=500):
    """cache_pointer_loss as it was before its split into cache_pointer_states and cache_mixed_loss: model and
    cache in one walk. Kept as it was, so that the split is held to the same floats."""
    model = unwrap(model)
    memory_states = ids.new_empty(0, dtype=torch.float32)  # (≤window, H)
    memory_words = ids.new_empty(0)  # (≤window,) the word that followed each cached state
    total, count = 0.0, 0
    for features, targets, _ in target_chunks(model, ids, 1, tokens=chunk):
        states, targets = features.squeeze(1), targets.squeeze(1)  # (T, H), (T,)
        log_model = torch.log_softmax(model.decoder.scores(states).double(), dim=-1)  # (T, V)
        model_log_prob = log_model.gather(1, targets.view(-1, 1)).squeeze(1)  # (T,)
        if window > 0 and lambdah > 0:
            keys = torch.cat([memory_states, states])  # (M + T, H): cache, then this chunk
            words = torch.cat([memory_words, targets])
            steps = torch.arange(states.size(0), device=ids.device)
            positions = torch.arange(keys.size(0), device=ids.device) - memory_states.size(0)
            visible = (positions[None, :] < steps[:, None]) & (positions[None, :] >= steps[:, None] - window)
            scores = (theta * states.double() @ keys.double().t()).masked_fill(~visible, -math.inf)  # (T, M+T)
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            cache_prob = (weights * (words[None, :] == targets[:, None])).sum(-1)  # (T,)
            has_cache = visible.any(-1)
            mixed = (1 - lambdah) * model_log_prob.exp() + lambdah * cache_prob
            log_prob = torch.where(has_cache, mixed.log(), model_log_prob)
            memory_states, memory_words = keys[-window:], words[-window:]
        else:
            log_prob = model_log_prob
        total -= log_prob.sum().item()
        count += targets.numel()
    return total / count, count


@pytest.mark.parametrize(
    "decoder",
    [{}, {"tied": False, "adaptive_softmax": (10,)}, {"adaptive_softmax": (5, 10)}],
    ids=["full", "adaptive", "adaptive tied"],
)
def test_one_model_pass_serves_every_cache_setting_with_the_one_pass_floats(decoder):
    """cache_pointer_states once, then cache_mixed_loss per setting: the floats of the model-and-cache walk
    bit for bit, whatever the window (none, shorter than a chunk, across chunks, past the text's end), θ and λ."""
    torch.manual_seed(5)
    model = RNNModel(ModelConfig(ntoken=20, emsize=8, nhid=8, nlayers=1, **decoder)).eval()
    ids = torch.cat([torch.randint(20, (90,))] * 3 + [torch.randint(20, (31,))])  # 301 tokens, some repeats
    settings = [(0, 1.0, 0.3), (17, 3.0, 0.0), (1, 0.5, 0.2), (17, 3.0, 0.4), (64, 0.662, 0.1279),
                (300, 1.0, 0.25), (5000, 0.3, 0.9), (40, 0.0, 1.0)]  # fmt: skip
    for chunk in (23, 64, 500):  # 500: the whole text in one chunk
        states, log_probs, targets = cache_pointer_states(model, ids, chunk)
        assert states.shape == (300, 8) and log_probs.dtype == torch.float64 and torch.equal(targets, ids[1:])
        for window, theta, lambdah in settings:
            expected = one_pass_cache_pointer_loss(model, ids, window, theta, lambdah, chunk)
            assert cache_mixed_loss(states, log_probs, targets, window, theta, lambdah, chunk) == expected
            assert cache_pointer_loss(model, ids, window, theta, lambdah, chunk) == expected
    cached = cache_pointer_loss(model, ids, 200, 1.0, 0.3)  # the default chunk
    assert cached == one_pass_cache_pointer_loss(model, ids, 200, 1.0, 0.3)
    assert cached[0] < one_pass_cache_pointer_loss(model, ids, 0, 1.0, 0.0)[0]  # the copy 90 words back is in reach


def test_dynamic_evaluation_with_lr_zero_is_plain_evaluation_and_adapts_otherwise():
    model, ids = model_and_text(2)
    repeated = torch.cat([ids[:100]] * 3)
    plain, count = evaluate_loss(model, repeated, batch_size=1)
    loss, n = dynamic_evaluation_loss(model, repeated, bptt=20, lr=0.0)
    assert n == count and loss == pytest.approx(plain, rel=1e-6)
    before = [p.clone() for p in model.parameters()]
    adapted, _ = dynamic_evaluation_loss(model, repeated, bptt=20, lr=1.0)
    assert adapted < plain - 0.02  # it learns from the text it has scored
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is untouched


def test_dynamic_evaluation_scores_each_segment_before_it_learns_from_it():
    """A text of one bptt segment is scored before any step: plain evaluation, whatever the lr."""
    model, ids = model_and_text(4)
    once, count = dynamic_evaluation_loss(model, ids, bptt=ids.numel(), lr=5.0, decay=0.1)
    assert (once, count) == pytest.approx(evaluate_loss(model, ids, 1), rel=1e-6)


# -- evaluate_text: what `main.py evaluate` computes, with its checks


def test_evaluate_text_chooses_the_method_and_names_it():
    model, ids = model_and_text(3)
    assert evaluate_text(model, ids, eval_batch_size=4) == (*evaluate_loss(model, ids, 4), "")
    loss, count, method = evaluate_text(model, ids, cache_window=40, cache_theta=0.5, cache_lambda=0.25)
    assert (loss, count) == cache_pointer_loss(model, ids, 40, 0.5, 0.25)
    assert method == " | cache pointer (window 40, theta 0.5, lambda 0.25)"
    loss, count, method = evaluate_text(model, ids, bptt=9, dynamic_lr=0.3, dynamic_decay=0.01)
    assert (loss, count) == dynamic_evaluation_loss(model, ids, 9, 0.3, 0.01)
    assert method == " | dynamic evaluation (lr 0.3, decay 0.01)"


@pytest.mark.parametrize(
    "keys, message",
    [({"eval_batch_size": 0}, "eval_batch_size=0 must be a positive integer"),
     ({"bptt": 2.5}, "bptt=2.5 must be a positive integer"),
     ({"cache_window": -1}, "cache_window=-1 must be an integer >= 0"),
     ({"cache_window": 10.0}, "cache_window=10.0 must be an integer >= 0"),
     ({"cache_lambda": 1.5}, "cache_lambda=1.5 must be a number between 0 and 1"),
     ({"cache_theta": -0.1}, "cache_theta=-0.1 must be a number >= 0"),
     ({"dynamic_lr": True}, "dynamic_lr=True must be a number >= 0"),
     ({"dynamic_decay": 1e39}, "dynamic_decay=1e+39 is beyond what float32 holds"),
     ({"cache_window": 5, "dynamic_lr": 0.1},
      "use the cache pointer (cache_window) or dynamic evaluation (dynamic_lr), not both at once")],
)  # fmt: skip
def test_evaluate_text_refuses_bad_options_in_one_line(keys, message):
    model, ids = model_and_text()
    with pytest.raises(UserError) as caught:
        evaluate_text(model, ids, **keys)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
