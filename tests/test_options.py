"""The options beyond the spec's keys, through the library and the command line.

The speed options that change the math: adaptive softmax, mixed precision, torch.compile.
Each is off by default; these tests pin what each computes and that the fused recurrent kernel stays in use.
The optimization options: ``init_range``, ``optimizer=adamw`` with ``wdecay`` and
``lr_decay``, NT-ASGD (``nonmono``), and runs that repeat bit for bit at the default model size.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_corpus
from test_training import first_lines, switch_epoch
from torch.profiler import profile

from wordlm.data.corpus import Vocabulary
from wordlm.models import ModelConfig, RNNModel, build_model
from wordlm.models.decoder import AdaptiveInput
from wordlm.models.regularize import embedding_dropout
from wordlm.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from wordlm.training.trainer import Precision, Reporter, TrainState, train_epoch

V = 60


def adaptive_model(seed=0, **options) -> RNNModel:
    torch.manual_seed(seed)
    sizes = dict(emsize=16, nhid=16, nlayers=1, dropout=0.0)
    config = ModelConfig(V, **sizes, tied=False, adaptive_softmax=(10, 30), **options)
    return RNNModel(config).eval()


def test_adaptive_softmax_gives_normalised_probabilities_in_id_order():
    model = adaptive_model()
    counts = torch.arange(V).flip(0).float()  # id 0 the most frequent, id V-1 the rarest
    counts[[3, 40]] = counts[[40, 3]]  # ... except that ids 3 and 40 swap places
    model.decoder.sort_words_by_frequency(counts)
    word_rank = model.decoder.word_rank
    assert word_rank[3] == 40 and word_rank[40] == 3 and word_rank[0] == 0
    inputs = torch.randint(0, V, (5, 2))
    targets = torch.randint(0, V, (5, 2))
    with torch.no_grad():
        scores, _ = model(inputs, model.init_hidden(2))  # (T, B, V) log-probabilities
        features, _ = model.features(inputs, model.init_hidden(2))
        # the id-order scores are the adaptive softmax's own rank-order log-probabilities, permuted
        ranked = model.decoder.adaptive.log_prob(features.reshape(-1, 16))
        assert torch.allclose(scores.reshape(-1, V), ranked[:, word_rank])
        assert torch.allclose(scores.exp().sum(-1), torch.ones(5, 2), atol=1e-5)
        expected = F.cross_entropy(scores.reshape(-1, V), targets.reshape(-1), reduction="sum")
        assert model.decoder.nll_sum(features, targets).item() == pytest.approx(expected.item(), rel=1e-5)
        assert model.decoder.loss(features, targets).item() == pytest.approx(expected.item() / 10, rel=1e-5)


def test_adaptive_softmax_word_order_travels_with_the_checkpoint(tmp_path):
    model = adaptive_model()
    model.decoder.sort_words_by_frequency(torch.rand(V))
    vocab = Vocabulary([f"w{index}" for index in range(V)])
    save_checkpoint(tmp_path / "a.pt", model, vocab)
    loaded, _ = model_from_checkpoint(load_checkpoint(tmp_path / "a.pt"))
    assert torch.equal(loaded.decoder.word_rank, model.decoder.word_rank)
    inputs = torch.randint(0, V, (4, 1))
    with torch.no_grad():
        assert torch.equal(loaded(inputs, loaded.init_hidden(1))[0], model(inputs, model.init_hidden(1))[0])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tied=True, nhid=12), "tied=True needs emsize == nhid"),
        (dict(adaptive_softmax=(30, 10)), "increasing"),
        (dict(adaptive_softmax=(10, V)), "between 1 and the vocabulary"),
        (dict(adaptive_softmax=()), "increasing"),
    ],
)
def test_bad_adaptive_softmax_settings_are_refused(options, message):
    config = dict(emsize=16, nhid=16, tied=False, adaptive_softmax=(10, 30)) | options
    with pytest.raises(ValueError, match=message):
        ModelConfig(V, **config)


def tied_adaptive_model(seed=0, model_type="LSTM", **options):
    torch.manual_seed(seed)
    sizes = dict(emsize=16, nhid=16, nlayers=1, dropout=0.0)
    return build_model(ModelConfig(V, model_type, **sizes, tied=True, adaptive_softmax=(10, 30), **options)).eval()


def test_a_tied_adaptive_softmax_reads_its_word_vectors_from_the_softmax():
    """Baevski & Auli's tied adaptive input: a head word's vector is its head row; a cluster word's is its output
    row times the cluster's down-projection (the transpose of that map); the model holds no embedding matrix."""
    tied, untied = tied_adaptive_model(), adaptive_model()
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == V * 16
    assert not [key for key in tied.state_dict() if key.startswith("encoder")]
    tied.decoder.sort_words_by_frequency(torch.rand(V))
    rank, adaptive = tied.decoder.word_rank, tied.decoder.adaptive
    vectors = tied.encoder(torch.arange(V).view(V, 1))  # (V, 1, E)
    assert vectors.shape == (V, 1, 16)
    for word in range(V):
        place = int(rank[word])
        if place < 10:
            expected = adaptive.head.weight[place]
        else:
            cluster, low = (0, 10) if place < 30 else (1, 30)
            down, up = adaptive.tail[cluster]  # Linear(16, 16 / 4^(i+1)), Linear(that, cluster size)
            expected = up.weight[place - low] @ down.weight
        torch.testing.assert_close(vectors[word, 0], expected)
    vectors.pow(2).sum().backward()  # the input side's gradient reaches the softmax's weights
    assert adaptive.head.weight.grad[:10].abs().sum() > 0 and adaptive.head.weight.grad[10:].abs().sum() == 0
    assert all(part.weight.grad.abs().sum() > 0 for tail in adaptive.tail for part in tail)


