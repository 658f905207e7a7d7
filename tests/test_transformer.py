"""model_type=Transformer: its window across chunks, and everything the RNNs do (train, resume, generate,
evaluate, export, torchrun, amp, compile, the API) on the real command line."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import torch
from conftest import run_cli
from test_distributed import TEST_PPL, assert_same_training, torchrun
from test_reliability import losses, popen, same_weights

import wordlm
from wordlm import evaluation
from wordlm.evaluation import target_log_probs
from wordlm.generation import sample_ids
from wordlm.models import ModelConfig, build_model, detach_hidden
from wordlm.models.transformer import TransformerModel
from wordlm.training.checkpoint import load_checkpoint
from wordlm.training.trainer import Precision, Reporter, TrainState, evaluate_loss, train_epoch

V = 40
SMOKE = ("with", "smoke", "model_type=Transformer")


def transformer(**options) -> TransformerModel:
    config = dict(ntoken=V, model_type="Transformer", emsize=16, nhid=24, nlayers=2, dropout=0.0, window=6)
    model = build_model(ModelConfig(**{**config, **options}))
    with torch.no_grad():  # biases that are not all zero, so that positions matter
        model.distance_bias.normal_()
    return model.eval()


def test_build_model_gives_a_transformer_whose_state_is_its_window():
    model = transformer(tied=True)
    assert isinstance(model, TransformerModel)
    assert model.decoder.weight is model.encoder.weight  # tied, though nhid != emsize
    memory = model.init_hidden(3)
    assert [tuple(m.shape) for m in memory] == [(5, 3, 16)] * 2 and not any(m.any() for m in memory)
    untied = transformer(tied=False)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == V * 16


def test_a_word_sees_exactly_the_window_before_it_across_chunks():
    torch.manual_seed(0)
    model = transformer()
    ids = torch.randint(0, V, (30, 2))
    whole, _ = model(ids, model.init_hidden(2))  # (T, B, V)
    for size in (1, 4, 7):  # chunks shorter and longer than the window: the same scores
        pieces, memory = [], model.init_hidden(2)
        for start in range(0, 30, size):
            logits, memory = model(ids[start : start + size], memory)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[10] = (ids[10] + 1) % V
    after, _ = model(changed, model.init_hidden(2))
    # word 10 is in the window of words 10..15 (itself and the 5 before) in the first layer, and through the
    # second layer of words up to 20; never before it
    assert torch.equal(after[:10], whole[:10])
    assert not torch.allclose(after[10:16], whole[10:16])
    # two layers of a 6-word window reach 10 words back, and no further
    torch.testing.assert_close(after[21:], whole[21:], rtol=1e-5, atol=1e-5)
    # the memory is what carries the context: without it, a chunk's first word sees nothing before it
    second, _ = model(ids[15:], model.init_hidden(2))
    assert not torch.allclose(second[0], whole[15])


def test_evaluation_scores_every_target_once_however_the_columns_are_cut(monkeypatch):
    torch.manual_seed(1)
    model = transformer()
    ids = torch.randint(0, V, (203,))
    figures = []
    for tokens in (1024, 64, 7):
        monkeypatch.setattr(evaluation, "EVAL_TOKENS", tokens)
        figures.append(evaluate_loss(model, ids, batch_size=3))
    assert all(count == 202 for _, count in figures)
    assert figures[1][0] == pytest.approx(figures[0][0], rel=1e-6)
    assert figures[2][0] == pytest.approx(figures[0][0], rel=1e-6)
    per_token = target_log_probs(model, ids, batch_size=3)  # another cut: its own chunks
    assert per_token.numel() == 202 and -per_token.mean().item() == pytest.approx(figures[0][0], rel=1e-6)


def test_one_cached_step_at_a_time_gives_the_whole_sequence_probabilities():
    """Generation feeds one token per step against the memory (no recomputation of the growing text); its
    probabilities are those of running the whole sequence at once, and the same seed samples the same ids."""
    torch.manual_seed(2)
    model = transformer()
    context = [3, 1, 4, 1, 5]
    generator = torch.Generator().manual_seed(7)
    sampled = sample_ids(model, context, words=25, samples=2, top_k=10, top_p=0.9, generator=generator)
    again = sample_ids(model, context, words=25, samples=2, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert torch.equal(sampled, again)
    text = torch.cat([torch.tensor(context).view(-1, 1).expand(-1, 2), sampled])  # (P + S, B)
    whole, _ = model(text[:-1], model.init_hidden(2))
    steps, memory = [], model.init_hidden(2)
    for token in text[:-1]:
        logits, memory = model(token.view(1, -1), memory)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps).log_softmax(-1), whole.log_softmax(-1), rtol=1e-5, atol=1e-5)


def train_losses(model, precision=None, compiled=None, batches=4):
    torch.manual_seed(1)
    data = torch.randint(0, V, (batches * 5 + 1, 4))
    seen = []

    class Keep(Reporter):
        def interval(self, state, total, ms_per_batch, loss):
            seen.append(loss)

        def write(self, line):
            pass

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_epoch(model if compiled is None else compiled, data, optimizer, TrainState(lr=1.0), bptt=5, clip=0.25,
                log_interval=1, max_batches=batches, reporter=Keep(), precision=precision or Precision())  # fmt: skip
    return seen


def test_compiled_and_bf16_training_follow_float32_eager_training():
    torch.manual_seed(0)
    model = transformer().train()
    reference = transformer().train()
    reference.load_state_dict(model.state_dict())
    expected = train_losses(reference)
    torch._dynamo.reset()
    assert train_losses(model, compiled=torch.compile(model, backend="aot_eager")) == pytest.approx(expected, rel=1e-5)
    bf16 = transformer().train()
    bf16.load_state_dict(reference.state_dict())
    assert train_losses(bf16, Precision("bf16")) == pytest.approx(train_losses(reference), rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())


def test_the_memory_is_detached_and_kept_by_training():
    model = transformer().train()
    ids = torch.randint(0, V, (8, 2))
    loss, memory = model(ids, model.init_hidden(2), ids)
    assert all(m.requires_grad for m in memory) and not any(m.requires_grad for m in detach_hidden(memory))
    assert torch.equal(memory[0][-1], (model.encoder(ids[-1]) * 16**0.5).detach())  # the first layer's last input


@pytest.mark.parametrize("softmax", [{"tied": True}, {"tied": False, "adaptive_softmax": [8, 20]}])
def test_the_cache_pointer_and_dynamic_evaluation_work_on_the_transformer(softmax):
    """At their neutral settings both are the plain evaluation (full and adaptive softmax), and on a text that
    repeats itself both lower the loss; the model's words are scored in id order whatever the softmax."""
    torch.manual_seed(3)
    model = transformer(**softmax)
    if "adaptive_softmax" in softmax:
        model.decoder.sort_words_by_frequency(torch.randperm(V).float())  # a word rank that is not the identity
    ids = torch.cat([torch.randint(0, V, (60,))] * 3)
    plain, count = evaluate_loss(model, ids, batch_size=1)
    assert count == ids.numel() - 1
    for loss, n in (
        evaluation.cache_pointer_loss(model, ids, window=40, theta=1.0, lambdah=0.0, chunk=17),
        evaluation.dynamic_evaluation_loss(model, ids, bptt=13, lr=0.0),
    ):
        assert n == count and loss == pytest.approx(plain, rel=1e-6)
    before = [p.clone() for p in model.parameters()]
    cached, _ = evaluation.cache_pointer_loss(model, ids, window=100, theta=1.0, lambdah=0.3, chunk=17)
    adapted, _ = evaluation.dynamic_evaluation_loss(model, ids, bptt=13, lr=0.5)
    assert cached < plain - 0.1 and adapted < plain - 0.1  # the second and third copies are predictable
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is untouched


