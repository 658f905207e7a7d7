"""wordlm: train recurrent word-level language models (Elman RNN, GRU, LSTM).

Run `python main.py with key=value ...` to train, `python main.py print_config` to see every key
with its default and meaning, and `python main.py print_named_configs` for the presets.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import torch
from sacred import Experiment
from sacred.observers import FileStorageObserver, SqlObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

# Modules only used through others: named here so that Sacred records them among the run's sources.
from wordlm import __version__, cache, download, files, fused, hidden, regularize, transformer  # noqa: F401, E402
from wordlm.api import load
from wordlm.checkpoint import load_checkpoint, save_checkpoint
from wordlm.checks import (
    Output,
    check_checkpoint_path,
    check_output,
    check_path,
    check_readable_path,
    check_seed,
    path_problem,
    resolve_device,
    write_output,
)
from wordlm.checks import check_positive_int as _check_positive_int
from wordlm.corpora import load_dataset, resolve_dataset
from wordlm.data import SPLITS, UNK, batchify
from wordlm.distributed import (
    launched_rank,
    launched_size,
    lost_contact,
    lost_contact_message,
    rank_rng_state,
    split_rng_streams,
    start_world,
    stop_world,
)
from wordlm.errors import UserError
from wordlm.evaltime import cache_pointer_loss, dynamic_evaluation_loss
from wordlm.export import check_export_available, export_onnx
from wordlm.files import same_file
from wordlm.generation import (
    check_sampling_options,
    encode_prompt,
    format_samples,
)
from wordlm.model import TRANSFORMER, ModelConfig, build_model
from wordlm.plots import LEARNING_CURVES_PNG, has_display, plot_learning_curves, plot_validation_curves
from wordlm.runs import (
    SQL_LACKS,
    MetricHistory,
    format_runs_table,
    open_database,
    read_runs_db,
    read_runs_dir,
    select_runs,
)
from wordlm.signals import StopRequests, ignore_termination
from wordlm.system import bfloat16_unavailable, tune_cpu_allocator
from wordlm.training import (
    Precision,
    Reporter,
    TrainState,
    averaging_optimizer,
    capture_rng_state,
    evaluate_loss,
    fit,
    make_optimizer,
    perplexity,
    restore_rng_state,
)


def _has_git_commit(path: str) -> bool:
    """Whether ``path`` is in a git repository with a commit (Sacred crashes in one without: sacred#915)."""
    try:
        import git

        _ = git.Repo(path, search_parent_directories=True).head.commit
    except Exception:
        return False
    return True


# Run from a checkout (pyproject.toml beside the package), a run records its sources relative to the
# checkout, with its git commit. Installed, relative to the package folder instead: Sacred counts any
# imported module under its base_dir as a source, and site-packages would make torch and sacred sources.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_IN_CHECKOUT = os.path.isfile(os.path.join(os.path.dirname(_PACKAGE_DIR), "pyproject.toml"))
_PROJECT_ROOT = os.path.dirname(_PACKAGE_DIR) if _IN_CHECKOUT else _PACKAGE_DIR
ex = Experiment("wordlm", base_dir=_PROJECT_ROOT, save_git_info=_IN_CHECKOUT and _has_git_commit(_PROJECT_ROOT))
ex.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt
_INTERACTIVE = sys.stdout.isatty() and sys.stderr.isatty()  # read before Sacred captures the streams


class error(SacredError):  # noqa: N801 - the name is what users see: "error: <message>"
    """A user error that Sacred prints as one line, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_traceback=False)


error.__module__ = "builtins"


@ex.config
def config():
    batch_size = 32  # batch size
    bptt = 35  # sequence length
    clip = 0.25  # gradient clipping
    dataset = "./data"  # location of the data corpus
    dropout = 0.2  # dropout applied to layers (0 = no dropout)
    emsize = 200  # size of word embeddings
    epochs = 40  # upper epoch limit
    log_interval = 200  # report interval
    lr = 20.0  # initial learning rate
    model_type = "LSTM"  # type of recurrent net (RNN_TANH, RNN_RELU, LSTM, GRU) or Transformer
    nhid = 200  # number of hidden units per layer
    nlayers = 2  # number of layers
    nhead = 2  # Transformer: attention heads (emsize divisible by it); nhid is its feed-forward width
    save = "model.pt"  # path to save the final model
    seed = 257  # the random seed for this experiment
    tied = True  # tie the word embedding and softmax weights
    # -- beyond the spec: none of these changes what the keys above mean
    max_batches = None  # stop each epoch after this many training batches (None = the whole epoch)
    device = "auto"  # where to train: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'
    eval_batch_size = 10  # batch size of validation and test evaluation
    lr_decay = None  # multiply lr by this after each epoch from lr_decay_start on (None = lr / 4 on no improvement)
    lr_decay_start = 1  # the first epoch after which lr_decay applies
    init_range = None  # initialise every weight uniform(-r, r) (None = the classic init)
    # -- regularization and optimization of AWD-LSTM (Merity et al. 2017); all off by default
    locked_dropout = False  # variational dropout: one mask per sequence on inputs, between layers, on outputs
    dropouti = None  # dropout on the word embeddings (None = dropout)
    dropouth = None  # dropout between recurrent layers (None = dropout)
    dropoute = 0.0  # embedding dropout: drop whole words from the embedding matrix
    wdrop = 0.0  # weight drop: DropConnect on the hidden-to-hidden weights
    alpha = 0.0  # activation regularization (AR) coefficient
    beta = 0.0  # temporal activation regularization (TAR) coefficient
    tied_projection = False  # with tied=True and emsize != nhid, give the last layer emsize units
    wdecay = 0.0  # weight decay (L2)
    optimizer = "sgd"  # 'sgd', 'adam' or 'adamw' (the lr schedule applies to each)
    nonmono = None  # NT-ASGD: averaged SGD once valid loss is worse than the best before the last n epochs (lr kept)
    variable_bptt = False  # variable-length BPTT around bptt, lr scaled to each sequence's length
    finetune = False  # with resume: restart averaged SGD from the loaded weights (AWD-LSTM's fine-tuning stage)
    min_freq = 1  # words seen fewer times in train.txt become <unk> (1 = keep every word)
    max_vocab = None  # keep at most this many words, the most frequent; the rest become <unk> (None = all)
    # -- speed options that change the math; all off by default (figures in docs/PERFORMANCE.md)
    adaptive_softmax = None  # adaptive softmax: word-frequency cutoffs, e.g. [2000, 10000]; tied=False (None = off)
    amp = None  # mixed precision of the training forward pass: 'bf16' (CPU or CUDA) or 'fp16' (CUDA) (None = float32)
    compile = False  # run the training forward pass through torch.compile
    # -- never lose a run
    save_last = (save[:-3] if str(save).endswith(".pt") else str(save)) + ".last.pt"  # latest state, for resume
    checkpoint_every = None  # also write save_last every this many minutes (None = at each epoch's end only)
    resume = None  # continue the run whose checkpoint (save_last, or save) is at this path
    on_divergence = "stop"  # a NaN/inf loss: 'stop' (one-line error) or 'reload' (best model, lr / 4)

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
    onnx_export = None  # write one model step as ONNX here: after training, or from checkpoint with `export`


# -- presets: the published recipes, each building on the one it varies (`print_named_configs` lists them)

# Zaremba, Sutskever & Vinyals 2014, "Recurrent Neural Network Regularization", PTB, non-regularized
# 2x200 LSTM: test perplexity 114.5 (valid 120.7). Their loss sums over the time steps, so their lr 1
# and gradient-norm clip 5 at bptt 20 are lr 20 and clip 0.25 on wordlm's per-token mean loss.
ZAREMBA_SMALL = dict(
    dataset="penn", model_type="LSTM", emsize=200, nhid=200, nlayers=2, dropout=0.0, tied=False,
    batch_size=20, bptt=20, lr=20.0, clip=0.25, epochs=13, lr_decay=0.5, lr_decay_start=4, init_range=0.1,
)  # fmt: skip
# Zaremba et al. 2014, medium regularized 2x650 LSTM, dropout 0.5: test 82.7 (valid 86.2); at bptt 35
# their lr 1 / clip 5 become lr 35 / clip 5/35; lr / 1.2 every epoch after the 6th.
ZAREMBA_MEDIUM = {**ZAREMBA_SMALL, **dict(emsize=650, nhid=650, dropout=0.5, bptt=35, lr=35.0, clip=5 / 35,
                                          epochs=39, lr_decay=1 / 1.2, lr_decay_start=6, init_range=0.05)}  # fmt: skip
# Zaremba et al. 2014, large regularized 2x1500 LSTM, dropout 0.65: test 78.4 (valid 82.2).
ZAREMBA_LARGE = {**ZAREMBA_MEDIUM, **dict(emsize=1500, nhid=1500, dropout=0.65, clip=10 / 35, epochs=55,
                                          lr_decay=1 / 1.15, lr_decay_start=14, init_range=0.04)}  # fmt: skip
# Press & Wolf 2016, "Using the Output Embedding to Improve Language Models": Zaremba's large model with
# tied input and output embeddings, test 74.3 on PTB.
PRESS_WOLF_LARGE_TIED = {**ZAREMBA_LARGE, "tied": True}
# Inan, Khosravi & Socher 2016, "Tying Word Vectors and Word Classifiers": variational dropout + tied
# embeddings on Zaremba's medium/large models, PTB test 73.2 / 68.5 (with their augmented loss, which
# wordlm does not implement). Locked dropout here covers inputs, outputs and between layers, not the
# recurrent connections of Gal & Ghahramani's variant.
INAN_MEDIUM_TIED = {**ZAREMBA_MEDIUM, "tied": True, "locked_dropout": True}
INAN_LARGE_TIED = {**ZAREMBA_LARGE, "tied": True, "locked_dropout": True}
# Merity, Keskar & Socher 2017, "Regularizing and Optimizing LSTM Language Models" (AWD-LSTM), PTB:
# 3-layer LSTM 400/1150/400, tied, every regularizer, NT-ASGD; test 58.8 (57.3 after fine-tuning with
# `with resume=model.pt finetune=True epochs=...`, 52.8 with the cache pointer). 500 epochs: a GPU job.
AWD_LSTM_PTB = dict(
    dataset="penn", model_type="LSTM", emsize=400, nhid=1150, nlayers=3, tied=True, tied_projection=True,
    locked_dropout=True, dropout=0.4, dropouti=0.4, dropouth=0.25, dropoute=0.1, wdrop=0.5, alpha=2.0,
    beta=1.0, wdecay=1.2e-6, nonmono=5, variable_bptt=True, batch_size=20, bptt=70, lr=30.0, clip=0.25,
    epochs=500, eval_batch_size=10, seed=141,
)  # fmt: skip
# Merity et al. 2017 on WikiText-2: test 66.0 (65.8 after fine-tuning, 52.0 with the cache pointer).
AWD_LSTM_WT2 = {**AWD_LSTM_PTB, **dict(dataset="wikitext-2", dropouti=0.65, dropouth=0.2, batch_size=80,
                                       epochs=750, seed=1882)}  # fmt: skip
PRESETS = {
    "zaremba_small": ZAREMBA_SMALL, "zaremba_medium": ZAREMBA_MEDIUM, "zaremba_large": ZAREMBA_LARGE,
    "press_wolf_large_tied": PRESS_WOLF_LARGE_TIED, "inan_medium_tied": INAN_MEDIUM_TIED,
    "inan_large_tied": INAN_LARGE_TIED, "awd_lstm_ptb": AWD_LSTM_PTB, "awd_lstm_wt2": AWD_LSTM_WT2,
}  # fmt: skip
for _name, _preset in PRESETS.items():
    ex.add_named_config(_name, _preset)


# A tiny, fast configuration for trying the pipeline end to end (and for the tests).
@ex.named_config
def smoke():
    emsize = 32
    nhid = 32
    nlayers = 1
    batch_size = 8
    bptt = 10
    epochs = 1
    max_batches = 20
    log_interval = 10


def _known_keys() -> set[str]:
    return {key for scope in ex.configurations for key in scope()} | {"seed"}


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
        said = []
        for key in unknown:
            near = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
            said += [
                leaf + (f" (did you mean {' or '.join(near)}?)" if near else "") for leaf in _leaves(key, config[key])
            ]
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


_FLOAT32 = torch.finfo(torch.float32)  # what the weights, and so every number multiplied into them, can hold


def _beyond_float32(key: str, value) -> None:
    if value > _FLOAT32.max or 0 < value < _FLOAT32.smallest_normal:
        raise UserError(
            f"{key}={value!r} is beyond what float32 holds ({_FLOAT32.smallest_normal:.3g} to {_FLOAT32.max:.3g}): "
            "the training math would turn it into inf or 0; give a value in that range"
        )


def _check_positive_number(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{key}={value!r} must be a positive, finite number" + (" or None" if allow_none else ""))
    _beyond_float32(key, value)


def _check_number_in(key: str, value, low: float = 0.0, high: float = float("inf"), integer: bool = False) -> None:
    """``low <= value <= high`` (``high`` excluded when infinite), else one line saying so."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high or value == float("inf"):
        what = "an integer" if integer else "a number"
        bounds = f">= {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
        raise UserError(f"{key}={value!r} must be {what} {bounds}")
    if not integer:
        _beyond_float32(key, value)


def validate_training_config(cfg: dict) -> ModelConfig:
    """Check every training key where it enters; one line naming the key, value and what is allowed."""
    for key in ("batch_size", "bptt", "epochs", "log_interval", "eval_batch_size"):
        _check_positive_int(key, cfg[key])
    _check_positive_int("max_batches", cfg["max_batches"], allow_none=True)
    _check_positive_number("lr", cfg["lr"])
    _check_positive_number("clip", cfg["clip"])
    _check_positive_number("checkpoint_every", cfg["checkpoint_every"], allow_none=True)
    check_path("save", cfg["save"])
    check_path("save_last", cfg["save_last"])
    if cfg["onnx_export"]:
        check_path("onnx_export", cfg["onnx_export"], example="model.onnx")
    if os.path.abspath(cfg["save"]) == os.path.abspath(cfg["save_last"]):
        raise UserError(
            f"save_last={cfg['save_last']!r} must differ from save: the best model and the latest state are kept apart"
        )
    if cfg["on_divergence"] not in ("stop", "reload"):
        raise UserError(f"on_divergence={cfg['on_divergence']!r} must be 'stop' or 'reload'")
    if not isinstance(cfg["dataset"], str):
        raise UserError(f"dataset={cfg['dataset']!r} must be a corpus name or a folder path")
    if cfg["resume"] is not None and not isinstance(cfg["resume"], str):
        raise UserError(f"resume={cfg['resume']!r} must be a checkpoint path or None")
    if cfg["lr_decay"] is not None:
        _check_positive_number("lr_decay", cfg["lr_decay"])
    _check_positive_int("lr_decay_start", cfg["lr_decay_start"])
    if cfg["optimizer"] not in ("sgd", "adam", "adamw"):
        raise UserError(f"optimizer={cfg['optimizer']!r} must be 'sgd', 'adam' or 'adamw'")
    if isinstance(cfg["wdecay"], bool) or not isinstance(cfg["wdecay"], (int, float)) or not 0 <= cfg["wdecay"] < 1:
        raise UserError(f"wdecay={cfg['wdecay']!r} must be a number with 0 <= wdecay < 1")
    _check_positive_int("nonmono", cfg["nonmono"], allow_none=True)
    if cfg["nonmono"] is not None and cfg["optimizer"] != "sgd":
        raise UserError(f"nonmono={cfg['nonmono']} (NT-ASGD) needs optimizer='sgd', not {cfg['optimizer']!r}")
    if cfg["finetune"] and cfg["resume"] is None:
        raise UserError("finetune=True needs resume=PATH: fine-tuning continues a trained model")
    for key in ("variable_bptt", "compile"):
        if not isinstance(cfg[key], bool):
            raise UserError(f"{key}={cfg[key]!r} must be True or False")
    if cfg["amp"] not in (None, "bf16", "fp16"):
        raise UserError(f"amp={cfg['amp']!r} must be 'bf16', 'fp16' or None")
    return build_model_config(sys.maxsize, cfg)  # the vocabulary's size is checked once it is known


MODEL_KEYS = ("model_type", "emsize", "nhid", "nlayers", "dropout", "tied", "init_range", "locked_dropout", "dropouti",
              "dropouth", "dropoute", "wdrop", "alpha", "beta", "tied_projection", "adaptive_softmax",
              "nhead")  # fmt: skip


def build_model_config(ntoken: int, cfg: dict) -> ModelConfig:
    """The model's config from the config keys, or one line naming the bad key."""
    try:
        window = {"window": cfg["bptt"]} if cfg["model_type"] == TRANSFORMER else {}  # it attends over bptt words
        return ModelConfig(ntoken, **{key: cfg[key] for key in MODEL_KEYS}, **window)
    except (ValueError, TypeError) as problem:
        raise UserError(str(problem)) from None


# Keys that define the model or the batch layout: a resumed run must keep them.
FIXED_ON_RESUME = ("dataset", "min_freq", "max_vocab", "batch_size", "bptt", "model_type", "emsize", "nhid",
                   "nlayers", "tied", "tied_projection", "adaptive_softmax", "optimizer", "nhead")  # fmt: skip


def resumed_config(config: dict, modified: set[str], payload: dict, path: str) -> dict:
    """The config a resumed run trains with: the checkpoint's, with the keys given now taking over."""
    saved = (payload.get("meta") or {}).get("config")
    if not saved or not payload.get("training"):
        raise UserError(f"{path} holds no training state to resume from; resume from a checkpoint written by training")
    folder = (payload.get("meta") or {}).get("corpus_folder")  # where the corpus was, as an absolute path
    same_corpus = "dataset" in modified and _same_folder(config["dataset"], folder)  # named from another folder
    conflicts = [k for k in FIXED_ON_RESUME if k in modified and k in saved and config[k] != saved[k]]
    conflicts = [k for k in conflicts if not (k == "dataset" and same_corpus)]
    if conflicts:
        changes = ", ".join(f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in conflicts)
        raise UserError(f"resume cannot change {changes}; drop those keys or start a new run")
    merged = {key: (config[key] if key in modified or key not in saved else saved[key]) for key in config}
    if "save" in modified and "save_last" not in modified:
        merged["save_last"] = config["save_last"]
    merged["resume"] = config["resume"]
    moved = folder and Path(folder).is_dir() and not Path(merged["dataset"]).expanduser().exists()
    if "dataset" not in modified and moved:  # a relative path or a corpus name typed in another folder
        merged["dataset"] = folder
    return merged


def _same_folder(path: str, other: str | None) -> bool:
    try:
        return other is not None and os.path.samefile(Path(path).expanduser(), other)
    except OSError:
        return False


@ex.main
def train(_run, _log, _config):
    """Train a language model, keep the best one by validation loss, and report its test perplexity."""
    try:
        return _train(_run, _log, _plain(_config))
    except UserError as problem:
        raise error(str(problem)) from None
    except Exception as problem:
        if not lost_contact(problem):
            raise
        ignore_termination()  # (as StopRequests does): torchrun's SIGTERM must not cut off this line and the record
        raise error(
            f"{lost_contact_message(problem)}: another process failed, was killed or hung, and its own output "
            f"says which; resume={_config['save_last']} continues from the latest state written"
        ) from None
    finally:
        stop_world()


def _plain(value):
    """Sacred's read-only config containers as plain dicts and lists: checkpoints hold only plain data."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _save_safely(path: str, *args, **kwargs) -> tuple[int, int] | None:
    """Write a checkpoint, returning ``save_checkpoint``'s identity of the file; a failed write is one warning
    line (and None) and leaves the previous file in place."""
    try:
        return save_checkpoint(path, *args, **kwargs)
    except OSError as problem:
        _warn(f"could not write {path} ({problem.strerror or problem}); the previous file is kept, training goes on")
        return None


_OUTPUTS = ("save", "save_last", "onnx_export")  # what training writes: checked before it starts


def _check_training_outputs(cfg: dict) -> None:
    """Every output of a training run checked before any work: writable, a file, each its own, no input."""
    if cfg["onnx_export"]:
        check_export_available()
    keys = [key for key in _OUTPUTS if cfg[key]]
    resume = ((f"resume={cfg['resume']!r}", cfg["resume"]),) if cfg["resume"] else ()
    for key in keys:  # save and save_last may well be the resumed file: it is read whole before they are written
        example = "model.onnx" if key == "onnx_export" else "model.pt"
        check_output(key, cfg[key], example=example, text=False, inputs=resume if key == "onnx_export" else ())
    for i, key in enumerate(keys):
        for other in keys[:i]:
            if os.path.abspath(cfg[key]) == os.path.abspath(cfg[other]) or same_file(cfg[key], cfg[other]):
                raise UserError(f"{key}={cfg[key]!r} is the same file as {other}={cfg[other]!r}; give each its own")


def _not_a_corpus_file(cfg: dict, folder: Path) -> None:
    for key in _OUTPUTS:
        for split in SPLITS:
            if cfg[key] and same_file(cfg[key], folder / f"{split}.txt"):
                raise UserError(
                    f"{key}={cfg[key]!r} is the corpus's {split}.txt ({folder / f'{split}.txt'}), which training "
                    f"reads; write {key} elsewhere"
                )


def _check_memory(config: ModelConfig, cfg: dict, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone exceed the memory this machine has free.

    Activations come on top (they grow with batch_size and bptt), so a model that passes may still not fit;
    one that fails cannot. The parameters are counted on the meta device, which allocates nothing.
    """
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(config).parameters())
    copies = 2 + {"adam": 2, "adamw": 2}.get(cfg["optimizer"], 0) + (cfg["nonmono"] is not None)  # weights, grads
    on_device, on_host = parameters * 4 * copies, parameters * 4  # + the host's copy of the best model
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        needs, where = on_device, f"{device} has {free / 1e9:.1f} GB free"
    else:
        free = _available_memory()
        needs, where = on_device + on_host, f"this machine has {free / 1e9:.1f} GB of memory available"
    if free is not None and needs > free:
        raise UserError(
            f"the model (model_type={cfg['model_type']}, nlayers={cfg['nlayers']}, nhid={cfg['nhid']}, "
            f"emsize={cfg['emsize']}, tied={cfg['tied']}, vocabulary {config.ntoken}) has {parameters:,} parameters, "
            f"which need at least {needs / 1e9:.1f} GB for weights, gradients, optimizer state and the best model's "
            f"copy, but {where}; make it smaller (nhid, emsize, nlayers, max_vocab)"
        )


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation: Linux's MemAvailable, else free pages; None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _add_model_artifact(_run, path: str, written: tuple[int, int] | None, rewrite) -> None:
    """Keep this run's own model with its record, as ``path``'s name.

    ``path`` may hold another process's model by now (two runs started with one ``save``): the file is recorded
    only if it is still the one this run wrote (``written``, from ``save_checkpoint``), else ``rewrite(copy)``
    writes this run's model from memory. It is copied first, so a replacement during the copy changes nothing.
    """
    name = os.path.basename(path)
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, name)
        try:
            with open(path, "rb") as source:
                found = os.fstat(source.fileno())
                if written is not None and (found.st_dev, found.st_ino) != written:
                    raise FileNotFoundError(path)
                with open(copy, "wb") as target:
                    shutil.copyfileobj(source, target)
        except OSError:
            rewrite(copy)
            _warn(f"{path} was replaced since this run wrote it (another run with save={path}?); the run's record "
                  "keeps this run's own model")  # fmt: skip
        _run.add_artifact(copy, name=name)


