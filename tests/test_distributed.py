"""Training across processes: torchrun on the real CLI, equal to one process, stops, resumes, crashes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env, run_cli
from test_reliability import read_until

from wordlm.evaluation import evaluate_loss
from wordlm.models import ModelConfig, RNNModel
from wordlm.training.distributed import World
from wordlm.training.signals import StopRequests

LOSS = re.compile(r"\| epoch +(\d+) \| +(\d+)/ *\d+ batches .*\| loss +([\d.]+) \|")
VALID = re.compile(r"\| end of epoch +(\d+) \|.*\| valid loss +([\d.]+) \|")
TEST_PPL = re.compile(r"test ppl +([\d.]+)")
# dropout 0: with dropout the processes draw their own masks, and no single process draws the same ones
RUN = ("with", "smoke", "dropout=0", "epochs=2", "max_batches=20", "log_interval=5")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def figures(pattern: re.Pattern, output: str) -> dict[tuple[int, ...], float]:
    return {tuple(int(x) for x in match[:-1]): float(match[-1]) for match in pattern.findall(output)}


def torchrun(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 main.py ARGS`` as a user types it (a free port each time)."""
    return subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"), *args],
        cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the process torchrun started with RANK=rank."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == launcher.pid else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"torchrun has no process of rank {rank}")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state"]


def assert_same_training(reference: str, single: Path, output: str, double: Path, before: str = "") -> None:
    """One process's run (its output, its folder) and the two processes' (with ``before``, an earlier session's
    output) log the same losses to 0.011 and the same test perplexity, and end with the same weights."""
    for pattern in (LOSS, VALID):
        expected, got = figures(pattern, reference), {**figures(pattern, before), **figures(pattern, output)}
        assert got.keys() == expected.keys() and len(expected) >= 2
        assert all(abs(got[key] - expected[key]) <= 0.011 for key in expected), (got, expected)
    assert float(TEST_PPL.findall(output)[0]) == pytest.approx(float(TEST_PPL.findall(reference)[0]), rel=1e-3)
    one, two = weights(single / "model.last.pt"), weights(double / "model.last.pt")
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


def test_each_rank_takes_its_columns_of_every_tensor_of_a_layered_state():
    whole = RNNModel(ModelConfig(ntoken=20, emsize=6, nhid=6, wdrop=0.5)).init_hidden(4)  # [(h, c), (h, c)]
    whole = [tuple(torch.arange(h.numel(), dtype=torch.float).view(h.shape) for h in layer) for layer in whole]
    parts = [World(rank=rank, size=2).take_columns(whole) for rank in range(2)]
    assert [type(layer) for layer in parts[1]] == [tuple, tuple]
    for layer in range(2):
        for i in range(2):
            assert torch.equal(torch.cat([part[layer][i] for part in parts], dim=1), whole[layer][i])
            assert parts[1][layer][i].shape == (1, 2, 6)


def test_share_gives_each_rank_one_contiguous_block():
    for count, size in [(8, 2), (10, 4), (3, 4), (32, 8)]:
        blocks = [World(rank=rank, size=size).share(count) for rank in range(size)]
        assert [i for block in blocks for i in range(count)[block]] == list(range(count))
        assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1


class _OneRankOf(World):
    """A rank whose sums stay its own, to look at what each rank of a world would score."""

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_evaluation_shares_add_up_to_the_single_process_figure():
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(ntoken=50, emsize=16, nhid=16, nlayers=1, dropout=0.0))
    ids = torch.randint(0, 50, (1003,))
    loss, count = evaluate_loss(model, ids, batch_size=10)
    for size in (2, 3, 4):
        parts = [evaluate_loss(model, ids, 10, world=_OneRankOf(rank=r, size=size)) for r in range(size)]
        assert sum(n for _, n in parts) == count == 1002
        assert sum(part_loss * n for part_loss, n in parts) / count == pytest.approx(loss, rel=1e-6)


def test_in_a_distributed_run_a_second_signal_waits_and_a_stop_can_come_from_elsewhere():
    with StopRequests(second_interrupts=False) as stop, stop.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding what a scheduler also sent
        assert stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            stop.check()
    with StopRequests(second_interrupts=False) as stop:
        with pytest.raises(KeyboardInterrupt, match="SIGINT"), stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            stop.check()
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy, landing while the stopped run tests
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGINT"
    with StopRequests(second_interrupts=False) as other, other.deferred():
        other.check()
        other.request(signal.SIGINT)  # what another rank received
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            other.check()


