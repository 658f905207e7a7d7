"""Optuna sweeps, `main.py sweep with ...` and `wordlm.sweep(...)`: a study filled and continued, each trial a
training run (and a Sacred run from the command line), pruning and Ctrl-C ending a trial cleanly, a diverged trial
pruned, bad input refused in one line before any work, and two sweep processes sharing a PostgreSQL study."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ROOT, cli_env, run_cli
from sacred.arg_parser import get_config_updates
from test_runs import postgres_url  # noqa: F401 - the throwaway PostgreSQL server, a fixture

import wordlm
import wordlm.experiment as experiment
from wordlm.config import defaults, make_config
from wordlm.errors import UserError
from wordlm.tracking import sweeps

SPACE = {"lr": {"low": 1, "high": 40, "log": True}, "dropout": {"low": 0.0, "high": 0.6}, "model_type": ["LSTM", "GRU"]}
QUICK = ["smoke", "epochs=2", "max_batches=4", "log_interval=2"]  # a trial in about a second on the tiny corpus
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def load_study(storage: Path | str, name: str = "wordlm"):
    url = storage if isinstance(storage, str) else f"sqlite:///{storage}"
    return optuna.load_study(study_name=name, storage=url)


def sweep_cli(*updates: str, cwd: Path, trials: int, **env) -> subprocess.CompletedProcess:
    return run_cli("sweep", "with", *QUICK, f"sweep_space={SPACE!r}", f"sweep_trials={trials}",
                   "sweep_storage=sweep.db", "save=lm.pt", *updates, cwd=cwd, **env)  # fmt: skip


def run_records(folder: Path, runs: str = "runs") -> dict[int, dict]:
    """Each recorded run's info by its trial number."""
    records = {}
    for run in sorted(path for path in (folder / runs).iterdir() if path.name.isdigit()):
        info = json.loads((run / "info.json").read_text())
        assert info["trial"] not in records, f"trial {info['trial']} recorded twice"
        records[info["trial"]] = {**info, "status": json.loads((run / "run.json").read_text())["status"],
                                  "run_id": run.name}  # fmt: skip
    return records


def test_the_command_line_sweep_fills_the_study_and_the_same_command_continues_it(tmp_path, tiny_corpus):
    result = sweep_cli(f"dataset={tiny_corpus}", cwd=tmp_path, trials=3)
    study = load_study(tmp_path / "sweep.db")
    assert [trial.state in FINISHED for trial in study.trials] == [True] * 3
    records = run_records(tmp_path)  # each trial a Sacred run of train, its info naming the sweep and trial
    assert sorted(records) == [0, 1, 2] and {info["sweep"] for info in records.values()} == {"wordlm"}
    assert {info["status"] for info in records.values()} == {"COMPLETED"}
    for trial in study.trials:
        assert trial.user_attrs["save"] == f"lm.trial{trial.number}.pt"
        meta = torch.load(tmp_path / trial.user_attrs["save"], weights_only=True)["meta"]
        assert meta["sweep"]["trial"] == trial.number and meta["sweep"]["params"] == trial.params
        assert records[trial.number]["best_valid_ppl"] == pytest.approx(trial.user_attrs["best_valid_ppl"])
    best = study.best_trial
    assert f"| best: trial {best.number}: " in result.stdout
    assert f"checkpoint lm.trial{best.number}.pt" in result.stdout
    assert "| see it: optuna-dashboard sqlite:///sweep.db" in result.stdout

    # the retraining line trains exactly the best trial's keys
    line = re.search(r"^\| retrain: (.*)$", result.stdout, re.MULTILINE).group(1)
    words = shlex.split(line)
    assert words[:3] == ["python", "main.py", "with"]
    updates, presets = get_config_updates(words[3:])
    assert presets == ["smoke"] and updates.pop("save") == "lm.best.pt"
    retrained, _ = make_config("smoke", **updates)
    trained = torch.load(tmp_path / f"lm.trial{best.number}.pt", weights_only=True)["meta"]["config"]
    assert [key for key in defaults() if retrained[key] != trained[key]] == ["save", "save_last"]

    before = [(trial.number, trial.params, trial.value) for trial in study.trials]
    again = sweep_cli(f"dataset={tiny_corpus}", cwd=tmp_path, trials=4)
    study = load_study(tmp_path / "sweep.db")
    assert [(trial.number, trial.params, trial.value) for trial in study.trials[:3]] == before
    assert len(study.trials) == 4 and study.trials[3].state in FINISHED
    assert sorted(run_records(tmp_path)) == [0, 1, 2, 3]
    assert again.stdout.count("| sweep 'wordlm': trial ") == 1


