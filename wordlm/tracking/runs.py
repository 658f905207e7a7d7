"""Read Sacred's run records and list them as a table: run folders and SQL observer databases.

Main names: ``Series`` and ``MetricHistory`` (metrics as steps and values), ``RunRecord`` (what is known of
one run), ``read_runs_dir``, ``open_database``, ``read_runs_db``, ``select_runs`` and ``format_runs_table``. Must
not import Sacred: it reads the json files of the FileStorageObserver and the ``run`` table of the SQL observer itself,
so records written by any version of wordlm or Sacred can be read, and a broken one costs a note, not a crash.

A run folder (``runs/<id>/``) holds ``run.json`` (status and times), ``config.json``, ``info.json`` (what
``train`` put in ``_run.info``) and ``metrics.json`` (every ``log_scalar``). Sacred writes naive UTC times.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from wordlm.errors import UserError

__all__ = [
    "STATUSES", "STALE_AFTER", "SQL_LACKS", "COLUMNS", "Series", "MetricHistory", "RunRecord", "read_run_folder",
    "read_runs_dir", "open_database", "SQLITE_HEADER", "read_runs_db", "differing_config_keys", "select_runs",
    "run_labels", "FIGURES", "MIN_NOTE", "format_runs_table"
]  # fmt: skip

STATUSES = ("completed", "interrupted", "failed", "running", "killed", "queued", "unknown")
STALE_AFTER = 120.0  # seconds without a heartbeat (Sacred beats every 10 s) before RUNNING means killed
SQL_LACKS = (
    "Sacred's SQL observer stores no metrics: perplexities and tokens/s come from each run's info, "
    "and `plot` needs run folders (the default runs/ or -F DIR); each run's learning_curves.png is an artifact"
)
_ABSENT = object()  # a config key a run does not have, shown as '-' (a value of None is shown as None)
COLUMNS = ("id", "command", "status", "started", "duration", "valid_ppl", "test_ppl", "tokens/s", "note")


@dataclass
class Series:
    """One metric: ``values[i]`` was logged at ``steps[i]``."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


class MetricHistory:
    """Keeps every metric logged during a run in memory, and passes each on to ``forward``."""

    def __init__(self, forward: Callable[[str, float, int], None] | None = None) -> None:
        self.metrics: dict[str, Series] = {}
        self.forward = forward

    def log(self, name: str, value: float, step: int) -> None:
        series = self.metrics.setdefault(name, Series())
        series.steps.append(step)
        series.values.append(value)
        if self.forward is not None:
            self.forward(name, value, step)


