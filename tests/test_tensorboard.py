"""TensorBoard, live: the events a training run writes, read by TensorBoard's own reader and served by its server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, cut_corpus
from test_distributed import torchrun

import wordlm
from wordlm.errors import UserError
from wordlm.tracking.tensorboard_log import run_folder_name

pytest.importorskip("tensorboard", reason="the tensorboard extra: .venv/bin/pip install -e '.[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

KEYS = dict(preset="smoke", epochs=2, max_batches=4, log_interval=2)
TAGS = {"train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_second", "valid/loss",
        "valid/ppl", "epoch", "test/ppl", "final/test_ppl", "final/best_valid_ppl"}  # fmt: skip


def events(folder: Path) -> EventAccumulator:
    """A run folder's events as TensorBoard's reader loads them (every point kept: no sampling)."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def curve(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal to float32's precision (TensorBoard keeps scalars as float32)."""
    return [step for step, _ in got] == [step for step, _ in expected] and [value for _, value in got] == pytest.approx(
        [value for _, value in expected], rel=1e-6
    )


def only_folder(board: Path) -> Path:
    (folder,) = board.iterdir()
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The same tiny run trained twice through wordlm.train: with TensorBoard on, and without."""
    folder = tmp_path_factory.mktemp("board")
    corpus = cut_corpus(folder / "tiny", lines=(300, 40, 40))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORDLM_CACHE", str(folder / "cache"))
        patch.setenv("WORDLM_OFFLINE", "1")
        on = wordlm.train(**KEYS, dataset=str(corpus), save=str(folder / "on.pt"), tensorboard=str(folder / "tb"))
        off = wordlm.train(**KEYS, dataset=str(corpus), save=str(folder / "off.pt"))
    return {"folder": folder, "corpus": corpus, "on": on, "off": off, "board": folder / "tb"}


def test_a_training_run_writes_what_tensorboard_reads_at_tokens_seen(trained):
    run, folder = trained["on"], only_folder(trained["board"])
    assert folder.name.split("_", 1)[1] == "smoke_dataset=tiny,epochs=2,log_interval=2,max_batches=4"
    board = events(folder)
    assert TAGS <= set(board.Tags()["scalars"])
    # every figure at the tokens seen when it was logged; the epoch's at its end, where its last report is
    assert same_curve(curve(board, "train/loss"), run.history["train.loss"])
    ends = [step for step, _ in curve(board, "epoch")]
    assert curve(board, "epoch") == [(ends[0], 1.0), (ends[1], 2.0)] and ends[1] == run.info["tokens_seen"]
    assert same_curve(curve(board, "valid/ppl"), [(end, ppl) for end, (_, ppl) in zip(ends, run.history["valid.ppl"])])
    assert same_curve(curve(board, "test/ppl"), [(ends[1], run.test_ppl)])
    assert same_curve(curve(board, "final/best_valid_ppl"), [(ends[1], run.best_valid_ppl)])
    assert [value for _, value in curve(board, "train/lr")] == [20.0] * 4
    assert all(value > 0 for _, value in curve(board, "train/grad_norm") + curve(board, "train/tokens_per_second"))
    # the figures beside the loss are the run's too (and Sacred's, through its Recorder)
    assert [step for step, _ in run.history["train.grad_norm"]] == [step for step, _ in run.history["train.loss"]]
    samples = board.Tensors("sample/text_summary")
    assert [event.step for event in samples] == ends
    assert all(len(event.tensor_proto.string_val[0].split()) >= 10 for event in samples)
    assert "_hparams_/session_start_info" in board.PluginTagToContent("hparams")  # the HParams view's


def test_tensorboard_changes_nothing_in_training(trained):
    on, off = trained["on"], trained["off"]  # the samples come from their own generator
    assert on.history["train.loss"] == off.history["train.loss"] and on.test_ppl == off.test_ppl


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_the_tensorboard_server_serves_the_runs_scalars_and_hparams(trained):
    port, binary = free_port(), Path(sys.executable).with_name("tensorboard")
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "tensorboard.main"]
    server = subprocess.Popen(
        [*command, "--logdir", str(trained["board"]), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        name, tags, deadline = only_folder(trained["board"]).name, {}, time.monotonic() + 120
        while name not in tags or not TAGS <= set(tags[name]):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read1().decode()
            time.sleep(1)
            try:
                tags = get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
            except OSError:  # not listening yet, or still loading
                continue
        valid = get(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={name}&tag=valid/ppl")
        assert [point[2] for point in valid] == pytest.approx([ppl for _, ppl in trained["on"].history["valid.ppl"]])
        experiment = get(f"http://127.0.0.1:{port}/data/plugin/hparams/experiment", b'{"experimentName": ""}')
        hparams = {info["name"]: info for info in experiment["hparamInfos"]}
        assert hparams["lr"]["type"] == "DATA_TYPE_FLOAT64" and hparams["tied"]["type"] == "DATA_TYPE_BOOL"
        assert {"final/test_ppl", "valid/ppl"} <= {info["name"]["tag"] for info in experiment["metricInfos"]}
    finally:  # the server and its data server, in their own process group, stopped within seconds
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def test_a_resumed_run_continues_its_curves_and_drops_what_a_killed_session_wrote_after_its_state(trained, tmp_path):
    corpus, board = trained["corpus"], tmp_path / "tb"
    first = wordlm.train(**{**KEYS, "epochs": 1}, dataset=str(corpus), save=str(tmp_path / "m.pt"),
                         tensorboard=str(board))  # fmt: skip
    shutil.copy(tmp_path / "m.last.pt", tmp_path / "after_epoch_1.pt")
    wordlm.train(resume=str(tmp_path / "m.last.pt"), epochs=2)  # the same folder, continued
    folder = only_folder(board)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    # As after a kill -9: the folder holds epoch 2, the state resumed is epoch 1's; the purge drops epoch 2's points
    # (TensorBoard's reader honours the purge; its data server drops a curve's later points at its first new one)
    again = wordlm.train(resume=str(tmp_path / "after_epoch_1.pt"), epochs=2)
    reference = events(trained["board"] / only_folder(trained["board"]).name)  # the run trained straight through
    resumed = events(folder)
    for tag in ("train/loss", "train/grad_norm", "train/lr", "valid/ppl", "epoch"):
        assert [step for step, _ in curve(resumed, tag)] == [step for step, _ in curve(reference, tag)], tag
    ends = [step for step, _ in curve(reference, "epoch")]
    for tag in ("test/ppl", "final/test_ppl"):  # the first session's, then the last's (HParams shows the last)
        assert [step for step, _ in curve(resumed, tag)] == ends, tag
    assert [step for step, _ in curve(resumed, "train/loss")] == [step for step, _ in curve(reference, "train/loss")]
    assert same_curve(curve(resumed, "valid/ppl"), curve(reference, "valid/ppl"))
    assert curve(resumed, "train/loss")[-1][1] == pytest.approx(again.history["train.loss"][-1][1])
    assert first.info["tokens_seen"] == curve(resumed, "epoch")[0][0]


def test_the_command_line_names_the_folder_by_run_id_and_preset_and_resumes_into_it(trained, tmp_path, cli_here):
    corpus = trained["corpus"]
    result = cli_here("with", "smoke", f"dataset={corpus}", "max_batches=4", "lr=5", "tensorboard=tb", "-F", "runs",
                      cwd=tmp_path)  # fmt: skip
    folder = only_folder(tmp_path / "tb")
    assert folder.name.split("_", 1)[1] == "run1_smoke_dataset=tiny,lr=5,max_batches=4", folder.name
    assert f"TensorBoard: {Path('tb') / folder.name} (new)" in result.stderr
    cli_here("with", "resume=model.last.pt", "epochs=2", "-F", "runs", cwd=tmp_path)  # the key comes from the state
    assert only_folder(tmp_path / "tb") == folder
    assert [epoch for _, epoch in curve(events(folder), "epoch")] == [1.0, 2.0]
    assert len(curve(events(folder), "test/ppl")) == 2  # each session's test of its best model


def test_under_torchrun_only_rank_0_writes(trained, tmp_path):
    launcher = torchrun(tmp_path, "with", "smoke", f"dataset={trained['corpus']}", "max_batches=4", "tensorboard=tb",
                        "-u")  # fmt: skip
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out + err
    folder = only_folder(tmp_path / "tb")
    assert len(list(folder.iterdir())) == 1 and len(curve(events(folder), "valid/ppl")) == 1


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    return line


@pytest.mark.parametrize(
    "value, line, phrase",
    [
        ("notes.txt", "error: tensorboard='notes.txt' is a file; give a folder for TensorBoard's event files",
         "is a file; give a folder"),
        ("notes.txt/tb", "error: cannot write tensorboard='notes.txt/tb': notes.txt is a file, not a folder",
         "notes.txt is a file, not a folder"),
        ("/proc", "error: cannot write tensorboard='/proc': the folder is not writable", "not writable"),  # root too
        ('""', "error: tensorboard='' must be a folder path (a non-empty string)", "must be a folder path"),
    ],
)  # fmt: skip
def test_a_tensorboard_folder_that_cannot_be_written_is_one_line_before_any_work(
    trained, tmp_path, value, line, phrase, cli_here
):
    (tmp_path / "notes.txt").write_text("a note\n")
    result = cli_here("with", "smoke", f"dataset={trained['corpus']}", f"tensorboard={value}", cwd=tmp_path,
                      check=False)  # fmt: skip
    assert one_error(result).startswith(line)
    assert "epoch" not in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no record
    given = "" if value == '""' else str(tmp_path / value)  # (/proc stays /proc)
    with pytest.raises(UserError) as refused:
        wordlm.train(**KEYS, dataset=str(trained["corpus"]), save=str(tmp_path / "m.pt"), tensorboard=given)
    assert phrase in str(refused.value) and f"tensorboard={given!r}" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_without_tensorboard_installed_the_key_is_refused_saying_how_to_install_it(trained, tmp_path, monkeypatch):
    """The command line in a process of its own, one where the tensorboard package cannot be imported at all (this
    process imported it at the top)."""
    hidden = "import sys; sys.modules['tensorboard'] = None; sys.argv[0] = 'main.py'; "
    script = hidden + "from wordlm.experiment import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, "with", "smoke", f"dataset={trained['corpus']}", "tensorboard=tb"],
        cwd=tmp_path, env=cli_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one_error(result) == ("error: tensorboard='tb' needs TensorBoard, which is not installed: run "
                                 ".venv/bin/pip install -e '.[tensorboard]' in the wordlm clone")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no run record, no folder
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[tensorboard\]'"):
        wordlm.train(**KEYS, dataset=str(trained["corpus"]), tensorboard=str(tmp_path / "tb"))
    assert list(tmp_path.iterdir()) == []


def test_folder_names_tell_runs_apart():
    from datetime import datetime

    from wordlm.config import PRESETS, defaults

    at = datetime(2026, 6, 1, 10, 15, 30)
    medium = defaults(**{**PRESETS["zaremba_medium"], "epochs": 10, "save": "runs/m.pt"})
    given = set(PRESETS["zaremba_medium"]) | {"epochs", "save"}
    assert run_folder_name(medium, given, PRESETS, 7, at) == "20260601-101530_run7_zaremba_medium_epochs=10"
    mine = defaults(dataset="/data/my corpus", adaptive_softmax=[2000, 10000], lr=0.5)
    assert run_folder_name(mine, {"dataset", "adaptive_softmax", "lr"}, PRESETS, None, at) == (
        "20260601-101530_adaptive_softmax=2000-10000,dataset=my-corpus,lr=0.5"
    )
    many = defaults(**{key: 12345 for key in ("batch_size", "bptt", "emsize", "nhid", "epochs", "log_interval")})
    name = run_folder_name(many, set(defaults()), PRESETS, None, at)
    assert len(name) < 160 and re.search(r",\+\d+$", name) and "/" not in name
