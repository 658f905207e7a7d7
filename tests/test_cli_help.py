"""`main.py COMMAND --help`, `-h` and `main.py help COMMAND`: each command's description and the config keys it
reads, with the defaults and docs `print_config` shows."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env
from test_cli import main_exits, one_error, parse_config

import wordlm.experiment as experiment
from wordlm.config import defaults

READS = {  # command: the config keys it reads (None: every key of the training config)
    "train": None,
    "runs": ["runs_dir", "runs_db", "runs_status", "runs_sort", "runs_command"],
    "plot": ["runs_dir", "runs_db", "run_ids", "plot_path"],
    "generate": ["checkpoint", "words", "temperature", "top_k", "top_p", "prompt", "samples", "stop_at_eos", "outf",
                 "seed", "device"],
    "evaluate": ["checkpoint", "dataset", "split", "text", "line_scores", "eval_batch_size", "bptt", "device",
                 "cache_window", "cache_theta", "cache_lambda", "dynamic_lr", "dynamic_decay"],
    "export": ["checkpoint", "onnx_export"],
    "sweep": ["sweep_space", "sweep_trials", "sweep_storage", "sweep_name", "sweep_pruner"],
    "print_config": [],
    "print_dependencies": [],
    "save_config": [],
    "print_named_configs": [],
}  # fmt: skip


@pytest.fixture
def printed_config(capsys, monkeypatch, tmp_path) -> dict[str, tuple[str, str]]:
    """Every key as `print_config` shows it: (default, doc); in this process, as the test's help is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORDLM_DATA", raising=False)  # as in run_cli's environment
    monkeypatch.setattr(experiment.ex, "observers", [])
    code, out, err = main_exits(capsys, "print_config")
    assert code in (0, None) and err == "", (code, err)
    return parse_config(out)


@pytest.mark.parametrize("command", sorted(READS))
def test_every_command_says_what_it_does_and_the_keys_it_reads(capsys, printed_config, command):
    shown = set()
    for args in ([command, "--help"], [command, "-h"], ["help", command], [command, "with", "lr=1", "--help"]):
        code, out, err = main_exits(capsys, *args)
        assert code in (0, None) and err == "", (args, code, err)
        shown.add(out)
    assert len(shown) == 1  # the four ways ask for the same help
    text = shown.pop()
    usage = "main.py [train]" if command == "train" else f"main.py {command}"
    assert text.startswith(f"usage: {usage} [with KEY=VALUE ...] [options]\n\n"), text
    summary = " ".join(experiment.ex.commands[command].__doc__.strip().split("\n\n")[0].split())
    assert text.splitlines()[2] == summary
    listed = parse_config(text)
    expected = sorted(set(defaults()) | {"seed"}) if READS[command] is None else sorted(READS[command])
    assert sorted(listed) == expected
    assert listed == {key: printed_config[key] for key in listed}  # print_config's defaults and docs
    assert set(experiment.ex.commands) == set(READS)  # every command is tested
    if not expected:
        assert "It reads no config key." in text or "every config key" in text


def test_help_through_the_scripts_and_the_module(tmp_path, cli_here):
    result = cli_here("runs", "--help", cwd=tmp_path)
    assert result.stdout.startswith("usage: main.py runs [with KEY=VALUE ...] [options]\n"), result.stdout
    assert "runs_sort = 'id'" in result.stdout and "dummy" not in result.stdout + result.stderr
    result = cli_here("with", "words=3", "--help", cwd=tmp_path, script="generate.py")
    assert result.stdout.startswith("usage: generate.py [generate] [with KEY=VALUE ...] [options]\n"), result.stdout
    assert "words = 1000" in result.stdout
    assert cli_here("--help", cwd=tmp_path, script="generate.py").stdout.startswith("Usage:\n  generate.py [(with")
    module = subprocess.run([sys.executable, "-m", "wordlm", "evaluate", "-h"], cwd=tmp_path, capture_output=True,
                            text=True, env=cli_env(PYTHONPATH=str(ROOT)), timeout=300)  # fmt: skip
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m wordlm evaluate "), module.stderr


def test_the_usage_is_still_sacreds(capsys):
    for args in (["--help"], ["-h"], ["help"], ["with", "lr=1", "--help"]):
        code, out, err = main_exits(capsys, *args)
        assert code in (0, None) and err == "" and out.startswith("Usage:\n  main.py [(with UPDATE...)] [options]\n")
        assert "--file_storage" in out


def test_help_for_an_unknown_command_is_one_line(tmp_path, cli_here):
    line = one_error(cli_here("help", "trian", cwd=tmp_path, check=False))
    assert line.startswith("error: 'trian' is not a command (did you mean train?); use one of "), line