def _train(_run, _log, cfg: dict):
    if cfg["resume"] is not None:
        check_path("resume", cfg["resume"])
        payload = load_checkpoint(cfg["resume"])
        cfg = resumed_config(cfg, set(_run.config_modifications.modified), payload, cfg["resume"])
    validate_training_config(cfg)
    check_readable_path("dataset", cfg["dataset"])
    _check_training_outputs(cfg)
    device = resolve_device(cfg["device"])
    if cfg["batch_size"] % launched_size():
        raise UserError(
            f"batch_size={cfg['batch_size']} must be a multiple of the {launched_size()} processes: each one "
            "trains an equal block of the batch's columns"
        )
    world, device = start_world(device)  # several processes under torchrun; else World() and device as is
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise UserError("amp='fp16' needs a CUDA device (half precision with loss scaling); on a CPU use amp='bf16'")
    if cfg["amp"] == "bf16" and device.type == "cpu" and (lacking := bfloat16_unavailable()):
        raise UserError(f"amp='bf16' cannot train on this CPU: {lacking}; leave amp unset to train in float32")
    if device.type == "cpu":
        tune_cpu_allocator()
    with world.local_rank_first():  # one download or tokenization per machine, the cache for the rest
        folder = resolve_dataset(cfg["dataset"], log=_log.info)
        corpus = load_dataset(folder, log=_log.info, min_freq=cfg["min_freq"], max_vocab=cfg["max_vocab"])
    _not_a_corpus_file(cfg, folder)
    vocab = corpus.vocab
    rows = corpus.train.numel() // cfg["batch_size"]
    if rows < 2:
        raise UserError(
            f"batch_size={cfg['batch_size']} needs at least {2 * cfg['batch_size']} training tokens, "
            f"but the training split has {corpus.train.numel()}; lower batch_size"
        )
    model_config = build_model_config(len(vocab), cfg)
    _check_memory(model_config, cfg, device)
    model = build_model(model_config).to(device)
    if cfg["adaptive_softmax"] is not None:  # (a resumed run loads the order with the weights)
        model.sort_words_by_frequency(torch.bincount(corpus.train, minlength=len(vocab)))
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["wdecay"])
    state = TrainState(lr=cfg["lr"])
    best_weights = None  # a CPU copy of the best model so far: what the final test uses
    own_rng = False  # whether this rank goes on with the random stream it saved
    if cfg["resume"] is not None:
        if payload["vocab"] != vocab.idx2word:
            raise UserError(
                f"the corpus {cfg['dataset']!r} is not the one {cfg['resume']} was trained on (its vocabulary differs)"
            )
        model.load_state_dict(payload["model_state"])
        state = TrainState.from_dict(payload["training"]["state"], device)
        if cfg["finetune"]:  # a fresh average from the loaded weights, as AWD-LSTM's finetune.py does
            state.averaging, state.val_history = True, []
            optimizer = averaging_optimizer(model.parameters(), state.lr, cfg["wdecay"])
        else:
            if state.averaging:
                optimizer = averaging_optimizer(model.parameters(), state.lr, cfg["wdecay"])
            optimizer.load_state_dict(payload["training"]["optimizer"])
        state.hidden = world.take_columns(state.hidden)  # the checkpoint holds every column's state
        if "lr" in _run.config_modifications.modified:
            state.lr = cfg["lr"]
        rng, own_rng = rank_rng_state(payload["training"], world)
        restore_rng_state(rng)
        best_weights = _load_best_weights(cfg["save"], state)
        _log.info("resumed from %s at epoch %d, batch %d", cfg["resume"], state.epoch, state.batch)
    if not own_rng:
        split_rng_streams(world)  # ranks > 0: dropout masks of their own
    _log.info(
        "model: %s, %d parameters, vocabulary %d, device %s",
        cfg["model_type"], sum(p.numel() for p in model.parameters()), len(vocab), device,
    )  # fmt: skip
    train_data = batchify(corpus.train, cfg["batch_size"])[:, world.share(cfg["batch_size"])]  # (rows, B/N)
    train_data = train_data.contiguous().to(device)
    valid_ids = corpus.valid.to(device)
    history = MetricHistory(forward=_run.log_scalar)  # kept in memory too, for the learning-curve picture
    reporter = Reporter(interactive=_INTERACTIVE and world.is_main, log_metric=history.log)
    meta = {"wordlm_version": __version__, "config": cfg, "corpus_folder": str(folder.resolve())}
    saved = None  # (identity, meta) of the model this run last wrote to save

    def whole_state() -> dict:  # a collective, as is training_payload: all ranks call it, rank 0 writes
        return dataclasses.replace(state, hidden=world.gather_columns(state.hidden)).to_dict()

    def training_payload() -> dict:
        rng = world.gather_data(capture_rng_state())
        by_rank = {"rng_by_rank": rng} if world.size > 1 else {}
        return {"optimizer": optimizer.state_dict(), "state": whole_state(), "rng": rng[0], **by_rank}

    def save_last() -> None:
        training = training_payload()
        if world.is_main:
            _save_safely(cfg["save_last"], model, vocab, meta={**meta, "epoch": state.epoch}, training=training)

    def save_best(current: TrainState) -> None:
        nonlocal best_weights, saved
        best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        best_meta = {**meta, "valid_loss": current.best_val_loss, "epoch": current.best_epoch}
        training = training_payload()
        if world.is_main:
            saved = _save_safely(cfg["save"], model, vocab, meta=best_meta, training=training), best_meta

    last_write = time.monotonic()

    def after_batch() -> None:
        nonlocal last_write
        due = cfg["checkpoint_every"] is not None and time.monotonic() - last_write >= 60 * cfg["checkpoint_every"]
        signum, due = world.agree(stop.requested or 0, due)  # a signal to any rank stops all at this batch
        if signum:  # decided on the agreed value only: a signal landing after the agree waits for the next batch
            stop.request(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)
        if due:
            save_last()
            last_write = time.monotonic()

    def on_diverged(divergence) -> None:
        if cfg["on_divergence"] == "stop" or best_weights is None or state.divergences >= MAX_RELOADS:
            kept = "no model was saved"
            if best_weights:
                kept = f"{cfg['save']} keeps the best model (epoch {state.best_epoch})"
            if cfg["on_divergence"] == "stop":
                raise UserError(f"{divergence}; {kept}; lower lr or clip, or set on_divergence=reload")
            tried = f"still diverging after {state.divergences} reloads of the best model" if best_weights else ""
            raise UserError(f"{divergence}; {tried or 'no best model to reload yet'}; {kept}; lower lr or clip")
        model.load_state_dict(best_weights)
        optimizer.state.clear()  # (an averaging optimizer restarts its average too)
        state.lr /= 4
        if world.is_main:  # every rank reloads alike; one says so
            _warn(f"{divergence}: reloaded the best model (epoch {state.best_epoch}), lr now {state.lr:g}")

    def switch_to_averaging() -> torch.optim.Optimizer:
        nonlocal optimizer
        optimizer = averaging_optimizer(model.parameters(), state.lr, cfg["wdecay"])
        _log.info("NT-ASGD: validation stopped improving; averaging the weights from epoch %d on", state.epoch + 1)
        return optimizer

    network = world.wrap(model)  # what training calls: DDP's wrapper across processes, torch.compile's on top
    if cfg["compile"]:
        network = torch.compile(network)
    interrupted = False
    started = time.perf_counter()
    with StopRequests(second_interrupts=world.size == 1, ignore_term_after_error=world.size > 1) as stop:
        try:
            with stop.deferred():
                fit(
                    network, train_data, valid_ids, optimizer, state,
                    epochs=cfg["epochs"], bptt=cfg["bptt"], clip=cfg["clip"],
                    eval_batch_size=cfg["eval_batch_size"], log_interval=cfg["log_interval"],
                    max_batches=cfg["max_batches"], save_best=save_best, reporter=reporter,
                    lr_decay=cfg["lr_decay"], lr_decay_start=cfg["lr_decay_start"],
                    variable_bptt=cfg["variable_bptt"], nonmono=cfg["nonmono"], switch_to_averaging=switch_to_averaging,
                    after_batch=after_batch, after_epoch=lambda _: save_last(), on_diverged=on_diverged,
                    pause_deferral=stop.immediate if world.size == 1 else nullcontext, world=world,
                    precision=Precision(cfg["amp"], device.type),
                )  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
            reporter.close()
            print("-" * 89)
            how = f" by {stop.name}" if stop.name else ""
            print(f"Exiting from training early{how} (epoch {state.epoch}, batch {state.batch})", flush=True)
            save_last()
            print(f"The latest state is in {cfg['save_last']}: continue with `with resume={cfg['save_last']}`")
            if best_weights is None:
                print(f"No epoch finished yet: saving the current model to {cfg['save']} and testing it")
                stopped_at = whole_state()
                if world.is_main:
                    stopped_meta = {**meta, "epoch": 0, "interrupted_at": stopped_at}
                    saved = _save_safely(cfg["save"], model, vocab, meta=stopped_meta), stopped_meta
        training_seconds = time.perf_counter() - started
        if best_weights is not None:
            model.load_state_dict(best_weights)
        test_ids = corpus.test.to(device)
        test_loss, test_tokens = evaluate_loss(model, test_ids, cfg["eval_batch_size"], cfg["bptt"], world)
    test_ppl = perplexity(test_loss)
    print("=" * 89)
    print(f"| End of training | test loss {test_loss:5.2f} | test ppl {test_ppl:8.2f}")
    print("=" * 89, flush=True)
    _run.log_scalar("test.loss", test_loss)
    _run.log_scalar("test.ppl", test_ppl)
    _run.info.update(
        interrupted=interrupted,
        stop_signal=stop.name or None,
        stopped_at={"epoch": state.epoch, "batch": state.batch} if interrupted else None,
        resumed_from=cfg["resume"],
        best_epoch=state.best_epoch,
        best_valid_ppl=perplexity(state.best_val_loss) if state.best_epoch else None,
        test_ppl=test_ppl,
        test_tokens=test_tokens,
        training_seconds=training_seconds,
        tokens_seen=state.tokens_seen,
        tokens_per_second=state.tokens_seen / training_seconds if training_seconds > 0 else None,
    )
    written, saved_meta = saved if saved is not None and saved[0] is not None else (None, meta)
    if not world.is_main:
        pass  # rank 0 records the run
    elif written is not None or os.path.isfile(cfg["save"]):
        _add_model_artifact(
            _run, cfg["save"], written, lambda copy: save_checkpoint(copy, model, vocab, meta=saved_meta)
        )
    else:
        _warn(f"{cfg['save']} could not be written: the model of this run was not saved")
    if cfg["onnx_export"] and world.is_main:
        try:
            _log.info("wrote %s", export_onnx(model, cfg["onnx_export"], vocab))
        except OSError as problem:
            _warn(f"could not write onnx_export={cfg['onnx_export']!r} ({path_problem(problem)}); the model is in "
                  f"{cfg['save']}: `python main.py export with checkpoint={cfg['save']}` writes it later")  # fmt: skip
    title = f"run {_run._id} · {cfg['model_type']} {cfg['nlayers']}x{cfg['nhid']}"
    title += " · interrupted" if interrupted else ""
    _add_learning_curves(_run, _log, history, title=title, best_epoch=state.best_epoch, test_ppl=test_ppl)
    return test_ppl


