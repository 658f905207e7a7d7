"""wordlm: train recurrent word-level language models (Elman RNN, GRU, LSTM).

Run `python main.py with key=value ...` to train, `python main.py print_config` to see every key
with its default and meaning, and `python main.py print_named_configs` for the presets.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import nullcontext, redirect_stdout

import torch
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds

from wordlm import __version__
from wordlm.checkpoint import load_checkpoint, save_checkpoint
from wordlm.corpora import load_dataset
from wordlm.data import batchify
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
from wordlm.model import ModelConfig, RNNModel
from wordlm.signals import StopRequests
from wordlm.system import tune_cpu_allocator
from wordlm.training import (
    Reporter,
    TrainState,
    capture_rng_state,
    evaluate_loss,
    fit,
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


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ex = Experiment("wordlm", base_dir=_PROJECT_ROOT, save_git_info=_has_git_commit(_PROJECT_ROOT))
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
    model_type = "LSTM"  # type of recurrent net (RNN_TANH, RNN_RELU, LSTM, GRU)
    nhid = 200  # number of hidden units per layer
    nlayers = 2  # number of layers
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
    min_freq = 1  # words seen fewer times in train.txt become <unk> (1 = keep every word)
    max_vocab = None  # keep at most this many words, the most frequent; the rest become <unk> (None = all)
    # -- never lose a run
    save_last = (save[:-3] if save.endswith(".pt") else save) + ".last.pt"  # latest state, for resume
    checkpoint_every = None  # also write save_last every this many minutes (None = at each epoch's end only)
    resume = None  # continue the run whose checkpoint (save_last, or save) is at this path
    on_divergence = "stop"  # a NaN/inf loss: 'stop' (one-line error) or 'reload' (best model, lr / 4)


# Zaremba, Sutskever & Vinyals 2014, "Recurrent Neural Network Regularization", PTB, non-regularized
# 2x200 LSTM: test perplexity 114.5 (valid 120.7). Their loss sums over the 20 time steps, so their
# lr 1 and gradient-norm clip 5 are lr 20 and clip 0.25 on our per-token mean loss.
@ex.named_config
def zaremba_small():
    dataset = "penn"
    model_type = "LSTM"
    emsize = 200
    nhid = 200
    nlayers = 2
    dropout = 0.0
    tied = False
    batch_size = 20
    bptt = 20
    lr = 20.0
    clip = 0.25
    epochs = 13
    lr_decay = 0.5
    lr_decay_start = 4
    init_range = 0.1


# Zaremba et al. 2014, medium regularized 2x650 LSTM, dropout 0.5: test 82.7 (valid 86.2).
# Their bptt 35 loss sum makes lr 1 / clip 5 into lr 35 / clip 5/35 here.
@ex.named_config
def zaremba_medium():
    dataset = "penn"
    model_type = "LSTM"
    emsize = 650
    nhid = 650
    nlayers = 2
    dropout = 0.5
    tied = False
    batch_size = 20
    bptt = 35
    lr = 35.0
    clip = 5 / 35
    epochs = 39
    lr_decay = 1 / 1.2
    lr_decay_start = 6
    init_range = 0.05


# Zaremba et al. 2014, large regularized 2x1500 LSTM, dropout 0.65: test 78.4 (valid 82.2).
@ex.named_config
def zaremba_large():
    dataset = "penn"
    model_type = "LSTM"
    emsize = 1500
    nhid = 1500
    nlayers = 2
    dropout = 0.65
    tied = False
    batch_size = 20
    bptt = 35
    lr = 35.0
    clip = 10 / 35
    epochs = 55
    lr_decay = 1 / 1.15
    lr_decay_start = 14
    init_range = 0.04


# Press & Wolf 2016, "Using the Output Embedding to Improve Language Models": Zaremba's large model
# with tied input/output embeddings, test 74.3 on PTB (medium tied: 79.6 with dropout).
@ex.named_config
def press_wolf_large_tied():
    dataset = "penn"
    emsize = 1500
    nhid = 1500
    nlayers = 2
    dropout = 0.65
    tied = True
    batch_size = 20
    bptt = 35
    lr = 35.0
    clip = 10 / 35
    epochs = 55
    lr_decay = 1 / 1.15
    lr_decay_start = 14
    init_range = 0.04


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


def _check_positive_int(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r} must be a positive integer" + (" or None" if allow_none else ""))


def _check_positive_number(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{key}={value!r} must be a positive, finite number" + (" or None" if allow_none else ""))


def _check_path(key: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key}={value!r} must be a file path (a non-empty string)")
    if os.path.isdir(value):
        raise UserError(f"{key}={value!r} is a folder; give a file path such as {os.path.join(value, 'model.pt')}")


def validate_training_config(cfg: dict) -> ModelConfig:
    """Check every training key where it enters; one line naming the key, value and what is allowed."""
    for key in ("batch_size", "bptt", "epochs", "log_interval", "eval_batch_size"):
        _check_positive_int(key, cfg[key])
    _check_positive_int("max_batches", cfg["max_batches"], allow_none=True)
    _check_positive_number("lr", cfg["lr"])
    _check_positive_number("clip", cfg["clip"])
    _check_positive_number("checkpoint_every", cfg["checkpoint_every"], allow_none=True)
    _check_path("save", cfg["save"])
    _check_path("save_last", cfg["save_last"])
    if os.path.abspath(cfg["save"]) == os.path.abspath(cfg["save_last"]):
        raise UserError(f"save_last={cfg['save_last']!r} must differ from save: the best model and the latest state are kept apart")
    if cfg["on_divergence"] not in ("stop", "reload"):
        raise UserError(f"on_divergence={cfg['on_divergence']!r} must be 'stop' or 'reload'")
    if not isinstance(cfg["dataset"], str):
        raise UserError(f"dataset={cfg['dataset']!r} must be a corpus name or a folder path")
    if cfg["resume"] is not None and not isinstance(cfg["resume"], str):
        raise UserError(f"resume={cfg['resume']!r} must be a checkpoint path or None")
    if cfg["lr_decay"] is not None:
        _check_positive_number("lr_decay", cfg["lr_decay"])
    _check_positive_int("lr_decay_start", cfg["lr_decay_start"])
    return build_model_config(
        1, cfg["model_type"], cfg["emsize"], cfg["nhid"], cfg["nlayers"], cfg["dropout"], cfg["tied"], cfg["init_range"]
    )


def resolve_device(device: str) -> torch.device:
    """Turn the ``device`` key into a torch device, refusing ones this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} asks for CUDA, which this machine lacks; use device=cpu or device=auto")
    return chosen


