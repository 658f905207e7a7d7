"""The run records as a table and as pictures: real tiny runs, broken and older folders, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, cut_corpus
from test_plots import check_png

import wordlm.experiment as experiment
from wordlm.errors import UserError
from wordlm.tracking.plots import LEARNING_CURVES_PNG
from wordlm.tracking.runs import (
    SQL_LACKS,
    differing_config_keys,
    format_runs_table,
    read_run_folder,
    read_runs_db,
    read_runs_dir,
    select_runs,
)

SMOKE = ["smoke", "epochs=2", "max_batches=4", "log_interval=2"]


def train_in_process(workdir: Path, options: dict, **updates):
    config = {"dataset": str(workdir / "tiny"), "save": str(workdir / "model.pt"), "epochs": 2, "max_batches": 4,
              "log_interval": 2, **updates}  # fmt: skip
    return experiment.ex.run(
        config_updates=config, named_configs=["smoke"], options={"--loglevel": "WARNING", **options}
    )


def interrupt_in_epoch(workdir: Path, epoch: int) -> subprocess.CompletedProcess:
    """Train from the command line as a user would, and press Ctrl-C (SIGINT) halfway through ``epoch``.

    Halfway, not at its end: a Ctrl-C while the best model is being saved would test the stale file on disk.
    """
    command = [sys.executable, str(ROOT / "main.py"), "with", *SMOKE[:1], *SMOKE[2:], "epochs=100000",
               f"dataset={workdir / 'tiny'}", f"save={workdir / 'model.pt'}"]  # fmt: skip
    process = subprocess.Popen(command, cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"| epoch {epoch:3d} |     2/"):
                process.send_signal(signal.SIGINT)
                break
        lines.append(process.communicate(timeout=120)[0])
    finally:
        if process.poll() is None:  # never leave a training process behind
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """runs/1 (lr 20) and runs/2 (lr 5) trained in this process, runs/3 from the CLI and interrupted in epoch 2."""
    folder = tmp_path_factory.mktemp("records")
    cut_corpus(folder / "tiny", lines=(300, 40, 40))
    for lr in (20.0, 5.0):
        train_in_process(folder, {"--file_storage": str(folder / "runs")}, lr=lr)
    interrupted = interrupt_in_epoch(folder, 2)
    assert interrupted.returncode == 0 and "Exiting from training early" in interrupted.stdout, interrupted.stdout
    return folder


def copy_run(workdir: Path, run_id: str, to: Path) -> Path:
    shutil.copytree(workdir / "runs" / run_id, to)
    return to


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_real_runs_are_read_with_status_curves_and_perplexities(workdir):
    first, second, stopped = read_runs_dir(workdir / "runs")
    assert [r.run_id for r in (first, second, stopped)] == ["1", "2", "3"]
    assert (first.status, second.status, stopped.status) == ("completed", "completed", "interrupted")
    assert first.metrics["valid.ppl"].steps == [1, 2] and first.notes == []
    assert first.valid_ppl == pytest.approx(min(first.metrics["valid.ppl"].values))
    assert first.test_ppl == pytest.approx(first.result) and first.tokens_per_second > 0
    assert 0 < first.seconds < 300 and first.start_time.tzinfo is not None
    assert differing_config_keys([first, second]) == ["lr"]
    assert differing_config_keys([first, second, stopped]) == ["epochs", "lr"]


def test_ctrl_c_still_leaves_the_learning_curves(workdir):
    folder = workdir / "runs" / "3"
    check_png(folder / LEARNING_CURVES_PNG, 1100, 420)
    assert json.loads((folder / "info.json").read_text())["interrupted"] is True
    assert json.loads((folder / "run.json").read_text())["status"] == "COMPLETED"  # train returns after Ctrl-C


def test_sacred_statuses_and_stale_heartbeats(workdir, tmp_path):
    now = datetime.now(timezone.utc)

    def ago(**delta) -> str:  # as Sacred writes times: naive UTC
        return (now - timedelta(**delta)).replace(tzinfo=None).isoformat()

    for status, times, expected in [
        ("INTERRUPTED", {}, "interrupted"),  # a second Ctrl-C, during testing
        ("FAILED", {}, "failed"),
        ("QUEUED", {}, "queued"),
        ("RUNNING", {"start_time": ago(minutes=3), "heartbeat": ago(seconds=5)}, "running"),
        ("RUNNING", {"start_time": ago(hours=2), "heartbeat": ago(hours=1)}, "killed"),  # SIGKILL, power cut
    ]:
        folder = copy_run(workdir, "1", tmp_path / f"{status}-{expected}")
        edit_json(folder / "run.json", status=status, **times)
        record = read_run_folder(folder, now=now)
        assert record.status == expected, status
        if expected == "running":
            assert record.seconds == pytest.approx(180) and record.notes == []
    assert record.notes[0].startswith("RUNNING, but no heartbeat since")
    assert record.seconds == pytest.approx(3600)  # until its last heartbeat


def test_broken_and_partial_folders_are_listed_with_what_is_known(workdir, tmp_path):
    no_metrics = copy_run(workdir, "1", tmp_path / "runs" / "1")
    (no_metrics / "metrics.json").unlink()
    corrupt = copy_run(workdir, "2", tmp_path / "runs" / "2")
    (corrupt / "run.json").write_text('{"status": "COMPL')
    (corrupt / "metrics.json").write_text('{"valid.ppl": {"steps": [1, 2], "values": [3.0]}}')
    (tmp_path / "runs" / "3").mkdir()  # made by a run killed before it wrote anything
    (tmp_path / "runs" / "_sources").mkdir()  # Sacred's, not a run

    records = read_runs_dir(tmp_path / "runs")
    assert [(r.run_id, r.status, r.notes) for r in records] == [
        ("1", "completed", ["no metrics.json"]),
        ("2", "unknown", ["run.json unreadable (JSONDecodeError)", "metric valid.ppl malformed"]),
        ("3", "unknown", ["no run.json", "no config.json"]),
    ]
    assert records[0].valid_ppl == pytest.approx(json.loads((no_metrics / "info.json").read_text())["best_valid_ppl"])
    assert records[1].config["lr"] == 5.0 and records[1].valid_ppl is not None  # from info.json
    table = format_runs_table(records).splitlines()
    assert table[0].split() == [
        "id",
        "status",
        "started",
        "duration",
        "lr",
        "valid_ppl",
        "test_ppl",
        "tokens/s",
        "note",
    ]
    assert table[3].split()[:8] == ["3", "unknown", "-", "-", "-", "-", "-", "-"]


def test_runs_of_an_older_version_fall_back_on_their_curves_and_result(workdir, tmp_path):
    older = copy_run(workdir, "1", tmp_path / "7")
    (older / "info.json").unlink()  # written before train put its results in the info
    loss = json.loads((older / "metrics.json").read_text())["valid.loss"]
    (older / "metrics.json").write_text(json.dumps({"valid.loss": loss}))  # and before it logged perplexities
    config = json.loads((older / "config.json").read_text())
    for key in experiment._READER_KEYS:
        del config[key]  # keys that came later
    (older / "config.json").write_text(json.dumps(config))

    record = read_run_folder(older)
    assert record.notes == [] and record.status == "completed"
    assert record.valid_ppl == pytest.approx(math.exp(min(loss["values"])))
    assert record.best_epoch == loss["steps"][loss["values"].index(min(loss["values"]))]
    assert record.test_ppl == pytest.approx(record.result) and record.tokens_per_second is None
    newer = read_run_folder(workdir / "runs" / "1")
    assert differing_config_keys([record, newer], ignore=experiment._READER_KEYS) == []


def test_table_sorts_by_any_column_with_unknowns_last(workdir, tmp_path):
    records = read_runs_dir(workdir / "runs")
    (tmp_path / "9").mkdir()
    records.append(read_run_folder(tmp_path / "9"))

    def ids(sort_by):
        return [line.split()[0] for line in format_runs_table(records, sort_by=sort_by).splitlines()[1:]]

    assert ids("test_ppl") == [r.run_id for r in sorted(records[:3], key=lambda r: r.test_ppl)] + ["9"]
    assert ids("-test_ppl") == [r.run_id for r in sorted(records[:3], key=lambda r: -r.test_ppl)] + ["9"]
    assert ids("-id") == ["9", "3", "2", "1"]
    assert ids("lr") == ["2", "1", "3", "9"]  # 5 before 20; run 1 before 3 as sorting is stable
    with pytest.raises(UserError, match="cannot sort by 'perplexity': the columns are id, status"):
        format_runs_table(records, sort_by="perplexity")


def test_select_runs_by_status_and_id(workdir):
    records = read_runs_dir(workdir / "runs")
    assert [r.run_id for r in select_runs(records, "interrupted,killed")] == ["3"]
    assert [r.run_id for r in select_runs(records, ["COMPLETED"])] == ["1", "2"]
    assert [r.run_id for r in select_runs(records, run_ids=[3, 1])] == ["3", "1"]
    with pytest.raises(UserError, match="unknown run status finished; choose among completed, interrupted"):
        select_runs(records, "finished")
    with pytest.raises(UserError, match=r"no run 8 among the records \(runs there: 1, 2, 3\)"):
        select_runs(records, run_ids=[1, 8])


def test_runs_command_prints_the_table_and_records_nothing(workdir, cli_here):
    result = cli_here("runs", "with", "runs_sort=-test_ppl", "runs_status=completed,interrupted",
                     f"runs_dir={workdir / 'runs'}", cwd=workdir / "tiny")  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", "status", "started", "duration", "epochs", "lr", "valid_ppl", "test_ppl",
                                "tokens/s"]  # fmt: skip
    rows = [line.split() for line in lines[1:]]
    assert {row[0]: row[1] for row in rows} == {"1": "completed", "2": "completed", "3": "interrupted"}
    assert {row[0]: row[5:7] for row in rows} == {"1": ["2", "20.0"], "2": ["2", "5.0"], "3": ["100000", "20.0"]}
    test_ppls = [float(row[8]) for row in rows]
    assert test_ppls == sorted(test_ppls, reverse=True)
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["1", "2", "3", "_sources"]
    assert not (workdir / "tiny" / "runs").exists()  # `runs` is unobserved: it records no run of its own


def test_plot_command_draws_the_runs_validation_curves(workdir, cli_here):
    result = cli_here("plot", "with", "run_ids=[1,2,3]", "plot_path=pictures/compare.png", cwd=workdir)
    assert f"validation curves of runs 1, 2, 3 written to {Path('pictures/compare.png')}" in result.stdout
    check_png(workdir / "pictures" / "compare.png", 1100, 420 + 90)  # three legend lines
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["1", "2", "3", "_sources"]


def test_sql_observer_with_sqlite_and_listing_its_runs(workdir, tmp_path, monkeypatch, capfd):
    """The command lines `main.py -s URL with ...` and `main.py runs with runs_db=URL`, run in this process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.ex, "observers", [])  # main() adds runs/ here when no observer flag is given
    url = f"sqlite:///{tmp_path / 'records.db'}"
    experiment.main(["main.py", "-s", url, "--loglevel=WARNING", "with", *SMOKE, f"dataset={workdir / 'tiny'}",
                     f"save={tmp_path / 'model.pt'}"])  # fmt: skip
    assert not (tmp_path / "runs").exists()  # -s alone: no run folder
    capfd.readouterr()

    experiment.main(["main.py", "runs", "--loglevel=WARNING", "with", f"runs_db={url}"])
    listed = capfd.readouterr().out.splitlines()
    assert listed[0].split() == ["id", "status", "started", "duration", "valid_ppl", "test_ppl", "tokens/s"]
    assert listed[1].split()[:2] == ["0", "completed"] and listed[2] == SQL_LACKS
    assert not (tmp_path / "runs").exists()  # the default observer was added, but `runs` is unobserved
    with sqlite3.connect(tmp_path / "records.db") as connection:
        artifacts = connection.execute("SELECT filename, length(content) FROM artifact").fetchall()
    assert {name for name, _ in artifacts} == {"model.pt", LEARNING_CURVES_PNG}