def test_a_failed_process_ignores_the_sigterm_that_follows_but_a_stopped_one_does_not():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError), StopRequests(second_interrupts=False, ignore_term_after_error=True):
            raise RuntimeError("Connection closed by peer")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, previous)
        with pytest.raises(KeyboardInterrupt), StopRequests(second_interrupts=False, ignore_term_after_error=True):
            raise KeyboardInterrupt("SIGTERM")
        assert signal.getsignal(signal.SIGTERM) is previous
        with pytest.raises(RuntimeError), StopRequests():
            raise RuntimeError("a single process")
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_batch_size_must_split_evenly_among_the_processes(tmp_path, tiny_corpus):
    # torchrun's variables, checked before any process group is joined, and before Sacred starts the run: rank 0
    # records runs, and a refused launch leaves no FAILED record behind
    result = run_cli("-F", "runs", "with", "smoke", f"dataset={tiny_corpus}", "batch_size=10", cwd=tmp_path,
                     check=False, WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")  # fmt: skip
    assert result.returncode != 0
    assert "error: batch_size=10 must be a multiple of the 4 processes" in result.stderr
    assert "Traceback" not in result.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or [p.name for p in runs.iterdir()] == ["_sources"], sorted(runs.iterdir())


def test_two_processes_train_like_one_stop_together_and_resume(tmp_path, tiny_corpus):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    reference = run_cli(*RUN, f"dataset={tiny_corpus}", "-u", cwd=single).stdout

    # two processes, recorded in runs/; SIGTERM to rank 1 alone in the middle of epoch 2
    launcher = torchrun(double, *RUN, f"dataset={tiny_corpus}", "checkpoint_every=1e-9", WORDLM_RUNS_DIR="runs")
    seen = read_until(launcher, r"\| epoch +2 \| +10/")
    os.kill(worker_pid(launcher, 1), signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    stopped = seen + out
    assert launcher.returncode == 0, stopped + err
    assert re.search(r"Exiting from training early by SIGTERM \(epoch 2, batch 1\d\)", stopped), stopped
    assert stopped.count("| End of training |") == 1  # rank 0 alone prints
    assert [p.name for p in (double / "runs").iterdir() if p.name.isdigit()] == ["1"]  # and records
    last = torch.load(double / "model.last.pt", weights_only=True)["training"]
    assert [h.shape for h in last["state"]["hidden"]] == [(1, 8, 32)] * 2  # every column's state, gathered
    assert len(last["rng_by_rank"]) == 2

    resumed = torchrun(double, "with", "resume=model.last.pt", "-u")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out + err
    assert f"resumed from model.last.pt at epoch 2, batch {last['state']['batch']}\n" in err
    assert min(figures(LOSS, out)) > (2, last["state"]["batch"])  # no batch before the stop is trained again

    assert_same_training(reference, single, out, double, before=stopped)


@pytest.mark.wallclock
def test_two_processes_end_a_time_budget_together_test_and_record(tmp_path, tiny_corpus):
    # every rank must stop at the same batch, or the one that goes on waits forever in its next all-reduce
    keys = ("with", "smoke", f"dataset={tiny_corpus}", "max_batches=None", "epochs=1000", "log_interval=1000",
            "lr_schedule=cosine", "time_budget=0.1")  # fmt: skip
    launcher = torchrun(tmp_path, *keys, WORDLM_RUNS_DIR="runs")
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, out + err
    assert out.count("time budget spent") == 1 and out.count("| End of training |") == 1, out  # rank 0 reports
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["time_budget_spent"] and 5 <= info["seconds_trained"] <= 6 + 3
    assert json.loads((tmp_path / "runs" / "1" / "run.json").read_text())["status"] == "COMPLETED"


def test_an_awd_style_run_saves_mid_epoch_stops_and_resumes_exactly(tmp_path, tiny_corpus):
    # locked dropout, weight drop, embedding dropout: a list of per-layer (h, c) states, random masks on every rank
    awd = ("with", "smoke", "nlayers=2", "locked_dropout=True", "wdrop=0.3", "dropoute=0.1", "log_interval=5",
           f"dataset={tiny_corpus}", "checkpoint_every=1e-9", "-u")  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    reference = torchrun(straight, *awd)
    expected, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, expected + err

    launcher = torchrun(stopped, *awd)  # a checkpoint after every batch, then SIGTERM to rank 1 mid-epoch
    seen = read_until(launcher, r"\| epoch +1 \| +5/")
    os.kill(worker_pid(launcher, 1), signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, seen + out + err
    stop = re.search(r"Exiting from training early by SIGTERM \(epoch 1, batch (\d+)\)", out)
    assert stop and 5 <= int(stop[1]) < 20, seen + out
    last = torch.load(stopped / "model.last.pt", weights_only=True)["training"]
    hidden = last["state"]["hidden"]  # every column's state, gathered layer by layer
    assert isinstance(hidden, list) and [[h.shape for h in layer] for layer in hidden] == [[(1, 8, 32)] * 2] * 2
    assert last["state"]["batch"] == int(stop[1]) and len(last["rng_by_rank"]) == 2

    resumed = torchrun(stopped, "with", "resume=model.last.pt", "-u")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out + err
    assert f"resumed from model.last.pt at epoch 1, batch {stop[1]}" in err
    assert TEST_PPL.findall(out) == TEST_PPL.findall(expected) and len(TEST_PPL.findall(out)) == 1
    one, two = weights(straight / "model.pt"), weights(stopped / "model.pt")
    assert all(torch.equal(one[k], two[k]) for k in one)  # the same masks, batches and states: bit for bit


def test_a_crashed_process_brings_the_run_down_with_a_message(tmp_path, tiny_corpus):
    launcher = torchrun(tmp_path, "with", "smoke", f"dataset={tiny_corpus}", "max_batches=None", "log_interval=5", "-u")
    read_until(launcher, r"\| epoch +1 \| +5/")
    survivor = worker_pid(launcher, 0)
    os.kill(worker_pid(launcher, 1), signal.SIGKILL)
    # torchrun then sends SIGTERM to process 0 once; sent again and again, it lands on every step of the way out
    while launcher.poll() is None:
        try:
            os.kill(survivor, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2 lost contact with the others ("), err
    assert "resume=model.last.pt continues from the latest state written" in errors[0]
    assert "End of training" not in out


# main.py with two faults put in: rank 1 raises in its third batch, and unpickling anything raises. Each rank
# also keeps the RNG state it captures for a checkpoint in rng.RANK.pt, to compare with what rank 0 saved.
FAULTY_MAIN = """
import os, pickle, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import wordlm.experiment as experiment
import wordlm.training.trainer as training

def unpickling(*args, **kwargs):
    raise AssertionError("something was unpickled")

class Unpickler(pickle.Unpickler):
    load = unpickling

for module, name in [(dist, "all_gather_object"), (dist, "broadcast_object_list"), (dist, "gather_object"),
                     (pickle, "loads"), (pickle, "load")]:
    setattr(module, name, unpickling)
pickle.Unpickler = Unpickler
capture, rank = training.capture_rng_state, os.environ["RANK"]

def kept_capture():
    state = capture()
    torch.save(state, f"rng.{{rank}}.pt")
    return state

training.capture_rng_state = kept_capture
if rank == "1":
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def broken_clip(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise ZeroDivisionError("rank 1 met a bug in its third batch")
        return clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = broken_clip
experiment.main()
"""


def test_a_rank_that_raises_shows_its_traceback_in_the_summary_and_checkpoints_move_no_pickle(tmp_path, tiny_corpus):
    script = tmp_path / "faulty_main.py"
    script.write_text(FAULTY_MAIN.format(root=str(ROOT)))
    launcher = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), "with", "smoke", f"dataset={tiny_corpus}",
         "dropout=0.3", "checkpoint_every=1e-9", "-u"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = launcher.stderr
    assert launcher.returncode != 0 and "something was unpickled" not in err, err
    summary = err[err.index("Root Cause (first observed failure)") :]
    assert re.search(r"rank +: 1 \(local_rank: 1\)", summary) and "error_file: <N/A>" not in summary, summary
    assert re.search(r"traceback : Traceback \(most recent call last\):\n(.*\n)*.*in train_epoch\n", summary), summary
    assert "ZeroDivisionError: rank 1 met a bug in its third batch" in summary
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # a user error stays one line
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2 lost contact with the others ("), err

    # the checkpoint of batch 2 holds each rank's own RNG state, moved as bytes in a tensor and read back intact
    saved = torch.load(tmp_path / "model.last.pt", weights_only=True)["training"]
    assert saved["state"]["batch"] == 2
    for rank, state in enumerate(saved["rng_by_rank"]):
        own = torch.load(tmp_path / f"rng.{rank}.pt", weights_only=True)
        assert torch.equal(state["torch"], own["torch"]) and torch.equal(state["numpy"][1], own["numpy"][1])
        plain = [state["python"], state["numpy"][0], *state["numpy"][2:]]
        assert plain == [own["python"], own["numpy"][0], *own["numpy"][2:]] and state["cuda"] == own["cuda"] == []
    assert not torch.equal(saved["rng_by_rank"][0]["torch"], saved["rng_by_rank"][1]["torch"])


def test_the_distributed_benchmark_runs_and_reports_every_figure(tmp_path, tiny_corpus):
    result = run_cli("--configs", "smoke", "--dataset", str(tiny_corpus), "--batches", "2", "--warmup", "1",
                     "--repeats", "1", "--no-gpu", cwd=tmp_path, script="benchmarks/distributed.py")  # fmt: skip
    for setup in ("1 process x 1 thread", "1 process x 2 threads", r"2 processes x 1 thread \(torchrun\)"):
        assert re.search(rf"{setup} +[\d,]+ +[\d.]+\n", result.stdout), result.stdout
    assert re.search(r"scaling efficiency, 2 processes vs 1 process x 1 thread: \d+%", result.stdout)
    assert '"efficiency": ' in result.stdout.splitlines()[-1]


def test_stop_world_lets_go_of_the_store_and_a_second_run_in_the_process_is_one_line(monkeypatch):
    """The store's connection goes before the interpreter's shutdown (where torch's leftovers can abort a finished
    rank); the meeting's answers stay, so the restart count a run recorded does not change."""
    from datetime import timedelta

    from wordlm.errors import UserError
    from wordlm.training import distributed

    monkeypatch.setattr(distributed, "_MET", {"store": object(), "start": 1, "restarts": 0})
    distributed.stop_world()
    assert distributed._MET == {"store": None, "start": 1, "restarts": 0}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.elastic_restarts() == 0
    with pytest.raises(UserError, match="under torchrun each process trains one run"):
        distributed._store(0, 2, timedelta(seconds=1))