def build_model_config(ntoken, model_type, emsize, nhid, nlayers, dropout, tied, init_range=None) -> ModelConfig:
    """The model's config, or one line naming the bad key."""
    try:
        return ModelConfig(ntoken, model_type, emsize, nhid, nlayers, dropout, tied, init_range)
    except (ValueError, TypeError) as problem:
        raise UserError(str(problem)) from None


# Keys that define the model or the batch layout: a resumed run must keep them.
FIXED_ON_RESUME = ("dataset", "min_freq", "max_vocab", "batch_size", "bptt", "model_type", "emsize", "nhid",
                   "nlayers", "tied", "dropout")  # fmt: skip


def resumed_config(config: dict, modified: set[str], payload: dict, path: str) -> dict:
    """The config a resumed run trains with: the checkpoint's, with the keys given now taking over."""
    saved = (payload.get("meta") or {}).get("config")
    if not saved or not payload.get("training"):
        raise UserError(f"{path} holds no training state to resume from; resume from a checkpoint written by training")
    conflicts = [k for k in FIXED_ON_RESUME if k in modified and k in saved and config[k] != saved[k]]
    if conflicts:
        changes = ", ".join(f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in conflicts)
        raise UserError(f"resume cannot change {changes}; drop those keys or start a new run")
    merged = {key: (config[key] if key in modified or key not in saved else saved[key]) for key in config}
    if "save" in modified and "save_last" not in modified:
        merged["save_last"] = config["save_last"]
    merged["resume"] = config["resume"]
    return merged


@ex.main
def train(_run, _log, _config):
    """Train a language model, keep the best one by validation loss, and report its test perplexity."""
    try:
        return _train(_run, _log, dict(_config))
    except UserError as problem:
        raise error(str(problem)) from None
    except Exception as problem:
        if not lost_contact(problem):
            raise
        raise error(
            f"{lost_contact_message(problem)}: another process failed, was killed or hung, and its own output "
            f"says which; resume={_config['save_last']} continues from the latest state written"
        ) from None
    finally:
        stop_world()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _save_safely(path: str, *args, **kwargs) -> bool:
    """Write a checkpoint; a failed write is one warning line and leaves the previous file in place."""
    try:
        save_checkpoint(path, *args, **kwargs)
    except OSError as problem:
        _warn(f"could not write {path} ({problem.strerror or problem}); the previous file is kept, training goes on")
        return False
    return True


