"""RNNModel: shapes and hidden state of every model type, weight tying, the config's checks."""

import math

import pytest
import torch

from wordlm.models import MODEL_TYPES, ModelConfig, RNNModel, detach_hidden


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shapes_and_hidden_state(model_type):
    model = RNNModel(ModelConfig(ntoken=50, model_type=model_type, emsize=12, nhid=12, nlayers=3))
    hidden = model.init_hidden(5)
    states = hidden if model_type == "LSTM" else (hidden,)
    assert all(h.shape == (3, 5, 12) and not h.any() for h in states)
    logits, new_hidden = model(torch.randint(50, (7, 5)), hidden)
    assert logits.shape == (7, 5, 50)
    new_states = new_hidden if model_type == "LSTM" else (new_hidden,)
    assert all(h.shape == (3, 5, 12) and h.any() for h in new_states)
    assert all(
        not h.requires_grad
        for h in (detach_hidden(new_hidden) if model_type == "LSTM" else (detach_hidden(new_hidden),))
    )


def test_tied_model_shares_one_matrix():
    model = RNNModel(ModelConfig(ntoken=40, emsize=8, nhid=8, tied=True))
    assert model.decoder.weight is model.encoder.weight
    untied = RNNModel(ModelConfig(ntoken=40, emsize=10, nhid=8, tied=False))
    assert untied.decoder.weight is not untied.encoder.weight
    shared = sum(p.numel() for p in model.parameters())
    assert (
        shared
        == sum(p.numel() for p in RNNModel(ModelConfig(ntoken=40, emsize=8, nhid=8, tied=False)).parameters()) - 40 * 8
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tied": True, "emsize": 10, "nhid": 8}, "tied=True needs emsize == nhid"),
        ({"model_type": "LSTMX"}, "model_type='LSTMX' is not one of"),
        ({"nhid": 0, "tied": False}, "nhid=0 must be a positive integer"),
        ({"dropout": 1.0}, "dropout=1.0 must be a number with 0 <= dropout < 1"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        ModelConfig(ntoken=10, **changes)


def test_zero_decoder_gives_uniform_perplexity():
    model = RNNModel(ModelConfig(ntoken=37, emsize=6, nhid=6, tied=False)).eval()
    torch.nn.init.zeros_(model.decoder.weight)
    logits, _ = model(torch.randint(37, (4, 3)), model.init_hidden(3))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 37), torch.randint(37, (12,)))
    assert math.exp(loss.item()) == pytest.approx(37, rel=1e-6)


def test_dropout_is_off_in_eval_mode():
    model = RNNModel(ModelConfig(ntoken=30, emsize=8, nhid=8, dropout=0.5)).eval()
    inputs = torch.randint(30, (5, 2))
    first, _ = model(inputs, model.init_hidden(2))
    second, _ = model(inputs, model.init_hidden(2))
    assert torch.equal(first, second)
