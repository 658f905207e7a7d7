"""Optuna sweeps: search training keys over ranges for the lowest validation perplexity, each trial a training run.

Main names: ``sweep`` (``wordlm.sweep``), ``plan_sweep`` (every check of a sweep before any work), ``run_sweep`` (the
study's loop, which ``main.py sweep`` runs too), ``TrialRecorder`` (a trial's figures to Optuna, and its pruner's
verdict back to training), ``SweepPlan`` and ``SweepResult``. Must not import Sacred: the command line's ``sweep``
(``wordlm.experiment``) hands ``run_sweep`` a ``run_trial`` that makes each trial a Sacred run of ``train``.

The module is ``sweeps``, not ``sweep``: ``wordlm.sweep`` is the function, which a submodule of that name would
replace on the package once imported. Optuna is an extra (``.venv/bin/pip install -e '.[sweep]'``), imported only
when a sweep starts.

    result = wordlm.sweep("smoke", dataset="wikitext-2", sweep_trials=10, sweep_storage="sweep.db",
                          sweep_space={"lr": {"low": 1, "high": 40, "log": True}, "model_type": ["LSTM", "GRU"]})
    result.best_params, result.best_valid_ppl, result.checkpoint, result.command
"""

from __future__ import annotations

import ast
import json
import os
import random
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wordlm.checks import check_output, check_positive_int, check_seed
from wordlm.config import PRESETS, defaults, did_you_mean, make_config, validate_training_config
from wordlm.errors import UserError, warn
from wordlm.run import Recorder, plan_run
from wordlm.training.distributed import launched_size

__all__ = [
    "OPTUNA_MISSING", "PRUNERS", "DEFAULTS", "PER_TRIAL", "REFUSED", "NOT_COMPARED", "STORAGE_TRIES", "Range",
    "Choice", "SweepPlan", "SweepResult", "parse_space", "storage_url", "plan_sweep", "trial_path", "TrialRecorder",
    "TrialRunner", "train_trial", "run_sweep", "retrain_command", "sweep"
]  # fmt: skip

OPTUNA_MISSING = "sweeps need Optuna: run .venv/bin/pip install -e '.[sweep]' in the wordlm clone"
PRUNERS = ("median", "hyperband", None)  # sweep_pruner: MedianPruner, HyperbandPruner, none
DEFAULTS = dict(sweep_space=None, sweep_trials=20, sweep_storage="sweep.db", sweep_name="wordlm", sweep_pruner="median")
PER_TRIAL = ("save", "save_last")  # each trial writes its own: <save stem>.trial<N>.pt
REFUSED = {  # training keys a sweep cannot take, and why
    "resume": "a sweep's trials start afresh; the same sweep command continues an interrupted sweep",
    "onnx_export": "export the best trial's checkpoint afterwards with `python main.py export with checkpoint=...`",
}
# Keys that change nothing a trial learns: a study continued with other values of these is the same study
NOT_COMPARED = (*PER_TRIAL, "resume", "onnx_export", "log_interval", "checkpoint_every", "device", "tensorboard")
STORAGE_TRIES = 5  # attempts at opening a new database's tables that another process makes at the same time
_JITTER = random.Random()  # its own stream: a run seeds the global one
SPACE_ATTR, FIXED_ATTR = "wordlm_space", "wordlm_fixed"  # the study's user attrs: its search space and fixed keys


@dataclass(frozen=True)
class Range:
    """A numeric range to search: integers when both bounds are, on a log scale when ``log``."""

    low: int | float
    high: int | float
    log: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial, key: str):
        if self.integer:
            return trial.suggest_int(key, self.low, self.high, log=self.log)
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def as_data(self):
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Choice:
    """Values to choose among."""

    choices: tuple

    def suggest(self, trial, key: str):
        return trial.suggest_categorical(key, list(self.choices))

    def as_data(self):
        return list(self.choices)


@dataclass(frozen=True)
class SweepPlan:
    """A sweep whose values passed every check: the training keys every trial shares (``config``; its ``save`` and
    ``save_last`` are the stems of the trials' own), the keys the user gave, the search space, how many trials
    the study should have, where it lives, its name and pruner."""

    config: dict
    given: frozenset[str]
    space: dict
    trials: int
    storage: str  # as given, a file path or a database URL, shown without its password
    url: str  # the database URL
    name: str
    pruner: object = "median"

    @property
    def fixed(self) -> dict:
        """The keys a study's trials share, as the study records them (``FIXED_ATTR``)."""
        return _json({k: v for k, v in self.config.items() if k not in NOT_COMPARED and k not in self.space})

    @property
    def space_data(self) -> dict:
        return _json({key: spec.as_data() for key, spec in self.space.items()})


