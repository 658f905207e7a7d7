"""ONNX export: onnxruntime gives PyTorch's outputs step after step; the key on training; the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wordlm import export
from wordlm.data.corpus import Vocabulary
from wordlm.errors import UserError
from wordlm.experiment import error, ex
from wordlm.export import export_onnx, flatten_state, state_names
from wordlm.models import ModelConfig, RNNModel
from wordlm.models.hidden import map_hidden
from wordlm.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: .venv/bin/pip install -e '.[onnx]'")
onnx = pytest.importorskip("onnx")


def run_steps_both_ways(model: RNNModel, path, batch: int = 3, steps: int = 3, seed: int = 0) -> None:
    """Feed the same tokens and a random start state to PyTorch and onnxruntime; compare every output."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = state_names(model)
    generator = torch.Generator().manual_seed(seed)
    torch_hidden = map_hidden(lambda s: torch.randn(s.shape, generator=generator), model.init_hidden(batch))
    onnx_state = [s.numpy() for s in flatten_state(torch_hidden)]
    for _ in range(steps):
        tokens = torch.randint(0, model.config.ntoken, (batch,), generator=generator)  # (B,)
        with torch.inference_mode():
            logits, torch_hidden = model(tokens.view(1, -1), torch_hidden)  # (1, B, V)
        logits_onnx, *onnx_state = session.run(
            None, {"tokens": tokens.numpy(), **dict(zip(names, onnx_state, strict=True))}
        )
        np.testing.assert_allclose(logits_onnx, logits[0].numpy(), rtol=1e-4, atol=1e-5)
        for got, want in zip(onnx_state, flatten_state(torch_hidden), strict=True):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_onnxruntime_matches_pytorch_step_by_step(tmp_path):
    """An LSTM: its state is a pair (test_training_with_onnx_export... covers a GRU's single state)."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(23, "LSTM", emsize=10, nhid=10, nlayers=2, dropout=0.3, tied=True)).eval()
    vocab = Vocabulary([f"w{i}" for i in range(23)])
    path = export_onnx(model, tmp_path / "sub" / "m.onnx", vocab)
    run_steps_both_ways(model, path, batch=3)
    run_steps_both_ways(model, path, batch=1, seed=1)  # the batch is dynamic, 1 included
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens", *state_names(model)]
    assert [o.name for o in session.get_outputs()] == ["logits", *(f"{n}_out" for n in state_names(model))]
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["wordlm.vocab"]) == vocab.idx2word
    assert json.loads(metadata["wordlm.model_config"]) == model.config.to_dict()
    assert model.training is False and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("model_type", ["LSTM", "GRU"])
def test_a_layered_awd_style_model_exports_a_state_per_layer(tmp_path, model_type):
    """Locked dropout, weight drop and a tied projection: a list of per-layer states of two widths."""
    torch.manual_seed(0)
    config = ModelConfig(
        30, model_type, emsize=6, nhid=10, nlayers=2, dropout=0.3, tied=True, tied_projection=True,
        locked_dropout=True, wdrop=0.5, dropoute=0.1,
    )  # fmt: skip
    model = RNNModel(config).eval()
    path = export_onnx(model, tmp_path / "m.onnx", Vocabulary([f"w{i}" for i in range(30)]))
    per_layer = ["hidden", "cell"] if model_type == "LSTM" else ["hidden"]
    assert state_names(model) == tuple(f"{n}_{layer}" for layer in (0, 1) for n in per_layer)
    run_steps_both_ways(model, path, batch=3)
    run_steps_both_ways(model, path, batch=1, seed=1)
    widths = [i.shape[2] for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[1:]]
    assert widths == [10] * len(per_layer) + [6] * len(per_layer)  # the last layer has emsize units


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied (adaptive input)"])
def test_an_adaptive_softmax_model_exports_its_log_probabilities(tmp_path, tied):
    torch.manual_seed(0)
    config = ModelConfig(40, "GRU", emsize=8, nhid=8, nlayers=1, tied=tied, adaptive_softmax=(5, 20))
    model = RNNModel(config).eval()
    model.decoder.sort_words_by_frequency(torch.rand(40))  # a word order the export must keep
    path = export_onnx(model, tmp_path / "m.onnx", Vocabulary([f"w{i}" for i in range(40)]))
    run_steps_both_ways(model, path, batch=2)


def test_missing_extra_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "_EXPORT_NEEDS", ("onnx", "no_such_module_for_wordlm"))
    model = RNNModel(ModelConfig(5, "GRU", 4, 4, 1, 0.0, True))
    expected = r"needs no_such_module_for_wordlm.*run \.venv/bin/pip install -e '\.\[onnx\]' in the wordlm clone"
    with pytest.raises(UserError, match=expected):
        export_onnx(model, tmp_path / "m.onnx")


def test_training_with_onnx_export_then_the_export_command(tiny_corpus, tmp_path):
    """The key on training writes the best model; the command on its checkpoint writes the same model."""
    updates = {"dataset": str(tiny_corpus), "save": str(tmp_path / "m.pt"), "onnx_export": str(tmp_path / "t.onnx"),
               "model_type": "GRU", "max_batches": 2, "log_interval": 1}  # fmt: skip
    ex.run(named_configs=["smoke"], config_updates=updates, options={"--loglevel": "ERROR"})
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    run_steps_both_ways(model, tmp_path / "t.onnx")
    run = ex.run("export", config_updates={"checkpoint": str(tmp_path / "m.pt")}, options={"--loglevel": "ERROR"})
    assert run.result == str(tmp_path / "m.onnx")  # onnx_export defaults to the checkpoint's name
    run_steps_both_ways(model, tmp_path / "m.onnx")


def test_export_command_of_a_damaged_checkpoint_is_a_user_error(tmp_path):
    model = RNNModel(ModelConfig(5, "GRU", 4, 4, 1, 0.0, True))
    save_checkpoint(tmp_path / "m.pt", model, Vocabulary(["a", "b"]))  # 2 words for a model of 5
    with pytest.raises(error, match="^the checkpoint is damaged: its vocabulary has 2 words, its model 5$"):
        ex.run("export", config_updates={"checkpoint": str(tmp_path / "m.pt"), "onnx_export": str(tmp_path / "x.onnx")},
               options={"--loglevel": "ERROR"})  # fmt: skip
    assert not (tmp_path / "x.onnx").exists()


def test_an_export_cut_short_leaves_the_previous_file_whole(tmp_path):
    """`ulimit -f` stops the write halfway: the good file from before stays, byte for byte (it was truncated)."""
    import resource
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    model = RNNModel(ModelConfig(40, "LSTM", 16, 16, 1, 0.0, True))
    save_checkpoint(tmp_path / "m.pt", model, Vocabulary([f"w{i}" for i in range(40)]))
    good = export_onnx(model, tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.pt").unlink()
    bigger = RNNModel(ModelConfig(400, "LSTM", 64, 64, 1, 0.0, True))  # its export outgrows the limit below
    save_checkpoint(tmp_path / "big.pt", bigger, Vocabulary([f"w{i}" for i in range(400)]))
    limit = len(good) + 1000

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "export", "with", "checkpoint=big.pt", "onnx_export=m.onnx", "-u"],
        cwd=tmp_path, env=cli_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=300,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr  # killed by SIGXFSZ, or an error line
    assert (tmp_path / "m.onnx").read_bytes() == good
    run_steps_both_ways(model, tmp_path / "m.onnx")


def test_training_refuses_an_onnx_export_folder_before_it_trains(tiny_corpus, tmp_path):
    (tmp_path / "out").mkdir()
    updates = {"dataset": str(tiny_corpus), "save": str(tmp_path / "m.pt"), "onnx_export": str(tmp_path / "out")}
    with pytest.raises(error, match=r"^onnx_export='\S+/out' is a folder; give a file path such as \S+/out/model.onnx"):
        ex.run(named_configs=["smoke"], config_updates=updates, options={"--loglevel": "ERROR"})
    assert not (tmp_path / "m.pt").exists()  # nothing trained
