"""Never lose a run: exact resume after kill -9, atomic writes, SIGTERM, a second Ctrl-C, divergence."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, cli_env, cut_corpus, read_until, run_cli

from wordlm.config import resumed_config
from wordlm.data.corpus import Vocabulary
from wordlm.models import ModelConfig, RNNModel
from wordlm.training import checkpoint as checkpoint_module
from wordlm.training.checkpoint import load_checkpoint, save_checkpoint

LOSS = re.compile(r"\| epoch +(\d+) \| +(\d+)/ *\d+ batches .*\| loss +([\d.]+) \|")
RUN = ("with", "smoke", "epochs=3", "max_batches=12", "log_interval=3")


def losses(output: str) -> dict[tuple[int, int], str]:
    return {(int(e), int(b)): loss for e, b, loss in LOSS.findall(output)}


def recorded(folder) -> dict[str, list[tuple[int, float]]]:
    """The metrics of the one run recorded under ``folder``/runs: name -> [(step, value)], at full precision."""
    (run,) = [path for path in (folder / "runs").iterdir() if path.name.isdigit()]
    metrics = json.loads((run / "metrics.json").read_text())
    return {name: list(zip(series["steps"], series["values"])) for name, series in metrics.items()}


def same_weights(path_a, path_b) -> bool:
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    return a["model_state"].keys() == b["model_state"].keys() and all(
        torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"]
    )


def popen(cwd, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights_and_losses(tmp_path, tiny_corpus):
    straight = tmp_path / "straight"
    straight.mkdir()
    reference = run_cli(*RUN, f"dataset={tiny_corpus}", "-F", "runs", cwd=straight).stdout

    killed = tmp_path / "killed"
    killed.mkdir()
    process = popen(killed, *RUN, f"dataset={tiny_corpus}", "checkpoint_every=1e-9", "-u")  # latest state every batch
    before = read_until(process, r"\| epoch +2 \| +6/")
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    saved = load_checkpoint(killed / "model.last.pt")["training"]["state"]
    assert saved["epoch"] == 2 and saved["batch"] >= 5  # mid-epoch: the batches before it are not trained again
    result = run_cli("with", "resume=model.last.pt", "-F", "runs", cwd=killed)
    resumed = result.stdout
    assert f"INFO - train - resumed from model.last.pt at epoch 2, batch {saved['batch']}\n" in result.stderr
    assert "Exiting" not in resumed

    # it goes on from the saved batch: the batches before it are not trained again, the ones after it are all trained
    expected = losses(reference)
    assert len(expected) == 12
    assert sorted(losses(resumed)) == [key for key in sorted(expected) if key > (2, saved["batch"])]
    assert {**losses(before), **losses(resumed)} == expected
    assert resumed.count("| end of epoch") == 2 and "| end of epoch   1 |" not in resumed
    # ... and its record holds the uninterrupted run's figures from there on, bit for bit
    straight_metrics, resumed_metrics = recorded(straight), recorded(killed)
    after = {"train.loss": saved["tokens_seen"], "valid.loss": 1, "lr": 1, "tokens_seen": 1, "test.loss": -1}
    for name, step in after.items():
        tail = [(s, value) for s, value in straight_metrics[name] if s > step]
        assert resumed_metrics[name] == tail and tail, name
    assert same_weights(straight / "model.pt", killed / "model.pt")
    assert same_weights(straight / "model.last.pt", killed / "model.last.pt")
    assert re.findall(r"test ppl +([\d.]+)", resumed) == re.findall(r"test ppl +([\d.]+)", reference)


def test_resume_refuses_a_changed_model_and_extends_epochs(tmp_path, tiny_corpus, cli_here):
    cli_here("with", "smoke", f"dataset={tiny_corpus}", "max_batches=4", "-u", cwd=tmp_path)
    changed = cli_here("with", "resume=model.last.pt", "nhid=64", "-u", cwd=tmp_path, check=False)
    assert changed.returncode != 0
    assert "error: resume cannot change nhid=64 (checkpoint: 32)" in changed.stderr
    longer = cli_here("with", "resume=model.last.pt", "epochs=2", "-u", cwd=tmp_path).stdout
    assert "| end of epoch   2 |" in longer and "| end of epoch   1 |" not in longer


def saver(path: str, ready) -> None:
    """Child process: write checkpoints A and B alternately, forever."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(RNNModel(ModelConfig(ntoken=500, emsize=64, nhid=64)))
    vocab = Vocabulary([f"w{i}" for i in range(500)])
    save_checkpoint(path, models[0], vocab, meta={"which": 0})
    ready.set()
    which = 1
    while True:
        save_checkpoint(path, models[which], vocab, meta={"which": which})
        which = 1 - which