@dataclass
class SweepResult:
    """What a sweep gives back (``wordlm.sweep``, ``run_sweep``).

    Attributes:
        study: the Optuna study (``study.trials``, ``study.trials_dataframe()``, ...).
        finished: its completed and pruned trials, over every run of the sweep.
        best_trial: the number of its best completed trial (None: none completed yet), with its ``best_params``
            (the searched keys), ``best_valid_ppl``, ``test_ppl``, ``checkpoint`` (its ``save``), and ``command``:
            the ``python main.py with ...`` line that trains it again.
        stopped: whether Ctrl-C (or SIGTERM) stopped the sweep; the same call continues it.
    """

    study: object
    finished: int
    best_trial: int | None = None
    best_params: dict = field(default_factory=dict)
    best_valid_ppl: float | None = None
    test_ppl: float | None = None
    checkpoint: Path | None = None
    command: str | None = None
    stopped: bool = False


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(OPTUNA_MISSING) from None
    return optuna


def _json(value):
    """``value`` as JSON gives it back (tuples as lists): what a study's user attrs hold."""
    return json.loads(json.dumps(value))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_space(space, cfg: dict) -> dict:
    """The search space: each key a training key, a dict a numeric range (``low``, ``high``, ``log``), a list a
    choice; each bound and choice a value that key takes (checked with the other keys as ``cfg`` has them).

    Raises:
        UserError: one line naming the key and what is wrong.
    """
    example = 'sweep_space={"lr": {"low": 1, "high": 40, "log": True}, "model_type": ["LSTM", "GRU"]}'
    if not isinstance(space, dict) or not space:
        raise UserError(f"sweep_space={space!r} must name the keys to search and their ranges, e.g. {example}")
    known = set(defaults()) | {"seed"}
    parsed = {}
    for key, spec in space.items():
        if key not in known:
            raise UserError(f"sweep_space: {key!r} is not a training key{did_you_mean(str(key), known)}; "
                            "`python main.py print_config` lists them")  # fmt: skip
        if key in PER_TRIAL or key in REFUSED:
            raise UserError(f"sweep_space: {key} cannot be searched (each trial has its own save and save_last; "
                            "resume and onnx_export are no training choices)")  # fmt: skip
        parsed[key] = _parse_spec(key, spec)
        values = [parsed[key].low, parsed[key].high] if isinstance(parsed[key], Range) else parsed[key].choices
        for value in values:
            try:
                validate_training_config({**cfg, key: value})
            except UserError as problem:
                raise UserError(f"sweep_space: {key} would take {value!r}, which training refuses: {problem}") from None
    return parsed


def _parse_spec(key: str, spec):
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UserError(f"sweep_space: {key}=[] offers no choice; give the values to choose among")
        for value in spec:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise UserError(f"sweep_space: {key}'s choice {value!r} must be a number, string, True, False or None")
        if len(set(map(repr, spec))) < len(spec):
            raise UserError(f"sweep_space: {key}={list(spec)!r} names a choice twice")
        return Choice(tuple(spec))
    if not isinstance(spec, dict):
        raise UserError(f"sweep_space: {key}={spec!r} must be a range such as {{'low': 1, 'high': 40}} (with "
                        "'log': True for a log scale) or a list of choices")  # fmt: skip
    unknown = [name for name in spec if name not in ("low", "high", "log")]
    if unknown or "low" not in spec or "high" not in spec:
        said = f"has {', '.join(map(repr, unknown))}, which" if unknown else "lacks low or high, which"
        raise UserError(f"sweep_space: {key}={spec!r} {said} a range does not take; give low, high and perhaps log")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for name, bound in (("low", low), ("high", high)):
        if not _number(bound) or bound != bound or bound in (float("inf"), float("-inf")):
            raise UserError(f"sweep_space: {key}'s {name}={bound!r} must be a finite number")
    if not isinstance(log, bool):
        raise UserError(f"sweep_space: {key}'s log={log!r} must be True or False")
    if low == high:
        raise UserError(f"sweep_space: {key}'s range {low!r} to {high!r} is empty; give low < high, or fix {key}")
    if low > high:
        raise UserError(f"sweep_space: {key}'s range is inverted (low={low!r} > high={high!r}); give low < high")
    if log and low <= 0:
        raise UserError(f"sweep_space: {key}'s log range needs low > 0, not {low!r}")
    return Range(low, high, log)


