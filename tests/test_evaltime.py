"""The cache pointer and dynamic evaluation: exact at their neutral settings, and they do adapt."""

import math

import pytest
import torch
from conftest import run_cli

from wordlm.evaltime import cache_pointer_loss, dynamic_evaluation_loss
from wordlm.model import ModelConfig, RNNModel
from wordlm.training import evaluate_loss


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


def test_evaluate_command_options(tmp_path, tiny_corpus):
    run_cli("with", "smoke", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    plain = run_cli("evaluate", "with", f"dataset={tiny_corpus}", "eval_batch_size=1", "-u", cwd=tmp_path).stdout
    cached = run_cli("evaluate", "with", f"dataset={tiny_corpus}", "cache_window=100", "cache_lambda=0.0", "-u",
                     cwd=tmp_path).stdout  # fmt: skip
    dynamic = run_cli("evaluate", "with", f"dataset={tiny_corpus}", "dynamic_lr=0.5", "-u", cwd=tmp_path).stdout
    ppl = lambda out: float(out.split("| ppl")[1].split()[0])  # noqa: E731
    assert ppl(cached) == pytest.approx(ppl(plain), rel=1e-4) and "cache pointer (window 100" in cached
    assert "dynamic evaluation (lr 0.5" in dynamic
    both = run_cli("evaluate", "with", f"dataset={tiny_corpus}", "cache_window=5", "dynamic_lr=0.1", "-u",
                   cwd=tmp_path, check=False)  # fmt: skip
    assert both.returncode != 0 and "error: use the cache pointer" in both.stderr