def test_database_problems_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="there is no database file"):
        read_runs_db(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(UserError, match="holds no runs of Sacred's SQL observer"):
        read_runs_db(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(UserError, match="is not a database URL"):
        read_runs_db("nosuchdialect://somewhere/db")


def _postgres_binaries() -> tuple[Path, Path] | None:
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    folders += [Path(p).parent for p in [shutil.which("initdb")] if p]
    return next(((f / "initdb", f / "pg_ctl") for f in folders if (f / "initdb").is_file()), None)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback, in a temporary folder, as a non-root user."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="wordlm-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user the package made
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the PostgreSQL server as")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser, so the PostgreSQL server cannot run as another user")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    initdb, pg_ctl = binaries
    data = folder / "data"
    steps = [[str(initdb), "-D", str(data), "-U", "wordlm", "--auth=trust", "--no-sync", "-E", "UTF8"],
             [str(pg_ctl), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60",
              "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off", "start"]]  # fmt: skip
    for step in steps:
        done = subprocess.run(as_user + step, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"could not start PostgreSQL ({Path(step[0]).name}): {(done.stderr or done.stdout).strip()}")
    yield f"postgresql://wordlm@127.0.0.1:{port}/postgres"
    subprocess.run(as_user + [str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_sql_observer_with_postgresql(workdir, postgres_url):
    if len(experiment.ex.base_dir) > 64:
        pytest.skip(f"Sacred's SQL schema keeps the project folder in VARCHAR(64), which PostgreSQL enforces, "
                    f"and this checkout's path has {len(experiment.ex.base_dir)} characters")  # fmt: skip
    run = train_in_process(workdir, {"--sql": postgres_url}, lr=7.0)
    (record,) = read_runs_db(postgres_url)
    assert (record.run_id, record.status, record.command) == (str(run._id), "completed", "train")
    assert record.test_ppl == pytest.approx(run.result) and record.config["lr"] == 7.0
    assert record.metrics == {} and record.valid_ppl == pytest.approx(run.info["best_valid_ppl"])
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        names = connection.execute(sa.text("SELECT filename FROM artifact")).scalars().all()
    engine.dispose()
    assert sorted(names) == [LEARNING_CURVES_PNG, "model.pt"]


def test_plot_leaves_out_runs_without_a_curve_and_refuses_a_database(workdir, tmp_path, capfd):
    copy_run(workdir, "1", tmp_path / "runs" / "1")
    (tmp_path / "runs" / "2").mkdir()  # killed before it wrote anything

    def plot(**keys):
        return experiment.ex.run("plot", config_updates={"runs_dir": str(tmp_path / "runs"), **keys},
                                 options={"--loglevel": "ERROR"})  # fmt: skip

    plot(plot_path=str(tmp_path / "one.png"))
    assert capfd.readouterr().out.splitlines() == [
        "run 2 has no validation curve (no run.json; no config.json)",
        f"validation curves of runs 1 written to {tmp_path / 'one.png'}",
    ]
    check_png(tmp_path / "one.png", 1100, 420 + 40)
    with pytest.raises(experiment.error, match="none of these runs finished an epoch"):
        plot(run_ids=[2])
    with pytest.raises(experiment.error, match="SQL observer stores no metrics: plot needs run folders"):
        plot(runs_db="sqlite:///runs.db")


def test_a_file_that_is_no_sqlite_database_is_one_line_at_once_and_records_nothing(tmp_path, cli_here):
    """-s sqlite:////abs/notes.txt started the run, retried for 6 s and printed two tracebacks (the second
    Sacred's AttributeError in failed_event) before its error line."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    url = f"sqlite:///{notes}"
    cut_corpus(tmp_path / "c", lines=(60, 10, 10))
    result = cli_here("-F", str(tmp_path / "records"), "-s", url, "with", *SMOKE, f"dataset={tmp_path / 'c'}",
                      f"save={tmp_path / 'model.pt'}", cwd=tmp_path, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output and "AttributeError" not in output, output
    assert result.stderr.splitlines() == [f"error: {url}: {notes} is not an SQLite database (it does not begin with "
                                          "SQLite's header)"]  # fmt: skip
    assert notes.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "notes.txt"]  # no run record, no model, no records/
    with pytest.raises(UserError, match="notes.txt is not an SQLite database"):
        read_runs_db(url)


def test_a_run_whose_start_the_database_refused_is_one_error_without_a_traceback(tmp_path, monkeypatch, capfd, caplog):
    """The SQL observer's failed_event met a run it never recorded: Sacred logged its AttributeError traceback."""
    (tmp_path / "notes.txt").write_text("not a database\n")
    observer = experiment._SqlObserver(f"sqlite:///{tmp_path / 'notes.txt'}")  # bypassing main's check of -s
    monkeypatch.setattr(experiment._SqlObserver, "TRIES", 1)
    monkeypatch.setattr(experiment.ex, "observers", [observer])
    with pytest.raises(experiment.error, match="cannot record the run in sqlite:///.*: file is not a database"):
        experiment.ex.run("export", config_updates={"checkpoint": str(tmp_path / "none.pt")},
                          options={"--loglevel": "WARNING"})  # fmt: skip
    logged = capfd.readouterr().err + caplog.text  # (Sacred's logger reaches pytest's log capture)
    assert "Traceback" not in logged and "AttributeError" not in logged, logged
    assert (tmp_path / "notes.txt").read_text() == "not a database\n"


def test_runs_starting_together_on_a_new_sqlite_database_are_all_recorded(tmp_path):
    """Sacred's own SQL observer loses runs here (24 of 40 in one trial: "table source already exists")."""
    import datetime as dt
    import threading

    url = f"sqlite:///{tmp_path / 'new.db'}"
    observers = [experiment._SqlObserver(url) for _ in range(4)]
    barrier, failures = threading.Barrier(len(observers)), []
    ex_info = {"name": "wordlm", "base_dir": str(tmp_path), "sources": [], "dependencies": [], "repositories": []}
    host_info = {"hostname": "h", "os": ["Linux", "x"], "python_version": "3.11", "cpu": "c"}

    def start(observer, seed):
        barrier.wait()  # all at once, into an empty database
        try:
            observer.started_event(ex_info=ex_info, command="train", host_info=host_info, config={"seed": seed},
                                   start_time=dt.datetime.now(), meta_info={}, _id=None)  # fmt: skip
        except Exception as problem:  # noqa: BLE001 - what the test reports
            failures.append(f"{type(problem).__name__}: {problem}")

    threads = [threading.Thread(target=start, args=(observer, seed)) for seed, observer in enumerate(observers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with sqlite3.connect(tmp_path / "new.db") as connection:
        rows = connection.execute("SELECT run_id, config FROM run").fetchall()
    assert len({run_id for run_id, _ in rows}) == 4
    assert sorted(json.loads(config)["seed"] for _, config in rows) == [0, 1, 2, 3]


def test_a_run_records_its_own_model_when_another_run_replaced_the_shared_save(workdir, tmp_path, monkeypatch):
    """Two runs with one save=: the second's model lands in the file while the first is testing its own."""
    from wordlm.data.corpus import Vocabulary
    from wordlm.models import ModelConfig, RNNModel
    from wordlm.training.checkpoint import load_checkpoint, save_checkpoint

    save = tmp_path / "model.pt"
    from wordlm import run as training_run

    real_evaluate = training_run.evaluate_loss

    def another_run_saves_meanwhile(*args, **kwargs):
        other = RNNModel(ModelConfig(ntoken=3, emsize=4, nhid=4, nlayers=1))
        save_checkpoint(save, other, Vocabulary(["a", "b", "c"]), meta={"config": {"seed": 99}})
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training_run, "evaluate_loss", another_run_saves_meanwhile)  # (the test split's: after fit)
    run = train_in_process(workdir, {"--file_storage": str(tmp_path / "runs")}, save=str(save), seed=5)
    assert load_checkpoint(save)["meta"]["config"]["seed"] == 99  # the file is the other run's now
    recorded = load_checkpoint(tmp_path / "runs" / str(run._id) / "model.pt")
    assert recorded["meta"]["config"]["seed"] == 5 and len(recorded["vocab"]) > 3  # and the record keeps its own