def storage_url(storage) -> tuple[str, Path | None]:
    """The database URL of ``sweep_storage`` (a SQLite file path, or a URL), and the SQLite file it names, if any."""
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str) or not storage.strip():
        raise UserError(f"sweep_storage={storage!r} must be a SQLite file (e.g. sweep.db) or a database URL "
                        "(sqlite:///sweep.db, postgresql://user@host/db)")  # fmt: skip
    if "://" not in storage:
        file = Path(storage).expanduser()
        return f"sqlite:///{file.resolve()}", file
    if storage.startswith("sqlite:///") and storage[len("sqlite:///") :] not in ("", ":memory:"):
        return storage, Path(storage[len("sqlite:///") :]).expanduser()
    return storage, None


def _check_storage(storage) -> str:
    """``sweep_storage`` checked before any work: a SQLite file that can be written (not a folder, its folder
    writable, an SQLite database if it exists), or a database that can be reached. Returns its URL."""
    url, file = storage_url(storage)
    if file is not None:
        if file.is_dir():
            raise UserError(f"sweep_storage={storage!r} is a folder; give a file in it, such as {file / 'sweep.db'}")
        check_output("sweep_storage", str(file), example="sweep.db", text=False)  # its folder made and writable
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise UserError(f"cannot write sweep_storage={storage!r}: permission denied")
    from wordlm.tracking.runs import open_database

    open_database(url, label="sweep_storage", create=True).dispose()
    return url


def plan_sweep(
    cfg: dict, given=frozenset(), *, named=None, sweep_space, sweep_trials=DEFAULTS["sweep_trials"],
    sweep_storage=DEFAULTS["sweep_storage"], sweep_name=DEFAULTS["sweep_name"], sweep_pruner=DEFAULTS["sweep_pruner"],
) -> SweepPlan:  # fmt: skip
    """Check a sweep once, before any work: its space, trial count, storage and name; the training keys its trials
    share (as ``plan_run`` checks a run); and, when the study exists, that it searched this space with these keys.

    Args:
        cfg: every training key (``make_config``, or Sacred's config): what each trial trains with, the searched
            keys aside.
        given: the keys the user gave, a preset's included.
        named: the keys the user gave by name, which may not be searched too (default: ``given``); a preset's
            keys may.

    Raises:
        UserError: one line naming what is wrong; no study is made or changed, and no trial runs.
    """
    _optuna()
    check_positive_int("sweep_trials", sweep_trials)
    if not isinstance(sweep_name, str) or not sweep_name.strip():
        raise UserError(f"sweep_name={sweep_name!r} must be a non-empty name for the study")
    if not (sweep_pruner in PRUNERS or _is_pruner(sweep_pruner)):
        raise UserError(f"sweep_pruner={sweep_pruner!r} must be 'median', 'hyperband' or None")
    for key, why in REFUSED.items():
        if cfg.get(key) is not None:
            raise UserError(f"{key}={cfg[key]!r} is not for a sweep: {why}")
    if launched_size() > 1:
        raise UserError("a sweep runs as one process a trial: start several sweep commands on one sweep_storage "
                        "instead of torchrun (docs/SWEEPS.md)")  # fmt: skip
    space = parse_space(sweep_space, cfg)
    both = [key for key in space if key in (given if named is None else named)]
    if both:
        raise UserError(f"{both[0]} is both searched (sweep_space) and given ({both[0]}={cfg[both[0]]!r}); "
                        "drop one")  # fmt: skip
    first = {**cfg, **{key: trial_path(cfg[key], 0) for key in PER_TRIAL}}
    plan_run(first, set(given))  # the trials' shared keys, data and outputs, as a training run checks them
    url = _check_storage(sweep_storage)
    plan = SweepPlan(_json(cfg), frozenset(given), space, sweep_trials, _shown(sweep_storage), url, sweep_name,
                     sweep_pruner)  # fmt: skip
    study = _existing_study(plan)
    if study is not None:
        _check_same_study(plan, study)
    return plan


