"""Resume honours or refuses every key given, whatever its value, and the run record says what trained.

Sacred's list of modified keys leaves out a key given at its default value: ``with resume=... bptt=35`` must not
train silently with the checkpoint's bptt, nor record a config other than the one that trained.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

import wordlm
from wordlm.config import defaults
from wordlm.errors import UserError

TRAINING_KEYS = set(defaults()) | {"seed"}


@pytest.fixture
def gru_run(tmp_path, tiny_corpus):
    """A finished one-epoch GRU run with lr 5 and clip 0.5 (smoke's bptt 10), its states in ``tmp_path``."""
    wordlm.train(preset="smoke", dataset=str(tiny_corpus), model_type="GRU", lr=5.0, clip=0.5,
                 save=str(tmp_path / "gru.pt"))  # fmt: skip
    return tmp_path


def only_error_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def no_run_record(folder) -> bool:
    runs = folder / "runs"
    return not runs.exists() or [p.name for p in runs.iterdir()] == ["_sources"]


@pytest.mark.parametrize(
    "key, message",
    [("model_type=LSTM", "error: resume cannot change model_type='LSTM' (checkpoint: 'GRU')"),
     ("bptt=35", "error: resume cannot change bptt=35 (checkpoint: 10)")],
)  # fmt: skip
def test_a_fixed_key_given_at_its_default_is_refused_on_the_command_line(gru_run, key, message, cli_here):
    result = cli_here("-F", "runs", "with", "resume=gru.last.pt", key, "epochs=2", cwd=gru_run, check=False)
    assert only_error_line(result).startswith(message)
    assert no_run_record(gru_run)  # refused before Sacred started the run


@pytest.mark.parametrize("key", [{"model_type": "LSTM"}, {"bptt": 35}])
def test_a_fixed_key_given_at_its_default_is_refused_by_the_api(gru_run, key):
    with pytest.raises(UserError, match="resume cannot change"):
        wordlm.train(resume=str(gru_run / "gru.last.pt"), epochs=2, save=str(gru_run / "r.pt"), **key)


def test_a_training_key_given_at_its_default_is_honoured_and_recorded(gru_run):
    """A subprocess, as a user runs it: this file's witness of a resumed run that Sacred observes in a real process (the
    other command lines here run in this process, cli_here, where the run records are alike but for cout.txt)."""
    result = run_cli("-F", "runs", "with", "resume=gru.last.pt", "lr=20.0", "clip=0.25", "log_interval=5", "epochs=2",
                     "save=r.pt", cwd=gru_run)  # fmt: skip
    lrs = [line.split("| lr ")[1].split()[0] for line in result.stdout.splitlines() if "| lr " in line]
    assert lrs and lrs[0] == "20.00", result.stdout  # not the checkpoint's 5
    trained = torch.load(gru_run / "r.last.pt", weights_only=True)["meta"]["config"]
    assert (trained["lr"], trained["clip"], trained["model_type"], trained["bptt"]) == (20.0, 0.25, "GRU", 10)
    recorded = json.loads((gru_run / "runs" / "1" / "config.json").read_text())
    assert {k: recorded[k] for k in TRAINING_KEYS} == {k: trained[k] for k in TRAINING_KEYS}


def test_the_api_honours_a_training_key_given_at_its_default(gru_run):
    run = wordlm.train(resume=str(gru_run / "gru.last.pt"), lr=20.0, clip=0.25, epochs=2, save=str(gru_run / "r.pt"))
    config = run.config
    assert (config["lr"], config["clip"], config["model_type"], config["bptt"]) == (20.0, 0.25, "GRU", 10)
    assert run.history["lr"][0][1] <= 20.0 and run.history["lr"][0][1] > 5.0  # (divided by 4 at most on no gain)


def test_a_resumed_finished_run_records_the_model_that_trained_and_no_speed(gru_run, cli_here):
    # (`main.py runs` builds its rows from config.json and info.json)
    cli_here("-F", "runs", "with", "resume=gru.last.pt", cwd=gru_run)  # one epoch was asked for: nothing to train
    record = gru_run / "runs" / "1"
    recorded = json.loads((record / "config.json").read_text())
    saved = torch.load(gru_run / "gru.last.pt", weights_only=True)["meta"]["config"]
    assert {k: recorded[k] for k in ("model_type", "emsize", "nhid", "nlayers", "epochs", "bptt", "lr", "clip")} == {
        k: saved[k] for k in ("model_type", "emsize", "nhid", "nlayers", "epochs", "bptt", "lr", "clip")
    }
    assert recorded["checkpoint"] == saved["save"]  # the commands' checkpoint follows the save that trained
    assert json.loads((record / "info.json").read_text())["tokens_per_second"] is None  # 0 tokens, not 26 million/s


def test_a_bad_value_given_beside_resume_leaves_no_run_record(gru_run, cli_here):
    result = cli_here("-F", "runs", "with", "resume=gru.last.pt", "lr=-1", cwd=gru_run, check=False)
    assert only_error_line(result).startswith("error: lr=-1 must be a positive")
    assert no_run_record(gru_run)


def test_a_resume_given_a_new_save_keeps_and_tests_the_best_model_of_the_run(gru_run, cli_here):
    # the best model so far is in the resumed run's save (gru.pt), not in the new save: it is carried over at once
    first = torch.load(gru_run / "gru.pt", weights_only=True)
    result = cli_here("-u", "with", "resume=gru.last.pt", "save=copy.pt", cwd=gru_run)  # (finished: nothing to train)
    assert "could not be written" not in result.stderr, result.stderr
    copy = torch.load(gru_run / "copy.pt", weights_only=True)
    assert all(torch.equal(copy["model_state"][k], v) for k, v in first["model_state"].items())
    assert copy["meta"]["config"]["save"] == "copy.pt" and copy["meta"]["epoch"] == first["meta"]["epoch"]
    tested = float(result.stdout.split("test ppl")[1].split()[0])
    assert f"{tested:.2f}" == f"{wordlm.load(gru_run / 'gru.pt').perplexity(gru_run / 'tiny' / 'test.txt'):.2f}"