def test_killing_a_saver_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for _ in range(25):
        ready = context.Event()
        child = context.Process(target=saver, args=(path, ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        payload = load_checkpoint(path)  # always complete: either A or B
        assert payload["meta"]["which"] in (0, 1)
    assert [p.name for p in tmp_path.iterdir() if p.name == "model.pt"] == ["model.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = RNNModel(ModelConfig(ntoken=30, emsize=8, nhid=8))
    vocab = Vocabulary([f"w{i}" for i in range(30)])
    save_checkpoint(tmp_path / "m.pt", model, vocab, meta={"n": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "m.pt", model, vocab, meta={"n": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "m.pt")["meta"] == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # the temporary file is gone


def test_unwritable_save_path_is_refused_before_training(tmp_path, tiny_corpus, cli_here):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = ("with", "smoke", f"dataset={tiny_corpus}", "save=blocker/model.pt", "-u")
    result = cli_here(*args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "epoch" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot write save='blocker/model.pt': blocker is a file, not a folder"], result.stderr


def test_sigterm_behaves_like_ctrl_c_and_the_run_resumes(tmp_path, small_corpus):
    process = popen(tmp_path, "with", "smoke", f"dataset={small_corpus}", "max_batches=None", "log_interval=5")
    seen = read_until(process, r"\| +10/")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=180)
    out = seen + out
    assert process.returncode == 0, err
    assert "Exiting from training early by SIGTERM (epoch 1, batch" in out and "test ppl" in out
    state = load_checkpoint(tmp_path / "model.last.pt")["training"]["state"]
    assert state["epoch"] == 1 and state["batch"] >= 10 and state["hidden"] is not None
    resumed = run_cli("with", "resume=model.last.pt", "max_batches=" + str(state["batch"] + 2), "-u", cwd=tmp_path)
    assert f"resumed from model.last.pt at epoch 1, batch {state['batch']}\n" in resumed.stderr
    assert f"| epoch   1 | {state['batch'] + 2:5d}/" in resumed.stdout
    assert min(losses(resumed.stdout)) > (1, state["batch"])  # the batches before the stop were not trained again


def test_a_second_ctrl_c_while_testing_exits_at_once(tmp_path):
    corpus = cut_corpus(tmp_path / "corpus", lines=(3000, 100, 3000))
    wide = ("emsize=400", "nhid=400")  # the test evaluation (batch 1, ~65k tokens) then lasts several seconds
    process = popen(tmp_path, "with", "smoke", *wide, f"dataset={corpus}", "max_batches=None", "eval_batch_size=1",
                    "bptt=5")  # fmt: skip
    seen = read_until(process, r"\| +10/")
    process.send_signal(signal.SIGINT)
    seen += read_until(process, r"No epoch finished yet")
    time.sleep(1.0)  # the test evaluation is running now
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, seen + out + err
    assert "error: interrupted again; stopped without testing" in err and "Traceback" not in err
    assert "test ppl" not in seen + out
    assert load_checkpoint(tmp_path / "model.pt")["meta"]["epoch"] == 0
    assert load_checkpoint(tmp_path / "model.last.pt")["training"]["state"]["batch"] >= 10


def test_divergence_stops_in_one_line_and_keeps_the_best_checkpoint(tmp_path, tiny_corpus, cli_here):
    cli_here("with", "smoke", "model_type=RNN_RELU", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    best = (tmp_path / "model.pt").read_bytes()
    result = cli_here("with", "resume=model.last.pt", "epochs=3", "lr=1e6", "-u", cwd=tmp_path, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: training diverged at epoch 2, batch \d+ \(loss (nan|inf)", errors[0])
    assert "model.pt keeps the best model (epoch 1)" in errors[0] and "Traceback" not in result.stderr
    assert (tmp_path / "model.pt").read_bytes() == best


def test_divergence_can_reload_the_best_model_and_lower_the_lr(tmp_path, tiny_corpus, cli_here):
    cli_here("with", "smoke", "model_type=RNN_RELU", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    result = cli_here("with", "resume=model.last.pt", "epochs=2", "lr=1e6", "on_divergence=reload", "-u", cwd=tmp_path,
                     check=False)  # fmt: skip
    assert "reloaded the best model (epoch 1), lr now 250000" in result.stderr
    assert "Traceback" not in result.stderr


def test_reloading_gives_up_after_three_tries_in_one_line(tmp_path, tiny_corpus, cli_here):
    cli_here("with", "smoke", "model_type=RNN_RELU", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    best = (tmp_path / "model.pt").read_bytes()
    result = cli_here("with", "resume=model.last.pt", "epochs=2", "lr=1e30", "on_divergence=reload", "-u", cwd=tmp_path,
                     check=False)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("reloaded the best model (epoch 1)") == 3  # lr 1e30 / 4, / 16, / 64: still too large
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "still diverging after 3 reloads of the best model" in errors[0], result.stderr
    assert "model.pt keeps the best model (epoch 1)" in errors[0] and "Traceback" not in result.stderr
    assert (tmp_path / "model.pt").read_bytes() == best


def test_resume_refuses_a_pickle_that_would_run_code(tmp_path, cli_here):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"format_version": 1, "model_state": Evil()}, tmp_path / "evil.pt")
    result = cli_here("with", "resume=evil.pt", "-u", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "error: evil.pt was refused" in result.stderr
    assert not marker.exists()


def test_derived_paths_stay_where_the_user_pointed(tmp_path, cli_here):
    """save_last is derived from save: it lies beside it, never elsewhere."""
    printed = cli_here("print_config", "with", "save=deep/dir/best.pt", cwd=tmp_path).stdout
    assert "save_last = 'deep/dir/best.last.pt'" in printed
    other = cli_here("print_config", "with", "save=models/run7", cwd=tmp_path).stdout
    assert "save_last = 'models/run7.last.pt'" in other
    assert not any(tmp_path.iterdir())  # print_config wrote nothing


def test_a_run_on_a_relative_dataset_path_resumes_from_another_folder(tmp_path, tiny_corpus, cli_here):
    first, elsewhere = tmp_path / "deeper" / "first", tmp_path / "elsewhere"  # the same relative path differs
    first.mkdir(parents=True), elsewhere.mkdir()
    relative = os.path.relpath(tiny_corpus, first)
    cli_here("with", "smoke", f"dataset={relative}", "epochs=1", "-u", cwd=first)
    resume = "resume=../deeper/first/model.last.pt"
    again = cli_here("with", resume, "epochs=2", "-u", cwd=elsewhere)
    assert "| end of epoch   2 |" in again.stdout and "test ppl" in again.stdout
    assert "| end of epoch   1 |" not in again.stdout  # it went on from epoch 2, not from the start
    # naming the same corpus from here is no change of dataset; another corpus still is
    named = cli_here("with", resume, f"dataset={os.path.relpath(tiny_corpus, elsewhere)}",
                    "epochs=3", "-u", cwd=elsewhere)  # fmt: skip
    assert "| end of epoch   3 |" in named.stdout and "| end of epoch   1 |" not in named.stdout
    other = cut_corpus(tmp_path / "other", lines=(200, 20, 20))
    refused = cli_here("with", resume, f"dataset={other}", "-u", cwd=elsewhere, check=False)
    assert refused.returncode == 1 and "error: resume cannot change dataset=" in refused.stderr


def test_resume_names_the_corpus_by_its_saved_folder_only_when_the_typed_path_is_gone(tmp_path, monkeypatch):
    corpus = tmp_path / "home" / "corpus"
    corpus.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = {"dataset": "gone/corpus", "save": "model.pt", "save_last": "model.last.pt", "resume": "model.last.pt"}
    payload = {"training": {"epoch": 1}, "meta": {"config": dict(config), "corpus_folder": str(corpus)}}
    assert resumed_config(config, {"resume"}, payload, "model.last.pt")["dataset"] == str(corpus)
    typed = resumed_config({**config, "dataset": "~/corpus"}, {"resume", "dataset"}, payload, "model.last.pt")
    assert typed["dataset"] == "~/corpus"  # the same folder by another name (with ~) is no change
    payload["meta"]["corpus_folder"] = str(tmp_path / "moved away")  # neither resolves: the typed path stays
    assert resumed_config(config, {"resume"}, payload, "model.last.pt")["dataset"] == "gone/corpus"
