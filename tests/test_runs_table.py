"""`python main.py runs`: the training runs by default, in a table that fits the terminal; the other commands' runs,
each with its own figures, when asked (runs_command)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import cut_corpus, run_cli
from test_cli import one_error

from wordlm.tracking.runs import ALL, RunRecord, Series, format_runs_table, select_runs

TRAIN_HEADER = ["id", "status", "started", "duration", "valid_ppl", "test_ppl", "tokens/s"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """runs/1 a training run, runs/2 a generate, runs/3 an evaluate, all from the command line as a user runs them
    (subprocesses: runs that Sacred observes, as a real process records them; the tables are read in this process)."""
    folder = tmp_path_factory.mktemp("commands")
    cut_corpus(folder / "tiny", lines=(300, 40, 40))
    train = run_cli("with", "smoke", "dataset=tiny", "max_batches=4", "-F", "runs", cwd=folder)
    run_cli("with", "checkpoint=model.pt", "words=20", "outf=g.txt", "temperature=0.8", "-F", "runs", cwd=folder,
            script="generate.py")  # fmt: skip
    evaluate = run_cli("evaluate", "with", "checkpoint=model.pt", "dataset=tiny", "-F", "runs", cwd=folder)
    (ppl,) = re.findall(r"\| ppl +([0-9.]+)$", evaluate.stdout, re.MULTILINE)
    (test_ppl,) = re.findall(r"test ppl +([0-9.]+)", train.stdout)
    return {"folder": folder, "ppl": ppl, "test_ppl": test_ppl}


def table(cli, recorded, *updates: str, **env: str) -> list[list[str]]:
    result = cli("runs", "with", "runs_dir=runs", *updates, cwd=recorded["folder"], **env)
    return [line.split() for line in result.stdout.splitlines()]


def test_runs_lists_the_training_runs_only(recorded, cli_here):
    header, *rows = table(cli_here, recorded)
    assert header == TRAIN_HEADER  # no generate key (temperature, outf), no checkpoint: the training keys only
    assert [row[0] for row in rows] == ["1"] and rows[0][1] == "completed" and rows[0][6] == recorded["test_ppl"]


def test_runs_command_lists_another_commands_runs_with_its_own_figures(recorded, cli_here):
    header, *rows = table(cli_here, recorded, "runs_command=generate")
    assert header == ["id", "status", "started", "duration", "checkpoint", "words", "outf"]
    assert [row[0] for row in rows] == ["2"] and rows[0][5:] == ["model.pt", "20", "g.txt"]
    header, *rows = table(cli_here, recorded, "runs_command=evaluate")
    assert header == ["id", "status", "started", "duration", "checkpoint", "scored", "tokens", "ppl"]
    assert [row[0] for row in rows] == ["3"] and rows[0][-1] == recorded["ppl"]  # where `runs` had '-'
    assert rows[0][-3] == str(Path("tiny") / "test.txt")


def test_runs_command_all_lists_every_run_with_what_it_gave(recorded, cli_here):
    result = cli_here("runs", "with", "runs_dir=runs", "runs_command=all", cwd=recorded["folder"])
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["id", "command", "status", "started", "duration", "result"]
    assert [row.split()[:3] for row in rows] == [["1", "train", "completed"], ["2", "generate", "completed"],
                                                 ["3", "evaluate", "completed"]]  # fmt: skip
    assert rows[0].endswith(f"test {recorded['test_ppl']}") and rows[1].endswith("20 words to g.txt")
    assert rows[2].endswith(f"ppl {recorded['ppl']} on test.txt")


def test_an_unknown_runs_command_is_one_line(recorded, cli_here):
    result = cli_here("runs", "with", "runs_dir=runs", "runs_command=sweeps", cwd=recorded["folder"], check=False)
    assert one_error(result) == ("error: runs_command='sweeps' is not a command whose runs are recorded; use one of "
                                 "train, generate, evaluate, export or all")  # fmt: skip


def test_plot_draws_the_training_runs_and_names_no_other(recorded, cli_here):
    result = cli_here("plot", "with", "plot_path=curves.png", cwd=recorded["folder"])
    assert result.stdout.splitlines() == ["validation curves of runs 1 written to curves.png"]


def record(run_id: str, **config) -> RunRecord:
    return RunRecord(run_id, "completed", "train", datetime(2026, 6, 1, 10, tzinfo=timezone.utc), 95.0,
                     {"save": "model.pt", **config}, {"best_valid_ppl": 180.5, "test_ppl": 170.25},
                     {"tokens_per_second": Series([1], [1500.0])})  # fmt: skip


def test_the_table_fits_the_width_leaving_out_times_then_the_last_keys_and_saying_so():
    records = [record("1", lr=20.0, dropout=0.2, dataset="/some/very/long/path/to/a/corpus/of/mine", nhid=200),
               record("2", lr=5, dropout=0.5, dataset="wikitext-2", nhid=650)]  # fmt: skip
    records[1].notes.append("metrics.json unreadable (JSONDecodeError) and a very long note besides")
    full = format_runs_table(records).splitlines()
    assert full[0].split() == ["id", "status", "started", "duration", "dataset", "dropout", "lr", "nhid",
                               "valid_ppl", "test_ppl", "tokens/s", "note"]  # fmt: skip
    assert max(map(len, full)) > 120
    for width in (120, 100, 80, 60):
        lines = format_runs_table(records, width=width).splitlines()
        assert max(map(len, lines)) <= width, (width, lines)
        assert lines[1].split()[-3:] == ["180.50", "170.25", "1500"] and "metrics.js" in lines[2]
    lines = format_runs_table(records, width=80).splitlines()
    assert lines[0].split() == ["id", "status", "dataset", "valid_ppl", "test_ppl", "tokens/s", "note"]
    assert lines[1].split()[2] == "…/corpus/of/mine"  # a long value cut to 16 characters
    assert lines[2].split()[-2:] == ["metrics.json", "un…"]  # the note in the room left
    left_out = "(left out to fit 80 columns: started, duration, nhid, lr, dropout; a wider terminal or COLUMNS=N"
    assert " ".join(lines[3:]) == left_out + " shows them)"
    lines = format_runs_table(records, width=80, sort_by="-nhid").splitlines()
    assert lines[0].split()[:4] == ["id", "status", "dataset", "valid_ppl"]
    assert [line.split()[0] for line in lines[1:3]] == ["2", "1"]  # sorted by a column later left out


def test_the_command_line_table_fits_columns(recorded, tmp_path, cli_here):
    runs = recorded["folder"] / "runs"
    result = cli_here("runs", "with", f"runs_dir={runs}", cwd=tmp_path, COLUMNS="50")
    assert max(len(line) for line in result.stdout.splitlines()) <= 50
    assert result.stdout.splitlines()[0].split() == ["id", "status", "valid_ppl", "test_ppl", "tokens/s"]


def test_a_sweep_names_its_trials_in_a_column():
    trial, alone = record("1", lr=20.0), record("2", lr=5.0)
    trial.info.update(sweep="wordlm", trial=3)  # what a sweep puts in its trials' info (wordlm.tracking.sweeps)
    header, first, second = (line.split() for line in format_runs_table([trial, alone]).splitlines())
    assert (header[4], first[5], second[5]) == ("sweep", "wordlm#3", "-")  # (the start time is two words)
    assert format_runs_table([alone, record("3", lr=1.0)]).splitlines()[0].split()[4] == "lr"
    assert select_runs([trial, alone], command=ALL) == [trial, alone]