MAX_RELOADS = 3  # on_divergence=reload gives up after this many reloads in one run


def _load_best_weights(path: str, state: TrainState) -> dict | None:
    """The best model of a resumed run, from its ``save`` file, if that file is the one the state names."""
    if not state.best_epoch or not os.path.isfile(path):
        return None
    try:
        payload = load_checkpoint(path)
    except UserError:
        return None
    if (payload.get("meta") or {}).get("epoch") != state.best_epoch:
        return None
    return payload["model_state"]


def _add_learning_curves(_run, _log, history: MetricHistory, **plot_options) -> None:
    """Keep a PNG of the learning curves with the run's records; a failure to draw is one warning line."""
    if not _run.observers:
        return  # unobserved: there are no records to keep it with
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = plot_learning_curves(history.metrics, os.path.join(folder, LEARNING_CURVES_PNG), **plot_options)
            _run.add_artifact(str(path), name=LEARNING_CURVES_PNG)
    except Exception as problem:  # noqa: BLE001 - a picture must never cost the run
        reason = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
        _log.warning("learning curves not drawn: %s", reason)


# -- reading the run records: `python main.py runs` and `python main.py plot`
@ex.config
def runs_config():
    runs_dir = None  # folder of run records to read (None: where runs are recorded, runs/ or $WORDLM_RUNS_DIR)
    runs_db = None  # instead, a database of Sacred's SQL observer (-s URL), e.g. sqlite:///runs.db
    runs_status = None  # list only runs with these statuses, e.g. completed or interrupted,killed (None: all)
    runs_sort = "id"  # sort the table by this column (a leading '-' sorts descending), e.g. -test_ppl
    run_ids = []  # runs whose validation curves `plot` draws (empty: every run with one)
    plot_path = "validation_curves.png"  # where `plot` writes its PNG