@pytest.mark.parametrize("model_type", ["LSTM", "Transformer"])
def test_a_tied_adaptive_model_trains_in_bf16_drops_words_and_travels_with_its_checkpoint(tmp_path, model_type):
    model = tied_adaptive_model(model_type=model_type, dropoute=0.5).train()
    inputs, targets = torch.randint(0, V, (6, 3)), torch.randint(0, V, (6, 3))
    dropped = model.encoder(inputs)
    torch.manual_seed(4)
    words = embedding_dropout(model.encoder, inputs, 0.5, training=True)
    zero = (words == 0).all(-1)
    assert zero.any() and not zero.all()
    assert torch.equal(words[~zero], dropped[~zero] * 2)  # kept words scaled by 1 / (1 - p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(inputs, model.init_hidden(3), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    model.eval()
    vocab = Vocabulary([f"w{index}" for index in range(V)])
    save_checkpoint(tmp_path / "tied.pt", model, vocab)
    loaded, _ = model_from_checkpoint(load_checkpoint(tmp_path / "tied.pt"))
    assert loaded.config.tied and isinstance(loaded.encoder, AdaptiveInput)
    assert loaded.device == torch.device("cpu")  # from its parameters: there is no encoder.weight to ask
    with torch.no_grad():
        assert torch.equal(loaded(inputs, loaded.init_hidden(3))[0], model(inputs, model.init_hidden(3))[0])
    loaded.decoder.adaptive.head.weight.data.zero_()  # the loaded input side reads the loaded softmax
    assert loaded.encoder(torch.tensor([[0]])).eq(0).all()  # word 0 is in the head (no frequencies given)


