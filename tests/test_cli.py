"""The command line as users meet it: real corpora, real run folders, real SIGINT.

What only a process shows runs as one (``run_cli``, ``Popen``): signals, terminals, FIFOs and devices, runs Sacred
records, a git repository, a witness per script; what a command refuses or prints runs in this process
(``cli_here``), milliseconds instead of seconds each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, cli_env, cut_corpus, read_until, run_cli

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
    "model_type": ("'LSTM'", "type of recurrent net (RNN_TANH, RNN_RELU, LSTM, GRU) or Transformer"),
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


def test_print_config_shows_the_spec_keys_defaults_and_docs(tmp_path, cli_here):
    result = cli_here("print_config", cwd=tmp_path)
    entries = parse_config(result.stdout)
    assert {key: entries.get(key) for key in SPEC} == SPEC
    assert {"max_batches", "device"} <= set(entries)
    assert not (tmp_path / "runs").exists()  # print_config records nothing


def test_help_and_named_configs(tmp_path, cli_here):
    help_text = cli_here("--help", cwd=tmp_path).stdout
    assert "train recurrent word-level language models" in help_text and "--file_storage" in help_text
    assert "smoke" in cli_here("print_named_configs", cwd=tmp_path).stdout
    updated = parse_config(cli_here("print_config", "with", "smoke", "lr=0.5", cwd=tmp_path).stdout)
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
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # run from a checkout: its repository and commit, once (not once per source file)
        (repository,) = run["experiment"]["repositories"]
        assert repository["commit"] == head.stdout.strip() and isinstance(repository["dirty"], bool), repository
    checkpoint = torch.load(tmp_path / "rnn_01.pt", weights_only=True)
    assert checkpoint["model_config"]["model_type"] == "RNN_TANH" and checkpoint["model_config"]["emsize"] == 250


@pytest.mark.parametrize("model_type", ["RNN_RELU", "LSTM", "GRU"])
def test_one_epoch_of_every_model_type(tmp_path, tiny_corpus, cli_here, model_type):
    result = cli_here("with", "smoke", f"model_type={model_type}", f"dataset={tiny_corpus}", "-u", cwd=tmp_path)
    assert "| end of epoch   1 |" in result.stdout and "test ppl" in result.stdout
    assert not (tmp_path / "runs").exists()  # -u: unobserved
    assert (tmp_path / "model.pt").is_file()


def test_sacred_flags_file_storage_print_config_and_loglevel(tmp_path, tiny_corpus):
    result = run_cli("with", "smoke", f"dataset={tiny_corpus}", "-F", "elsewhere", "-p", "-l", "WARNING", cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "1" / "run.json").is_file()
    assert not (tmp_path / "runs").exists()  # -F replaces the default observer
    assert "Configuration" in result.stdout  # -p
    assert "INFO - wordlm" not in result.stderr and "INFO - wordlm" not in result.stdout  # -l WARNING


def test_same_seed_same_losses_through_the_cli(tmp_path, tiny_corpus, cli_here):
    runs = [cli_here("with", "smoke", f"dataset={tiny_corpus}", "-u", f"seed={seed}", cwd=tmp_path).stdout
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
def test_bad_values_give_one_line_and_no_traceback(tmp_path, tiny_corpus, cli_here, update, message):
    result = cli_here("with", "smoke", f"dataset={tiny_corpus}", update, "-u", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_misspelt_key_is_refused(tmp_path, cli_here):
    result = cli_here("with", "bacth_size=3", cwd=tmp_path, check=False)
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


def run_in_terminal(*args: str, cwd) -> tuple[int, str]:
    """Run main.py with stdin, stdout and stderr on a pseudo-terminal; its exit status and what the terminal got."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd, env=cli_env(), stdin=follower, stdout=follower, stderr=follower,
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
    return process.returncode, screen.decode(errors="replace")


def test_progress_bar_on_a_terminal_and_plain_lines_in_the_run_record(tmp_path, tiny_corpus):
    code, text = run_in_terminal("with", "smoke", f"dataset={tiny_corpus}", cwd=tmp_path)
    assert code == 0, text
    assert re.search(r"epoch 1: +\d+%\|", text)  # tqdm's bar
    assert "| end of epoch   1 |" in text
    record = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    assert "| end of epoch   1 |" in record and "\r" not in record  # redraws filtered from the record


