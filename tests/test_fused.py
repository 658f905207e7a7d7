"""The fused CPU decoder loss is the plain one: same values and gradients, safe buffer reuse."""

import json
import platform
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from wordlm.data.cache import CACHE_ENV
from wordlm.models import fused
from wordlm.models.fused import (
    CHUNK,
    EVAL_CHUNK,
    available_backends,
    linear_cross_entropy,
    linear_nll_sum,
    matmul_backend,
)
from wordlm.system import tune_cpu_allocator

BACKENDS = available_backends()
# Each library alone; 'auto' timing both, as a run does; and 'auto' with fake timings that make it mix them
# as it did on an Intel Xeon (MKL for the grad of h over the transposed chunks and for evaluation's logits).
CASES = [name for name in BACKENDS if name != "auto"] + (["auto", "auto mixed"] if "auto" in BACKENDS else [])


def fake_timer(faster: dict[str, str], calls: list | None = None):
    """A timer under which ``faster[role]`` (default oneDNN) wins each role; the product still runs."""

    def timer(run, library, key):
        run()
        if calls is not None:
            calls.append((library, key))
        return 1.0 if faster.get(key.split()[0], "onednn") == library else 2.0

    return timer


MIXED = {"hidden_grad": "blas", "eval_logits": "blas"}


@pytest.fixture(params=CASES)
def backend(request, monkeypatch):
    """Each test that takes it runs once per matrix-product library this torch has (oneDNN, BLAS), once
    with 'auto' choosing by real timings (a fresh choice, as in a new process) and once with 'auto'
    mixing the two."""
    timer = fake_timer(MIXED) if request.param == "auto mixed" else fused._seconds
    monkeypatch.setattr(fused, "BACKEND", fused.Backend(timer=timer, remember=False))
    with matmul_backend(request.param.split()[0]):
        yield request.param


def inputs(n=37, h=8, v=CHUNK * 3 + 17, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator, requires_grad=True)
    weight = (torch.randn(v, h, generator=generator) * 2).requires_grad_()
    bias = torch.randn(v, generator=generator).requires_grad_()
    targets = torch.randint(v, (n,), generator=generator)
    return hidden, weight, bias, targets


