"""wordlm: train recurrent word-level language models (Elman RNN, GRU, LSTM).

Run `python main.py with key=value ...` to train, `python main.py print_config` to see every key
with its default and meaning, and `python main.py print_named_configs` for the presets.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pprint
import random
import re
import sys
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import NoReturn

from sacred import Experiment
from sacred.observers import FileStorageObserver, SqlObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

# Modules only used through others: named here (and, among the imports below, each ``noqa: F401`` module of a
# sub-package) so that Sacred records them among the run's sources.
from wordlm import (  # noqa: F401
    __version__,
    api,
    files,
    system,
    version,
)  # fmt: skip
from wordlm import models as _model_module  # noqa: F401
from wordlm.api import load
from wordlm.checks import (
    Output,
    check_checkpoint_path,
    check_output,
    check_path,
    check_readable_path,
    check_seed,
    path_problem,
    write_output,
)
from wordlm.config import PRESETS, defaults, did_you_mean, training_config
from wordlm.data import cache, download  # noqa: F401
from wordlm.data import corpus as data  # noqa: F401
from wordlm.data.corpus import SPLITS, UNK
from wordlm.data.datasets import resolve_dataset
from wordlm.errors import UserError
from wordlm.evaluation import check_evaluation_options, evaluate_text, perplexity
from wordlm.export import check_export_available, export_onnx
from wordlm.generation import (
    check_sampling_options,
    encode_prompt,
    format_samples,
)
from wordlm.models import decoder, fused, hidden, regularize, rnn, transformer, word_model  # noqa: F401
from wordlm.run import Recorder, RunFinished, plan_run, train_run
from wordlm.tracking import sweeps as _sweeps
from wordlm.tracking import tensorboard_log  # noqa: F401
from wordlm.tracking.plots import has_display, plot_validation_curves
from wordlm.tracking.runs import (
    ALL,
    SQL_LACKS,
    TRAIN,
    format_runs_table,
    open_database,
    read_runs_db,
    read_runs_dir,
    select_runs,
)
from wordlm.training import checkpoint as _checkpoint_module  # noqa: F401 - (checkpoint and model are config keys)
from wordlm.training import signals  # noqa: F401
from wordlm.training import trainer as training  # noqa: F401
from wordlm.training.distributed import launched_rank

__all__ = [
    "ex", "error", "commands_config", "train", "runs_config", "runs", "plot", "generate", "evaluate", "export",
    "sweep_config", "sweep", "main"
]  # fmt: skip


def _git_repository(path: str) -> tuple[str, str, bool] | None:
    """``(url, commit, dirty)`` of the git repository holding ``path``, as Sacred records a repository; None outside
    one, or in one without a commit (where Sacred's own look crashes: sacred#915)."""
    try:
        import git

        repo = git.Repo(path, search_parent_directories=True)
        commit = repo.head.commit.hexsha
        try:
            url = repo.remote().url
        except ValueError:  # no remote named origin
            url = "git:/" + repo.working_dir
        return url, commit, repo.is_dirty()
    except Exception:
        return None


def _record_repository(experiment: Experiment, root: str) -> None:
    """Record the checkout's repository once, on the experiment's main source file.

    Sacred's ``save_git_info`` asks git for the repository of every source file (the package's ~40 files), three git
    commands each: 0.3 s of every start of a command on an idle machine, more on a busy one, and a run record
    listing the one repository once per file. All the files are in one checkout, so it is asked once here.
    """
    repository = _git_repository(root)
    sources = sorted(experiment.sources)
    if repository is None or not sources:
        return
    named = experiment.mainfile.filename if experiment.mainfile else None
    main = next((source for source in sources if source.filename == named), sources[0])
    main.repo, main.commit, main.is_dirty = repository


# What a terminal shows but a run's captured output (cout.txt) must not hold: ANSI escape sequences, and the
# progress bar of training.Reporter, which tqdm draws on stderr as '\r<desc>: <pct>%|<bar>| <n>/<total> [<times>]'
# padded with spaces, and clears as '\r' and spaces.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_BAR_DRAWN = re.compile(r"\r[^\r\n|]*\d+%\|[^|\r\n]*\|[^\r\n\[]*\[[^\]\r\n]*\] *")
_BAR_CLEARED = re.compile(r"\r +")


def _plain_output(text: str) -> str:
    """A run's captured output as the plain lines its commands printed: no progress bar, no escape sequences.

    Sacred's ``apply_backspaces_and_linefeeds`` alone is not enough: Sacred captures stdout and stderr through two
    ``tee`` processes appending to one file, so a line printed on stdout lands anywhere among the bar's redraws on
    stderr, often right after a drawn bar, and the record kept '36/1865 [00:08<06:30, 4.69batch/s]h]-----'. The
    bar's drawings and clearings are taken out wherever they landed; what is left is read as a terminal would.
    Sacred filters the whole output so far at each heartbeat: this gives plain text back unchanged.
    """
    text = _BAR_CLEARED.sub("", _BAR_DRAWN.sub("", _ANSI_ESCAPE.sub("", text)))
    return apply_backspaces_and_linefeeds(text)


# Run from a checkout (pyproject.toml beside the package), a run records its sources relative to the
# checkout, with its git commit. Installed, relative to the package folder instead: Sacred counts any
# imported module under its base_dir as a source, and site-packages would make torch and sacred sources.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_IN_CHECKOUT = os.path.isfile(os.path.join(os.path.dirname(_PACKAGE_DIR), "pyproject.toml"))
_PROJECT_ROOT = os.path.dirname(_PACKAGE_DIR) if _IN_CHECKOUT else _PACKAGE_DIR


class _Experiment(Experiment):
    """Sacred's experiment, told which keys the caller of each run gave, whatever their value.

    Sacred's list of modified keys leaves out a key given at its default value (``with bptt=35``), so a resumed
    run would take the checkpoint's value instead; resume honours or refuses every key given (``plan_run``).
    """

    given: frozenset[str] = frozenset()

    def run(self, command_name=None, config_updates=None, named_configs=(), *args, **kwargs):
        self.given = _given_keys(config_updates or {}, named_configs)
        return super().run(command_name, config_updates, named_configs, *args, **kwargs)


def _given_keys(config_updates: dict, named_configs) -> frozenset[str]:
    """The top-level keys of ``with key=value`` updates and of the named configs (presets or config files) given."""
    keys = {str(key).split(".")[0] for key in config_updates}
    for name in named_configs:
        if name in PRESETS:
            keys |= set(PRESETS[name])
        elif os.path.isfile(name):  # a config file: Sacred reads it again, and says what is wrong with it
            try:
                from sacred.config import load_config_file

                keys |= {str(key).split(".")[0] for key in load_config_file(name)}
            except Exception:  # noqa: BLE001, S110 - Sacred's own reading of it reports the problem
                pass
    return frozenset(keys)


ex = _Experiment("wordlm", base_dir=_PROJECT_ROOT, save_git_info=False)
if _IN_CHECKOUT:
    _record_repository(ex, _PROJECT_ROOT)
ex.captured_out_filter = _plain_output  # keep the progress bar and its redraws out of cout.txt
_INTERACTIVE = sys.stdout.isatty() and sys.stderr.isatty()  # read before Sacred captures the streams


class error(SacredError):  # noqa: N801 - the name is what users see: "error: <message>"
    """A user error that Sacred prints as one line, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_traceback=False)


error.__module__ = "builtins"


ex.config(training_config)  # the training keys, with their docs (wordlm/config.py)


@ex.config
def commands_config(save):
    # -- generation and scoring: `python generate.py`, `python main.py evaluate`, `python main.py export`
    checkpoint = save  # checkpoint that generate, evaluate and export read (follows save unless set)
    words = 1000  # tokens to generate per sample (an <eos>, i.e. a line break, counts as one)
    temperature = 1.0  # sampling temperature > 0: below 1 more likely words, above 1 more surprising ones
    top_k = 0  # sample among the k most likely words only (0 = all words)
    top_p = 1.0  # sample among the most likely words whose probabilities add up to top_p, in (0, 1] (1 = all)
    prompt = ""  # text that primes the hidden state before sampling; unknown words become <unk>
    samples = 1  # texts to generate at once, side by side in one batch
    stop_at_eos = False  # end each sample at its first <eos> (the end of its first line)
    outf = "generated.txt"  # file that generate writes the text to ('-' = stdout)
    split = "test"  # split of dataset that evaluate scores: train, valid or test
    text = None  # plain text file that evaluate scores instead of dataset's split
    line_scores = None  # file where evaluate also writes each line's log-probability as JSON lines
    cache_window = 0  # evaluate: continuous cache pointer over this many past words (0 = off; AWD WT2: 3785)
    cache_theta = 0.662  # evaluate: cache pointer's flatness θ (scale of the state dot products)
    cache_lambda = 0.1279  # evaluate: weight λ of the cache in the mixture with the model
    dynamic_lr = 0.0  # evaluate: dynamic evaluation's SGD step on each scored bptt segment (0 = off)
    dynamic_decay = 0.0  # evaluate: dynamic evaluation's pull back toward the trained weights


for _name, _preset in PRESETS.items():  # `print_named_configs` lists them
    ex.add_named_config(_name, _preset)


def _known_keys() -> set[str]:
    values = {}
    for scope in ex.configurations:  # each scope sees the keys of those before it, as Sacred runs them
        values.update(scope(preset=values))
    return set(values) | {"seed"}


def _leaves(key: str, value) -> list[str]:
    """``key`` as typed: a dotted update (``with a.b=1``) reaches Sacred as ``{"a": {"b": 1}}``."""
    if isinstance(value, dict) and value:
        return [leaf for inner, item in value.items() for leaf in _leaves(f"{key}.{inner}", item)]
    return [f"{key}={value!r}"]


@ex.config_hook
def _refuse_unknown_keys(config, command_name, logger):
    """A key no config defines is one line naming it and the nearest keys, not Sacred's ConfigAddedError."""
    known = _known_keys()
    unknown = [key for key in config if key not in known]
    if unknown:
        said = [leaf + did_you_mean(key, known) for key in unknown for leaf in _leaves(key, config[key])]
        raise error(
            f"{' and '.join(said)} {'is not a config key' if len(said) == 1 else 'are not config keys'}; "
            "`python main.py print_config` lists every key"
        )
    return {}


@ex.config_hook
def _check_seed(config, command_name, logger):
    """Sacred seeds random, numpy and torch before any command runs: a bad seed is one line, not its assert."""
    try:
        check_seed(config.get("seed"))
    except UserError as problem:
        raise error(str(problem)) from None
    return {}


_TRAINING_KEYS = frozenset(defaults()) | {"seed"}
_PLANNED: dict = {}  # the plan of the training run Sacred is about to start, made by its config hook


@ex.config_hook
def _plan_training_run(config, command_name, logger):
    """A training run is checked (``plan_run``) before Sacred starts it and its observers: a refused value is one
    line and leaves no FAILED run record behind. A resumed run's config, merged with its checkpoint's, becomes the
    run's config, so that its record says what trained."""
    if command_name != ex.default_command:
        return {}
    try:
        plan = plan_run(_plain(config), ex.given)
    except RunFinished as finished:  # resume='auto' of a finished run: said, and nothing to do (a requeued job)
        print(finished, flush=True)
        raise SystemExit(0) from None
    except UserError as problem:
        raise error(str(problem)) from None
    _PLANNED["plan"] = plan
    updates = {key: value for key, value in plan.config.items() if key in _TRAINING_KEYS and config.get(key) != value}
    if "save" in updates and "checkpoint" not in ex.given:  # the commands' checkpoint follows save unless given
        updates["checkpoint"] = updates["save"]
    return updates


class _SacredRecorder(Recorder):
    """A training run's figures and files, handed to Sacred's run (and so to its observers) as well."""

    def __init__(self, run) -> None:
        super().__init__()
        self.run, self.run_id, self.observed = run, run._id, bool(run.observers)

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        super().log_scalar(name, value, step)
        self.run.log_scalar(name, value, step)

    def update_info(self, **info) -> None:
        super().update_info(**info)
        self.run.info.update(info)

    def add_artifact(self, path: str, name: str) -> None:
        self.run.add_artifact(path, name=name)


@ex.main
def train(_run, _log, _config):
    """Train a language model, keep the best one by validation loss, and report its test perplexity."""
    try:
        plan = _PLANNED.pop("plan", None) or plan_run(_plain(_config), ex.given)  # (the hook's, as a rule)
        recorder = _SacredRecorder(_run)
        if "wrap" in _TRIAL:  # a trial of `sweep`: its validation figures go to Optuna too
            recorder = _TRIAL["wrap"](recorder)
        return train_run(plan, recorder=recorder, log=_log, interactive=_INTERACTIVE).test_ppl
    except UserError as problem:
        raise error(str(problem)) from None


def _plain(value):
    """Sacred's read-only config containers as plain dicts and lists: checkpoints hold only plain data."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# -- reading the run records: `python main.py runs` and `python main.py plot`
@ex.config
def runs_config():
    runs_dir = None  # folder of run records to read (None: where runs are recorded, runs/ or $WORDLM_RUNS_DIR)
    runs_db = None  # instead, a database of Sacred's SQL observer (-s URL), e.g. sqlite:///runs.db
    runs_status = None  # list only runs with these statuses, e.g. completed or interrupted,killed (None: all)
    runs_sort = "id"  # sort the table by this column (a leading '-' sorts descending), e.g. -test_ppl
    runs_command = "train"  # list the runs of this command, with its own figures: generate, evaluate, export; or all
    run_ids = []  # runs whose validation curves `plot` draws (empty: every run with one)
    plot_path = "validation_curves.png"  # where `plot` writes its PNG


_READER_KEYS = tuple(runs_config())  # never among the config keys that tell runs apart


def _default_runs_dir() -> str:
    return os.environ.get("WORDLM_RUNS_DIR", "runs")


def _read_records(runs_dir, runs_db):
    if runs_db:
        return read_runs_db(runs_db)
    return read_runs_dir(runs_dir or _default_runs_dir())


def _terminal_columns() -> int | None:
    """The width of the terminal stdout is, or None. Asked of the terminal itself: ``shutil.get_terminal_size`` says
    80 when it cannot tell, and a stream that only claims to be a tty (a test runner's worker) is no terminal."""
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.stdout.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


_TERMINAL_COLUMNS = _terminal_columns()  # before Sacred's capture


def _table_width() -> int | None:
    """How wide the runs table may be: $COLUMNS, else the terminal's; None (no limit) when piped to a file."""
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else _TERMINAL_COLUMNS


def _recorded_command(runs_command) -> str:
    """``runs_command`` checked: a command whose runs are recorded (``train`` for the default command), or all."""
    recorded = [TRAIN if name == ex.default_command else name for name, f in ex.commands.items() if not f.unobserved]
    if runs_command not in (*recorded, ALL):
        raise UserError(f"runs_command={runs_command!r} is not a command whose runs are recorded; use one of "
                        f"{', '.join(recorded)} or {ALL}")  # fmt: skip
    return runs_command


def _keys_read_by(command: str) -> frozenset[str]:
    """The config keys a command reads, the only ones its table may show (none for every command's table)."""
    if command == ALL:
        return frozenset()
    if command == TRAIN:
        return _TRAINING_KEYS
    return frozenset(key for key in ex.commands[command].signature.arguments if not key.startswith("_"))


@ex.command(unobserved=True)
def runs(runs_dir, runs_db, runs_status, runs_sort, runs_command):
    """List the recorded training runs (runs_command: another command's): status, times, the training keys that
    differ, best validation and test perplexity."""
    try:
        command = _recorded_command(runs_command)
        records = select_runs(_read_records(runs_dir, runs_db), runs_status, command=command)
        table = format_runs_table(records, sort_by=runs_sort, keys=_keys_read_by(command), command=command,
                                  width=_table_width())  # fmt: skip
        print(table if records else f"no runs{'' if command == ALL else f' of {command}'}")
        if runs_db:
            print(SQL_LACKS)
    except UserError as problem:
        raise error(str(problem)) from None


@ex.command(unobserved=True)
def plot(runs_dir, runs_db, run_ids, plot_path):
    """Draw the validation curves of several runs on one figure, saved as a PNG (and shown on a display)."""
    try:
        if runs_db:
            raise UserError("Sacred's SQL observer stores no metrics: plot needs run folders (runs/ or -F DIR)")
        check_output("plot_path", plot_path, example="curves.png", text=False)
        chosen = select_runs(_read_records(runs_dir, None), run_ids=run_ids or None, command=None if run_ids else TRAIN)
        for record in chosen:
            if not record.has_validation_curve:
                print(f"run {record.run_id} has no validation curve ({'; '.join(record.notes) or record.status})")
        try:
            path = plot_validation_curves(chosen, plot_path, ignore_keys=_READER_KEYS, show=has_display())
        except ValueError:
            raise UserError("none of these runs finished an epoch: there is no validation curve to draw") from None
        except OSError as problem:
            raise UserError(f"cannot write plot_path={plot_path!r}: {path_problem(problem)}") from None
        drawn = ", ".join(r.run_id for r in chosen if r.has_validation_curve)
        print(f"validation curves of runs {drawn} written to {path}")
    except UserError as problem:
        raise error(str(problem)) from None


@ex.command
def generate(
    _log, checkpoint, words, temperature, top_k, top_p, prompt, samples, stop_at_eos, outf, seed, device,
):  # fmt: skip
    """Sample text from a checkpoint alone: `python generate.py with checkpoint=model.pt words=200`."""
    try:
        return _generate(**locals())
    except UserError as problem:
        raise error(str(problem)) from None


def _generate(_log, checkpoint, words, temperature, top_k, top_p, prompt, samples, stop_at_eos, outf, seed, device):
    check_sampling_options(
        words=words, temperature=temperature, top_k=top_k, top_p=top_p, samples=samples, stop_at_eos=stop_at_eos
    )
    prompt = "" if prompt is None else str(prompt)
    check_checkpoint_path(checkpoint)
    reads = ((f"checkpoint={checkpoint!r}", checkpoint),)
    target = Output("outf", "-", "stdout") if outf == "-" else check_output("outf", outf, inputs=reads)
    lm = load(checkpoint, device)
    _, unknown = encode_prompt(lm.vocab, prompt)
    if unknown:
        _log.warning(
            "prompt words not in the checkpoint's vocabulary, %s: %s",
            f"read as {UNK}" if UNK in lm.vocab else f"left out (it has no {UNK})", " ".join(unknown),
        )  # fmt: skip
    texts = lm.sample(words=words, prompt=prompt, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      samples=samples, stop_at_eos=stop_at_eos)  # fmt: skip
    write_output(target, format_samples(prompt, texts))
    if outf != "-":
        _log.info("wrote %d sample(s), %d words, to %s", samples, sum(map(len, texts)), outf)


@ex.command
def evaluate(
    _run, _log, checkpoint, dataset, split, text, line_scores, eval_batch_size, bptt, device, cache_window,
    cache_theta, cache_lambda, dynamic_lr, dynamic_decay,
):  # fmt: skip
    """Print a checkpoint's perplexity on a split of dataset (`split`) or on any text file (`text`)."""
    try:
        return _evaluate(**locals())
    except UserError as problem:
        raise error(str(problem)) from None


def _evaluate(
    _run, _log, checkpoint, dataset, split, text, line_scores, eval_batch_size, bptt, device, cache_window,
    cache_theta, cache_lambda, dynamic_lr, dynamic_decay,
):  # fmt: skip
    options = dict(eval_batch_size=eval_batch_size, bptt=bptt, cache_window=cache_window, cache_theta=cache_theta,
                   cache_lambda=cache_lambda, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay)  # fmt: skip
    check_evaluation_options(**options)  # before any work
    if text is None and split not in SPLITS:
        raise UserError(f"split={split!r} is not a split; use one of {', '.join(SPLITS)}")
    check_checkpoint_path(checkpoint)
    if text is not None:
        check_path("text", text, example="notes.txt")
        check_readable_path("text", text)
        path = Path(text)
    else:
        check_readable_path("dataset", dataset)
        path = resolve_dataset(dataset) / f"{split}.txt"
    scored = f"text={str(path)!r}" if text is not None else f"the {split} split {path}"
    reads = ((f"checkpoint={checkpoint!r}", checkpoint), (scored, path))
    scores_file = check_output("line_scores", line_scores, inputs=reads) if line_scores else None
    lm = load(checkpoint, device)
    ids, unknown = lm.tokenize(path)
    if unknown:
        _log.info("%d of %d tokens are not in the checkpoint's vocabulary and were read as <unk>", unknown, len(ids))
    loss, count, method = evaluate_text(lm.model, ids, **options)
    ppl = perplexity(loss)
    print(f"| evaluate {path} | tokens {count} | loss {loss:5.2f} | ppl {ppl:8.2f}{method}", flush=True)
    _run.info.update(scored=str(path), tokens=count, unknown=unknown, loss=loss, ppl=ppl)
    if scores_file:
        scores = lm.line_scores(ids, eval_batch_size)
        write_output(scores_file, "".join(json.dumps(record) + "\n" for record in scores))
        _log.info("wrote the log-probabilities of %d lines to %s", len(scores), line_scores)
    return ppl


@ex.command
def export(_log, checkpoint, onnx_export):
    """Write a checkpoint's model as ONNX: `python main.py export with checkpoint=model.pt onnx_export=model.onnx`."""
    try:
        check_checkpoint_path(checkpoint)
        check_export_available()
        target = str(onnx_export or Path(checkpoint).with_suffix(".onnx"))
        check_output("onnx_export", target, example="model.onnx", text=False,
                     inputs=((f"checkpoint={checkpoint!r}", checkpoint),))  # fmt: skip
        lm = load(checkpoint, "cpu")
        try:
            _log.info("wrote %s", export_onnx(lm.model, target, lm.vocab))
        except OSError as problem:
            raise UserError(f"cannot write onnx_export={target!r}: {path_problem(problem)}") from None
        return target
    except UserError as problem:
        raise error(str(problem)) from None


# -- Optuna sweeps: `python main.py sweep with sweep_space=... sweep_trials=20 sweep_storage=sweep.db` (docs/SWEEPS.md)
@ex.config
def sweep_config():
    sweep_space = None  # keys to search: a range {'low': 1, 'high': 40, 'log': True} (integers if both are) or a list
    sweep_trials = 20  # trials the study should have, completed or pruned; the same command adds those missing
    sweep_storage = "sweep.db"  # the study's SQLite file, or a database URL that sweep processes share
    sweep_name = "wordlm"  # the study's name in sweep_storage
    sweep_pruner = "median"  # what stops hopeless trials after an epoch: 'median', 'hyperband' or None


_SWEEP_KEYS = tuple(sweep_config())


class _SweepSpaceEntries(logging.Filter):
    """Sacred warns of each key inside a dict given to a key whose default has none ('Added new config entry:
    "sweep_space.lr.low"'): the ranges of sweep_space are new entries by design. (Its logger is the root logger.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('Added new config entry: "sweep_space.')


logging.getLogger().addFilter(_SweepSpaceEntries())
_TRIAL: dict = {}  # while `sweep` runs a trial: "wrap", which makes the run's recorder the trial's


@ex.command(unobserved=True)
def sweep(_run, _config, sweep_space, sweep_trials, sweep_storage, sweep_name, sweep_pruner):
    """Search training keys over ranges (sweep_space) for the lowest validation perplexity with Optuna; each trial
    trains with the other keys as given, and is a recorded training run.

    The study lives in sweep_storage: the same command continues it, and sweep processes on several machines share
    a database URL. Ctrl-C ends the trial under way as it ends training and stops the sweep. The end names the best
    trial, its checkpoint, and the `main.py with ...` line that trains it again.
    """
    options = {key: value for key, value in (_run.meta_info.get("options") or {}).items() if key.startswith("--")}
    config = _plain(_config)
    given = frozenset(ex.given) & _TRAINING_KEYS
    named = {str(key).split(".")[0] for key in _run.meta_info.get("config_updates") or {}} & _TRAINING_KEYS
    presets = list(_run.meta_info.get("named_configs") or [])

    def run_trial(cfg: dict, trial_given: set, wrap, searched: dict) -> None:
        """A trial is `main.py with PRESETS KEYS` as the sweep's command gave them, the searched keys and its own
        save added: its record says what was given, and Sacred makes the rest of the config as for the sweep."""
        updates = {key: cfg[key] for key in [*named, *searched, *_sweeps.PER_TRIAL]}
        _TRIAL["wrap"] = wrap
        try:
            ex.run(config_updates=updates, named_configs=presets, options=options)
        except error as problem:
            raise UserError(str(problem)) from problem  # (the chain tells a divergence)
        finally:
            _TRIAL.pop("wrap", None)

    try:
        plan = _sweeps.plan_sweep({key: config[key] for key in _TRAINING_KEYS}, given, named=named,
                                  **{key: config[key] for key in _SWEEP_KEYS})  # fmt: skip
        _sweeps.run_sweep(plan, run_trial)
    except UserError as problem:
        raise error(str(problem)) from None
    except KeyboardInterrupt:
        raise error("interrupted: the sweep stopped, and the trial under way is failed in the study; the same "
                    "command continues the sweep") from None  # fmt: skip


_OBSERVER_FLAGS = ("-F", "--file_storage", "-m", "--mongo_db", "-s", "--sql", "-t", "--tiny_db",
                   "-S", "--s3", "-G", "--gcs", "-u", "--unobserved")  # fmt: skip


def _log_levels(argv: list[str]) -> list[str]:
    """The values given to ``-l``/``--loglevel`` before ``with`` (after it come config updates)."""
    args = argv[1 : argv.index("with")] if "with" in argv else argv[1:]
    levels = []
    for i, arg in enumerate(args):
        if arg in ("-l", "--loglevel"):
            levels.append(args[i + 1] if i + 1 < len(args) else "")
        elif arg.startswith("--loglevel="):
            levels.append(arg.split("=", 1)[1])
        elif arg.startswith("-l") and not arg.startswith("--"):
            levels.append(arg[2:])
    return levels


def _program_name(path: str) -> str:
    """What usage lines call the program: ``main.py``, ``wordlm``, or ``python -m wordlm`` for ``__main__.py``."""
    name = os.path.basename(path) or "wordlm"
    return "python -m wordlm" if name == "__main__.py" else name


def _report_crash_to_torchrun(stop: SystemExit) -> None:
    """Write the exception behind Sacred's exit status 1 to torchrun's error file (``TORCHELASTIC_ERROR_FILE``).

    Sacred prints a crash's traceback and exits 1, so ``record`` sees only the exit; this gives torchrun's
    failure summary the traceback of the rank that crashed. User errors (one ``error:`` line) are left out.
    """
    crash = stop.__context__  # the exception Sacred was handling when it exited
    if stop.code != 1 or not isinstance(crash, Exception) or isinstance(crash, SacredError):
        return
    try:
        raise crash from None  # record_exception writes the traceback of the exception being handled
    except Exception as problem:
        problem.__traceback__ = problem.__traceback__.tb_next  # from where Sacred caught it, without this frame
        get_error_handler().record_exception(problem)


class _SqlObserver(SqlObserver):
    """Sacred's SQL observer (``-s URL``), safe for runs that start together.

    At its start a run creates the tables of a new database and takes the next run id; two runs doing so at
    once collide (SQLite: "table source already exists", or a run id already taken) and Sacred loses the run.
    Here a collision is rolled back and the start tried again, a little later.
    """

    TRIES = 10

    def _add_event(self, *args, **kwargs):
        import sqlalchemy as sa

        for attempt in range(self.TRIES):
            try:
                return super()._add_event(*args, **kwargs)
            except sa.exc.DBAPIError as problem:
                self.session.rollback()
                if attempt + 1 == self.TRIES:
                    reason = str(problem.orig or problem).strip().splitlines()[0]
                    shown = self.engine.url.render_as_string(hide_password=True)
                    raise error(f"cannot record the run in {shown}: {reason}") from None
                time.sleep(_JITTER.uniform(0.05, 0.2) * (attempt + 1))

    # A run whose start could not be recorded has no row to mark: Sacred's observer then failed with an
    # AttributeError on None, a second traceback under the run's one-line error.
    def failed_event(self, *args, **kwargs):
        if self.run is not None:
            super().failed_event(*args, **kwargs)

    def interrupted_event(self, *args, **kwargs):
        if self.run is not None:
            super().interrupted_event(*args, **kwargs)


_JITTER = random.Random()  # its own stream: Sacred seeds the global one


def _take_sql_urls(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``-s URL`` / ``--sql URL`` options, and those URLs (main opens them itself)."""
    rest, urls, args = argv[:1], [], iter(argv[1:])
    for arg in args:
        if arg in ("-s", "--sql"):
            urls.append(next(args, ""))
        elif arg.startswith("--sql="):
            urls.append(arg.split("=", 1)[1])
        elif arg.startswith("-s") and len(arg) > 2:
            urls.append(arg[2:])
        else:
            rest.append(arg)
    return rest, urls


_CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".pickle")  # what Sacred reads as a config file after `with`


def _command_line(argv: list[str]) -> tuple[list[str], list[str], list[str], list[str], bool]:
    """``argv`` read as Sacred's docopt reads it: the words before ``with`` (the command), the options (long
    names), the options Sacred does not know, the updates after ``with``, and whether ``with`` was given.

    Options may stand anywhere, a long one shortened to a unique prefix, short ones joined (``-uq``); those that
    take a value take the next word unless it is joined (``-Fruns``, ``--name=x``)."""
    takes_value = {}
    for option in ex.all_cli_options:
        takes_value[option.short_flag] = takes_value[option.get_flag()] = not option.is_flag
    longs = sorted(flag for flag in takes_value if flag.startswith("--"))
    short_to_long = {option.short_flag: option.get_flag() for option in ex.all_cli_options}
    words, options, unknown, updates, given_with = [], [], [], [], False
    args = iter(argv[1:])
    for arg in args:
        if arg == "with" and not given_with:
            given_with = True
        elif arg.startswith("--") and len(arg) > 2:
            name, joined, _ = arg.partition("=")
            matches = [name] if name in longs else [flag for flag in longs if flag.startswith(name)]
            if len(matches) != 1:
                unknown.append(name)
                continue
            options.append(matches[0])
            if takes_value[matches[0]] and not joined:
                next(args, None)
        elif arg.startswith("-") and len(arg) > 1:
            for at, char in enumerate(arg[1:], start=2):
                flag = f"-{char}"
                if flag not in takes_value:
                    unknown.append(flag)
                    break
                options.append(short_to_long[flag])
                if takes_value[flag]:
                    if at == len(arg):
                        next(args, None)
                    break
        elif given_with:
            updates.append(arg)
        else:
            words.append(arg)
    return words, options, unknown, updates, given_with


def _exit_with_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _config_entries() -> dict[str, tuple[object, str]]:
    """Every config key with its default and its one-line doc (the comment in its config scope), as
    ``print_config`` shows them: each scope sees the keys of those before it, as Sacred runs them."""
    values, docs = {}, {}
    for scope in ex.configurations:
        summary = scope(preset=values)
        values.update(summary)
        for key, doc in summary.docs.items():
            docs[key] = docs.get(key) or doc
    return {key: (value, docs.get(key, "")) for key, value in values.items()}


def _command_help(name: str, program: str) -> str:
    """What ``COMMAND --help`` and ``help COMMAND`` print: the command's description and the config keys it reads."""
    function = ex.commands[name]
    doc = (inspect.getdoc(function) or "").split("\n\n")[0]
    arguments = function.signature.arguments
    entries = _config_entries()
    if "_config" in arguments and name == ex.default_command:  # training reads the keys of training_config
        keys = [key for key in entries if key in set(defaults()) | {"seed"}]
    else:
        keys = [key for key in arguments if key in entries]
    shown = f"[{name}]" if name == ex.default_command or program == f"{name}.py" else name
    lines = [f"usage: {program} {shown} [with KEY=VALUE ...] [options]", "", " ".join(doc.split()), ""]
    if keys:
        lines.append("Config keys it reads (`with key=value` sets one, a preset's name several):")
        for key in keys:
            value, key_doc = entries[key]
            assign = f"  {key} = {pprint.pformat(value)}"
            lines.append(f"{assign:<35}  # {key_doc}" if key_doc else assign)
    elif name == "print_config":
        lines.append("It shows every config key, with the updates and presets given after `with`.")
    elif "_config" in arguments:
        lines.append(f"It reads every config key (`{program} print_config` lists them).")
    else:
        lines.append("It reads no config key.")
    if name == ex.default_command:
        lines += ["", f"Presets: {', '.join(PRESETS)} (`{program} print_named_configs` shows their keys)."]
    records = "" if function.unobserved else f" A run is recorded in {_default_runs_dir()}/ (-F DIR: in DIR; -u: not)."
    lines += ["", f"Options: `{program} --help` lists them.{records}"]
    return "\n".join(lines)


def _print_help(argv: list[str], program: str) -> None:
    """``COMMAND --help``, ``COMMAND -h`` and ``help COMMAND`` print the command's help and exit; Sacred's docopt
    cannot parse the first two (its usage is printed for a program called 'dummy') and prints only the signature
    and docstring for the third. Without a command, Sacred's usage, as ``--help`` prints it."""
    words, options, _, _, _ = _command_line(argv)
    if "--help" not in options and words[:1] != ["help"]:
        return
    command = (words[1:] if words[:1] == ["help"] else words)[:1]
    if not command and argv[1:] in (["-h"], ["--help"], ["help"]):
        return  # Sacred's own
    if not command:  # e.g. `with lr=1 --help`, which Sacred's docopt cannot parse
        print(ex.get_usage()[1])
        sys.exit(0)
    if command[0] not in ex.commands:
        _exit_with_error(_not_a_command(command[0], program))
    print(_command_help(command[0], program))
    sys.exit(0)


def _not_a_command(word: str, program: str) -> str:
    if "=" in word or word in PRESETS:
        return f"{word!r} is not a command; config updates and presets follow `with`: {program} with {word}"
    return f"{word!r} is not a command{did_you_mean(word, ex.commands)}; use one of {', '.join(ex.commands)}"


def _check_command_line(argv: list[str], program: str) -> None:
    """Options, commands and presets that Sacred does not know are one line each, not Sacred's usage for a program
    called 'dummy' (an unknown option), its ``Error: Command ... not found`` or a traceback (an unknown preset)."""
    words, _, unknown, updates, given_with = _command_line(argv)
    if unknown:
        flags = [flag for option in ex.all_cli_options for flag in (option.short_flag, option.get_flag())]
        _exit_with_error(f"{unknown[0]} is not an option{did_you_mean(unknown[0], flags)}; "
                         f"`{program} --help` lists them")  # fmt: skip
    if words == ["help"]:
        return  # Sacred's usage (_print_help saw to `help COMMAND`)
    if words and words[0] not in ex.commands:
        _exit_with_error(_not_a_command(words[0], program))
    for word in words[1:]:
        if word in ex.commands:
            _exit_with_error(f"{words[0]!r} and {word!r} are both commands; give one at a time")
        command = "" if program == f"{words[0]}.py" else f" {words[0]}"
        _exit_with_error(f"{word!r} is not expected after the command {words[0]}; config updates and presets "
                         f"follow `with`: {program}{command} with {word}")  # fmt: skip
    if given_with and not [update for update in updates if update]:
        _exit_with_error(f"`with` needs config updates or a preset after it, e.g. {program} with smoke lr=10")
    for name in (update for update in updates if update and "=" not in update):
        _check_named_config(name)


def _check_named_config(name: str) -> None:
    """A word without '=' after ``with`` is a preset, or the config file Sacred reads when it exists."""
    if name in PRESETS:
        return
    if os.path.isfile(name):
        from sacred.config import load_config_file

        try:
            loaded = load_config_file(name)
        except Exception as problem:  # noqa: BLE001 - whatever the reader says of the file is the user's to fix
            reason = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
            _exit_with_error(f"cannot read the config file {name}: {reason}")
        if not isinstance(loaded, dict):
            _exit_with_error(f"the config file {name} holds a {type(loaded).__name__}, not keys and their values")
        return
    if name.endswith(_CONFIG_FILE_SUFFIXES):
        _exit_with_error(f"there is no config file {name} (after `with`, a name ending in "
                         f"{os.path.splitext(name)[1]} is a config file to read)")  # fmt: skip
    hint = did_you_mean(name, PRESETS)
    if not hint and name in _config_entries():
        hint = f" (to set the key {name}, give {name}=VALUE)"
    _exit_with_error(f"{name!r} is not a preset{hint}; use one of {', '.join(PRESETS)}, or key=value")


@record  # under torchrun: a rank's traceback in the failure summary instead of "error_file: <N/A>"
def main(argv: list[str] | None = None) -> None:
    """Run Sacred's command line, recording runs in ``runs/`` unless an observer flag or ``-u`` is given.

    The entry point of ``main.py``, ``generate.py``, ``python -m wordlm`` and the ``wordlm`` command.
    """
    argv = list(sys.argv if argv is None else argv)
    # Sacred's usage names the program by sys.argv[0] relative to base_dir (an installed command would read
    # ../../bin/wordlm) and shell-quotes it ('python -m wordlm'): name it here instead
    program = _program_name(argv[0] if argv else "")

    def usage(program_name=None):
        short, long, internal = Experiment.get_usage(ex, os.path.join(ex.base_dir, "WORDLM_PROGRAM"))
        return short.replace("WORDLM_PROGRAM", program), long.replace("WORDLM_PROGRAM", program), internal

    ex.get_usage = usage
    _print_help(argv, program)  # `COMMAND --help`, `help COMMAND`: the command's description and keys
    # logging.getLevelNamesMapping() is Python 3.11+; logging._nameToLevel is what it copies (and 3.10 has)
    names = dict(getattr(logging, "getLevelNamesMapping", lambda: logging._nameToLevel)())
    for level in _log_levels(argv):  # Sacred would hand it to logging, whose ValueError is a traceback
        if level not in names and not level.lstrip("-").isdigit():
            print(f"error: -l {level!r} is not a log level; use one of {', '.join(sorted(names, key=names.get))} "
                  "or a number", file=sys.stderr)  # fmt: skip
            sys.exit(1)
    _check_command_line(argv, program)  # unknown options, commands and presets: one line each
    observed = any(arg.startswith(flag) for arg in argv[1:] for flag in _OBSERVER_FLAGS)
    follower = launched_rank() > 0  # under torchrun every process runs this; rank 0 alone records and prints
    if follower:
        argv += [] if "-u" in argv or "--unobserved" in argv else ["-u"]
        argv += [] if any(arg.startswith(("-l", "--loglevel")) for arg in argv[1:]) else ["-l", "WARNING"]
    argv, sql_urls = _take_sql_urls(argv)
    added = [] if follower else [_sql_observer(url) for url in sql_urls]
    if not follower and not observed and not ex.observers and not sql_urls:
        added.append(FileStorageObserver(_default_runs_dir()))
    ex.observers.extend(added)  # for this command line only: main() called again in one process starts afresh
    try:
        with open(os.devnull, "w") if follower else nullcontext(sys.stdout) as out, redirect_stdout(out):
            ex.run_commandline(argv)
    except KeyboardInterrupt:  # a second Ctrl-C while the interrupted run was being tested
        print("error: interrupted again; stopped without testing (the checkpoints written are complete)",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)
    except SystemExit as stop:
        _report_crash_to_torchrun(stop)
        raise
    finally:
        for observer in added:
            ex.observers.remove(observer)


def _sql_observer(url: str) -> _SqlObserver:
    """The observer of ``-s URL``, its database reached first: a URL that cannot be used is one line, not a
    traceback from inside Sacred."""
    try:
        open_database(url, label="-s", create=True).dispose()
    except UserError as problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    return _SqlObserver(url)