@pytest.mark.parametrize("model_type", ["LSTM", "Transformer"])
def test_an_untied_adaptive_softmax_trains_under_bf16_autocast(model_type):
    """A Transformer's features reach the decoder in float32 (its final LayerNorm) where an RNN's are bfloat16;
    the adaptive softmax failed on them ("index_copy_(): self and source expected to have the same dtype")."""
    torch.manual_seed(0)
    sizes = dict(emsize=16, nhid=16, nlayers=1)
    model = build_model(ModelConfig(V, model_type, **sizes, tied=False, adaptive_softmax=(10, 30)))
    inputs = torch.randint(0, V, (6, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.train()(inputs, model.init_hidden(3), inputs)
        scores, _ = model.eval()(inputs, model.init_hidden(3))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.allclose(scores.float().exp().sum(-1), torch.ones(6, 3), atol=0.05)


def rnn_kernels(model, precision=None, network=None):
    """The recurrent ops a training step runs, by name."""
    precision = precision or Precision()
    inputs = torch.randint(0, V, (6, 3))
    model.train()
    with profile() as prof:
        with precision.autocast():
            loss, _ = (model if network is None else network)(inputs, model.init_hidden(3), inputs)
        loss.backward()
    return {event.key for event in prof.key_averages() if "rnn" in event.key or "lstm" in event.key}


@pytest.mark.parametrize(
    "options, amp",
    [({}, None), ({}, "bf16"), ({"adaptive_softmax": (10, 30), "tied": False}, "bf16"), ({"wdrop": 0.3}, None)],
)
def test_the_fused_recurrent_kernel_stays_in_use(options, amp):
    """On the CPU the fused kernel is oneDNN's (cuDNN's on CUDA): no option may fall back to a cell loop."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(V, emsize=16, nhid=16, nlayers=2, **options))
    kernels = rnn_kernels(model, Precision(amp, "cpu"))
    assert "aten::mkldnn_rnn_layer" in kernels and "aten::mkldnn_rnn_layer_backward" in kernels, kernels


def test_compile_leaves_the_recurrent_kernel_to_eager_mode():
    """Dynamo does not trace nn.LSTM (``allow_rnn`` is off): the fused kernel runs as it does without compile."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(V, emsize=16, nhid=16, nlayers=2))
    torch._dynamo.reset()
    kernels = rnn_kernels(model, network=torch.compile(model, backend="aot_eager"))
    assert "aten::mkldnn_rnn_layer" in kernels and "aten::mkldnn_rnn_layer_backward" in kernels, kernels


def train_losses(model, precision=None, compiled=None, batches=4):
    torch.manual_seed(1)
    data = torch.randint(0, V, (batches * 5 + 1, 4))
    losses = []

    class Keep(Reporter):
        def interval(self, state, total, ms_per_batch, loss):
            losses.append(loss)

        def write(self, line):
            pass

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_epoch(model if compiled is None else compiled, data, optimizer, TrainState(lr=1.0), bptt=5, clip=0.25,
                log_interval=1, max_batches=batches, reporter=Keep(), precision=precision or Precision())  # fmt: skip
    return losses


def test_bf16_autocast_trains_close_to_float32_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(V, emsize=16, nhid=16))
    reference = RNNModel(ModelConfig(V, emsize=16, nhid=16))
    reference.load_state_dict(model.state_dict())
    bf16 = train_losses(model, Precision("bf16", "cpu"))
    fp32 = train_losses(reference)
    assert bf16 != fp32  # it does compute in lower precision ...
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # ... and stays close
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    "dtype, products", [(None, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, None)]
)
def test_the_decoder_is_fused_in_float32_and_under_bf16_autocast(dtype, products, monkeypatch):
    """On the CPU the fused decoder serves float32 and ``amp='bf16'`` (in bfloat16); any other autocast
    (float16) takes the plain path."""
    import wordlm.models.decoder

    seen = []
    fused_loss = wordlm.models.decoder.linear_cross_entropy
    monkeypatch.setattr(wordlm.models.decoder, "linear_cross_entropy", lambda *a: seen.append(a[-1]) or fused_loss(*a))
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(V, emsize=16, nhid=16))
    features, targets = torch.randn(6, 3, 16, requires_grad=True), torch.randint(0, V, (6, 3))
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model.decoder.loss(features if dtype is None else features.to(dtype), targets)
    loss.backward()
    assert seen == ([] if products is None else [products])
    assert torch.isfinite(loss) and features.grad is not None