def gradients(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_cross_entropy_in_value_and_gradients(with_bias, backend):
    hidden, weight, bias, targets = inputs()
    bias = bias if with_bias else None
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    actual = linear_cross_entropy(hidden, weight, bias, targets)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, e in zip(gradients(actual * 3, hidden, weight, bias), gradients(expected * 3, hidden, weight, bias)):
        assert torch.allclose(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab", [CHUNK - 5, CHUNK * 2])
def test_gradients_match_when_the_vocabulary_is_one_chunk_or_whole_chunks(vocab, backend):
    """The grad of h runs over the weight's chunks transposed (oneDNN): a vocabulary smaller than a
    chunk, or with no partial last chunk, must be covered as exactly as the usual partial one."""
    hidden, weight, bias, targets = inputs(v=vocab)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    actual = linear_cross_entropy(hidden, weight, bias, targets)
    for a, e in zip(gradients(actual, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
        assert torch.allclose(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab", [CHUNK + 1, EVAL_CHUNK * 3 + 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_nll_sum_matches_cross_entropy_sum(vocab, with_bias, backend):
    hidden, weight, bias, targets = inputs(n=50, v=vocab)
    bias = bias if with_bias else None
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    assert linear_nll_sum(hidden, weight, bias, targets).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("word", [5, CHUNK * 2 + 3, EVAL_CHUNK * 2 + 7])
def test_a_dominant_word_in_any_chunk_keeps_the_loss_exact(word, backend):
    """A chunk is shifted by the log-sum-exp of the chunks before it; a word whose logits tower over
    those (here by hundreds, far past float32's exp range) must make its chunk be redone exactly."""
    hidden, weight, bias, targets = inputs(v=max(CHUNK, EVAL_CHUNK) * 3 + 17)
    with torch.no_grad():
        weight[word] *= 1000
    logits = F.linear(hidden, weight, bias)
    assert (logits[:, word] - logits.logsumexp(1)).max() > -1  # it does dominate some columns
    expected = F.cross_entropy(logits, targets)
    actual = linear_cross_entropy(hidden, weight, bias, targets)
    assert torch.isfinite(actual) and actual.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, e in zip(gradients(actual, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)
    total = linear_nll_sum(hidden.detach(), weight.detach(), bias.detach(), targets)
    assert total.item() == pytest.approx(expected.item() * targets.numel(), rel=1e-5)


def test_a_non_finite_logit_gives_a_non_finite_loss(backend):
    """Divergence must surface as a NaN/inf loss, not be absorbed by the chunked shifts."""
    hidden, weight, bias, targets = inputs()
    with torch.no_grad():
        weight[CHUNK + 1, 0] = float("nan")
    assert not torch.isfinite(linear_cross_entropy(hidden, weight, bias, targets))
    assert not torch.isfinite(linear_nll_sum(hidden.detach(), weight.detach(), bias.detach(), targets))


def exact(hidden, weight, bias, targets):
    """The loss and its gradients in float64: what both precisions are measured against."""
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    loss = F.cross_entropy(F.linear(doubles[0], doubles[1], doubles[2] if bias is not None else None), targets)
    return loss.item(), torch.autograd.grad(loss, doubles)


def relative_errors(loss, grads, reference):
    value, expected = reference
    return abs(loss - value) / value, [((g.double() - e).norm() / e.norm()).item() for g, e in zip(grads, expected)]


@pytest.mark.parametrize("with_bias", [True, False])
def test_bfloat16_products_keep_autocasts_precision(with_bias, backend):
    """``amp='bf16'``: bfloat16 products, float32 sums and gradients. It must compute in bfloat16 (not
    equal to float32), and be no less accurate than the plain path under autocast, which rounds the
    same operands and logits to bfloat16."""
    hidden, weight, bias, targets = inputs(n=200)
    bias = bias if with_bias else None
    reference = exact(hidden, weight, bias, targets)
    loss = linear_cross_entropy(hidden, weight, bias, targets, torch.bfloat16)
    grads = gradients(loss, hidden, weight, bias)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert loss.item() != linear_cross_entropy(hidden, weight, bias, targets).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    plain_errors = relative_errors(plain.item(), gradients(plain, hidden, weight, bias), reference)
    loss_error, grad_errors = relative_errors(loss.item(), grads, reference)
    # The loss within 3e-4 (9e-5 here): a shift column that rounds (log2(e) → 1.445) biased it by 1e-3
    assert loss_error < 3e-4 and max(grad_errors) < 2e-2, (loss_error, grad_errors)
    assert max(grad_errors) <= 1.5 * max(plain_errors[1]), (grad_errors, plain_errors)


def test_bfloat16_features_get_a_bfloat16_gradient():
    """Under autocast the recurrent layers hand the decoder bfloat16 features: their gradient comes back
    in bfloat16, the weight's and the bias's in float32 (the parameters' dtype)."""
    hidden, weight, bias, targets = inputs()
    features = hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(features, weight, bias, targets, torch.bfloat16)
    grad_features, grad_weight, grad_bias = gradients(loss, features, weight, bias)
    assert (grad_features.dtype, grad_weight.dtype, grad_bias.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    _, expected = exact(hidden, weight, bias, targets)
    assert ((grad_weight.double() - expected[1]).norm() / expected[1].norm()).item() < 1e-2


@pytest.mark.parametrize("word", [5, CHUNK * 2 + 3])
def test_a_dominant_word_keeps_the_bfloat16_loss_finite_and_close(word, backend):
    """The redone pass (each chunk shifted by its own maximum) in bfloat16."""
    hidden, weight, bias, targets = inputs(v=CHUNK * 3 + 17)
    with torch.no_grad():
        weight[word] *= 1000
    value, expected = exact(hidden, weight, bias, targets)
    loss = linear_cross_entropy(hidden, weight, bias, targets, torch.bfloat16)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(value, rel=1e-2)
    grad_weight = gradients(loss, weight)[0]
    assert ((grad_weight.double() - expected[1]).norm() / expected[1].norm()).item() < 2e-2


def test_a_non_finite_logit_gives_a_non_finite_bfloat16_loss():
    hidden, weight, bias, targets = inputs()
    with torch.no_grad():
        weight[CHUNK + 1, 0] = float("inf")
    assert not torch.isfinite(linear_cross_entropy(hidden, weight, bias, targets, torch.bfloat16))


def test_two_graphs_alive_at_once_keep_their_own_buffers():
    tune_cpu_allocator()
    first = inputs(seed=1)
    second = inputs(seed=2)
    loss_a = linear_cross_entropy(*first)
    loss_b = linear_cross_entropy(*second)  # same shapes: would reuse a buffer if the pool were careless
    grad_b = gradients(loss_b, *second[:3])
    grad_a = gradients(loss_a, *first[:3])
    for (hidden, weight, bias, targets), grads in ((first, grad_a), (second, grad_b)):
        expected = gradients(F.cross_entropy(F.linear(hidden, weight, bias), targets), hidden, weight, bias)
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))


def test_a_buffer_pooled_in_inference_mode_never_serves_training():
    """Evaluation (inference mode) and training share the pool and the augmented weight's shape; an
    inference tensor handed to autograd would fail its in-place writes."""
    hidden, weight, bias, targets = inputs()
    with torch.inference_mode():
        linear_nll_sum(hidden.detach(), weight.detach(), bias.detach(), targets)
    loss = linear_cross_entropy(hidden, weight, bias, targets)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    for a, e in zip(gradients(loss, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
        assert torch.allclose(a, e, atol=1e-6, rtol=1e-5)


def test_a_frozen_decoder_builds_its_weight_once_and_forgets_it_after_the_block(monkeypatch):
    import wordlm.models.fused as fused

    built = []
    original = fused._scaled_augmented
    monkeypatch.setattr(fused, "_scaled_augmented", lambda w, b: built.append(1) or original(w, b))
    hidden, weight, bias, targets = (t.detach() for t in inputs(v=EVAL_CHUNK * 2 + 3))

    def expected():
        return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum").item()

    with torch.inference_mode(), fused.frozen_decoder():
        with fused.frozen_decoder():  # nested: the outer block keeps the copy
            first = linear_nll_sum(hidden, weight, bias, targets).item()
        second = linear_nll_sum(hidden[:20], weight, bias, targets[:20]).item()
    assert len(built) == 1
    assert first == pytest.approx(expected(), rel=1e-6)
    assert second == pytest.approx(
        F.cross_entropy(F.linear(hidden[:20], weight, bias), targets[:20], reduction="sum").item(), rel=1e-6
    )
    weight.mul_(0.5)  # after the block, a changed weight is seen
    with torch.inference_mode():
        assert linear_nll_sum(hidden, weight, bias, targets).item() == pytest.approx(expected(), rel=1e-6)
    assert len(built) == 2


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
def test_gradients_of_a_subset_of_the_inputs_match(frozen, backend):
    """Only the gradients asked for are formed (the bias one can come without the weight's)."""
    hidden, weight, bias, targets = inputs()
    {"weight": weight, "hidden": hidden, "bias": bias}[frozen].requires_grad_(False)
    wanted = [t for t in (hidden, weight, bias) if t.requires_grad]
    actual = torch.autograd.grad(linear_cross_entropy(hidden, weight, bias, targets), wanted)
    expected = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight, bias), targets), wanted)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
def test_bfloat16_gradients_of_a_subset_are_those_of_the_whole(frozen, backend):
    """In bfloat16 the grad of h runs over the forward pass's weight copy, given back after the backward
    pass: leaving any input out must not change the others' gradients by a bit."""
    hidden, weight, bias, targets = inputs()
    everything = gradients(linear_cross_entropy(hidden, weight, bias, targets, torch.bfloat16), hidden, weight, bias)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    tensors[frozen].requires_grad_(False)
    wanted = [name for name, tensor in tensors.items() if tensor.requires_grad]
    subset = torch.autograd.grad(linear_cross_entropy(hidden, weight, bias, targets, torch.bfloat16),
                                 [tensors[name] for name in wanted])  # fmt: skip
    whole = dict(zip(tensors, everything))
    assert all(torch.equal(grad, whole[name]) for name, grad in zip(wanted, subset))


def _count_onednn_calls(monkeypatch, timer=fused._seconds) -> list:
    """Count oneDNN's products from now on: a fresh backend (as in a new process) probes a counting op."""
    calls = []
    product = torch.ops.mkldnn._linear_pointwise
    counting = types.SimpleNamespace(_linear_pointwise=lambda *args: calls.append(1) or product(*args))
    monkeypatch.setattr(torch.ops, "mkldnn", counting)
    monkeypatch.setattr(fused, "BACKEND", fused.Backend(timer=timer, remember=False))
    fused.available_backends()  # the probe's product
    calls.clear()
    return calls


def test_onednn_serves_every_product_when_chosen_and_auto_is_the_default(monkeypatch):
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert BACKENDS[0] == "auto"  # the pinned x86 CPU wheel has oneDNN: its probe must pass
    if "onednn" not in BACKENDS:
        pytest.skip("this torch build has no oneDNN")
    calls = _count_onednn_calls(monkeypatch)
    assert fused.BACKEND.name == "auto"
    hidden, weight, bias, targets = inputs()
    with matmul_backend("onednn"):
        linear_cross_entropy(hidden, weight, bias, targets).backward()
    chunks = -(-weight.size(0) // CHUNK)
    assert len(calls) == 3 * chunks  # the forward product, the weight gradient's and the grad of h's, per chunk


@pytest.mark.parametrize("faster", [{}, MIXED, dict.fromkeys(fused.ROLES, "blas")], ids=["onednn", "mixed", "blas"])
def test_auto_times_both_libraries_once_per_shape_class_and_runs_the_faster(faster, monkeypatch):
    """With fake timings: each role's first product of a shape class is timed on both libraries (one
    untimed call each, then alternating rounds), the faster runs it and every later product of that class
    without timing again; the values stay those of cross_entropy."""
    if "auto" not in BACKENDS:
        pytest.skip("this torch build has no oneDNN")
    timed = []
    calls = _count_onednn_calls(monkeypatch, fake_timer(faster, timed))
    hidden, weight, bias, targets = inputs()  # 3 full chunks and a partial one: 2 shape classes a role
    for _ in range(2):  # the second step times nothing
        loss = linear_cross_entropy(hidden, weight, bias, targets)
        grads = gradients(loss, hidden, weight, bias)
        total = linear_nll_sum(hidden.detach(), weight.detach(), bias.detach(), targets)
    choices = fused.BACKEND.choices()
    assert sorted({key.split()[0] for key in choices}) == sorted(fused.ROLES)
    assert all(library == faster.get(key.split()[0], "onednn") for key, library in choices.items())
    assert len(timed) == 2 * fused.TIMED_ROUNDS * len(choices)  # once per class: later products are not timed
    assert {key for _, key in timed} == set(choices)
    # oneDNN ran: the products of the roles it won (2 steps), and each class's 1 + TIMED_ROUNDS trial products
    chunks, eval_chunks = -(-weight.size(0) // CHUNK), -(-weight.size(0) // EVAL_CHUNK)
    per_role = {"logits": chunks, "weight_grad": chunks, "hidden_grad": chunks, "eval_logits": eval_chunks}
    won = sum(count for role, count in per_role.items() if faster.get(role, "onednn") == "onednn")
    assert len(calls) == 2 * won + (1 + fused.TIMED_ROUNDS) * len(choices)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() == pytest.approx(expected.item() * targets.numel(), rel=1e-6)
    for a, e in zip(grads, gradients(expected, hidden, weight, bias)):
        assert torch.allclose(a, e, atol=1e-6, rtol=1e-5)


def step_with_mixed_timings(monkeypatch):
    """A backend remembering its choices, timed with MIXED fake timings, after one training step: that step's
    inputs and the choices it made (skips where torch has no oneDNN: there is nothing to choose)."""
    if "auto" not in BACKENDS:
        pytest.skip("this torch build has no oneDNN")
    hidden, weight, bias, targets = inputs()
    monkeypatch.setattr(fused, "BACKEND", fused.Backend(timer=fake_timer(MIXED)))
    linear_cross_entropy(hidden, weight, bias, targets).backward()
    return hidden, weight, bias, targets, dict(fused.BACKEND.choices())


def test_a_choice_is_remembered_for_the_machine_so_that_a_new_process_makes_the_same(monkeypatch, corpus_cache):
    """oneDNN and MKL round differently in the last bits: a later process (a resumed run) must not time
    afresh and perhaps choose otherwise. A backend that never saw a product reads the choices from the
    cache folder; another machine's (another CPU, torch or thread count) are not used."""
    hidden, weight, bias, targets, first = step_with_mixed_timings(monkeypatch)
    saved = json.loads((corpus_cache / fused.CHOICES_FILE).read_text())
    assert saved == {fused.machine(): first} and "blas" in first.values() and "onednn" in first.values()

    def never(run, library, key):
        raise AssertionError(f"{key} was timed again")

    monkeypatch.setattr(fused, "BACKEND", fused.Backend(timer=never))  # a new process on this machine
    assert fused.BACKEND.choices() == first
    linear_cross_entropy(hidden, weight, bias, targets).backward()
    monkeypatch.setattr(fused, "machine", lambda: "another CPU; AVX2; torch 2.13.0+cpu; 8 threads")
    assert fused.Backend(timer=never).choices() == {}
    (corpus_cache / fused.CHOICES_FILE).write_text("not json")  # a damaged file: chosen afresh, rewritten
    fresh = fused.Backend(timer=fake_timer({}))
    monkeypatch.setattr(fused, "BACKEND", fresh)
    linear_cross_entropy(hidden, weight, bias, targets).backward()
    assert set(fresh.choices().values()) == {"onednn"}
    assert json.loads((corpus_cache / fused.CHOICES_FILE).read_text()) == {fused.machine(): fresh.choices()}


def test_a_process_that_moves_to_another_cache_folder_reads_and_writes_that_folders_choices(
    monkeypatch, corpus_cache, tmp_path
):
    """The choices read once would otherwise follow a process into another WORDLM_CACHE: a run there would use
    choices its folder lacks, and a new process on that folder could time afresh and choose the other library."""
    hidden, weight, bias, targets, first = step_with_mixed_timings(monkeypatch)
    other = tmp_path / "other-cache"
    monkeypatch.setenv("WORDLM_CACHE", str(other))
    assert fused.BACKEND.choices() == {}  # nothing chosen for this folder yet
    fused.BACKEND.timer = fake_timer({})  # timed afresh here: oneDNN throughout
    linear_cross_entropy(hidden, weight, bias, targets).backward()
    assert set(fused.BACKEND.choices().values()) == {"onednn"}
    assert json.loads((other / fused.CHOICES_FILE).read_text()) == {fused.machine(): fused.BACKEND.choices()}
    monkeypatch.setenv("WORDLM_CACHE", str(corpus_cache))  # back: the first folder's choices again
    assert fused.BACKEND.choices() == first
    assert fused._CACHE_ENV == CACHE_ENV  # the variable the cache folder follows, named twice to keep imports apart


def test_the_machine_names_the_cpu_torch_and_threads():
    machine = fused.machine()
    assert torch.__version__ in machine and f"{torch.get_num_threads()} threads" in machine
    assert torch.backends.cpu.get_cpu_capability() in machine


def test_importing_the_package_probes_and_times_nothing():
    """The oneDNN probe and the timings wait for the decoder's first product (a subprocess: a fresh import)."""
    script = """
import types, torch
calls = []
real = torch.ops.mkldnn._linear_pointwise
torch.ops.mkldnn = types.SimpleNamespace(_linear_pointwise=lambda *args: calls.append(1) or real(*args))
import wordlm.models.fused, wordlm.models, wordlm.training.trainer
assert calls == [], calls
assert wordlm.models.fused.available_backends()[0] == "auto" and calls == [1], calls
"""
    if "onednn" not in BACKENDS:
        pytest.skip("this torch build has no oneDNN")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_fused_path_can_be_switched_off_and_on(monkeypatch):
    """``set_enabled(False)`` (what the benchmarks use) makes the model compute the plain loss."""
    import wordlm.models.decoder
    from wordlm.models import ModelConfig, RNNModel

    seen = []
    monkeypatch.setattr(
        wordlm.models.decoder, "linear_cross_entropy", lambda *args: seen.append(1) or linear_cross_entropy(*args)
    )
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(50, emsize=8, nhid=8))
    features, targets = torch.randn(4, 2, 8), torch.randint(0, 50, (4, 2))
    with fused.enabled(False):
        plain = model.decoder.loss(features, targets)
        assert fused.set_enabled(False) is False  # (the setting before)
    assert seen == [] and fused.BACKEND.enabled
    assert model.decoder.loss(features, targets).item() == pytest.approx(plain.item(), rel=1e-6) and seen == [1]


def test_all_backends_give_the_same_loss_and_gradients():
    results = []
    for name in BACKENDS:
        hidden, weight, bias, targets = inputs(seed=4)
        with matmul_backend(name):
            loss = linear_cross_entropy(hidden, weight, bias, targets)
            results.append((loss.item(), gradients(loss, hidden, weight, bias)))
    for value, grads in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads, results[0][1]))


def test_an_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="'cublas' is not available here; choose one of"):
        fused.set_backend("cublas")
    assert fused.BACKEND.name == BACKENDS[0]


def test_a_second_backward_pass_is_refused_plainly():
    """The backward pass frees the kept exponentials as it goes: it cannot run again, and says so."""
    hidden, weight, bias, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, bias, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice: retain_graph is not supported"):
        loss.backward()


def test_a_broken_onednn_entry_point_falls_back_to_torch_mm(monkeypatch):
    """The oneDNN product is an internal torch op: if it is missing, fails or is wrong, torch.mm serves."""

    def failing(*args):
        raise RuntimeError("no such kernel")

    hidden, weight, bias, targets = inputs()
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets).item()
    for replacement in (None, failing, lambda a, b, *rest: torch.zeros(a.size(0), b.size(0))):
        entry = {} if replacement is None else {"_linear_pointwise": replacement}
        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(**entry))
        monkeypatch.setattr(fused, "BACKEND", fused.Backend(remember=False))
        assert fused.available_backends() == ("blas",) and fused.BACKEND.name == "blas"
        assert linear_cross_entropy(hidden, weight, bias, targets).item() == pytest.approx(expected, rel=1e-6)
