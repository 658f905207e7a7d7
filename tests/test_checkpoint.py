"""Checkpoints: identical logits after a round trip, never run code, clear errors."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from wordlm.data.corpus import Vocabulary
from wordlm.errors import UserError
from wordlm.models import MODEL_TYPES, ModelConfig, RNNModel, build_model
from wordlm.training.checkpoint import FORMAT_VERSION, load_checkpoint, model_from_checkpoint, save_checkpoint

OLD_CHECKPOINTS = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"  # see the README.md there


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


@pytest.mark.parametrize(
    "name", ["lstm_tied", "gru_adaptive", "lstm_layered_projection", "transformer_tied", "transformer_adaptive"]
)
def test_a_checkpoint_from_before_the_decoder_module_loads_scores_and_saves_alike(name):
    """Checkpoints written when the models held the decoder's parts themselves (``decoder.*``, or ``adaptive.*``
    and ``word_rank``) load, give the scores they gave then bit for bit, and are saved under the same names in
    the same order; the parameters come in the same order too, so an optimizer's state of then fits them."""
    payload = load_checkpoint(OLD_CHECKPOINTS / f"{name}.pt")
    model, _ = model_from_checkpoint(payload)
    meta = payload["meta"]
    with torch.no_grad():
        scores, _ = model(meta["inputs"], model.init_hidden(2))
    assert torch.equal(scores, meta["scores"])
    assert list(model.state_dict()) == list(payload["model_state"])
    stored_as = {id(value): key for key, value in reversed(model.state_dict(keep_vars=True).items())}  # first name
    assert [stored_as[id(parameter)] for parameter in model.parameters()] == meta["parameters"]
    if model.config.tied:
        assert model.decoder.weight is model.encoder.weight


@pytest.mark.parametrize("options", [{}, {"model_type": "Transformer", "tied": False, "adaptive_softmax": (8,)}])
def test_a_wrapped_model_saves_and_loads_under_its_wrappers_prefix(options):
    """As inside DistributedDataParallel (``module.``) or torch.compile (``_orig_mod.``): the checkpoint names,
    under the prefix, and a load back into a fresh wrapped model."""
    torch.manual_seed(0)
    config = ModelConfig(ntoken=20, emsize=8, nhid=8, nlayers=1, **options)
    model = build_model(config).eval()
    wrapped = nn.ModuleDict({"module": model})
    state = wrapped.state_dict()
    assert list(state) == [f"module.{key}" for key in model.state_dict()]
    fresh = nn.ModuleDict({"module": build_model(config).eval()})
    fresh.load_state_dict(state)
    inputs = torch.randint(20, (5, 2))
    with torch.no_grad():
        expected, _ = model(inputs, model.init_hidden(2))
        actual, _ = fresh["module"](inputs, model.init_hidden(2))
    assert torch.equal(expected, actual)


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


def zip_bomb(path, inflated: int, chunk: int = 1 << 20) -> None:
    """A torch-style zip whose ``archive/data.pkl`` inflates to ``inflated`` zero bytes, a few KB per MB on disk.

    One chunk of zeros is deflated once and its bytes repeated: after a full flush a deflate stream starts afresh,
    so the repetitions are a valid stream (what a real compressor would write, built in about a second).
    """
    import struct
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    ending = compressor.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(inflated // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    compressed = len(block) * (inflated // chunk) + len(ending)
    name = b"archive/data.pkl"
    sizes = struct.pack("<HHHIIIHH", 8, 0, 0, crc, compressed, inflated, len(name), 0)  # deflated, no time, no date
    with open(path, "wb") as out:
        out.write(b"PK\x03\x04" + struct.pack("<HH", 20, 0) + sizes + name)  # version 2.0, no flags
        out.write(b"".join([block] * (inflated // chunk)) + ending)
        directory = out.tell()
        central = b"PK\x01\x02" + struct.pack("<HHH", 20, 20, 0) + sizes + struct.pack("<HHHII", 0, 0, 0, 0, 0) + name
        out.write(central)
        out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), directory, 0))


def test_a_checkpoint_whose_pickle_inflates_beyond_the_cap_is_refused_before_reading_it(tmp_path):
    import zipfile

    zip_bomb(tmp_path / "small.pt", 8 << 20)
    with zipfile.ZipFile(tmp_path / "small.pt") as archive:  # a real zip, whose member really inflates so
        assert len(archive.read("archive/data.pkl")) == 8 << 20
    with pytest.raises(UserError, match=r"refused before reading it: its member archive/data.pkl would inflate to "
                                        r"8,388,608 bytes"):  # fmt: skip
        load_checkpoint(tmp_path / "small.pt", max_pickle_bytes=1 << 20)
    model = RNNModel(ModelConfig(ntoken=20, emsize=8, nhid=8, nlayers=1))
    save_checkpoint(tmp_path / "real.pt", model, Vocabulary([f"w{i}" for i in range(20)]))
    assert load_checkpoint(tmp_path / "real.pt")["vocab"][0] == "w0"  # the default cap takes real checkpoints
    with pytest.raises(UserError, match="refused before reading it"):
        load_checkpoint(tmp_path / "real.pt", max_pickle_bytes=64)


def test_save_writes_through_a_symbolic_link_and_refuses_a_fifo(tmp_path):
    model = RNNModel(ModelConfig(ntoken=20, emsize=8, nhid=8, nlayers=1))
    vocab = Vocabulary([f"w{i}" for i in range(20)])
    (tmp_path / "kept").mkdir()
    (tmp_path / "link.pt").symlink_to("kept/model.pt")  # dangling until the first save
    written = save_checkpoint(tmp_path / "link.pt", model, vocab)
    assert (tmp_path / "link.pt").is_symlink() and (tmp_path / "kept" / "model.pt").is_file()
    found = os.stat(tmp_path / "kept" / "model.pt")
    assert written == (found.st_dev, found.st_ino)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(OSError, match="a FIFO, not a regular file, and is never replaced"):
        save_checkpoint(tmp_path / "fifo.pt", model, vocab)
    assert (tmp_path / "fifo.pt").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.pt", "kept", "link.pt"]