@dataclass
class RunRecord:
    """What the records say of one run; ``None`` where they do not say."""

    run_id: str
    status: str = "unknown"
    command: str | None = None
    start_time: datetime | None = None  # aware, UTC
    seconds: float | None = None  # how long it ran (until its last heartbeat for a killed run)
    config: dict = field(default_factory=dict)  # flattened: nested keys joined with '.'
    info: dict = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)
    result: float | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read

    @property
    def valid_ppl(self) -> float | None:
        """The best validation perplexity, from the info or else from the curve."""
        if _is_number(self.info.get("best_valid_ppl")):
            return float(self.info["best_valid_ppl"])
        if "valid.ppl" in self.metrics:
            return _finite_min(self.metrics["valid.ppl"].values)
        if "valid.loss" in self.metrics:
            loss = _finite_min(self.metrics["valid.loss"].values)
            return None if loss is None else math.exp(min(loss, 709.0))
        return None

    @property
    def has_validation_curve(self) -> bool:
        return bool(self.metrics.get("valid.ppl", Series()).values)

    @property
    def test_ppl(self) -> float | None:
        if _is_number(self.info.get("test_ppl")):
            return float(self.info["test_ppl"])
        if self.metrics.get("test.ppl") and self.metrics["test.ppl"].values:
            return self.metrics["test.ppl"].values[-1]
        return self.result if self.command == "train" else None

    @property
    def tokens_per_second(self) -> float | None:
        if _is_number(self.info.get("tokens_per_second")):
            return float(self.info["tokens_per_second"])
        rates = self.metrics.get("tokens_per_second")
        return sum(rates.values) / len(rates.values) if rates and rates.values else None

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose model was kept: from the info, or where the validation curve is lowest."""
        if _is_number(self.info.get("best_epoch")) and self.info["best_epoch"] > 0:
            return int(self.info["best_epoch"])
        curve = self.metrics.get("valid.ppl") or self.metrics.get("valid.loss")
        finite = [(v, s) for s, v in zip(curve.steps, curve.values) if math.isfinite(v)] if curve else []
        return int(min(finite)[1]) if finite else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_min(values: Iterable[float]) -> float | None:
    finite = [v for v in values if _is_number(v)]
    return min(finite) if finite else None


def _parse_time(value) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _flatten(config: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and not any(str(k).startswith("py/") for k in value):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settle(record: RunRecord, sacred_status, start, heartbeat, stop, now: datetime, stale_after: float) -> None:
    """Fill in the status and duration from Sacred's status and the times it recorded."""
    record.start_time = start = _parse_time(start)
    heartbeat, stop = _parse_time(heartbeat), _parse_time(stop)
    sacred_status = str(sacred_status or "").upper()
    end = stop
    if sacred_status == "COMPLETED":
        record.status = "interrupted" if record.info.get("interrupted") is True else "completed"
    elif sacred_status == "INTERRUPTED":
        record.status = "interrupted"
    elif sacred_status in ("FAILED", "TIMEOUT"):
        record.status = "failed"
    elif sacred_status == "QUEUED":
        record.status = "queued"
    elif sacred_status == "RUNNING":
        last = heartbeat or start
        if last is not None and (now - last).total_seconds() <= stale_after:
            record.status, end = "running", now
        elif last is not None:
            record.status, end = "killed", heartbeat
            record.notes.append(f"RUNNING, but no heartbeat since {_local(last)}")
    if start is not None and end is not None:
        record.seconds = max(0.0, (end - start).total_seconds())


def _read_json(path: Path, notes: list[str], expected: bool = True):
    """The json in ``path``, or ``None`` (with a note when it was expected or is unreadable)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        if expected:
            notes.append(f"no {path.name}")
    except (OSError, ValueError) as problem:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        notes.append(f"{path.name} unreadable ({type(problem).__name__})")
    return None


def _load_json_text(text: str | None, name: str, notes: list[str]) -> dict:
    """The json object in a text column, or ``{}`` (with a note when the text is not one)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        notes.append(f"{name} unreadable")
        return {}
    return value


def _read_metrics(raw, notes: list[str]) -> dict[str, Series]:
    metrics = {}
    for name, entry in (raw or {}).items() if isinstance(raw, dict) else ():
        steps = entry.get("steps") if isinstance(entry, dict) else None
        values = entry.get("values") if isinstance(entry, dict) else None
        if not isinstance(steps, list) or not isinstance(values, list) or len(steps) != len(values):
            notes.append(f"metric {name} malformed")
            continue
        pairs = [(s, v) for s, v in zip(steps, values) if _is_number(s) and isinstance(v, (int, float))]
        metrics[name] = Series([s for s, _ in pairs], [float(v) for _, v in pairs])
    if raw is not None and not isinstance(raw, dict):
        notes.append("metrics.json malformed")
    return metrics


def read_run_folder(folder: Path, now: datetime | None = None, stale_after: float = STALE_AFTER) -> RunRecord:
    """Read one run folder of Sacred's FileStorageObserver; whatever is missing or corrupt becomes a note."""
    folder = Path(folder)
    record = RunRecord(run_id=folder.name)
    run = _read_json(folder / "run.json", record.notes)
    run = run if isinstance(run, dict) else {}
    config = _read_json(folder / "config.json", record.notes)
    record.config = _flatten(config) if isinstance(config, dict) else {}
    info = _read_json(folder / "info.json", record.notes, expected=False)
    record.info = info if isinstance(info, dict) else {}
    record.command = run.get("command") if isinstance(run.get("command"), str) else None
    record.result = run.get("result") if _is_number(run.get("result")) else None
    _settle(record, run.get("status"), run.get("start_time"), run.get("heartbeat"), run.get("stop_time"),
            now or datetime.now(timezone.utc), stale_after)  # fmt: skip
    curves_expected = record.status in ("completed", "interrupted") and record.command in (None, "train")
    record.metrics = _read_metrics(_read_json(folder / "metrics.json", record.notes, curves_expected), record.notes)
    return record