def test_fp16_needs_loss_scaling_and_amp_must_be_known():
    assert Precision("fp16", "cpu").scaler is not None and Precision("bf16", "cpu").scaler is None
    with pytest.raises(ValueError, match="amp='fp8'"):
        Precision("fp8")


def test_compiled_training_follows_eager_training():
    """torch.compile's graph capture of the model, the fused loss included, gives the eager losses. The
    ``aot_eager`` backend checks the capture quickly; the slow test below runs the real code generator."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(V, emsize=16, nhid=16, dropout=0.0))
    reference = RNNModel(ModelConfig(V, emsize=16, nhid=16, dropout=0.0))
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = train_losses(model, compiled=torch.compile(model, backend="aot_eager"))
    assert compiled == pytest.approx(train_losses(reference), rel=1e-5)


@pytest.mark.slow
def test_compile_true_trains_through_inductor(tmp_path, tiny_corpus):
    result = run_cli("with", "smoke", f"dataset={tiny_corpus}", "compile=True", "-u", cwd=tmp_path, timeout=900)
    assert "End of training" in result.stdout


def test_options_through_the_cli(tmp_path, tiny_corpus, cli_here):
    """adaptive_softmax and amp train, and the checkpoint serves evaluate and generate; bad values are one line."""
    args = ("with", "smoke", f"dataset={tiny_corpus}", "tied=False", "adaptive_softmax=[100, 1000]", "amp=bf16", "-u")
    trained = cli_here(*args, cwd=tmp_path)
    assert "End of training" in trained.stdout
    config = load_checkpoint(tmp_path / "model.pt")["meta"]["config"]
    assert config["adaptive_softmax"] == [100, 1000] and config["amp"] == "bf16"
    scored = cli_here("evaluate", "with", f"dataset={tiny_corpus}", "line_scores=lines.jsonl", "-u", cwd=tmp_path)
    assert "ppl" in scored.stdout
    assert json.loads((tmp_path / "lines.jsonl").read_text().splitlines()[0])
    cli_here("with", "words=15", "outf=out.txt", "-u", cwd=tmp_path, script="generate.py")
    assert len((tmp_path / "out.txt").read_text().split()) >= 10
    # tied (the default): the adaptive input; generate reads its checkpoint as any other
    tied = cli_here("with", "smoke", f"dataset={tiny_corpus}", "adaptive_softmax=[100, 1000]", "save=tied.pt", "-u",
                    cwd=tmp_path)  # fmt: skip
    assert "End of training" in tied.stdout and load_checkpoint(tmp_path / "tied.pt")["meta"]["config"]["tied"]
    cli_here("with", "checkpoint=tied.pt", "words=15", "outf=tied.txt", "-u", cwd=tmp_path, script="generate.py")
    assert len((tmp_path / "tied.txt").read_text().split()) >= 10
    for bad, says in (
        (["adaptive_softmax=[100, 1000]", "nhid=48"], "tied=True needs emsize == nhid"),
        (["tied=False", "adaptive_softmax=[1000, 100]"], "adaptive_softmax=[1000, 100] must be increasing"),
        (["amp=fp16"], "amp='fp16' needs a CUDA device"),
        (["amp=fp32"], "amp='fp32' must be 'bf16', 'fp16' or None"),
        (["compile=1"], "compile=1 must be True or False"),
    ):
        failed = cli_here("with", "smoke", f"dataset={tiny_corpus}", *bad, "-u", cwd=tmp_path, check=False)
        assert failed.returncode != 0
        lines = failed.stderr.strip().splitlines()
        assert says in lines[-1] and "Traceback" not in failed.stderr, failed.stderr


# -- the optimization options


def recorded(folder) -> dict[str, list]:
    """The metrics of the one run recorded in ``folder`` (``-F folder``): name -> [(step, value)], full precision."""
    (run,) = [path for path in folder.iterdir() if path.name.isdigit()]
    metrics = json.loads((run / "metrics.json").read_text())
    return {name: list(zip(series["steps"], series["values"])) for name, series in metrics.items()}


def not_uniform(model: RNNModel, r: float) -> list[str]:
    """The parameters of ``model`` that do not look drawn from uniform(-r, r)."""
    wrong = []
    for name, parameter in model.named_parameters():
        values = parameter.detach().flatten()
        inside = values.abs().max() <= r
        if values.numel() >= 1000:  # spread over the whole range, evenly: uniform(-r, r) has std r / sqrt(3)
            spread = values.max() > 0.95 * r and values.min() < -0.95 * r and abs(values.mean()) < 0.1 * r
            spread = spread and abs(values.std() - r / math.sqrt(3)) < 0.05 * r
        else:  # biases: drawn too (the classic init leaves the decoder's at zero)
            spread = values.std() > 0.3 * r
        if not (inside and spread):
            wrong.append(name)
    return wrong


@pytest.mark.parametrize("r", [0.05, 0.3])
@pytest.mark.parametrize(
    "options",
    [
        dict(tied=False),
        dict(tied=True, nlayers=1),
        dict(wdrop=0.5, tied=False),
        dict(tied=False, adaptive_softmax=(10, 30)),
    ],
)
def test_init_range_makes_every_weight_uniform_in_it(r, options):
    torch.manual_seed(0)
    sizes = dict(emsize=64, nhid=64, nlayers=2) | options
    assert not_uniform(RNNModel(ModelConfig(V, init_range=r, **sizes)), r) == []
    assert not_uniform(RNNModel(ModelConfig(V, **sizes)), r) != []  # the classic init fails these checks


def test_adamw_with_weight_decay_and_lr_decay_resumes_bit_for_bit(tmp_path, tiny_corpus, cli_here):
    """An adamw run stopped after epoch 1 and resumed ends as the run that went straight through: the
    optimizer's moments travel with the checkpoint (without them the first steps after the resume differ)."""
    args = ("with", "smoke", f"dataset={tiny_corpus}", "optimizer=adamw", "lr=0.005", "wdecay=0.01",
            "lr_decay=0.5", "init_range=0.05", "max_batches=4", "log_interval=2")  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    reference = cli_here(*args, "epochs=2", "-F", "runs", cwd=straight).stdout
    cli_here(*args, "epochs=1", "-u", cwd=split)
    first = load_checkpoint(split / "model.last.pt")
    groups, moments = first["training"]["optimizer"]["param_groups"], first["training"]["optimizer"]["state"]
    assert groups[0]["decoupled_weight_decay"] is True and groups[0]["weight_decay"] == 0.01  # AdamW's
    assert groups[0]["lr"] == 0.0025 and all("exp_avg_sq" in moment for moment in moments.values())
    assert first["model_config"]["init_range"] == 0.05
    resumed = cli_here("with", "resume=model.last.pt", "epochs=2", "-u", cwd=split)
    assert "resumed from model.last.pt at epoch 2, batch 0" in resumed.stderr
    assert [value for _, value in recorded(straight / "runs")["lr"]] == [0.005, 0.0025]  # lr_decay reaches adamw
    losses = re.compile(r"\| epoch +(\d+) \| +(\d+)/.*\| loss +([\d.]+) \|")
    assert losses.findall(resumed.stdout) == [found for found in losses.findall(reference) if found[0] == "2"]
    a, b = (load_checkpoint(folder / "model.last.pt") for folder in (straight, split))
    assert all(torch.equal(a["model_state"][key], b["model_state"][key]) for key in a["model_state"])
    assert a["training"]["state"]["lr"] == b["training"]["state"]["lr"] == 0.00125
    assert re.findall(r"test ppl +([\d.]+)", resumed.stdout) == re.findall(r"test ppl +([\d.]+)", reference)


