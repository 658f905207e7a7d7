"""Checkpoints: identical logits after a round trip, never run code, clear errors."""

import os
import pickle

import pytest
import torch

from wordlm.checkpoint import FORMAT_VERSION, load_checkpoint, model_from_checkpoint, save_checkpoint
from wordlm.data import Vocabulary
from wordlm.errors import UserError
from wordlm.model import MODEL_TYPES, ModelConfig, RNNModel


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_round_trip_gives_identical_logits(tmp_path, model_type):
    torch.manual_seed(1)
    model = RNNModel(ModelConfig(ntoken=20, model_type=model_type, emsize=8, nhid=8, nlayers=2)).eval()
    vocab = Vocabulary([f"w{i}" for i in range(20)])
    save_checkpoint(tmp_path / "m.pt", model, vocab, meta={"note": "x"})
    payload = load_checkpoint(tmp_path / "m.pt")
    loaded, loaded_vocab = model_from_checkpoint(payload)
    inputs = torch.randint(20, (6, 3))
    expected, _ = model(inputs, model.init_hidden(3))
    actual, _ = loaded(inputs, loaded.init_hidden(3))
    assert torch.equal(expected, actual)
    assert loaded_vocab.idx2word == vocab.idx2word and payload["meta"] == {"note": "x"}
    assert loaded.decoder.weight is loaded.encoder.weight  # tying survives the round trip
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


class CreatesFile:
    def __reduce__(self):
        return (os.mkdir, (os.environ["WORDLM_TEST_MARKER"],))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("WORDLM_TEST_MARKER", str(marker))
    torch.save({"format_version": 1, "model_state": CreatesFile()}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="is damaged or is no wordlm checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"format_version": FORMAT_VERSION + 1, "model_state": {}}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="newer than this wordlm understands"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a wordlm checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump({"a": 1}, handle)
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "plain.pkl")