def _id_order(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def read_runs_dir(folder: str | Path, now: datetime | None = None, stale_after: float = STALE_AFTER) -> list[RunRecord]:
    """Read every run folder in ``folder`` (skipping Sacred's ``_sources``/``_resources``), by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of run records: train first (runs go to runs/) or name another")
    names = sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))),
                   key=_id_order)  # fmt: skip
    return [read_run_folder(folder / name, now, stale_after) for name in names]


def open_database(url, label: str = "runs_db", create: bool = False):
    """An SQLAlchemy engine for ``url``, checked by connecting: every reason it cannot be used is one line.

    Args:
        url: a database URL, e.g. ``sqlite:///runs.db`` or ``postgresql://user@host/db``.
        label: how the error names the URL: ``runs_db`` or ``-s``.
        create: whether the database may be created (Sacred's SQL observer does): a SQLite file then needs only
            its folder; otherwise the file must exist (connecting would create an empty one).

    Raises:
        UserError: SQLAlchemy or the driver is missing, ``url`` is no URL or names no dialect SQLAlchemy knows, a
            SQLite file or folder is missing, the file is not an SQLite database, or the server cannot be reached.
    """
    try:
        import sqlalchemy as sa
    except ImportError:
        raise UserError(
            "reading runs from a database needs SQLAlchemy: run .venv/bin/pip install -e '.[sql]' in the wordlm clone"
        ) from None
    named = f"{label}={url!r}" if label.isidentifier() else f"{label} {url!r}"
    if not isinstance(url, str):
        raise UserError(f"{named} must be a database URL, e.g. sqlite:///runs.db")
    try:
        engine = sa.create_engine(url)
    except sa.exc.NoSuchModuleError:
        dialect = url.split("://", 1)[0]
        raise UserError(
            f"{named} is not a database URL that can be opened here: SQLAlchemy knows no database {dialect!r}; "
            "use e.g. sqlite:///runs.db or postgresql://user@host/db"
        ) from None
    except sa.exc.ArgumentError:
        hint = f"; for the SQLite file {url} give sqlite:///{url}" if "://" not in url and url.strip() else ""
        hint = hint or ", e.g. sqlite:///runs.db or postgresql://user@host/db"
        raise UserError(f"{named} is not a database URL that can be opened here (dialect://...){hint}") from None
    except ImportError as problem:
        driver = getattr(problem, "name", None) or str(problem)
        raise UserError(f"{named} needs the database driver {driver}, which is not installed") from None
    shown = engine.url.render_as_string(hide_password=True)
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
        file = Path(database).expanduser()
        if create and not file.parent.is_dir():
            raise UserError(f"{shown}: there is no folder {file.parent} for the database file; make it first")
        if not create and not file.is_file():
            raise UserError(f"{shown}: there is no database file {database}")  # connecting would create an empty one
        _check_sqlite_header(file, shown)
    try:
        with engine.connect():
            pass
    except sa.exc.SQLAlchemyError as problem:
        engine.dispose()
        reason = str(getattr(problem, "orig", None) or problem).strip().splitlines()[0]
        raise UserError(f"cannot open the database {shown}: {reason}") from None
    return engine


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _check_sqlite_header(file: Path, shown: str) -> None:
    """Refuse an existing, non-empty ``file`` that is no SQLite database: SQLite itself says so only at the first
    query, which for Sacred's observer is inside the run, after it started (an empty file is a new database)."""
    if not file.is_file():
        return  # absent (connecting creates it) or no regular file (reading a FIFO would block): left to connecting
    try:
        with open(file, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError:
        return  # unreadable: connecting says so in SQLite's words
    if head and head != SQLITE_HEADER:
        raise UserError(f"{shown}: {file} is not an SQLite database (it does not begin with SQLite's header)")


def read_runs_db(url: str, now: datetime | None = None, stale_after: float = STALE_AFTER) -> list[RunRecord]:
    """Read the runs that Sacred's SQL observer (``-s URL``) stored in the database at ``url``.

    The SQL observer keeps status, times, config, info and the result, but no metrics: the records have none.

    Raises:
        UserError: SQLAlchemy or the database driver is missing, or the database cannot be read.
    """
    engine = open_database(url)  # (says in one line when SQLAlchemy is missing)
    import sqlalchemy as sa

    shown = engine.url.render_as_string(hide_password=True)
    columns = [sa.Column(name, sa.String) for name in ("run_id", "command", "status", "config", "info")]
    columns += [sa.Column(name, sa.DateTime) for name in ("start_time", "heartbeat", "stop_time")]
    table = sa.Table("run", sa.MetaData(), sa.Column("id", sa.Integer), sa.Column("result", sa.Float), *columns)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("run"):
                raise UserError(f"{shown} holds no runs of Sacred's SQL observer (no table 'run')")
            rows = connection.execute(sa.select(table).order_by(table.c.id)).mappings().all()
    except sa.exc.SQLAlchemyError as problem:
        reason = str(getattr(problem, "orig", None) or problem).strip().splitlines()[0]
        raise UserError(f"cannot read runs from {shown}: {reason}") from None
    finally:
        engine.dispose()
    now = now or datetime.now(timezone.utc)
    records = []
    for row in rows:
        record = RunRecord(run_id=str(row["run_id"]), command=row["command"], result=row["result"])
        record.config = _flatten(_load_json_text(row["config"], "config", record.notes))
        record.info = _load_json_text(row["info"], "info", record.notes)
        _settle(record, row["status"], row["start_time"], row["heartbeat"], row["stop_time"], now, stale_after)
        records.append(record)
    return records


def differing_config_keys(records: list[RunRecord], ignore: Iterable[str] = ()) -> list[str]:
    """The config keys whose values differ between the runs whose config was read (missing counts as a value)."""
    configs = [r.config for r in records if r.config]
    keys = sorted(set().union(*configs) - set(ignore)) if configs else []
    return [
        k for k in keys if len({json.dumps(c[k], sort_keys=True, default=str) if k in c else None for c in configs}) > 1
    ]


def select_runs(
    records: list[RunRecord], statuses: str | Iterable[str] | None = None, run_ids=None, command: str | None = None
) -> list[RunRecord]:
    """The records with one of ``statuses`` (all when ``None``), an id among ``run_ids`` (all when ``None``) and run
    by ``command`` (all when ``None`` or ``ALL``; ``TRAIN`` also takes a record whose command is unknown).

    ``statuses`` may be one string naming several, as a command line gives them: ``interrupted,killed``.
    """
    if command is not None and command != ALL:
        records = [r for r in records if r.command == command or (command == TRAIN and r.command is None)]
    if isinstance(statuses, str):
        statuses = statuses.strip("[]").replace(",", " ").split()
    if statuses is not None:
        statuses = {str(s).lower() for s in statuses}
        unknown = sorted(statuses - set(STATUSES))
        if unknown:
            raise UserError(f"unknown run status {', '.join(unknown)}; choose among {', '.join(STATUSES)}")
        records = [r for r in records if r.status in statuses]
    if run_ids is not None:
        by_id = {r.run_id: r for r in records}
        missing = [str(i) for i in run_ids if str(i) not in by_id]
        if missing:
            known = ", ".join(by_id) or "none"
            raise UserError(f"no run {', '.join(missing)} among the records (runs there: {known})")
        records = [by_id[str(i)] for i in run_ids]
    return records


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _cell(value, longest: int = 32) -> str:
    if value is None or value is _ABSENT:
        return "-"
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 10 else f"{value:.6g}"  # 20.0 stays 20.0, as it was written
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= longest else "…" + text[-(longest - 1) :]


def _config_value(config: dict, key: str):
    value = config.get(key, _ABSENT)
    return "None" if value is None else value


def run_labels(records: list[RunRecord], ignore_keys: Iterable[str] = ()) -> list[str]:
    """A legend label for each run: its id and its values of the config keys that differ between the runs."""
    keys = differing_config_keys(records, ignore_keys)
    return [
        ", ".join([f"run {r.run_id}"] + [f"{k}={_cell(_config_value(r.config, k))}" for k in keys if r.config])
        for r in records
    ]


def _info(key: str) -> Callable[[RunRecord], object]:
    return lambda record: record.info.get(key)


def _config(key: str) -> Callable[[RunRecord], object]:
    return lambda record: record.config.get(key)


def _onnx_written(record: RunRecord):
    """Where ``export`` wrote: onnx_export, or else the checkpoint's name with .onnx."""
    written, checkpoint = record.config.get("onnx_export"), record.config.get("checkpoint")
    return written or (str(Path(checkpoint).with_suffix(".onnx")) if isinstance(checkpoint, str) else None)


def _evaluate_ppl(record: RunRecord) -> float | None:
    return float(record.info["ppl"]) if _is_number(record.info.get("ppl")) else record.result


def _summary(record: RunRecord) -> str | None:
    """One cell saying what a run of any command gave: perplexities, a text scored, words written, a file."""
    if record.command in (None, TRAIN):
        valid, test = record.valid_ppl, record.test_ppl
        shown = [f"{name} {value:.2f}" for name, value in (("valid", valid), ("test", test)) if value is not None]
        return ", ".join(shown) or None
    if record.command == "evaluate" and _evaluate_ppl(record) is not None:
        scored = record.info.get("scored")
        return f"ppl {_evaluate_ppl(record):.2f}" + (f" on {Path(scored).name}" if isinstance(scored, str) else "")
    if record.command == "generate" and record.config.get("words") is not None:
        return f"{record.config['words']} words to {record.config.get('outf')}"
    if record.command == "export":
        return _onnx_written(record)
    return None if record.result is None else f"{record.result:.6g}"


TRAIN, ALL = "train", "all"  # the runs of training, and of every command (``select_runs``, ``format_runs_table``)
# Each command's own figures, shown for its runs whatever their values: (column, the value in a record)
FIGURES: dict[str, tuple[tuple[str, Callable[[RunRecord], object]], ...]] = {
    TRAIN: (("valid_ppl", lambda r: r.valid_ppl), ("test_ppl", lambda r: r.test_ppl),
            ("tokens/s", lambda r: r.tokens_per_second)),
    "evaluate": (("checkpoint", _config("checkpoint")), ("scored", _info("scored")), ("tokens", _info("tokens")),
                 ("ppl", _evaluate_ppl)),
    "generate": (("checkpoint", _config("checkpoint")), ("words", _config("words")), ("outf", _config("outf"))),
    "export": (("checkpoint", _config("checkpoint")), ("onnx_export", _onnx_written)),
    ALL: (("result", _summary),),
}  # fmt: skip
_OTHER = (("result", lambda r: r.result),)  # a command named nowhere above
_TIMES = ("started", "duration")
_NUMBER_TEXT = {
    "started": lambda v: _local(v) if v else "-",
    "duration": lambda v: "-" if v is None else str(timedelta(seconds=round(v))),
    "valid_ppl": lambda v: "-" if v is None else f"{v:.2f}",
    "test_ppl": lambda v: "-" if v is None else f"{v:.2f}",
    "ppl": lambda v: "-" if v is None else f"{v:.2f}",
    "tokens/s": lambda v: "-" if v is None else f"{v:.0f}",
    "note": lambda v: v or "",
}
MIN_NOTE = 12  # characters of the note column kept when the table is cut to a width


def _sweep(record: RunRecord) -> str | None:
    """The sweep whose trial a run was, as its info says (``sweep``, ``trial``: ``wordlm.tracking.sweeps``):
    ``name#trial``."""
    sweep, trial = record.info.get("sweep"), record.info.get("trial")
    if sweep is None:
        return None
    return f"{_cell(sweep)}#{trial}" if isinstance(trial, int) and not isinstance(trial, bool) else _cell(sweep)


def _sort_key(value) -> tuple:
    if value is None or value is _ABSENT:
        return (2, 0, "")
    if isinstance(value, datetime):
        return (0, value.timestamp(), "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0, value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def format_runs_table(
    records: list[RunRecord], ignore_keys: Iterable[str] = (), sort_by: str | None = None, *,
    keys: Iterable[str] | None = None, command: str | None = None, width: int | None = None,
) -> str:  # fmt: skip
    """A plain-text table of ``records``, one line a run, with the config keys that differ between them.

    Args:
        records: the runs to list.
        ignore_keys: config keys never shown (e.g. the keys of the commands that read records).
        sort_by: a column name (``id``, ``status``, ``started``, ``duration``, a figure such as ``test_ppl``, or a
            shown config key); a leading ``-`` sorts descending. Unknown values go last.
        keys: the config keys that may be shown (those of them that differ between the runs); None: every key.
        command: whose figures follow the keys: ``FIGURES[command]`` (an unknown command's ``result``); ``ALL``
            adds a ``command`` column and one ``result`` cell a run. None: training's, with a ``command`` column
            when the runs ran different commands.
        width: the most characters a line may have (a terminal's): long config values are cut to 16 characters,
            then the note, and then ``started``, ``duration`` and the last config keys are left out, a line below
            the table naming them. None: no limit.

    Raises:
        UserError: ``sort_by`` names no column.
    """
    figures = FIGURES.get(command or TRAIN, _OTHER)
    figure_names = [name for name, _ in figures]
    shown_keys = [k for k in differing_config_keys(records, ignore_keys) if keys is None or k in set(keys)]
    shown_keys = [k for k in shown_keys if k not in figure_names and k not in COLUMNS]
    commands = {r.command for r in records if r.command}
    columns = ["id"] + (["command"] if command == ALL or (command is None and len(commands) > 1) else [])
    columns += ["status", *_TIMES] + (["sweep"] if any(r.info.get("sweep") is not None for r in records) else [])
    columns += shown_keys + figure_names + (["note"] if any(r.notes for r in records) else [])
    rows = []
    for record in records:
        row = {"id": int(record.run_id) if record.run_id.isdigit() else record.run_id, "command": record.command,
               "status": record.status, "started": record.start_time, "duration": record.seconds,
               "sweep": _sweep(record), "note": "; ".join(record.notes) or None}  # fmt: skip
        row.update({key: _config_value(record.config, key) for key in shown_keys})
        row.update({name: value(record) for name, value in figures})
        rows.append(row)  # raw values: numbers stay numbers, so that they sort as numbers
    if sort_by:
        column = sort_by[1:] if sort_by.startswith("-") else sort_by
        if column not in columns:
            raise UserError(f"cannot sort by {column!r}: the columns are {', '.join(columns)}")
        known = [r for r in rows if _sort_key(r[column])[0] < 2]
        known.sort(key=lambda r: _sort_key(r[column]), reverse=sort_by.startswith("-"))
        rows = known + [r for r in rows if _sort_key(r[column])[0] == 2]
    longest = {key: 16 for key in shown_keys} if width is not None else {}
    cells = {c: [_NUMBER_TEXT.get(c, lambda v, c=c: _cell(v, longest.get(c, 32)))(row[c]) for row in rows]
             for c in columns}  # fmt: skip
    numeric = {c: all(_is_number(row[c]) or row[c] is None or row[c] is _ABSENT for row in rows) for c in columns}
    left_out = _fit(columns, cells, width, droppable=[*_TIMES, *reversed(shown_keys)]) if width else []
    widths = {c: max([len(c)] + [len(text) for text in cells[c]]) for c in columns}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].rjust(widths[c]) if numeric[c] else values[c].ljust(widths[c]) for c in columns)

    lines = [line({c: c for c in columns}).rstrip()]
    lines += [line({c: cells[c][i] for c in columns}).rstrip() for i in range(len(rows))]
    if left_out:
        said = f"(left out to fit {width} columns: {', '.join(left_out)}; a wider terminal or COLUMNS=N shows them)"
        lines += textwrap.wrap(said, max(width, 40))
    return "\n".join(lines)


def _fit(columns: list[str], cells: dict[str, list[str]], width: int, droppable: list[str]) -> list[str]:
    """Cut the table to ``width`` characters a line: the ``droppable`` columns in their order are taken out of
    ``columns`` while the note is cut to ``MIN_NOTE`` characters, which then gets the room left. Returns the columns
    left out."""

    def total() -> int:
        return sum(max([len(c)] + [len(text) for text in cells[c]]) for c in columns) + 2 * (len(columns) - 1)

    notes = cells.get("note", [])
    if "note" in columns:
        cells["note"] = [text[: MIN_NOTE - 1] + "…" if len(text) > MIN_NOTE else text for text in notes]
    left_out = []
    for column in droppable:
        if total() <= width:
            break
        columns.remove(column)
        left_out.append(column)
    if "note" in columns:  # the note's text back, as far as the room left allows
        room = max(MIN_NOTE, width - total() + max(len(text) for text in cells["note"]))
        cells["note"] = [text[: room - 1] + "…" if len(text) > room else text for text in notes]
    return left_out