def test_a_run_record_made_on_a_terminal_holds_the_printed_lines_only(tmp_path, tiny_corpus):
    """Sacred captures stdout and stderr through two tee processes: a progress line landed after a drawing of the
    bar, and cout.txt kept lines like '36/1865 [00:08<06:30, 4.69batch/s]h]-----'."""
    code, text = run_in_terminal("-F", "records", "with", "smoke", f"dataset={tiny_corpus}", "log_interval=1",
                                 f"save={tmp_path / 'm.pt'}", cwd=tmp_path)  # fmt: skip
    assert code == 0 and re.search(r"epoch 1: +\d+%\|", text), text  # the bar was drawn, 20 lines printed
    record = (tmp_path / "records" / "1" / "cout.txt").read_text()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", record), repr(record)  # no \r, \b or escape sequence
    assert "batch/s" not in record and "%|" not in record, record
    lines = record.splitlines()
    progress = [line for line in lines if "batches | lr" in line]
    assert [line[:35] for line in progress] == [f"| epoch   1 |    {n:2d}/   20 batches |" for n in range(1, 21)]
    assert all(re.fullmatch(r"(INFO|WARNING) - [\w.]+ - .*|\| .*|-{89}|={89}", line) for line in lines), lines


# -- bad input is one line, and outputs never destroy what they name


def one_error(result) -> str:
    """The single `error:` line of a failed command, after checking it failed cleanly."""
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def checkpoint(tmp_path):
    """A small real checkpoint (an untrained 1x8 LSTM over 30 words), written without training."""
    from wordlm.data.corpus import Vocabulary
    from wordlm.models import ModelConfig, RNNModel
    from wordlm.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = RNNModel(ModelConfig(ntoken=30, emsize=8, nhid=8, nlayers=1))
    save_checkpoint(tmp_path / "v.pt", model, Vocabulary(["<eos>", "<unk>", *(f"w{i}" for i in range(28))]))
    return tmp_path / "v.pt"


def test_an_unknown_key_is_one_line_naming_it_and_the_nearest_key(tmp_path):
    line = one_error(run_cli("with", "bptt_len=20", "-u", cwd=tmp_path, check=False))
    assert line.startswith("error: bptt_len=20 (did you mean bptt?) is not a config key"), line


def main_exits(capsys, *args: str, program: str = "main.py") -> tuple[object, str, str]:
    """Run the command line in this process; its exit status, stdout and stderr (torch's ``record``, which wraps
    ``main``, turns an exit with status 0 into a return)."""
    import wordlm.experiment as experiment

    try:
        experiment.main([program, *args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, start",
    [
        (["with", "nope"], "error: 'nope' is not a preset; use one of zaremba_small, "),
        (["evaluate", "with", "smokey", "split=valid"], "error: 'smokey' is not a preset (did you mean smoke?); use "),
        (["with", "lr"], "error: 'lr' is not a preset (to set the key lr, give lr=VALUE); use one of zaremba_small, "),
        (["with", "a.b"], "error: 'a.b' is not a preset; use one of zaremba_small, "),
        (["with", "nope.json"], "error: there is no config file nope.json (after `with`, a name ending in .json is a "
                                "config file to read)"),
        (["with", "smoke", "nope.yaml"], "error: there is no config file nope.yaml (after `with`, a name ending in "),
        (["with", "broken.json"], "error: cannot read the config file broken.json: Expecting "),
        (["with", "list.json"], "error: the config file list.json holds a list, not keys and their values"),
        (["with", "notes.txt"], "error: cannot read the config file notes.txt: Configuration file \"notes.txt\" has "
                                "invalid or unsupported extension \".txt\""),
    ],
)  # fmt: skip
def test_an_unknown_preset_or_config_file_is_one_line_naming_the_presets(tmp_path, monkeypatch, capsys, args, start):
    """Sacred printed its NamedConfigNotFoundError, a KeyError traceback for a name with a dot (nope.json), or
    its file reader's traceback."""
    import wordlm.experiment as experiment
    from wordlm.config import PRESETS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.ex, "observers", [])
    (tmp_path / "broken.json").write_text("{lr: 1")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("lr=1\n")
    code, out, err = main_exits(capsys, *args)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(start), (err, out)
    if "preset" in start:
        assert all(name in err for name in PRESETS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "list.json", "notes.txt"]  # no run record
    (tmp_path / "good.json").write_text('{"lr": 0.5}')  # a config file that is there is read, as before
    code, out, err = main_exits(capsys, "print_config", "with", "good.json", "smoke")
    assert code == 0 and parse_config(out)["lr"][0] == "0.5" and parse_config(out)["nhid"][0] == "32", err