def test_nt_asgd_through_the_cli(tmp_path, tiny_corpus, cli_here):
    """600 training tokens overfit from the second epoch on: the run switches to averaging and says so."""
    train = first_lines(tiny_corpus / "train.txt", 600)
    valid = (tiny_corpus / "valid.txt").read_text(encoding="utf-8")
    corpus = write_corpus(tmp_path / "short", train, valid, valid)
    result = cli_here("with", "smoke", f"dataset={corpus}", "dropout=0", "nonmono=1", "epochs=4", "max_batches=None",
                     "-F", "runs", cwd=tmp_path)  # fmt: skip
    metrics = recorded(tmp_path / "runs")
    epoch = switch_epoch([value for _, value in metrics["valid.loss"]], nonmono=1)
    assert epoch is not None and epoch < 4, metrics["valid.loss"]  # the premise
    line = f"NT-ASGD: validation stopped improving; averaging the weights from epoch {epoch + 1} on"
    assert result.stderr.count("NT-ASGD:") == 1 and line in result.stderr, result.stderr
    assert [value for _, value in metrics["lr"]] == [20.0] * 4  # kept, not divided by 4
    last = load_checkpoint(tmp_path / "model.last.pt")["training"]
    assert last["state"]["averaging"] is True and "t0" in last["optimizer"]["param_groups"][0]  # torch's ASGD
    assert all("ax" in moment for moment in last["optimizer"]["state"].values())


