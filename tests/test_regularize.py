"""Each AWD-LSTM technique does what Merity et al. 2017 say it does, and the classic model is unchanged."""

import numpy as np
import pytest
import torch
from conftest import run_cli

from wordlm.models import ModelConfig, RNNModel
from wordlm.models.regularize import LockedDropout, activation_penalties, embedding_dropout, weight_dropped_call
from wordlm.training.trainer import (
    Reporter,
    TrainState,
    averaged_weights,
    averaging_optimizer,
    sample_bptt,
    train_epoch,
)


def test_locked_dropout_shares_its_mask_over_time_and_not_over_the_batch():
    torch.manual_seed(0)
    dropout = LockedDropout(0.5).train()
    out = dropout(torch.ones(7, 16, 32))
    kept = out != 0  # (T, B, H)
    assert torch.equal(kept, kept[:1].expand_as(kept))  # the same units at every step
    assert not torch.equal(kept[0, 0], kept[0, 1])  # different units in different columns
    assert set(out.unique().tolist()) <= {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert torch.equal(dropout.eval()(out), out)


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(50, 8)
    inputs = torch.arange(50).repeat(3, 1)  # every word, three times
    dropped = embedding_dropout(embedding, inputs, 0.5, training=True)  # (3, 50, 8)
    zero_words = (dropped == 0).all(-1)  # (3, 50)
    assert zero_words.any() and not zero_words.all()
    assert torch.equal(zero_words, zero_words[:1].expand_as(zero_words))  # a dropped word is dropped everywhere
    kept = ~zero_words[0]
    assert torch.allclose(dropped[0, kept], embedding.weight[kept] * 2)
    assert torch.equal(embedding_dropout(embedding, inputs, 0.5, training=False), embedding(inputs))


def test_embedding_dropout_masks_rows_as_scaling_the_matrix_would():
    """Masking the looked-up rows gives the vectors and gradients of AWD-LSTM's scaled (V, E) matrix."""
    embedding = torch.nn.Embedding(40, 6)
    inputs = torch.randint(0, 40, (7, 5))
    torch.manual_seed(3)
    dropped = embedding_dropout(embedding, inputs, 0.3, training=True)
    dropped.pow(2).sum().backward()
    grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    torch.manual_seed(3)
    mask = embedding.weight.new_empty(40, 1).bernoulli_(0.7) / 0.7  # the same draws, as a (V, 1) column
    reference = torch.nn.functional.embedding(inputs, embedding.weight * mask)
    reference.pow(2).sum().backward()
    assert 0 < (mask == 0).sum() < 40
    assert torch.equal(dropped, reference)
    torch.testing.assert_close(grad, embedding.weight.grad)


def test_weight_drop_changes_only_recurrent_steps_and_is_off_in_eval():
    torch.manual_seed(2)
    rnn = torch.nn.LSTM(4, 6, 1)
    inputs = torch.randn(5, 3, 4)
    plain, _ = rnn(inputs)
    dropped, _ = weight_dropped_call(rnn, inputs, None, 0.5, training=True)
    assert torch.allclose(dropped[0], plain[0])  # from a zero state the recurrent matrix plays no part
    assert not torch.allclose(dropped[1:], plain[1:])
    evaluated, _ = weight_dropped_call(rnn, inputs, None, 0.5, training=False)
    assert torch.equal(evaluated, plain)
    dropped.sum().backward()
    assert rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.abs().sum() > 0


def test_ar_and_tar_add_exactly_their_terms():
    torch.manual_seed(3)
    config = dict(ntoken=30, emsize=8, nhid=8, nlayers=2, dropout=0.0, locked_dropout=True)
    model = RNNModel(ModelConfig(**config, alpha=2.0, beta=1.0)).train()
    plain = RNNModel(ModelConfig(**config))
    plain.load_state_dict(model.state_dict())
    inputs, targets = torch.randint(30, (6, 4)), torch.randint(30, (6, 4))
    loss, _ = model(inputs, model.init_hidden(4), targets)
    cross_entropy, _ = plain.train()(inputs, plain.init_hidden(4), targets)
    output, raw, _ = plain._run(inputs, plain.init_hidden(4))
    expected = 2.0 * output.pow(2).mean() + 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    assert (loss - cross_entropy).item() == pytest.approx(expected.item(), rel=1e-5)
    assert activation_penalties(output, raw, 0.0, 0.0) == 0.0
    assert model.last_cross_entropy.item() == pytest.approx(cross_entropy.item(), rel=1e-6)


def test_averaged_sgd_keeps_the_mean_of_the_iterates():
    torch.manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(5))
    optimizer = averaging_optimizer([weight], lr=0.1)
    iterates = []
    for _ in range(6):
        optimizer.zero_grad()
        (weight**2).sum().backward()
        optimizer.step()
        iterates.append(weight.detach().clone())
    # torch's ASGD (as AWD-LSTM used it, t0=0): the average of the iterates after the first step
    average = torch.stack(iterates[1:]).mean(0)
    assert torch.allclose(optimizer.state[weight]["ax"], average, atol=1e-6)
    assert not torch.allclose(optimizer.state[weight]["ax"], torch.stack(iterates).mean(0), atol=1e-4)
    current = weight.detach().clone()
    with averaged_weights(optimizer):
        assert torch.allclose(weight, average, atol=1e-6)
    assert torch.equal(weight.detach(), current)