def test_an_unknown_preset_is_one_line_from_the_command_line(tmp_path, cli_here):
    line = one_error(cli_here("with", "smok", "lr=1", cwd=tmp_path, check=False))
    assert line.startswith("error: 'smok' is not a preset (did you mean smoke?); use one of zaremba_small, "), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, line",
    [
        (["nosuch"], "error: 'nosuch' is not a command; use one of print_config, print_dependencies, save_config, "
                     "print_named_configs, train, runs, plot, generate, evaluate, export, sweep"),
        (["evalute", "with", "split=valid"], "error: 'evalute' is not a command (did you mean evaluate?); use one of "
                                             "print_config, print_dependencies, save_config, print_named_configs, "
                                             "train, runs, plot, generate, evaluate, export, sweep"),
        (["lr=1"], "error: 'lr=1' is not a command; config updates and presets follow `with`: main.py with lr=1"),
        (["smoke"], "error: 'smoke' is not a command; config updates and presets follow `with`: main.py with smoke"),
        (["runs", "plot"], "error: 'runs' and 'plot' are both commands; give one at a time"),
        (["runs", "runs_sort=id"], "error: 'runs_sort=id' is not expected after the command runs; config updates "
                                   "and presets follow `with`: main.py runs with runs_sort=id"),
        (["-x"], "error: -x is not an option; `main.py --help` lists them"),
        (["-ux", "with", "smoke"], "error: -x is not an option; `main.py --help` lists them"),
        (["print_config", "with", "smoke", "--unobserverd"],
         "error: --unobserverd is not an option (did you mean --unobserved?); `main.py --help` lists them"),
        (["--foo=1"], "error: --foo is not an option (did you mean --force?); `main.py --help` lists them"),
        (["with"], "error: `with` needs config updates or a preset after it, e.g. main.py with smoke lr=10"),
    ],
)  # fmt: skip
def test_an_unknown_command_or_option_is_one_error_line(tmp_path, monkeypatch, capsys, args, line):
    """Sacred said `Error: Command "nosuch" not found` after its usage, and for an unknown option printed docopt's
    warning and the usage of a program called 'dummy'."""
    import wordlm.experiment as experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.ex, "observers", [])
    code, out, err = main_exits(capsys, *args)
    assert (code, out, err) == (1, "", line + "\n")


def test_an_unknown_command_or_option_from_the_scripts(tmp_path):
    line = one_error(run_cli("trian", "with", "smoke", cwd=tmp_path, check=False))
    assert line == (
        "error: 'trian' is not a command (did you mean train?); use one of print_config, "
        "print_dependencies, save_config, print_named_configs, train, runs, plot, generate, evaluate, export, sweep"
    )
    result = run_cli("-x", "with", "words=3", cwd=tmp_path, check=False, script="generate.py")
    assert one_error(result) == "error: -x is not an option; `generate.py --help` lists them"
    assert "Error" not in result.stdout + result.stderr and "dummy" not in result.stdout + result.stderr


def test_outputs_write_through_symbolic_links(tmp_path, checkpoint, cli_here):
    (tmp_path / "kept.txt").write_text("old")
    (tmp_path / "out.txt").symlink_to("kept.txt")
    cli_here("with", f"checkpoint={checkpoint}", "outf=out.txt", "words=5", "-u", cwd=tmp_path, script="generate.py")
    assert (tmp_path / "out.txt").is_symlink() and len((tmp_path / "kept.txt").read_text().split()) == 5


def test_an_output_naming_stdout_prints_into_it_and_replaces_nothing(tmp_path, checkpoint):
    (tmp_path / "stdout").symlink_to("/proc/self/fd/1")  # what /dev/stdout is, made here
    result = run_cli("with", f"checkpoint={checkpoint}", "outf=stdout", "words=5", cwd=tmp_path, script="generate.py")
    assert len(result.stdout.split()) == 5 and os.readlink(tmp_path / "stdout") == "/proc/self/fd/1"