_READER_KEYS = tuple(runs_config())  # never among the config keys that tell runs apart


def _default_runs_dir() -> str:
    return os.environ.get("WORDLM_RUNS_DIR", "runs")


def _read_records(runs_dir, runs_db):
    if runs_db:
        return read_runs_db(runs_db)
    return read_runs_dir(runs_dir or _default_runs_dir())


@ex.command(unobserved=True)
def runs(runs_dir, runs_db, runs_status, runs_sort):
    """List the recorded runs: status, times, the config keys that differ, best validation and test perplexity."""
    try:
        records = select_runs(_read_records(runs_dir, runs_db), runs_status)
        print(format_runs_table(records, ignore_keys=_READER_KEYS, sort_by=runs_sort) if records else "no runs")
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
        chosen = select_runs(_read_records(runs_dir, None), run_ids=run_ids or None)
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
    _check_positive_int("eval_batch_size", eval_batch_size)
    _check_number_in("cache_window", cache_window, integer=True)  # 0: no cache
    _check_number_in("cache_lambda", cache_lambda, high=1.0)
    for key, value in (("cache_theta", cache_theta), ("dynamic_lr", dynamic_lr), ("dynamic_decay", dynamic_decay)):
        _check_number_in(key, value)
    if cache_window and (dynamic_lr or dynamic_decay):
        raise UserError("use the cache pointer (cache_window) or dynamic evaluation (dynamic_lr), not both at once")
    _check_positive_int("bptt", bptt)
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
    model = lm.model
    ids, unknown = lm.tokenize(path)
    if unknown:
        _log.info("%d of %d tokens are not in the checkpoint's vocabulary and were read as <unk>", unknown, len(ids))
    if cache_window:
        loss, count = cache_pointer_loss(model, ids, cache_window, cache_theta, cache_lambda)
        method = f" | cache pointer (window {cache_window}, theta {cache_theta:g}, lambda {cache_lambda:g})"
    elif dynamic_lr or dynamic_decay:
        loss, count = dynamic_evaluation_loss(model, ids, bptt, dynamic_lr, dynamic_decay)
        method = f" | dynamic evaluation (lr {dynamic_lr:g}, decay {dynamic_decay:g})"
    else:
        loss, count = lm.loss(ids, eval_batch_size, bptt)
        method = ""
    ppl = perplexity(loss)
    print(f"| evaluate {path} | tokens {count} | loss {loss:5.2f} | ppl {ppl:8.2f}{method}", flush=True)
    _run.info.update(scored=str(path), tokens=count, unknown=unknown, loss=loss, ppl=ppl)
    if scores_file:
        scores = lm.line_scores(ids, eval_batch_size, bptt)
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
    # logging.getLevelNamesMapping() is Python 3.11+; logging._nameToLevel is what it copies (and 3.10 has)
    names = dict(getattr(logging, "getLevelNamesMapping", lambda: logging._nameToLevel)())
    for level in _log_levels(argv):  # Sacred would hand it to logging, whose ValueError is a traceback
        if level not in names and not level.lstrip("-").isdigit():
            print(f"error: -l {level!r} is not a log level; use one of {', '.join(sorted(names, key=names.get))} "
                  "or a number", file=sys.stderr)  # fmt: skip
            sys.exit(1)
    observed = any(arg.startswith(flag) for arg in argv[1:] for flag in _OBSERVER_FLAGS)
    follower = launched_rank() > 0  # under torchrun every process runs this; rank 0 alone records and prints
    if follower:
        argv += [] if "-u" in argv or "--unobserved" in argv else ["-u"]
        argv += [] if any(arg.startswith(("-l", "--loglevel")) for arg in argv[1:]) else ["-l", "WARNING"]
    elif not observed and not ex.observers:
        ex.observers.append(FileStorageObserver(_default_runs_dir()))
    argv, sql_urls = _take_sql_urls(argv)
    sql_observers = [] if follower else [_sql_observer(url) for url in sql_urls]
    ex.observers.extend(sql_observers)
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
        for observer in sql_observers:
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