def _train(_run, _log, cfg: dict):
    if cfg["resume"] is not None:
        _check_path("resume", cfg["resume"])
        payload = load_checkpoint(cfg["resume"])
        cfg = resumed_config(cfg, set(_run.config_modifications.modified), payload, cfg["resume"])
    validate_training_config(cfg)
    device = resolve_device(cfg["device"])
    if cfg["batch_size"] % launched_size():
        raise UserError(
            f"batch_size={cfg['batch_size']} must be a multiple of the {launched_size()} processes: each one "
            "trains an equal block of the batch's columns"
        )
    world, device = start_world(device)  # several processes under torchrun; else World() and device as is
    if device.type == "cpu":
        tune_cpu_allocator()
    with world.local_rank_first():  # one download or tokenization per machine, the cache for the rest
        corpus = load_dataset(cfg["dataset"], log=_log.info, min_freq=cfg["min_freq"], max_vocab=cfg["max_vocab"])
    vocab = corpus.vocab
    rows = corpus.train.numel() // cfg["batch_size"]
    if rows < 2:
        raise UserError(
            f"batch_size={cfg['batch_size']} needs at least {2 * cfg['batch_size']} training tokens, "
            f"but the training split has {corpus.train.numel()}; lower batch_size"
        )
    model_config = build_model_config(
        len(vocab), cfg["model_type"], cfg["emsize"], cfg["nhid"], cfg["nlayers"], cfg["dropout"], cfg["tied"],
        cfg["init_range"],
    )
    model = RNNModel(model_config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    state = TrainState(lr=cfg["lr"])
    best_weights = None  # a CPU copy of the best model so far: what the final test uses
    own_rng = False  # whether this rank goes on with the random stream it saved
    if cfg["resume"] is not None:
        if payload["vocab"] != vocab.idx2word:
            raise UserError(f"the corpus {cfg['dataset']!r} is not the one {cfg['resume']} was trained on (its vocabulary differs)")
        model.load_state_dict(payload["model_state"])
        optimizer.load_state_dict(payload["training"]["optimizer"])
        state = TrainState.from_dict(payload["training"]["state"], device)
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
    reporter = Reporter(interactive=_INTERACTIVE and world.is_main, log_metric=_run.log_scalar)
    meta = {"wordlm_version": __version__, "config": cfg}

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
        nonlocal best_weights
        best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        best_meta = {**meta, "valid_loss": current.best_val_loss, "epoch": current.best_epoch}
        training = training_payload()
        if world.is_main:
            _save_safely(cfg["save"], model, vocab, meta=best_meta, training=training)

    last_write = time.monotonic()

    def after_batch() -> None:
        nonlocal last_write
        due = cfg["checkpoint_every"] is not None and time.monotonic() - last_write >= 60 * cfg["checkpoint_every"]
        signum, due = world.agree(stop.requested or 0, due)  # a signal to any rank stops all at this batch
        if signum:
            stop.request(signum)
        stop.check()
        if due:
            save_last()
            last_write = time.monotonic()

    def on_diverged(divergence) -> None:
        if cfg["on_divergence"] == "stop" or best_weights is None or state.divergences >= 3:
            kept = f"{cfg['save']} keeps the best model (epoch {state.best_epoch})" if best_weights else "no model was saved"
            raise UserError(f"{divergence}; {kept}; lower lr or clip, or set on_divergence=reload")
        model.load_state_dict(best_weights)
        optimizer.state.clear()
        state.lr /= 4
        if world.is_main:  # every rank reloads alike; one says so
            _warn(f"{divergence}: reloaded the best model (epoch {state.best_epoch}), lr now {state.lr:g}")

    interrupted = False
    started = time.perf_counter()
    with StopRequests(second_interrupts=world.size == 1) as stop:
        try:
            with stop.deferred():
                fit(
                    world.wrap(model), train_data, valid_ids, optimizer, state,
                    epochs=cfg["epochs"], bptt=cfg["bptt"], clip=cfg["clip"],
                    eval_batch_size=cfg["eval_batch_size"], log_interval=cfg["log_interval"],
                    max_batches=cfg["max_batches"], save_best=save_best, reporter=reporter,
                    lr_decay=cfg["lr_decay"], lr_decay_start=cfg["lr_decay_start"],
                    after_batch=after_batch, after_epoch=lambda _: save_last(), on_diverged=on_diverged,
                    pause_deferral=stop.immediate if world.size == 1 else nullcontext, world=world,
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
                    _save_safely(cfg["save"], model, vocab, meta={**meta, "epoch": 0, "interrupted_at": stopped_at})
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
    if not world.is_main:
        pass  # rank 0 records the run
    elif os.path.isfile(cfg["save"]):
        _run.add_artifact(cfg["save"], name=os.path.basename(cfg["save"]))
    else:
        _warn(f"{cfg['save']} could not be written: the model of this run was not saved")
    return test_ppl


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


_OBSERVER_FLAGS = ("-F", "--file_storage", "-m", "--mongo_db", "-s", "--sql", "-t", "--tiny_db",
                   "-S", "--s3", "-G", "--gcs", "-u", "--unobserved")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run Sacred's command line, recording runs in ``runs/`` unless an observer flag or ``-u`` is given."""
    argv = list(sys.argv if argv is None else argv)
    observed = any(arg.startswith(flag) for arg in argv[1:] for flag in _OBSERVER_FLAGS)
    follower = launched_rank() > 0  # under torchrun every process runs this; rank 0 alone records and prints
    if follower:
        argv += [] if "-u" in argv or "--unobserved" in argv else ["-u"]
        argv += [] if any(arg.startswith(("-l", "--loglevel")) for arg in argv[1:]) else ["-l", "WARNING"]
    elif not observed and not ex.observers:
        ex.observers.append(FileStorageObserver(os.environ.get("WORDLM_RUNS_DIR", "runs")))
    try:
        with open(os.devnull, "w") if follower else nullcontext(sys.stdout) as out, redirect_stdout(out):
            ex.run_commandline(argv)
    except KeyboardInterrupt:  # a second Ctrl-C while the interrupted run was being tested
        print("error: interrupted again; stopped without testing (the checkpoints written are complete)", file=sys.stderr)
        sys.exit(130)