def _shown(storage) -> str:
    """``sweep_storage`` as lines and checkpoints show it: a URL without its password."""
    storage = os.fspath(storage)
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def _is_pruner(value) -> bool:
    try:
        return isinstance(value, _optuna().pruners.BasePruner)
    except UserError:
        return False


def trial_path(path: str, number: int) -> str:
    """A trial's own file: ``model.pt`` -> ``model.trial3.pt``, ``model.last.pt`` -> ``model.trial3.last.pt``."""
    for suffix in (".last.pt", ".pt"):
        if path.endswith(suffix) and len(path) > len(suffix):
            return f"{path[: -len(suffix)]}.trial{number}{suffix}"
    return f"{path}.trial{number}"


def _storage(plan: SweepPlan):
    """Optuna's storage of the study, with heartbeats: a trial whose process died (killed, power cut) is marked
    failed by the next sweep process after 2 minutes of silence, so that it neither counts nor blocks."""
    optuna = _optuna()
    engine = {"connect_args": {"timeout": 60}} if plan.url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(STORAGE_TRIES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(plan.url, engine_kwargs=engine, heartbeat_interval=30,
                                                  grace_period=120)  # fmt: skip
            except Exception as problem:  # noqa: BLE001 - an older schema, a locked file, ...: each one line
                # Two processes that make the tables of a new database at once collide: PostgreSQL says "duplicate
                # key" (a type made twice) or 'relation "studies" already exists' (a table): again
                said = str(problem) + str(problem.__cause__)
                if attempt + 1 < STORAGE_TRIES and ("duplicate key" in said or "already exists" in said):
                    time.sleep(_JITTER.uniform(0.2, 1.0) * (attempt + 1))
                    continue
                reason = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
                raise UserError(f"cannot use sweep_storage={plan.storage!r} as Optuna's storage: {reason}") from None


def _existing_study(plan: SweepPlan):
    storage = _storage(plan)
    try:
        study_id = storage.get_study_id_from_name(plan.name)
    except KeyError:
        return None
    return storage, study_id


def _check_same_study(plan: SweepPlan, found) -> None:
    """A study continued by this sweep must have searched the same space with the same fixed keys."""
    storage, study_id = found
    attrs = storage.get_study_user_attrs(study_id)
    named = f"the study {plan.name!r} in {plan.storage}"
    other = "; give another sweep_name (or sweep_storage) for a new study"
    if SPACE_ATTR not in attrs:
        if storage.get_all_trials(study_id, deepcopy=False):
            raise UserError(f"{named} was not made by wordlm's sweep (it records no search space){other}")
        return  # made by another sweep process a moment ago, which records its keys next
    if attrs[SPACE_ATTR] != plan.space_data:
        raise UserError(f"{named} searches {_space_text(attrs[SPACE_ATTR])}, not this sweep_space "
                        f"{_space_text(plan.space_data)}{other}, or this study's own sweep_space")  # fmt: skip
    fixed, ours = attrs.get(FIXED_ATTR) or {}, plan.fixed
    differ = [key for key in dict.fromkeys([*ours, *fixed]) if fixed.get(key, "absent") != ours.get(key, "absent")]
    if differ:
        shown = ", ".join(f"{key}={fixed.get(key)!r}, not {ours.get(key)!r}" for key in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise UserError(f"{named} trains its trials with {shown}{more}{other}, or the study's own keys")


def _space_text(space: dict) -> str:
    return json.dumps(space, separators=(", ", ": "))


class TrialRecorder(Recorder):
    """A trial's recorder: wraps the run's own (``inner``: in memory, or the command line's Sacred one), reports
    each validation perplexity to the Optuna trial, and, when its pruner says so, ends training after that epoch
    (``end_early``), which the run's info then tells."""

    def __init__(self, inner: Recorder, trial, sweep: str) -> None:  # noqa: D107 - shares inner's history and info
        self.inner, self.trial = inner, trial
        self.history, self.info = inner.history, inner.info
        self.run_id, self.observed = inner.run_id, inner.observed
        self.pruned_at: tuple[int, float] | None = None  # (epoch, valid ppl) where the pruner stopped the trial
        self._verdict: tuple[int, float] | None = None
        inner.update_info(sweep=sweep, trial=trial.number)

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        self.inner.log_scalar(name, value, step)
        if name == "valid.ppl" and step is not None:
            self.trial.report(value, step)
            if self.trial.should_prune():
                self._verdict = (step, value)

    def update_info(self, **info) -> None:
        self.inner.update_info(**info)

    def add_artifact(self, path: str, name: str) -> None:
        self.inner.add_artifact(path, name)

    def end_early(self) -> str | None:
        if self._verdict is None:
            return None
        epoch, ppl = self.pruned_at = self._verdict
        reason = f"pruned by Optuna (valid ppl {ppl:.2f} at epoch {epoch})"
        self.inner.update_info(pruned=True, pruned_at_epoch=epoch)
        return reason


TrialRunner = Callable[[dict, set, Callable[[Recorder], Recorder], dict], None]


def train_trial(cfg: dict, given: set, wrap: Callable[[Recorder], Recorder], searched: dict) -> None:
    """Train one trial in this process, seeded as the command line seeds a run: ``run_sweep``'s own runner."""
    import numpy as np
    import torch

    from wordlm.run import train_run

    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    train_run(plan_run(cfg, given), recorder=wrap(Recorder()))


class _Surplus(Exception):
    """The study had its trials by the time this one was asked for (another process took the last one)."""


_COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")  # trials that are, or will be, finished


def _counted(study, before: int | None = None) -> int:
    states = tuple(getattr(_optuna().trial.TrialState, state) for state in _COUNTED)
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(1 for trial in trials if before is None or trial.number < before)


def _finished(study) -> list:
    state = _optuna().trial.TrialState
    return study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))