def test_a_fifo_output_is_written_into_and_stays_a_fifo(tmp_path, checkpoint):
    os.mkfifo(tmp_path / "pipe")
    line = one_error(run_cli("with", f"checkpoint={checkpoint}", "outf=pipe", "-u", cwd=tmp_path, check=False,
                             script="generate.py"))  # fmt: skip
    assert "no process reads that FIFO" in line and stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    received = []
    reader = threading.Thread(target=lambda: received.append((tmp_path / "pipe").read_text()))
    reader.start()
    try:
        for _ in range(100):  # wait until the reader has the FIFO open, so that the writer finds it read
            opened = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
            if str(tmp_path / "pipe") in opened:
                break
            time.sleep(0.05)
        run_cli("with", f"checkpoint={checkpoint}", "outf=pipe", "words=5", "-u", cwd=tmp_path, script="generate.py")
    finally:
        if reader.is_alive():
            with open(tmp_path / "pipe", "w"):  # unblock the reader whatever happened
                pass
        reader.join(timeout=30)
    assert len(received[0].split()) == 5 and stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def test_a_character_device_is_written_into_never_replaced(tmp_path, checkpoint):
    try:  # private copies of /dev/null and /dev/full, in this test's folder (never the real /dev)
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(tmp_path / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except OSError as problem:
        pytest.skip(f"cannot make device nodes here ({problem.strerror}): needs root and CAP_MKNOD")
    run_cli("with", f"checkpoint={checkpoint}", "outf=null", "words=5", "-u", cwd=tmp_path, script="generate.py")
    line = one_error(run_cli("with", f"checkpoint={checkpoint}", "outf=full", "words=5", "-u", cwd=tmp_path,
                             check=False, script="generate.py"))  # fmt: skip
    assert line == "error: cannot write outf='full': No space left on device", line
    line = one_error(run_cli("with", f"checkpoint={checkpoint}", "save=null", "-u", cwd=tmp_path, check=False))
    assert line.startswith("error: save='null' is a character device, not a file; save must name a file"), line
    assert all(stat.S_ISCHR(os.lstat(tmp_path / name).st_mode) for name in ("null", "full"))


@pytest.mark.parametrize(
    "script, args, start",
    [
        ("generate.py", ["checkpoint=v.pt", "outf=v.pt"], "error: outf='v.pt' is the same file as checkpoint='v.pt'"),
        ("generate.py", ["checkpoint=v.pt", "outf=link.pt"], "error: outf='link.pt' is the same file as checkpoint="),
        ("main.py", ["evaluate", "checkpoint=v.pt", "text=notes.txt", "line_scores=notes.txt"],
         "error: line_scores='notes.txt' is the same file as text='notes.txt'"),
        ("main.py", ["evaluate", "checkpoint=v.pt", "dataset=c", "line_scores=c/test.txt"],
         "error: line_scores='c/test.txt' is the same file as the test split"),
        ("main.py", ["smoke", "dataset=c", "save=c/valid.txt"], "error: save='c/valid.txt' is the corpus's valid.txt"),
        ("main.py", ["export", "checkpoint=v.pt", "onnx_export=v.pt"], "error: onnx_export='v.pt' is the same file as"),
        ("main.py", ["smoke", "dataset=c", "save=notes.txt/m.pt"],
         "error: cannot write save='notes.txt/m.pt': notes.txt is a file, not a folder"),
        ("main.py", ["smoke", "dataset=c", "onnx_export=c"], "error: onnx_export='c' is a folder; give a file path"),
        ("main.py", ["smoke", "dataset=c", "save=/proc/m.pt"],  # no file can be made there, even by root
         "error: cannot write save='/proc/m.pt': its folder /proc is not writable"),
        ("main.py", ["smoke", "dataset=c", "save_last=link.pt", "save=v.pt"], "error: save_last='link.pt' is the same "
                                                                             "file as save='v.pt'"),
    ],
)  # fmt: skip
def test_an_output_that_is_an_input_or_unwritable_is_refused_before_any_work(
    tmp_path, checkpoint, cli_here, script, args, start
):
    corpus = cut_corpus(tmp_path / "c", lines=(60, 10, 10))
    (tmp_path / "notes.txt").write_text("a few words\nof text\n")
    (tmp_path / "link.pt").symlink_to("v.pt")
    before = {path: path.read_bytes() for path in [checkpoint, tmp_path / "notes.txt", *corpus.iterdir()]}
    command, updates = ([args[0]], args[1:]) if "=" not in args[0] and args[0] != "smoke" else ([], args)
    result = cli_here(*command, "with", *updates, "-u", cwd=tmp_path, check=False, script=script)
    line = one_error(result)
    assert line.startswith(start), line
    assert "epoch" not in result.stdout and "test ppl" not in result.stdout  # refused before training
    assert {path: path.read_bytes() for path in before} == before and (tmp_path / "link.pt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "link.pt", "notes.txt", "v.pt"]  # no run record


def test_plot_to_a_fifo_is_refused_and_says_nothing_was_written(tmp_path):
    os.mkfifo(tmp_path / "curves.png")
    result = run_cli("plot", "with", "plot_path=curves.png", cwd=tmp_path, check=False)
    line = one_error(result)
    assert line.startswith("error: plot_path='curves.png' is a FIFO, not a file"), line
    assert "written" not in result.stdout and stat.S_ISFIFO(os.lstat(tmp_path / "curves.png").st_mode)


LONG = "x" * 300  # beyond the 255 bytes a file name may have


@pytest.mark.parametrize(
    "args, start",
    [
        (["-s", "bogus://x", "with", "smoke", "dataset=c"],
         "error: -s 'bogus://x' is not a database URL that can be opened here: SQLAlchemy knows no database 'bogus'"),
        (["-s", "notaurl", "with", "smoke", "dataset=c"], "error: -s 'notaurl' is not a database URL that can be "
                                                          "opened here (dialect://...); for the SQLite file notaurl "
                                                          "give sqlite:///notaurl"),
        (["-s", "sqlite:////missing/dir/x.db", "with", "smoke", "dataset=c"],
         "error: sqlite:////missing/dir/x.db: there is no folder /missing/dir"),
        (["--sql=postgresql://u@127.0.0.1:1/db", "with", "smoke", "dataset=c"],
         "error: cannot open the database postgresql://u@127.0.0.1:1/db: "),
        (["with", "smoke", "dataset=loop"], "error: cannot read dataset='loop': it is a symbolic link loop"),
        (["with", "smoke", f"dataset={LONG}"], f"error: cannot read dataset='{LONG}': the path is longer than this"),
        (["generate", "with", "checkpoint=v.pt", f"outf={LONG}"], f"error: cannot write outf='{LONG}': the path is "
                                                                  "longer than this system allows"),
        (["evaluate", "with", "checkpoint=v.pt", f"text={LONG}"], f"error: cannot read text='{LONG}': the path is"),
        (["with", "smoke", "dataset=c", "save=None"], "error: save=None must be a file path"),
        (["with", "smoke", "dataset=c", "lr=1e300"], "error: lr=1e+300 is beyond what float32 holds"),
        (["with", "smoke", "dataset=c", "nhid=100000", "tied=False"],
         "error: the model (model_type=LSTM, nlayers=1, nhid=100000, emsize=32, tied=False, vocabulary "),
        (["with", "smoke", "dataset=fifo_train"], "error: dataset folder fifo_train: train.txt is a FIFO, not a file"),
        (["with", "smoke", "dataset=folder_train"], "error: dataset folder folder_train: train.txt is a folder, not"),
        (["with", "smoke", "dataset=c", "adaptive_softmax=[5,3]", "tied=False"],
         "error: adaptive_softmax=[5, 3] must be increasing word counts from 1 up, below the vocabulary size, e.g."),
        (["runs", "with", "runs_db=x.db"], "error: runs_db='x.db' is not a database URL that can be opened here "
                                           "(dialect://...); for the SQLite file x.db give sqlite:///x.db"),
        (["generate", "with", "checkpoint=bomb.pt"], "error: bomb.pt was refused before reading it: its member "
                                                     "archive/data.pkl would inflate to 2,147,483,648 bytes"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_not_a_traceback(tmp_path, checkpoint, cli_here, args, start):
    cut_corpus(tmp_path / "c", lines=(60, 10, 10))
    for name in ("fifo_train", "folder_train"):
        cut_corpus(tmp_path / name, lines=(60, 10, 10))
        (tmp_path / name / "train.txt").unlink()
    os.mkfifo(tmp_path / "fifo_train" / "train.txt")
    (tmp_path / "folder_train" / "train.txt").mkdir()
    (tmp_path / "loop").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop")
    if "checkpoint=bomb.pt" in args:
        from test_checkpoint import zip_bomb

        zip_bomb(tmp_path / "bomb.pt", 2 << 30)  # 2 MB on disk
    started = time.monotonic()
    if "dataset=fifo_train" in args:  # a process, which its timeout ends if reading the FIFO ever blocks
        result = run_cli(*args, cwd=tmp_path, check=False, timeout=120)
    else:
        result = cli_here(*args, cwd=tmp_path, check=False)
    line = one_error(result)
    assert line.startswith(start), line
    assert time.monotonic() - started < 60  # the checkpoint of 2 GiB inflated took 37 s (and 6.5 GB) to refuse
    assert os.path.islink(tmp_path / "loop") and stat.S_ISFIFO(os.lstat(tmp_path / "fifo_train" / "train.txt").st_mode)
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "model.pt").exists()
