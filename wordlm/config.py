"""The training config: every key with its default and doc, the presets, the checks, and resume's merge.

Main names: ``training_config`` (the keys as a config scope: ``wordlm.experiment`` hands it to Sacred, whose
``print_config`` shows its comments; ``defaults`` reads it without Sacred), ``PRESETS``, ``make_config`` (the
config of ``wordlm.train``), ``validate_training_config``, ``resumed_config`` and ``differing_keys``. Must not import
Sacred.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
import textwrap
from pathlib import Path

from wordlm.checks import check_positive_int, check_positive_number
from wordlm.data.datasets import resolve_dataset
from wordlm.errors import UserError
from wordlm.models import TRANSFORMER, ModelConfig
from wordlm.training.trainer import OPTIMIZERS, amp_problem

__all__ = [
    "training_config", "ZAREMBA_SMALL", "ZAREMBA_MEDIUM", "ZAREMBA_LARGE", "PRESS_WOLF_LARGE_TIED",
    "INAN_MEDIUM_TIED", "INAN_LARGE_TIED", "AWD_LSTM_PTB", "AWD_LSTM_WT2", "BUDGET_WT2", "BUDGET_WT2_2H",
    "BUDGET_WT2_TRANSFORMER", "BUDGET_PTB", "SMOKE",
    "PRESETS", "defaults", "make_config", "did_you_mean", "validate_training_config", "MODEL_KEYS",
    "build_model_config", "FIXED_ON_RESUME", "resumed_config", "differing_keys"
]  # fmt: skip


# The training keys, their defaults and one-line docs: a config scope (``print_config`` shows the comments), so
# no docstring here, which Sacred would print too.
def training_config():
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
    lr_schedule = None  # 'cosine': lr falls to 0 along a half cosine over the epochs, or over time_budget (None = off)
    time_budget = None  # minutes to train (validation included): then the epoch under way ends early (None = no limit)
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
    adaptive_softmax = None  # adaptive softmax: word cutoffs, e.g. [2000, 10000]; tied = adaptive input (None = off)
    amp = None  # mixed precision of the training forward pass: 'bf16' (CPU or CUDA) or 'fp16' (CUDA) (None = float32)
    compile = False  # run the training forward pass through torch.compile
    # -- never lose a run
    save_last = (save[:-3] if str(save).endswith(".pt") else str(save)) + ".last.pt"  # latest state, for resume
    checkpoint_every = None  # also write save_last every this many minutes (None = at each epoch's end only)
    resume = None  # continue the run whose checkpoint (save_last, or save) is at this path; 'auto': save_last if there
    on_divergence = "stop"  # a NaN/inf loss: 'stop' (one-line error) or 'reload' (best model, lr / 4)
    onnx_export = None  # write one model step as ONNX here: after training, or from checkpoint with `export`
    tensorboard = None  # write TensorBoard events live, each run into a sub-folder of this folder (None = off)


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
# The best WikiText-2 model found for 30 minutes on a 2-core CPU (docs/RESULTS.md, "30 minutes on 2 cores"): a
# 2x400 LSTM with an adaptive softmax (Grave et al. 2017; its cheap decoder buys ~3x the tokens of the full
# softmax), tied: its output vectors are the word vectors too (Baevski & Auli 2019's adaptive input; untied it
# tested 111.66 where tied tests 98.16, both on the Intel AMX VM with amp="bf16"), the lr falling along a half
# cosine over the budget. Add amp="bf16" on a CPU with AVX-512 BF16 or AMX.
BUDGET_WT2 = dict(
    dataset="wikitext-2", emsize=400, nhid=400, dropout=0.3, tied=True, adaptive_softmax=[2000, 10000],
    lr_schedule="cosine", time_budget=30, epochs=1000,
)  # fmt: skip
# Two hours on PTB on a CPU (docs/RESULTS.md, "Two hours on a CPU (PTB)"): Zaremba's medium 2x650 LSTM with
# Inan et al.'s tied embeddings and variational (locked) dropout, the lr along a half cosine over the budget
# instead of the paper's 39-epoch decay. With amp="bf16" on the Intel AMX VM: 21 epochs on one core (245 ms a batch,
# test 77.66); 2 threads run 140 ms a batch, about 36 epochs (not run to the end).
BUDGET_PTB = dict(
    dataset="penn", model_type="LSTM", emsize=650, nhid=650, nlayers=2, dropout=0.5, tied=True, locked_dropout=True,
    batch_size=20, bptt=35, lr=35.0, clip=5 / 35, init_range=0.05, lr_schedule="cosine", time_budget=120, epochs=1000,
)  # fmt: skip
# Two hours on WikiText-2 on a CPU (docs/RESULTS.md, "Two hours on a CPU (WikiText-2)"): budget_wt2's tied 2x400
# adaptive-softmax LSTM with more dropout for the epochs two hours buy. Add amp="bf16". On one core of the Intel
# AMX VM with amp="bf16": 26.3 epochs, test 92.92 (valid 98.62).
BUDGET_WT2_2H = {**BUDGET_WT2, **dict(dropout=0.4, time_budget=120)}
# The Transformer on the same two hours (docs/RESULTS.md): 4 pre-LayerNorm layers of width 256, 4 heads, feed-forward
# 1024, each word seeing the 63 before it, the tied adaptive softmax (Baevski & Auli 2019), AdamW along a half cosine
# over the budget. Add amp="bf16". On the other core, beside budget_wt2_2h: 11.9 epochs, test 93.17 (valid 99.43).
BUDGET_WT2_TRANSFORMER = dict(
    dataset="wikitext-2", model_type="Transformer", nlayers=4, emsize=256, nhead=4, nhid=1024, bptt=64,
    batch_size=32, tied=True, adaptive_softmax=[2000, 10000], dropout=0.2, dropouti=0.2, dropouth=0.1,
    optimizer="adamw", lr=1e-3, wdecay=0.01, lr_schedule="cosine", time_budget=120, epochs=1000,
)  # fmt: skip
# A tiny, fast configuration for trying the pipeline end to end (and for the tests).
SMOKE = dict(emsize=32, nhid=32, nlayers=1, batch_size=8, bptt=10, epochs=1, max_batches=20, log_interval=10)
PRESETS = {
    "zaremba_small": ZAREMBA_SMALL, "zaremba_medium": ZAREMBA_MEDIUM, "zaremba_large": ZAREMBA_LARGE,
    "press_wolf_large_tied": PRESS_WOLF_LARGE_TIED, "inan_medium_tied": INAN_MEDIUM_TIED,
    "inan_large_tied": INAN_LARGE_TIED, "awd_lstm_ptb": AWD_LSTM_PTB, "awd_lstm_wt2": AWD_LSTM_WT2,
    "budget_wt2": BUDGET_WT2, "budget_wt2_2h": BUDGET_WT2_2H, "budget_wt2_transformer": BUDGET_WT2_TRANSFORMER,
    "budget_ptb": BUDGET_PTB, "smoke": SMOKE,
}  # fmt: skip


def defaults(**pinned) -> dict:
    """The training keys' values: ``training_config`` run with ``pinned`` keys fixed, so that the keys derived
    from them follow (``save="a.pt"`` gives ``save_last="a.last.pt"``), as Sacred runs a config scope."""
    namespace = _Pinned(pinned)
    exec(_scope_code(), {}, namespace)  # noqa: S102 - our own config scope, not user input
    return dict(namespace)


class _Pinned(dict):
    """A namespace whose pinned keys keep their values when the scope assigns them."""

    def __init__(self, pinned: dict) -> None:
        super().__init__(pinned)
        self.pinned = set(pinned)

    def __setitem__(self, key, value) -> None:
        if key not in self.pinned:
            super().__setitem__(key, value)


def _scope_code():
    function = ast.parse(textwrap.dedent(inspect.getsource(training_config))).body[0]
    return compile(ast.Module(body=function.body, type_ignores=[]), inspect.getsourcefile(training_config), "exec")


def make_config(preset: str | None = None, **keys) -> tuple[dict, set[str]]:
    """The config of a training run: the defaults, then ``preset``'s keys, then ``keys``, as
    ``main.py with PRESET key=value`` gives; and the set of keys set by the preset or by name.

    Raises:
        TypeError: a key that is not a training key (the nearest keys named).
        UserError: an unknown preset.
    """
    if preset is not None and preset not in PRESETS:
        raise UserError(f"preset={preset!r} is not a preset; use one of {', '.join(PRESETS)}")
    known = defaults()
    unknown = [key for key in keys if key not in known]
    if unknown:
        said = [f"{key!r}{did_you_mean(key, known)}" for key in unknown]
        raise TypeError(
            f"{' and '.join(said)} {'is not a training key' if len(said) == 1 else 'are not training keys'}"
        )
    chosen = {**(PRESETS[preset] if preset else {}), **keys}
    return defaults(**chosen), set(chosen)


def did_you_mean(key: str, known) -> str:
    """`` (did you mean a or b?)`` naming the known keys nearest to a mistyped ``key``, or nothing."""
    near = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def validate_training_config(cfg: dict) -> None:
    """Check every training key where it enters; one line naming the key, value and what is allowed. The output
    paths (save, save_last, onnx_export) are the run plan's to check (``wordlm.run.plan_run``), with the files
    they would replace. The model's
    keys are checked as far as they can be without the corpus: that the adaptive softmax's cutoffs fall inside
    the vocabulary is checked once its size is known (``build_model_config``)."""
    for key in ("batch_size", "bptt", "epochs", "log_interval", "eval_batch_size"):
        check_positive_int(key, cfg[key])
    check_positive_int("max_batches", cfg["max_batches"], allow_none=True)
    check_positive_number("lr", cfg["lr"])
    check_positive_number("clip", cfg["clip"])
    check_positive_number("checkpoint_every", cfg["checkpoint_every"], allow_none=True)
    if cfg["on_divergence"] not in ("stop", "reload"):
        raise UserError(f"on_divergence={cfg['on_divergence']!r} must be 'stop' or 'reload'")
    if not isinstance(cfg["dataset"], str):
        raise UserError(f"dataset={cfg['dataset']!r} must be a corpus name or a folder path")
    if cfg["resume"] is not None and not isinstance(cfg["resume"], str):
        raise UserError(f"resume={cfg['resume']!r} must be a checkpoint path or None")
    if cfg["lr_decay"] is not None:
        check_positive_number("lr_decay", cfg["lr_decay"])
    check_positive_int("lr_decay_start", cfg["lr_decay_start"])
    check_positive_number("time_budget", cfg["time_budget"], allow_none=True)
    if cfg["lr_schedule"] not in (None, "cosine"):
        raise UserError(f"lr_schedule={cfg['lr_schedule']!r} must be 'cosine' or None")
    for other in ("lr_decay", "nonmono"):
        if cfg["lr_schedule"] and cfg[other] is not None:
            raise UserError(f"lr_schedule={cfg['lr_schedule']!r} and {other}={cfg[other]!r} both steer the lr; set one")
    if not isinstance(cfg["optimizer"], str) or cfg["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer={cfg['optimizer']!r} must be {_either(OPTIMIZERS)}")
    if isinstance(cfg["wdecay"], bool) or not isinstance(cfg["wdecay"], (int, float)) or not 0 <= cfg["wdecay"] < 1:
        raise UserError(f"wdecay={cfg['wdecay']!r} must be a number with 0 <= wdecay < 1")
    check_positive_int("nonmono", cfg["nonmono"], allow_none=True)
    if cfg["nonmono"] is not None and cfg["optimizer"] != "sgd":
        raise UserError(f"nonmono={cfg['nonmono']} (NT-ASGD) needs optimizer='sgd', not {cfg['optimizer']!r}")
    if cfg["finetune"] and cfg["resume"] is None:
        raise UserError("finetune=True needs resume=PATH: fine-tuning continues a trained model")
    for key in ("variable_bptt", "compile"):
        if not isinstance(cfg[key], bool):
            raise UserError(f"{key}={cfg[key]!r} must be True or False")
    if problem := amp_problem(cfg["amp"]):
        raise UserError(problem)
    build_model_config(sys.maxsize, cfg)  # any vocabulary size: the real one is checked once it is known


def _either(names) -> str:
    """``'a', 'b' or 'c'``."""
    shown = [repr(name) for name in names]
    return f"{', '.join(shown[:-1])} or {shown[-1]}" if len(shown) > 1 else shown[0]


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


def differing_keys(config: dict, saved: dict, corpus_folder: str | None = None) -> list[str]:
    """The training keys whose value in ``config`` is not the one a checkpoint's ``saved`` config holds (``resume``
    aside): whether a state on disk belongs to the run ``config`` describes. Keys ``saved`` lacks (an older
    wordlm's checkpoint) are not counted; a dataset that names the checkpoint's ``corpus_folder`` is the same."""
    keys = [key for key in [*defaults(), "seed"] if key != "resume" and key in saved and key in config]
    return [
        key for key in dict.fromkeys(keys)
        if config[key] != saved[key] and not (key == "dataset" and _same_folder(str(config[key]), corpus_folder))
    ]  # fmt: skip


def _same_folder(path: str, other: str | None) -> bool:
    """Whether the dataset ``path`` (a folder, or a corpus name such as ``wikitext-2``) is the folder ``other``."""
    if other is None:
        return False
    try:
        if os.path.samefile(Path(path).expanduser(), other):
            return True
    except OSError:
        pass
    if not Path(other).is_dir():
        return False
    try:  # a corpus name: where it is found (the shipped copy unpacked, ./data/NAME, $WORDLM_DATA/NAME); a corpus
        # that is not downloaded is not the saved folder, which exists: no download just to compare
        return os.path.samefile(resolve_dataset(path, fetch=False), other)
    except (UserError, OSError):
        return False