def _diverged(problem: BaseException) -> bool:
    """Whether training diverged (``Trainer.recover``'s error, raised while ``Diverged`` was handled)."""
    from wordlm.training.trainer import Diverged

    seen = set()
    while problem is not None and id(problem) not in seen:
        if isinstance(problem, Diverged):
            return True
        seen.add(id(problem))
        problem = problem.__cause__ or problem.__context__
    return False


def _keys_text(params: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value!r}"
                     for key, value in params.items())  # fmt: skip


def _mark_checkpoints(cfg: dict, mark: dict) -> None:
    """Write the trial's sweep, number and end into the meta of its checkpoints (``meta["sweep"]``)."""
    from wordlm.training.checkpoint import load_checkpoint, write_payload

    for key in PER_TRIAL:
        path = cfg[key]
        if not os.path.isfile(path):
            continue
        try:
            payload = load_checkpoint(path)
            payload["meta"] = {**(payload.get("meta") or {}), "sweep": mark}
            write_payload(path, payload)
        except (UserError, OSError) as problem:
            warn(f"could not note the trial in {path}: {problem}")


def run_sweep(plan: SweepPlan, run_trial: TrialRunner = train_trial) -> SweepResult:
    """Run trials of the study until it has ``plan.trials`` of them (completed, pruned, or running elsewhere).

    Each trial trains with the plan's keys and the searched keys Optuna samples, saving to its own
    ``<save stem>.trial<N>.pt``; its validation perplexities go to Optuna, whose pruner may end it after any
    epoch (the trial is then tested and recorded, and PRUNED in the study). A trial whose training diverges is
    pruned too. Ctrl-C ends the trial under way as it ends training (tested, recorded), marks it failed in the
    study (so that a later run of the sweep replaces it) and stops the sweep. Another error fails the trial and
    stops the sweep with that error.

    Args:
        plan: the sweep checked by ``plan_sweep``.
        run_trial: trains one trial: ``(config, given keys, wrap, searched keys)``, where ``wrap`` turns the run's
            ``Recorder`` into the trial's; raises ``UserError`` for a failed run.

    Raises:
        UserError: a trial failed (its error, named), or the storage failed.
        KeyboardInterrupt: a second Ctrl-C, or one outside training; the trial under way is failed in the study.
    """
    optuna = _optuna()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial's end is said here, in wordlm's words
    try:
        return _run_sweep(plan, run_trial, optuna)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _pruner(optuna, choice):
    if choice == "median":
        return optuna.pruners.MedianPruner()
    if choice == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return choice if choice is not None else optuna.pruners.NopPruner()