def test_the_transformer_trains_with_the_adaptive_softmax():
    model = transformer(tied=False, adaptive_softmax=[8, 20]).train()
    losses = train_losses(model, batches=12)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ({"wdrop": 0.5}, "wdrop=0.5 is for the RNNs"),
        ({"locked_dropout": True}, "locked_dropout=True is for the RNNs"),
        ({"tied_projection": True}, "tied_projection=True is for the RNNs"),
        ({"emsize": 10, "nhead": 4}, "emsize=10 must be divisible by nhead=4"),
        ({"nhead": 0}, "nhead=0 must be a positive integer"),
    ],
)
def test_what_makes_no_sense_for_the_transformer_is_refused(option, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        ModelConfig(**{**dict(ntoken=V, model_type="Transformer", emsize=16, nhid=16), **option})


def test_the_rnns_ignore_nhead():
    ModelConfig(ntoken=V, model_type="LSTM", emsize=10, nhid=10, nhead=4)


def test_train_kill_resume_generate_evaluate_and_export_on_the_command_line(tmp_path, tiny_corpus):
    """The CLI end to end: a run killed mid-epoch resumes with the memory it carried, bit for bit; generation is
    the same for the same seed; evaluation and ONNX export read the checkpoint; bad keys are one line."""
    run = (*SMOKE, "epochs=2", "max_batches=12", "log_interval=3", f"dataset={tiny_corpus}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    reference = run_cli(*run, "-u", cwd=straight).stdout
    process = popen(killed, *run, "checkpoint_every=1e-9", "-u")  # the latest state after every batch
    before = ""
    for line in process.stdout:
        before += line
        if re.search(r"\| epoch +2 \| +6/", line):
            break
    process.kill()
    process.wait()
    process.stdout.close(), process.stderr.close()
    state = load_checkpoint(killed / "model.last.pt")["training"]["state"]
    assert state["epoch"] == 2 and state["batch"] >= 5
    assert [tuple(m.shape) for m in state["hidden"]] == [(9, 8, 32)]  # bptt 10: the last 9 inputs of one layer
    resumed = run_cli("with", "resume=model.last.pt", "-u", cwd=killed).stdout
    assert {**losses(before), **losses(resumed)} == losses(reference) and len(losses(reference)) == 8
    assert same_weights(straight / "model.pt", killed / "model.pt")
    assert TEST_PPL.findall(resumed) == TEST_PPL.findall(reference)

    generate = ("with", "words=30", "prompt=the game", "top_k=20", "top_p=0.9", "outf=-", "-u")
    first = run_cli(*generate, "seed=5", cwd=straight, script="generate.py").stdout
    assert first == run_cli(*generate, "seed=5", cwd=straight, script="generate.py").stdout
    assert first != run_cli(*generate, "seed=6", cwd=straight, script="generate.py").stdout
    assert len(first.split()) >= 30
    scored = run_cli("evaluate", "with", f"dataset={tiny_corpus}", "-u", cwd=straight).stdout
    (ppl,) = re.findall(r"\| ppl +([0-9.]+)$", scored, re.MULTILINE)
    assert float(ppl) == pytest.approx(float(TEST_PPL.findall(reference)[0]), rel=1e-4)  # the run's own test figure

    lm = wordlm.load(straight / "model.pt", device="cpu")
    api_text = lm.generate(words=30, prompt="the game", top_k=20, top_p=0.9, seed=5)
    assert api_text == first
    assert lm.perplexity((tiny_corpus / "test.txt").read_text()) == pytest.approx(float(ppl), rel=1e-4)

    for bad, says in (
        ("wdrop=0.5", "error: wdrop=0.5 is for the RNNs"),
        ("nhead=3", "error: emsize=32 must be divisible by nhead=3"),
    ):
        result = run_cli(*SMOKE, f"dataset={tiny_corpus}", bad, "-u", cwd=tmp_path, check=False)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: .venv/bin/pip install -e '.[onnx]'")
    from test_export import run_steps_both_ways

    from wordlm.export import export_onnx, state_names

    torch.manual_seed(3)
    model = transformer(tied=True)
    path = export_onnx(model, tmp_path / "t.onnx")
    assert state_names(model) == ("hidden_0", "hidden_1")
    run_steps_both_ways(model, path, batch=3, steps=8)  # past the window: the memory rolls on
    run_steps_both_ways(model, path, batch=1, seed=1)


def test_two_processes_train_like_one(tmp_path, tiny_corpus):
    """lr 2: at the default lr 20 the tiny Transformer's loss jumps about, which lets the ranks' other order of
    summing the gradients grow from rounding into visible differences."""
    run = (*SMOKE, "dropout=0", "lr=2", "epochs=2", "max_batches=10", "log_interval=5", f"dataset={tiny_corpus}", "-u")
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    reference = run_cli(*run, cwd=single).stdout
    launcher = torchrun(double, *run)
    try:
        out, err = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    assert launcher.returncode == 0, out + err
    assert_same_training(reference, single, out, double)


@pytest.mark.slow
def test_amp_and_compile_train_through_the_command_line(tmp_path, tiny_corpus):
    for option in ("amp=bf16", "compile=True"):
        result = run_cli(*SMOKE, f"dataset={tiny_corpus}", "max_batches=4", option, "-u", cwd=tmp_path, timeout=900)
        assert "End of training" in result.stdout
