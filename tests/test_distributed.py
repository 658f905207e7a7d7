"""Training across processes: torchrun on the real CLI, equal to one process, stops, resumes, crashes."""

from __future__ import annotations

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

from wordlm.distributed import World
from wordlm.model import ModelConfig, RNNModel
from wordlm.signals import StopRequests
from wordlm.training import evaluate_loss

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
    # torchrun's variables, checked before any process group is joined
    result = run_cli("with", "smoke", f"dataset={tiny_corpus}", "batch_size=10", "-u", cwd=tmp_path, check=False,
                     WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")  # fmt: skip
    assert result.returncode != 0
    assert "error: batch_size=10 must be a multiple of the 4 processes" in result.stderr
    assert "Traceback" not in result.stderr


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

    for pattern in (LOSS, VALID):
        expected, got = figures(pattern, reference), {**figures(pattern, stopped), **figures(pattern, out)}
        assert got.keys() == expected.keys() and len(expected) >= 2
        assert all(abs(got[key] - expected[key]) <= 0.011 for key in expected), (got, expected)
    assert float(TEST_PPL.findall(out)[0]) == pytest.approx(float(TEST_PPL.findall(reference)[0]), rel=1e-3)
    one, two = weights(single / "model.last.pt"), weights(double / "model.last.pt")
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


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


def test_the_distributed_benchmark_runs_and_reports_every_figure(tmp_path, tiny_corpus):
    result = run_cli("--configs", "smoke", "--dataset", str(tiny_corpus), "--batches", "2", "--warmup", "1",
                     "--repeats", "1", "--no-gpu", cwd=tmp_path, script="benchmarks/distributed.py")  # fmt: skip
    for setup in ("1 process x 1 thread", "1 process x 2 threads", r"2 processes x 1 thread \(torchrun\)"):
        assert re.search(rf"{setup} +[\d,]+ +[\d.]+\n", result.stdout), result.stdout
    assert re.search(r"scaling efficiency, 2 processes vs 1 process x 1 thread: \d+%", result.stdout)
    assert '"efficiency": ' in result.stdout.splitlines()[-1]