def _run_sweep(plan: SweepPlan, run_trial: TrialRunner, optuna) -> SweepResult:
    storage = _storage(plan)
    study = optuna.create_study(storage=storage, study_name=plan.name, direction="minimize", load_if_exists=True,
                                pruner=_pruner(optuna, plan.pruner))  # fmt: skip
    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, plan.space_data)
        study.set_user_attr(FIXED_ATTR, plan.fixed)
    _check_same_study(plan, (storage, storage.get_study_id_from_name(plan.name)))  # (two made it at once)
    stop = {"interrupted": False, "trial": None}

    def objective(trial):
        stop["trial"] = trial.number
        if _counted(study, before=trial.number) >= plan.trials:
            trial.set_user_attr("surplus", f"the study had its {plan.trials} trials when this one was asked for")
            raise _Surplus
        params = {key: spec.suggest(trial, key) for key, spec in plan.space.items()}
        cfg = {**plan.config, **params, **{key: trial_path(plan.config[key], trial.number) for key in PER_TRIAL}}
        trial.set_user_attr("save", cfg["save"])
        _say(f"| sweep {plan.name!r}: trial {trial.number} ({_keys_text(params)}), saved to {cfg['save']} |")
        made: list[TrialRecorder] = []

        def wrap(inner: Recorder) -> Recorder:
            made.append(TrialRecorder(inner, trial, plan.name))
            return made[-1]

        def end(how: str, **attrs) -> None:
            for key, value in {"end": how, **attrs}.items():
                trial.set_user_attr(key, value)
            info = made[-1].info if made else {}
            for key in ("run_id", "test_ppl", "best_valid_ppl", "best_epoch"):
                value = made[-1].run_id if key == "run_id" and made else info.get(key)
                if value is not None:
                    trial.set_user_attr(key, value)
            _mark_checkpoints(cfg, {"study": plan.name, "storage": plan.storage, "trial": trial.number,
                                    "end": how, "params": params})  # fmt: skip

        try:
            run_trial(cfg, set(plan.given) | set(params) | set(PER_TRIAL), wrap, params)
        except KeyboardInterrupt:
            end("interrupted")
            _say(f"| trial {trial.number} interrupted before it was tested; it is failed in the study |")
            raise
        except Exception as problem:
            if _diverged(problem):
                end("diverged", error=str(problem))
                _say(f"| trial {trial.number} diverged: pruned, and the sweep goes on |")
                raise optuna.TrialPruned(str(problem)) from None
            end("failed", error=str(problem))
            raise
        recorder = made[-1]
        info = recorder.info
        if info.get("interrupted"):
            end("interrupted")
            stop["interrupted"] = True
            _say(f"| trial {trial.number} stopped ({info.get('stop_signal') or 'interrupted'}) and recorded; it is "
                 "failed in the study, and the sweep stops: the same command goes on with a new trial |")  # fmt: skip
            raise KeyboardInterrupt
        if recorder.pruned_at is not None:
            epoch, ppl = recorder.pruned_at
            end("pruned", pruned_at_epoch=epoch)
            _say(f"| trial {trial.number} pruned after epoch {epoch} (valid ppl {ppl:.2f}); test ppl "
                 f"{info['test_ppl']:.2f} |")  # fmt: skip
            raise optuna.TrialPruned(f"valid ppl {ppl:.2f} at epoch {epoch}")
        if info.get("best_valid_ppl") is None:
            end("failed", error="no epoch was validated")
            raise UserError(f"trial {trial.number} validated no epoch: it has no perplexity to offer")
        end("complete")
        _say(f"| trial {trial.number} complete: best valid ppl {info['best_valid_ppl']:.2f}, test ppl "
             f"{info['test_ppl']:.2f} |")  # fmt: skip
        return info["best_valid_ppl"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    while _counted(study) < plan.trials and not stop["interrupted"]:
        try:
            study.optimize(objective, n_trials=1, gc_after_trial=False)
        except _Surplus:
            break
        except KeyboardInterrupt:
            if not stop["interrupted"]:
                raise
        except UserError as problem:
            raise UserError(f"trial {stop['trial']} failed, and the sweep stopped: {problem}") from None
    return _summary(plan, study, stopped=stop["interrupted"])


def _say(line: str) -> None:
    print(line, flush=True)


def _summary(plan: SweepPlan, study, stopped: bool) -> SweepResult:
    finished = _finished(study)
    state = _optuna().trial.TrialState
    complete = [trial for trial in finished if trial.state == state.COMPLETE]
    result = SweepResult(study, len(finished), stopped=stopped)
    running = _counted(study) - len(finished)
    elsewhere = f", {running} running elsewhere" if running else ""
    _say("=" * 89)
    _say(f"| sweep {plan.name!r} in {plan.storage}: {len(finished)} of {plan.trials} trials finished "
         f"({len(complete)} complete, {len(finished) - len(complete)} pruned{elsewhere})"
         + ("; stopped by Ctrl-C" if stopped else ""))  # fmt: skip
    if complete:
        best = study.best_trial
        attrs = best.user_attrs
        result.best_trial, result.best_params, result.best_valid_ppl = best.number, dict(best.params), best.value
        result.test_ppl = attrs.get("test_ppl")
        result.checkpoint = Path(attrs["save"]) if attrs.get("save") else None
        result.command = retrain_command(plan.config, best.params, _best_path(plan.config["save"]))
        test = f", test ppl {result.test_ppl:.2f}" if result.test_ppl is not None else ""
        epoch = f" (epoch {attrs['best_epoch']})" if attrs.get("best_epoch") else ""
        _say(f"| best: trial {best.number}: {_keys_text(best.params)}")
        _say(f"| valid ppl {best.value:.2f}{epoch}{test}; checkpoint {result.checkpoint}")
        _say(f"| retrain: {result.command}")
    else:
        _say("| no trial has completed yet: no best trial")
    dashboard = plan.storage if "://" in plan.storage else f"sqlite:///{plan.storage}"
    _say(f"| see it: optuna-dashboard {shlex.quote(dashboard)}")
    _say("=" * 89)
    return result


def _best_path(save: str) -> str:
    """Where the retraining line saves: ``model.pt`` -> ``model.best.pt``."""
    return f"{save[:-3]}.best.pt" if save.endswith(".pt") and len(save) > 3 else f"{save}.best"


def _arg(key: str, value) -> str:
    """``key=value`` as Sacred reads it back (a string that would read as another value is quoted), for a shell."""
    text = repr(value)
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            text = value
    return shlex.quote(f"{key}={text}")


def retrain_command(cfg: dict, params: dict, save: str) -> str:
    """The ``python main.py with ...`` line that trains ``cfg`` with ``params`` again, into ``save``: the preset (or
    none) that leaves the fewest keys to give, then the keys that differ from it, the searched keys last."""
    keys = {**cfg, **params}

    def differing(preset: str | None) -> list[str]:
        base = defaults(**(PRESETS[preset] if preset else {}))
        return [key for key in base if key not in PER_TRIAL and key not in params and _differs(keys[key], base[key])]

    preset = min([None, *PRESETS], key=lambda name: len(differing(name)) + (name is not None))
    words = ["python", "main.py", "with", *([preset] if preset else []), *(_arg(k, keys[k]) for k in differing(preset))]
    return " ".join([*words, *(_arg(key, value) for key, value in params.items()), _arg("save", save)])


def _differs(value, other) -> bool:
    return value != other or type(value) is not type(other)


def sweep(preset: str | None = None, **keys) -> SweepResult:
    """Search training keys over ranges for the lowest validation perplexity: ``main.py sweep with ...`` without
    recording Sacred runs.

    Each trial is a full training run with the other keys as given (``wordlm.train``'s keys and defaults, a
    preset by name); the study lives in ``sweep_storage``, so the same call continues it, and sweeps on several
    machines share one database URL. Prints each trial's end and, at the end, the best trial.

    Args:
        preset: a name of ``wordlm.PRESETS``.
        **keys: training keys, and the sweep's: ``sweep_space`` (required; a dict of keys to search: a range
            ``{"low": 1, "high": 40, "log": True}``, integers when both bounds are, or a list of choices),
            ``sweep_trials`` (20: trials the study should have, completed or pruned), ``sweep_storage``
            ("sweep.db": a SQLite file, or a database URL), ``sweep_name`` ("wordlm": the study's name),
            ``sweep_pruner`` ("median", "hyperband", None, or an Optuna pruner).

    Raises:
        TypeError: a key that is neither a training key nor a sweep key.
        UserError: bad input (before any work), or a trial's failure.
    """
    options = {key: keys.pop(key) for key in list(keys) if key in DEFAULTS}
    if "sweep_space" not in options:
        raise TypeError("sweep() needs sweep_space: the keys to search and their ranges")
    cfg, given = make_config(preset, **keys)
    check_seed(cfg["seed"])
    return run_sweep(plan_sweep(cfg, given, named=set(keys), **options))
