"""The command line as users meet it: real subprocesses, real corpora, real run folders, real SIGINT."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_env, read_until, run_cli

SPEC = {  # key: (default as printed, one-line doc) -- exactly the spec's
    "batch_size": ("32", "batch size"),
    "bptt": ("35", "sequence length"),
    "clip": ("0.25", "gradient clipping"),
    "dataset": ("'./data'", "location of the data corpus"),
    "dropout": ("0.2", "dropout applied to layers (0 = no dropout)"),
    "emsize": ("200", "size of word embeddings"),
    "epochs": ("40", "upper epoch limit"),
    "log_interval": ("200", "report interval"),
    "lr": ("20.0", "initial learning rate"),
    "model_type": ("'LSTM'", "type of recurrent net (RNN_TANH, RNN_RELU, LSTM, GRU)"),
    "nhid": ("200", "number of hidden units per layer"),
    "nlayers": ("2", "number of layers"),
    "save": ("'model.pt'", "path to save the final model"),
    "seed": ("257", "the random seed for this experiment"),
    "tied": ("True", "tie the word embedding and softmax weights"),
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_config(output: str) -> dict[str, tuple[str, str]]:
    entries = {}
    for line in ANSI.sub("", output).splitlines():
        match = re.match(r"^\s+(\w+) = (.+?)\s+# (.*)$", line)
        if match:
            entries[match.group(1)] = (match.group(2), match.group(3))
    return entries


def test_print_config_shows_the_spec_keys_defaults_and_docs(tmp_path):
    result = run_cli("print_config", cwd=tmp_path)
    entries = parse_config(result.stdout)
    assert {key: entries.get(key) for key in SPEC} == SPEC
    assert {"max_batches", "device"} <= set(entries)
    assert not (tmp_path / "runs").exists()  # print_config records nothing


def test_help_and_named_configs(tmp_path):
    help_text = run_cli("--help", cwd=tmp_path).stdout
    assert "train recurrent word-level language models" in help_text and "--file_storage" in help_text
    assert "smoke" in run_cli("print_named_configs", cwd=tmp_path).stdout
    updated = parse_config(run_cli("print_config", "with", "smoke", "lr=0.5", cwd=tmp_path).stdout)
    assert updated["nhid"][0] == "32" and updated["lr"][0] == "0.5" and updated["batch_size"][0] == "8"


def read_run(folder):
    """run.json with the run's info (FileStorageObserver keeps it in info.json), and metrics.json."""
    run = json.loads((folder / "run.json").read_text())
    run["info"] = json.loads((folder / "info.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    return run, metrics


def test_the_issue_example_trains_and_records_the_run(tmp_path, tiny_corpus):
    args = ("with", "model_type=RNN_TANH", "lr=0.2", "nhid=150", "nlayers=1", "bptt=20", "dropout=0.5",
            "save=rnn_01.pt", "emsize=250", "tied=False", "epochs=3", f"dataset={tiny_corpus}")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.stdout.count("| end of epoch") == 3
    test_ppl = float(
        re.search(r"\| End of training \| test loss +[\d.]+ \| test ppl +([\d.]+)", result.stdout).group(1)
    )
    run, metrics = read_run(tmp_path / "runs" / "1")
    assert run["status"] == "COMPLETED" and run["result"] == pytest.approx(test_ppl, rel=1e-4)
    assert run["info"]["interrupted"] is False and run["artifacts"] == ["rnn_01.pt", "learning_curves.png"]
    assert metrics["valid.ppl"]["steps"] == [1, 2, 3] and len(metrics["lr"]["values"]) == 3
    assert metrics["test.ppl"]["values"] == [run["result"]]
    assert metrics["train.loss"]["values"] and (tmp_path / "runs" / "1" / "rnn_01.pt").is_file()
    checkpoint = torch.load(tmp_path / "rnn_01.pt", weights_only=True)
    assert checkpoint["model_config"]["model_type"] == "RNN_TANH" and checkpoint["model_config"]["emsize"] == 250


@pytest.mark.parametrize("model_type", ["RNN_RELU", "LSTM", "GRU"])
def test_one_epoch_of_every_model_type(tmp_path, tiny_corpus, model_type):
    result = run_cli("with", "smoke", f"model_type={model_type}", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    assert "| end of epoch   1 |" in result.stdout and "test ppl" in result.stdout
    assert not (tmp_path / "runs").exists()  # -u: unobserved
    assert (tmp_path / "model.pt").is_file()


def test_sacred_flags_file_storage_print_config_and_loglevel(tmp_path, tiny_corpus):
    result = run_cli("with", "smoke", f"dataset={tiny_corpus}", "-F", "elsewhere", "-p", "-l", "WARNING", cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "1" / "run.json").is_file()
    assert not (tmp_path / "runs").exists()  # -F replaces the default observer
    assert "Configuration" in result.stdout  # -p
    assert "INFO - wordlm" not in result.stderr and "INFO - wordlm" not in result.stdout  # -l WARNING


def test_same_seed_same_losses_through_the_cli(tmp_path, tiny_corpus):
    runs = [run_cli("with", "smoke", f"dataset={tiny_corpus}", "-u", f"seed={seed}", cwd=tmp_path).stdout
            for seed in (5, 5, 6)]  # fmt: skip
    losses = [re.findall(r"loss +([\d.]+) \| ppl", out) for out in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize(
    "update, message",
    [
        ("batch_size=0", "error: batch_size=0 must be a positive integer"),
        ("model_type=LSTMX", "error: model_type='LSTMX' is not one of RNN_TANH, RNN_RELU, LSTM, GRU"),
        ("emsize=100", "error: tied=True needs emsize == nhid"),
        ("dataset=/nonexistent/corpus", "error: dataset='/nonexistent/corpus' is neither a folder nor a known corpus"),
        ("lr=-1", "error: lr=-1 must be a positive, finite number"),
    ],
)
def test_bad_values_give_one_line_and_no_traceback(tmp_path, tiny_corpus, update, message):
    result = run_cli("with", "smoke", f"dataset={tiny_corpus}", update, "-u", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_misspelt_key_is_refused(tmp_path):
    result = run_cli("with", "bacth_size=3", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "bacth_size" in result.stderr


def test_runs_outside_a_committed_git_repository(tmp_path):
    """Sacred crashes in a repository with no commits (sacred#915); an unpacked archive + `git init` must work."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "wordlm", project / "wordlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "main.py", project / "main.py")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    result = subprocess.run([sys.executable, "main.py", "print_config"], cwd=project, env=cli_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "batch_size = 32" in ANSI.sub("", result.stdout)


def start_training(tmp_path, corpus, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "with", f"dataset={corpus}", "emsize=32", "nhid=32",
         "nlayers=1", "batch_size=8", "bptt=10", "log_interval=5", "epochs=50", *extra],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def interrupt(process, seen):
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return seen + out, err


def test_ctrl_c_before_the_first_epoch_saves_and_tests_the_current_model(tmp_path, small_corpus):
    stale = tmp_path / "model.pt"
    stale.write_bytes(b"a stale file from an earlier run")
    process = start_training(tmp_path, small_corpus)
    seen = read_until(process, r"\|\s+10/\s*\d+ batches")
    out, err = interrupt(process, seen)
    assert process.returncode == 0, err
    assert "Exiting from training early by SIGINT (epoch 1" in out and "No epoch finished yet" in out
    assert re.search(r"\| End of training \| test loss +[\d.]+ \| test ppl", out)
    checkpoint = torch.load(stale, weights_only=True)  # replaced by this run's model, not the stale file
    assert checkpoint["meta"]["epoch"] == 0 and checkpoint["meta"]["interrupted_at"]["batch"] >= 10
    run, _ = read_run(tmp_path / "runs" / "1")
    assert run["status"] == "COMPLETED" and run["info"]["interrupted"] is True
    assert run["result"] == pytest.approx(run["info"]["test_ppl"]) and run["info"]["stopped_at"]["epoch"] == 1


def test_ctrl_c_after_an_epoch_tests_the_best_model(tmp_path, tiny_corpus):
    process = start_training(tmp_path, tiny_corpus)
    seen = read_until(process, r"\| end of epoch   2 \|")
    out, err = interrupt(process, seen)
    assert process.returncode == 0, err
    assert "Exiting from training early" in out and "No epoch finished yet" not in out
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["meta"]["epoch"] in (1, 2)  # the best by validation loss, saved at an epoch's end
    run, _ = read_run(tmp_path / "runs" / "1")
    assert run["info"]["interrupted"] is True and run["info"]["best_epoch"] == checkpoint["meta"]["epoch"]


def test_progress_bar_on_a_terminal_and_plain_lines_in_the_run_record(tmp_path, tiny_corpus):
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "with", "smoke", f"dataset={tiny_corpus}"],
        cwd=tmp_path, env=cli_env(), stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        screen += chunk
    process.wait(timeout=120)
    os.close(leader)
    text = screen.decode(errors="replace")
    assert process.returncode == 0, text
    assert re.search(r"epoch 1: +\d+%\|", text)  # tqdm's bar
    assert "| end of epoch   1 |" in text
    record = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    assert "| end of epoch   1 |" in record and "\r" not in record  # redraws filtered from the record