def test_same_seed_same_losses_bit_for_bit_at_the_default_model_size(tmp_path, small_corpus):
    """emsize=nhid=200, nlayers=2, batch 32 x bptt 35, dropout 0.2, on real text: the losses each run records,
    at full precision (validated and tested on about 400 tokens, to keep it to seconds)."""
    short = [first_lines(small_corpus / f"{split}.txt", 400) for split in ("valid", "test")]
    corpus = write_corpus(tmp_path / "corpus", (small_corpus / "train.txt").read_text(encoding="utf-8"), *short)
    records = []
    for index, seed in enumerate((5, 5, 6)):
        folder = tmp_path / f"runs{index}"
        run_cli("with", f"dataset={corpus}", f"seed={seed}", "epochs=1", "max_batches=3", "log_interval=1",
                f"save=model{index}.pt", "-F", str(folder), cwd=tmp_path)  # fmt: skip
        (config,) = [json.loads(path.read_text()) for path in folder.glob("*/config.json")]
        assert (config["emsize"], config["nhid"], config["nlayers"], config["batch_size"]) == (200, 200, 2, 32)
        records.append(recorded(folder))
    same, again, other = records
    assert len(same["train.loss"]) == 3 and all(math.isfinite(loss) for _, loss in same["train.loss"])
    assert same["train.loss"] == again["train.loss"] and same["valid.loss"] == again["valid.loss"]
    assert same["test.loss"] == again["test.loss"]
    assert [loss for _, loss in same["train.loss"]] != [loss for _, loss in other["train.loss"]]


@pytest.mark.wallclock
def test_time_budget_through_the_cli_ends_in_time_tests_records_and_resumes_counting_the_time_spent(
    tmp_path, tiny_corpus
):
    keys = ["with", "smoke", f"dataset={tiny_corpus}", "max_batches=None", "epochs=1000", "log_interval=1000"]
    first = run_cli("-F", "runs", *keys, "time_budget=0.1", cwd=tmp_path)  # 6 seconds
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert run["status"] == "COMPLETED" and "| End of training | test loss" in first.stdout
    assert "time budget spent" in first.stdout and info["time_budget_spent"] and info["best_epoch"] >= 1
    assert 5 <= info["seconds_trained"] <= 6 + 2  # a batch and a validation of 900 tokens past the check at most
    second = run_cli("-F", "runs", "with", "resume=model.last.pt", "time_budget=0.2", cwd=tmp_path)
    again = json.loads((tmp_path / "runs" / "2" / "info.json").read_text())
    assert "resumed from model.last.pt" in second.stderr and again["time_budget_spent"]
    assert 11 <= again["seconds_trained"] <= 12 + 2  # the budget counts the first run's 6 seconds
    assert again["tokens_seen"] > info["tokens_seen"] and again["training_seconds"] < 6 + 2