# -- wordlm.sweep, in this process


def api_sweep(folder: Path, corpus: Path, **keys):
    options = dict(dataset=str(corpus), epochs=2, max_batches=4, log_interval=2, save=str(folder / "lm.pt"),
                   sweep_storage=str(folder / "sweep.db"), sweep_trials=2, sweep_pruner=None)  # fmt: skip
    return wordlm.sweep("smoke", **{**options, **keys})


class PruneAfterTheFirstTrial(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number > 0


def test_a_pruned_trial_ends_after_its_epoch_tested_and_saved_and_says_so(tmp_path, tiny_corpus, capsys):
    result = api_sweep(tmp_path, tiny_corpus, epochs=3, sweep_space={"lr": [5.0, 10.0]},
                       sweep_pruner=PruneAfterTheFirstTrial())  # fmt: skip
    out = capsys.readouterr().out
    first, pruned = load_study(tmp_path / "sweep.db").trials
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [1, 2, 3]
    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    assert pruned.value == pytest.approx(pruned.intermediate_values[1])
    assert pruned.user_attrs["end"] == "pruned" and pruned.user_attrs["pruned_at_epoch"] == 1
    assert pruned.user_attrs["test_ppl"] > 0  # the pruned trial's best model was tested
    assert out.count("| end of epoch") == 3 + 1 and "| training ends after epoch 1: pruned by Optuna" in out
    for path in (tmp_path / "lm.trial1.pt", tmp_path / "lm.trial1.last.pt"):
        payload = torch.load(path, weights_only=True)
        assert payload["meta"]["sweep"]["end"] == "pruned" and payload["meta"]["sweep"]["trial"] == 1
    state = torch.load(tmp_path / "lm.trial1.last.pt", weights_only=True)["training"]["state"]
    assert state["epoch"] == 2 and state["finished"]  # nothing left to train: resume='auto' would say so
    assert (result.best_trial, result.finished, result.stopped) == (0, 2, False)
    assert result.best_valid_ppl == pytest.approx(first.value) and result.checkpoint == Path(tmp_path / "lm.trial0.pt")
    assert result.command.endswith(f"lr={first.params['lr']} save={tmp_path / 'lm.best.pt'}")


class InterruptTheSecondTrial(optuna.pruners.BasePruner):
    """Ctrl-C (SIGINT to this process) as the second trial's first epoch is validated; prunes nothing."""

    def prune(self, study, trial) -> bool:
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return False


def test_ctrl_c_ends_the_trial_as_training_does_records_it_and_stops_the_sweep(tmp_path, tiny_corpus, capsys):
    result = api_sweep(tmp_path, tiny_corpus, sweep_trials=3, sweep_space={"dropout": {"low": 0.0, "high": 0.5}},
                       sweep_pruner=InterruptTheSecondTrial())  # fmt: skip
    out = capsys.readouterr().out
    study = load_study(tmp_path / "sweep.db")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert study.trials[1].user_attrs["end"] == "interrupted" and study.trials[1].user_attrs["test_ppl"] > 0
    assert "Exiting from training early by SIGINT (epoch 2, batch 1)" in out and "the sweep stops" in out
    assert torch.load(tmp_path / "lm.trial1.last.pt", weights_only=True)["meta"]["sweep"]["end"] == "interrupted"
    assert result.stopped and result.finished == 1

    result = api_sweep(tmp_path, tiny_corpus, sweep_trials=3, sweep_space={"dropout": {"low": 0.0, "high": 0.5}})
    study = load_study(tmp_path / "sweep.db")
    assert [trial.state for trial in study.trials][2:] == [optuna.trial.TrialState.COMPLETE] * 2
    assert result.finished == 3 and not result.stopped


def test_ctrl_c_in_a_command_line_sweep_leaves_the_trials_run_recorded_as_interrupted(
    tmp_path, tiny_corpus, monkeypatch, capsys
):
    """`main.py sweep -F DIR with ...`, run in this process: the options reach each trial's run, and a key the preset
    sets (bptt) may be searched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.ex, "observers", [])
    monkeypatch.setattr(sweeps, "_pruner", lambda optuna, choice: InterruptTheSecondTrial())
    experiment.main(["main.py", "sweep", "-F", "records", "--loglevel=WARNING", "with", *QUICK,
                     f"dataset={tiny_corpus}", "sweep_space={'dropout': {'low': 0.0, 'high': 0.5}, 'bptt': [10, 12]}",
                     "sweep_trials=3", "save=lm.pt"])  # fmt: skip
    out = capsys.readouterr().out
    assert "the sweep stops" in out and "stopped by Ctrl-C" in out
    runs = run_records(tmp_path, "records")
    assert sorted(runs) == [0, 1] and runs[1]["interrupted"] and runs[1]["status"] == "COMPLETED"
    assert not runs[0]["interrupted"] and not (tmp_path / "runs").exists()
    trials = load_study(tmp_path / "sweep.db").trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    for trial in trials:
        config = json.loads((tmp_path / "records" / runs[trial.number]["run_id"] / "config.json").read_text())
        assert config["bptt"] == trial.params["bptt"] and config["save"] == f"lm.trial{trial.number}.pt"


def test_without_optuna_a_sweep_is_one_line(monkeypatch, tmp_path, tiny_corpus):
    monkeypatch.setitem(sys.modules, "optuna", None)  # (import optuna then raises ImportError)
    with pytest.raises(UserError, match=r"^sweeps need Optuna: run .venv/bin/pip install -e '.\[sweep\]' in the"):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [1, 2]})


def test_a_trial_that_diverges_is_pruned_and_the_sweep_goes_on(tmp_path, tiny_corpus, capsys):
    result = api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [3e38]}, sweep_trials=2)  # (float32's max: inf)
    out = capsys.readouterr().out
    trials = load_study(tmp_path / "sweep.db").trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(trial.user_attrs["end"] == "diverged" for trial in trials)
    assert trials[0].user_attrs["error"].startswith("training diverged at epoch 1")
    assert out.count("diverged: pruned, and the sweep goes on") == 2 and "| no trial has completed yet" in out
    assert (result.finished, result.best_trial, result.command) == (2, None, None)


def test_keys_that_work_apart_but_not_together_fail_the_trial_and_stop_the_sweep(tmp_path, tiny_corpus):
    stopped = r"^trial 0 failed, and the sweep stopped: emsize=30 must be divisible by nhead=4"
    with pytest.raises(UserError, match=stopped):  # either alone trains (smoke: emsize 32, nhead 2)
        api_sweep(tmp_path, tiny_corpus, model_type="Transformer", sweep_space={"emsize": [30], "nhead": [4]})
    (trial,) = load_study(tmp_path / "sweep.db").trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["end"] == "failed"
    assert "divisible" in trial.user_attrs["error"] and not (tmp_path / "lm.trial0.pt").exists()


# -- bad input: one line each, before any work


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(sweep_space={"lrr": {"low": 1, "high": 2}}),
         "sweep_space: 'lrr' is not a training key (did you mean lr?)"),
        (dict(sweep_space={"lr": {"low": 5, "high": 5}}), "sweep_space: lr's range 5 to 5 is empty"),
        (dict(sweep_space={"lr": {"low": 5.0, "high": 1.0}}),
         "sweep_space: lr's range is inverted (low=5.0 > high=1.0)"),
        (dict(sweep_space={"lr": {"low": "a", "high": 2}}), "sweep_space: lr's low='a' must be a finite number"),
        (dict(sweep_space={"lr": {"low": 1, "high": 2, "lg": True}}),
         "sweep_space: lr={'low': 1, 'high': 2, 'lg': True} has 'lg', which a range does not take"),
        (dict(sweep_space={"lr": {"low": 0, "high": 2, "log": True}}), "log range needs low > 0"),
        (dict(sweep_space={"model_type": []}), "sweep_space: model_type=[] offers no choice"),
        (dict(sweep_space={"dropout": {"low": 0.0, "high": 1.5}}), "sweep_space: dropout would take 1.5, which "
                                                                   "training refuses: dropout=1.5 must be"),
        (dict(sweep_space={"model_type": ["LSTM", "LTSM"]}), "sweep_space: model_type would take 'LTSM'"),
        (dict(sweep_space={"save": ["a.pt", "b.pt"]}), "sweep_space: save cannot be searched"),
        (dict(sweep_space={}), "sweep_space={} must name the keys to search"),
        (dict(sweep_space={"lr": [1, 2]}, lr=3), "lr is both searched (sweep_space) and given (lr=3)"),
        (dict(sweep_space={"lr": [1, 2]}, sweep_trials=0), "sweep_trials=0 must be a positive integer"),
        (dict(sweep_space={"lr": [1, 2]}, sweep_pruner="mean"), "sweep_pruner='mean' must be 'median', 'hyperband'"),
        (dict(sweep_space={"lr": [1, 2]}, resume="lm.last.pt"), "resume='lm.last.pt' is not for a sweep"),
        (dict(sweep_space={"lr": [1, 2]}, sweep_storage="/proc/sweep.db"),
         "cannot write sweep_storage='/proc/sweep.db'"),
        (dict(sweep_space={"lr": [1, 2]}, sweep_storage="postgresql://nobody@127.0.0.1:1/none"),
         "cannot open the database postgresql://nobody@127.0.0.1:1/none"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_corpus, keys, message):
    with pytest.raises(UserError) as refused:
        api_sweep(tmp_path, tiny_corpus, **keys)
    assert str(refused.value).startswith(message) or message in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]  # no study, no trial's file


def test_a_storage_that_is_a_folder_or_no_sqlite_file_is_one_line(tmp_path, tiny_corpus):
    with pytest.raises(UserError, match=r"sweep_storage='.*' is a folder; give a file in it, such as .*sweep.db"):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [1, 2]}, sweep_storage=str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a database\n")
    with pytest.raises(UserError, match=r"notes.txt is not an SQLite database"):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [1, 2]}, sweep_storage=str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "not a database\n"
    with pytest.raises(TypeError, match=r"'lrr' \(did you mean lr\?\) is not a training key"):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [1, 2]}, lrr=3)


def test_a_study_of_other_keys_is_refused_and_kept(tmp_path, tiny_corpus):
    api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [5.0, 10.0]}, sweep_trials=1, epochs=1)
    before = sorted(path.name for path in tmp_path.iterdir())
    searched = r"^the study 'wordlm' in .*sweep.db searches \{\"lr\": \[5.0, 10.0\]\}, not this sweep_space "
    with pytest.raises(UserError, match=searched + r"\{\"lr\": \[5.0, 20.0\]\}; give another sweep_name"):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [5.0, 20.0]}, sweep_trials=2, epochs=1)
    with pytest.raises(UserError, match=r"^the study 'wordlm' in .*sweep.db trains its trials with epochs=1, not 2; "):
        api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [5.0, 10.0]}, sweep_trials=2)
    study = load_study(tmp_path / "sweep.db")
    assert len(study.trials) == 1 and study.user_attrs[sweeps.SPACE_ATTR] == {"lr": [5.0, 10.0]}
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    # another name is another study in the same file; log_interval changes nothing a trial learns
    api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [5.0, 20.0]}, sweep_trials=1, epochs=1, sweep_name="other")
    api_sweep(tmp_path, tiny_corpus, sweep_space={"lr": [5.0, 10.0]}, sweep_trials=2, epochs=1, log_interval=1)
    assert [len(load_study(tmp_path / "sweep.db", name).trials) for name in ("wordlm", "other")] == [2, 1]


def test_the_sweep_keys_are_a_scope_of_their_own_with_the_apis_defaults():
    assert dict(experiment.sweep_config()) == sweeps.DEFAULTS
    assert set(sweeps.DEFAULTS).isdisjoint(defaults())  # the training keys, and so print_config's part, unchanged
    assert "sweep" in experiment.ex.commands and experiment.ex.commands["sweep"].unobserved


def test_trial_files_and_the_retraining_line():
    assert sweeps.trial_path("model.pt", 3) == "model.trial3.pt"
    assert sweeps.trial_path("runs/model.last.pt", 3) == "runs/model.trial3.last.pt"
    assert sweeps.trial_path("weights", 0) == "weights.trial0"
    cfg, _ = make_config(None, dataset="my corpus", seed=3, model_type="GRU")
    line = sweeps.retrain_command(cfg, {"lr": 6.5, "amp": None}, "m.best.pt")
    assert line == "python main.py with 'dataset=my corpus' model_type=GRU seed=3 lr=6.5 amp=None save=m.best.pt"
    cfg, _ = make_config(None, dataset="123")  # a string Sacred would read as a number is quoted
    assert shlex.split(sweeps.retrain_command(cfg, {}, "m.pt"))[3:] == ["dataset='123'", "save=m.pt"]


# -- a sweep on several machines: processes sharing one study in a database


@pytest.mark.parametrize(
    "collision",
    ['(psycopg2.errors.DuplicateTable) relation "studies" already exists',
     '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "pg_type_typname_nsp_index"'],
)  # fmt: skip
def test_two_processes_making_a_new_databases_tables_at_once_try_again(monkeypatch, collision):
    """What PostgreSQL says to the second of two sweep processes that create Optuna's tables at the same moment
    (both seen in the suite's two-process sweep): that process waits and opens the storage again; a lasting
    problem is still one line after the last try."""
    calls, slept = [], []

    def storage(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError(collision)
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(sweeps.time, "sleep", slept.append)
    plan = sweeps.SweepPlan({}, frozenset(), {}, 2, "postgresql://u@h/db", "postgresql://u@h/db", "wordlm")
    assert sweeps._storage(plan) == "storage" and len(calls) == 2 and len(slept) == 1
    calls.clear()

    def always(url, **kwargs):
        calls.append(url)
        raise RuntimeError(collision)

    monkeypatch.setattr(optuna.storages, "RDBStorage", always)
    with pytest.raises(UserError, match="cannot use sweep_storage='postgresql://u@h/db' as Optuna's storage: "):
        sweeps._storage(plan)
    assert len(calls) == sweeps.STORAGE_TRIES


def test_two_sweep_processes_share_a_postgresql_study_and_run_each_trial_once(tmp_path, tiny_corpus, postgres_url):  # noqa: F811
    trials = 5
    command = [sys.executable, str(ROOT / "main.py"), "sweep", "with", *QUICK, f"dataset={tiny_corpus}",
               f"sweep_space={SPACE!r}", f"sweep_trials={trials}", f"sweep_storage={postgres_url}",
               "sweep_name=shared", "save=lm.pt"]  # fmt: skip
    folders = [tmp_path / "a", tmp_path / "b"]
    processes = []
    for folder in folders:
        folder.mkdir()
        processes.append(subprocess.Popen(command, cwd=folder, env=cli_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert [process.returncode for process in processes] == [0, 0], "\n".join(outputs)
    study = load_study(postgres_url, "shared")
    finished = [trial.number for trial in study.trials if trial.state in FINISHED]
    assert len(finished) == trials
    ran = [set(map(int, re.findall(r"^\| sweep 'shared': trial (\d+) ", out, re.MULTILINE))) for out in outputs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both took part; no trial ran in both
    assert ran[0] | ran[1] == set(finished)
    recorded = [run_records(folder) for folder in folders]
    assert [set(records) for records in recorded] == ran  # one Sacred run a trial, where it ran
    for trial in study.trials:
        assert trial.state in FINISHED or "surplus" in trial.user_attrs  # a trial asked once the study was full