def test_variable_bptt_lengths_and_lr_scaling(tiny_corpus):
    np.random.seed(5)
    lengths = [sample_bptt(70) for _ in range(2000)]
    assert min(lengths) >= 5 and 60 < np.median(lengths) < 80
    assert 0.02 < np.mean([n < 50 for n in lengths]) < 0.1  # about 5 % around bptt / 2
    from wordlm.data.corpus import batchify, load_corpus

    corpus = load_corpus(tiny_corpus)
    model = RNNModel(ModelConfig(ntoken=len(corpus.vocab), emsize=8, nhid=8, nlayers=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    original_step = optimizer.step
    optimizer.step = lambda: (seen.append(optimizer.param_groups[0]["lr"]), original_step())
    state = TrainState(lr=1.0)
    data = batchify(corpus.train, 4)
    np.random.seed(6)
    train_epoch(model, data, optimizer, state, bptt=20, clip=1.0, log_interval=100, max_batches=8,
                reporter=Reporter(stream=open("/dev/null", "w")), variable_bptt=True)  # fmt: skip
    np.random.seed(6)
    expected = []
    for _ in range(8):
        expected.append(sample_bptt(20))
    assert seen == pytest.approx([length / 20 for length in expected])
    assert state.position == sum(expected) and optimizer.param_groups[0]["lr"] == 1.0


def test_tied_projection_gives_the_last_layer_emsize_units():
    model = RNNModel(ModelConfig(ntoken=40, emsize=12, nhid=20, nlayers=3, tied=True, tied_projection=True))
    assert [(rnn.input_size, rnn.hidden_size) for rnn in model.rnns] == [(12, 20), (20, 20), (20, 12)]
    assert model.decoder.weight is model.encoder.weight
    logits, hidden = model(torch.randint(40, (5, 2)), model.init_hidden(2))
    assert logits.shape == (5, 2, 40) and hidden[-1][0].shape == (1, 2, 12)


def test_the_classic_model_is_unchanged_by_default():
    model = RNNModel(ModelConfig(ntoken=30))
    assert isinstance(model.rnn, torch.nn.LSTM) and model.rnn.num_layers == 2 and not hasattr(model, "rnns")
    assert isinstance(model.drop, torch.nn.Dropout)


def test_every_technique_together_through_the_cli_and_resume_with_averaging(tmp_path, tiny_corpus):
    args = ("with", "smoke", f"dataset={tiny_corpus}", "locked_dropout=True", "dropouti=0.3", "dropouth=0.2",
            "dropoute=0.1", "wdrop=0.3", "alpha=2", "beta=1", "wdecay=1e-6", "nonmono=1", "variable_bptt=True",
            "emsize=24", "tied_projection=True", "nlayers=2", "epochs=4", "max_batches=5", "-u")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.stdout.count("| end of epoch") == 4 and "test ppl" in result.stdout
    checkpoint = torch.load(tmp_path / "model.last.pt", weights_only=True)
    assert checkpoint["model_config"]["tied_projection"] is True
    finetuned = run_cli("with", "resume=model.last.pt", "finetune=True", "epochs=5", "-u", cwd=tmp_path)
    assert "| end of epoch   5 |" in finetuned.stdout and "| end of epoch   4 |" not in finetuned.stdout
    state = torch.load(tmp_path / "model.last.pt", weights_only=True)["training"]
    assert state["state"]["averaging"] is True and any("ax" in s for s in state["optimizer"]["state"].values())
