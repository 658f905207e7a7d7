"""One training run from a config: check, set up, train, test, save, record.

Main names: ``plan_run`` (the one check of a run's values before any work, and resume's merge), its ``RunPlan``,
``train_run`` (what ``wordlm.train`` and ``main.py with ...`` both call), its ``TrainingRun``, and the ``Recorder`` a
run reports its figures to: in memory here; the command line's forwards them to Sacred's run.
Must not import Sacred.

    cfg, given = make_config("smoke", dataset="wikitext-2")
    result = train_run(plan_run(cfg, given))
    result.test_ppl, result.history["valid.ppl"]
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wordlm.checks import check_output, check_path, path_problem, resolve_device
from wordlm.config import PRESETS, build_model_config, differing_keys, resumed_config, validate_training_config
from wordlm.data.cache import load_corpus_cached
from wordlm.data.corpus import SPLITS, Corpus, batchify
from wordlm.data.datasets import check_dataset, load_dataset, resolve_dataset
from wordlm.errors import UserError, warn
from wordlm.evaluation import evaluate_loss, perplexity
from wordlm.export import check_export_available, export_onnx
from wordlm.files import same_file
from wordlm.generation import format_samples, generate_words
from wordlm.language_model import LanguageModel
from wordlm.models import ModelConfig, build_model
from wordlm.system import bfloat16_emulated, bfloat16_unavailable, tune_cpu_allocator
from wordlm.tracking.plots import LEARNING_CURVES_PNG, plot_learning_curves
from wordlm.tracking.runs import MetricHistory
from wordlm.tracking.tensorboard_log import SAMPLE_WORDS, TensorBoardLog, check_tensorboard, run_folder_name
from wordlm.training.checkpoint import CheckpointKeeper, check_checkpoint_file, load_checkpoint
from wordlm.training.distributed import (
    World,
    elastic_restarts,
    launched_size,
    lost_contact,
    lost_contact_message,
    split_rng_streams,
    start_world,
    stop_world,
)
from wordlm.training.signals import StopRequests, ignore_termination
from wordlm.training.trainer import (
    Precision,
    Reporter,
    Trainer,
    TrainOptions,
    TrainState,
    make_optimizer,
    resume_training,
)
from wordlm.version import __version__

__all__ = [
    "Recorder", "TrainingRun", "AUTO", "RUN_ID_ENV", "RunFinished", "RunPlan", "restart_count", "plan_run",
    "train_run"
]  # fmt: skip


class Recorder:
    """Where a run's figures go besides the console. This one keeps them in memory (``history``, ``info``) and
    has nowhere to keep files; the command line's subclass also hands everything to Sacred's run record."""

    run_id: str | None = None
    observed = False  # whether artifacts (the model, the learning curves) are kept anywhere

    def __init__(self) -> None:
        self.history = MetricHistory()
        self.info: dict = {}

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        self.history.log(name, value, step)

    def update_info(self, **info) -> None:
        self.info.update(info)

    def add_artifact(self, path: str, name: str) -> None:
        pass

    def end_early(self) -> str | None:
        """Asked after each validated epoch that leaves more to train: why training should end there (a sweep's
        pruner), or None to go on."""
        return None


@dataclass
class TrainingRun:
    """What a training run gives back (``train_run``, ``wordlm.train``).

    Attributes:
        model: the tested model (the best by validation loss, or the stopped one) as a ``LanguageModel``.
        test_ppl: its test perplexity (``test_loss`` in nats per token).
        best_valid_ppl: the best validation perplexity (None when no epoch finished).
        history: every metric as ``(step, value)`` pairs, e.g. ``history["valid.ppl"]`` (step: the epoch),
            ``history["train.ppl"]`` (step: tokens seen).
        checkpoint: the file holding the best model (``save``).
        config: every key the run trained with (a resumed run's merged with its checkpoint's).
        info: what a run record's info holds: ``best_epoch``, ``interrupted``, ``training_seconds``, ...
    """

    model: LanguageModel
    test_ppl: float
    best_valid_ppl: float | None
    history: dict[str, list[tuple[int, float]]]
    checkpoint: Path
    config: dict
    info: dict = field(default_factory=dict)
    test_loss: float = float("nan")


AUTO = "auto"  # resume="auto": from save_last when it holds this run's latest state, else from the start
RUN_ID_ENV = "TORCHELASTIC_RUN_ID"  # torchrun's id of the job, the same in every restart (--rdzv-id, or random)


class RunFinished(UserError):
    """``resume='auto'`` found the run finished: nothing is left to train (the command line exits 0)."""


@dataclass(frozen=True)
class RunPlan:
    """A training run whose values passed every check: the config it trains with (a resumed run's merged with
    its checkpoint's), the keys the user gave, the checkpoint it resumes from, read once, and why it resumes
    when the user did not name the state (``resume='auto'``, torchrun's restart)."""

    config: dict
    given: frozenset[str] = frozenset()
    resume_payload: dict | None = None
    resumed_by: str | None = None


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (0: the first start, or no torchrun), as every rank counts
    it: a machine's own count can stay 0 when another machine's worker failed (``elastic_restarts``)."""
    return elastic_restarts()


def _own_state(cfg: dict) -> tuple[dict, dict | None, str | None]:
    """Resolve ``resume='auto'`` and torchrun's restarts to the state they continue from.

    ``resume='auto'`` (a job requeued by its scheduler runs the same command again): save_last when it holds a
    state of this run's config, the start when there is none; a state of another config, a damaged file or a
    finished run are refused in one line, and the file is kept. After torchrun restarted the workers: save_last
    when this very job wrote it (``TORCHELASTIC_RUN_ID``) with this config, else ``resume`` as given.

    Returns:
        ``(cfg, payload, why)``: the config with ``resume`` set to the state's path (or None, or as given), the
        loaded state, and why it is resumed (for the console and the record).
    """
    auto, restarts, path = cfg["resume"] == AUTO, restart_count(), cfg["save_last"]
    check_path("save_last", path)
    if not os.path.lexists(path):  # nothing written yet: the run starts (a restart: as its command says)
        return ({**cfg, "resume": None} if auto else cfg), None, None
    said = f"resume={AUTO!r}" if auto else f"torchrun's restart {restarts}"
    try:
        check_checkpoint_file(path)
        payload = load_checkpoint(path)
    except UserError as problem:
        raise UserError(f"{said}: {problem}; {path} is kept: move it away to start over") from None
    meta = payload.get("meta") or {}
    differ = differing_keys(cfg, meta.get("config") or {}, meta.get("corpus_folder"))
    this_job = restarts > 0 and meta.get("elastic_run_id") == os.environ.get(RUN_ID_ENV)
    if payload.get("training") and not differ and (auto or this_job):
        state = payload["training"]["state"]
        epochs = (meta.get("config") or {}).get("epochs", cfg["epochs"])
        if auto and not this_job and (state.get("finished") or state["epoch"] > epochs):
            best = f" (best valid ppl {perplexity(state['best_val_loss']):.2f})" if state.get("best_epoch") else ""
            raise RunFinished(
                f"resume='auto': the run whose latest state is {path} has finished{best}; its best model is in "
                f"{cfg['save']}. Nothing is trained again: give epochs or time_budget more with resume={path}, or "
                "a new save= for a new run"
            )
        why = f"torchrun restarted the workers: restart {restarts}" if this_job else "resume='auto'"
        return {**cfg, "resume": path}, payload, why
    if not auto:  # a restart: the state is another run's, or none of this job yet
        return cfg, None, None
    if not payload.get("training"):
        raise UserError(f"resume='auto': {path} holds no training state; move it away to start over")
    shown = ", ".join(f"{key}={cfg[key]!r}, not its {meta['config'][key]!r}" for key in differ[:4])
    raise UserError(
        f"resume='auto': {path} holds the state of another run ({shown}); it is kept: give this run its own "
        f"save=, or resume={path} to continue that run with these keys"
    )


def plan_run(cfg: dict, given: set[str] | frozenset[str] = frozenset()) -> RunPlan:
    """Check a training run's values once, before any work, and merge a resumed run's config with its checkpoint's.

    Every entry runs this once: ``wordlm.train`` through ``train_run``, the command line in a Sacred config hook,
    before Sacred starts the run and its observers (so a refused value leaves no run record).

    Args:
        cfg: every training key (``wordlm.config.make_config``, or Sacred's config).
        given: the keys the user gave, whatever their value (a preset's keys count as given): with ``resume``
            each one is honoured or refused, never silently replaced by the checkpoint's.

    Raises:
        UserError: one line naming the key and what to give instead.
    """
    payload, why = None, None
    if cfg["resume"] == AUTO or restart_count() > 0:
        cfg, payload, why = _own_state(cfg)
    if cfg["resume"] is not None:
        if payload is None:
            check_path("resume", cfg["resume"])
            check_checkpoint_file(cfg["resume"])
            payload = load_checkpoint(cfg["resume"])
        cfg = resumed_config(cfg, set(given), payload, cfg["resume"])
    validate_training_config(cfg)
    folder = check_dataset(cfg["dataset"])
    _check_outputs(cfg)
    if folder is not None:
        _not_a_corpus_file(cfg, folder)
    _check_machine(cfg)
    if folder is not None and cfg["adaptive_softmax"] is not None:  # its cutoffs must fall inside the vocabulary
        corpus, _ = load_corpus_cached(folder, cfg["min_freq"], cfg["max_vocab"])
        build_model_config(len(corpus.vocab), cfg)
    return RunPlan(cfg, frozenset(given), payload, why)


def train_run(
    plan: RunPlan | dict, *, modified: set[str] = frozenset(), recorder: Recorder | None = None,
    log: logging.Logger | None = None, interactive: bool = False,
) -> TrainingRun:  # fmt: skip
    """Train a model as the config says, keep the best one by validation loss, test it, and record the run.

    Args:
        plan: the run checked by ``plan_run``; or a config with every training key, checked here.
        modified: with a config: the keys the user gave (``plan_run``'s ``given``).
        recorder: where the figures and files go (default: in memory only).
        log: where the info lines go (default: the ``wordlm`` logger).
        interactive: draw a progress bar (a terminal).

    Raises:
        UserError: bad config, data or paths; a divergence; another process of a distributed run lost.
    """
    recorder = recorder or Recorder()
    log = log or logging.getLogger("wordlm")
    if not isinstance(plan, RunPlan):
        plan = plan_run(plan, modified)
    try:
        return _train_run(plan, recorder, log, interactive)
    except Exception as problem:
        if not lost_contact(problem):
            raise
        ignore_termination()  # (as StopRequests does): torchrun's SIGTERM must not cut off this line and the record
        raise UserError(
            f"{lost_contact_message(problem)}: another process failed, was killed or hung, and its own output "
            f"says which; resume={plan.config['save_last']} continues from the latest state written"
        ) from None
    finally:
        stop_world()


def _train_run(plan: RunPlan, recorder: Recorder, log, interactive: bool) -> TrainingRun:
    cfg, payload = plan.config, plan.resume_payload
    world, device = _start(cfg)
    if cfg["amp"] == "bf16" and device.type == "cpu" and world.is_main and (emulated := bfloat16_emulated()):
        log.warning("amp='bf16' trains slower than float32 here: %s (0.31x on an Ice Lake Xeon); leave amp unset "
                    "for float32", emulated)  # fmt: skip
    with world.local_rank_first():  # one download or tokenization per machine, the cache for the rest
        folder = resolve_dataset(cfg["dataset"], log=log.info)
        corpus = load_dataset(folder, log=log.info, min_freq=cfg["min_freq"], max_vocab=cfg["max_vocab"])
    _not_a_corpus_file(cfg, folder)  # (planned before a download: the folder is known only now)
    model_config = _model_config(cfg, corpus)
    _check_memory(model_config, cfg, device)
    model = build_model(model_config).to(device)
    if cfg["adaptive_softmax"] is not None:  # (a resumed run loads the order with the weights)
        model.decoder.sort_words_by_frequency(torch.bincount(corpus.train, minlength=len(corpus.vocab)))
    optimizer = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["wdecay"])
    meta = {"wordlm_version": __version__, "config": cfg, "corpus_folder": str(folder.resolve()),
            "elastic_run_id": os.environ.get(RUN_ID_ENV),
            "tensorboard_run": _tensorboard_run(plan, recorder) if world.is_main else None}  # fmt: skip
    keeper = CheckpointKeeper(cfg["save"], cfg["save_last"], model, corpus.vocab, meta, world)
    state, own_rng = TrainState(lr=cfg["lr"]), False  # own_rng: this rank goes on with the stream it saved
    options = TrainOptions.from_config(cfg)
    if payload is not None:
        training = keeper.restore(payload, cfg["dataset"], cfg["resume"])
        lr = cfg["lr"] if "lr" in plan.given else None  # a resume keeps its lr unless one is given
        state, optimizer, own_rng = resume_training(
            training, model, options, lr=lr, finetune=cfg["finetune"], world=world
        )
        why = f" ({plan.resumed_by})" if plan.resumed_by else ""
        log.info("resumed from %s at epoch %d, batch %d%s", cfg["resume"], state.epoch, state.batch, why)
    if not own_rng:
        split_rng_streams(world)  # ranks > 0: dropout masks of their own
    log.info(
        "model: %s, %d parameters, vocabulary %d, device %s",
        cfg["model_type"], sum(p.numel() for p in model.parameters()), len(corpus.vocab), device,
    )  # fmt: skip
    train_data = batchify(corpus.train, cfg["batch_size"])[:, world.share(cfg["batch_size"])]  # (rows, B/N)
    network = world.wrap(model)  # what training calls: DDP's wrapper across processes, torch.compile's on top
    if cfg["compile"]:
        network = torch.compile(network)
    board = None  # TensorBoard's writer: rank 0's, with the tensorboard key
    if cfg["tensorboard"] and world.is_main:
        board = TensorBoardLog(cfg["tensorboard"], meta["tensorboard_run"], state, cfg,
                               sample=lambda: _sample(model, corpus.vocab, cfg["seed"]))  # fmt: skip
        log.info("TensorBoard: %s (%s)", board.path, "continued" if board.resumed else "new")
    log_metric = recorder.log_scalar if board is None else board.tee(recorder.log_scalar)
    reporter = Reporter(interactive=interactive and world.is_main, log_metric=log_metric)
    started, tokens_before = time.perf_counter(), state.tokens_seen  # a resumed run's earlier sessions excluded
    with StopRequests(second_interrupts=world.size == 1, ignore_term_after_error=world.size > 1) as stop:
        trainer = Trainer(
            model, train_data.contiguous().to(device), corpus.valid.to(device), optimizer, state,
            options, reporter=reporter, checkpoints=keeper, world=world,
            precision=Precision(cfg["amp"], device.type), network=network, stop=stop, log=log.info,
            end_early=recorder.end_early,
        )  # fmt: skip
        interrupted = trainer.run()
        training_seconds = time.perf_counter() - started
        keeper.load_best()
        test_loss, test_tokens = evaluate_loss(
            model, corpus.test.to(device), cfg["eval_batch_size"], cfg["bptt"], world
        )
    test_ppl = perplexity(test_loss)
    print("=" * 89)
    print(f"| End of training | test loss {test_loss:5.2f} | test ppl {test_ppl:8.2f}")
    print("=" * 89, flush=True)
    log_metric("test.loss", test_loss)
    log_metric("test.ppl", test_ppl)
    recorder.update_info(
        interrupted=interrupted,
        stop_signal=stop.name or None,
        stopped_at={"epoch": state.epoch, "batch": state.batch} if interrupted else None,
        resumed_from=cfg["resume"],
        resumed_by=plan.resumed_by,
        torchrun_restarts=restart_count(),
        best_epoch=state.best_epoch,
        best_valid_ppl=perplexity(state.best_val_loss) if state.best_epoch else None,
        test_ppl=test_ppl,
        test_tokens=test_tokens,
        training_seconds=training_seconds,
        tokens_seen=state.tokens_seen,
        tokens_per_second=_rate(state.tokens_seen - tokens_before, training_seconds),  # this session's
        time_budget_spent=trainer.budget_spent,
        seconds_trained=state.seconds,  # over every session of a resumed run
    )
    if board is not None:
        board.finish(recorder.info, interrupted)
    if world.is_main:  # rank 0 records the run and writes the files
        _record(cfg, recorder, keeper, state, interrupted, test_ppl, log)
    history = {name: list(zip(series.steps, series.values)) for name, series in recorder.history.metrics.items()}
    return TrainingRun(
        LanguageModel(model, corpus.vocab, keeper.written_meta), test_ppl, recorder.info.get("best_valid_ppl"),
        history, Path(cfg["save"]), cfg, dict(recorder.info), test_loss,
    )  # fmt: skip


def _tensorboard_run(plan: RunPlan, recorder: Recorder) -> str | None:
    """The run's sub-folder of the tensorboard folder: a resumed run's own (its state keeps the name, even when a
    session ran without the key), else a new one named by ``run_folder_name`` (None without the key)."""
    stored = ((plan.resume_payload or {}).get("meta") or {}).get("tensorboard_run")
    if stored or not plan.config["tensorboard"]:
        return stored
    name = run_folder_name(plan.config, plan.given, PRESETS, recorder.run_id)
    folder, taken = Path(plan.config["tensorboard"]).expanduser(), 1
    while (folder / (name if taken == 1 else f"{name}-{taken}")).exists():  # two runs started in the same second
        taken += 1
    return name if taken == 1 else f"{name}-{taken}"


def _sample(model, vocab, seed: int) -> str:
    """A short text sampled from the model, from its own generator: training's random streams are left alone."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return format_samples("", generate_words(model, vocab, words=SAMPLE_WORDS, generator=generator))


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second, or None when nothing was trained (a finished run resumed only to be tested)."""
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def _check_machine(cfg: dict) -> None:
    """What this machine, or torchrun's launch, cannot do: a device it lacks, a precision its device lacks, a batch
    that the launched processes cannot share."""
    device = resolve_device(cfg["device"])
    if cfg["batch_size"] % launched_size():
        raise UserError(
            f"batch_size={cfg['batch_size']} must be a multiple of the {launched_size()} processes: each one "
            "trains an equal block of the batch's columns"
        )
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise UserError("amp='fp16' needs a CUDA device (half precision with loss scaling); on a CPU use amp='bf16'")
    if cfg["amp"] == "bf16" and device.type == "cpu" and (lacking := bfloat16_unavailable()):
        raise UserError(f"amp='bf16' cannot train on this CPU: {lacking}; leave amp unset to train in float32")


def _start(cfg: dict) -> tuple[World, torch.device]:
    """The device and, under torchrun, the process group (the values were checked by ``plan_run``)."""
    world, device = start_world(resolve_device(cfg["device"]))  # several processes under torchrun; else as is
    if device.type == "cpu":
        tune_cpu_allocator()
    return world, device


def _model_config(cfg: dict, corpus: Corpus) -> ModelConfig:
    if corpus.train.numel() // cfg["batch_size"] < 2:
        raise UserError(
            f"batch_size={cfg['batch_size']} needs at least {2 * cfg['batch_size']} training tokens, "
            f"but the training split has {corpus.train.numel()}; lower batch_size"
        )
    return build_model_config(len(corpus.vocab), cfg)


def _record(cfg, recorder: Recorder, keeper: CheckpointKeeper, state, interrupted, test_ppl, log) -> None:
    """Keep this run's model and learning curves with its record, and write the ONNX export if asked."""
    if keeper.written is None and not os.path.isfile(cfg["save"]):
        warn(f"{cfg['save']} could not be written: the model of this run was not saved")
    elif recorder.observed:
        with tempfile.TemporaryDirectory() as folder:
            recorder.add_artifact(keeper.copy_for_record(folder), name=os.path.basename(cfg["save"]))
    if cfg["onnx_export"]:
        try:
            log.info("wrote %s", export_onnx(keeper.model, cfg["onnx_export"], keeper.vocab))
        except OSError as problem:
            warn(f"could not write onnx_export={cfg['onnx_export']!r} ({path_problem(problem)}); the model is in "
                 f"{cfg['save']}: `python main.py export with checkpoint={cfg['save']}` writes it later")  # fmt: skip
    if recorder.observed:
        title = f"run {recorder.run_id} · {cfg['model_type']} {cfg['nlayers']}x{cfg['nhid']}"
        title += " · interrupted" if interrupted else ""
        _add_learning_curves(recorder, log, title=title, best_epoch=state.best_epoch, test_ppl=test_ppl)


def _add_learning_curves(recorder: Recorder, log, **plot_options) -> None:
    """Keep a PNG of the learning curves with the run's records; a failure to draw is one warning line."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = plot_learning_curves(recorder.history.metrics, os.path.join(folder, LEARNING_CURVES_PNG),
                                        **plot_options)  # fmt: skip
            recorder.add_artifact(str(path), name=LEARNING_CURVES_PNG)
    except Exception as problem:  # noqa: BLE001 - a picture must never cost the run
        reason = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
        log.warning("learning curves not drawn: %s", reason)


_OUTPUTS = ("save", "save_last", "onnx_export")  # what training writes: checked before it starts


def _check_outputs(cfg: dict) -> None:
    """Every output of a training run checked before any work: writable, a file, each its own, no input."""
    if cfg["onnx_export"]:
        check_export_available()
    if cfg["tensorboard"] is not None:
        check_tensorboard(cfg["tensorboard"])
    keys = [key for key in _OUTPUTS if key != "onnx_export" or cfg[key]]  # save and save_last are never optional
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
