"""wordlm: train recurrent word-level language models (Elman RNN, GRU, LSTM).

Run `python main.py with key=value ...` to train, `python main.py print_config` to see every key
with its default and meaning, and `python main.py print_named_configs` for the presets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds

from wordlm import __version__
from wordlm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from wordlm.corpora import load_dataset, resolve_dataset
from wordlm.data import EOS, SPLITS, UNK, batchify
from wordlm.errors import UserError
from wordlm.export import export_onnx
from wordlm.generation import (
    check_sampling_options,
    encode_prompt,
    format_samples,
    generate_words,
    score_lines,
    target_log_probs,
    tokenize_for_scoring,
)
from wordlm.model import ModelConfig, RNNModel
from wordlm.training import Reporter, TrainState, evaluate_loss, fit, perplexity


def _has_git_commit(path: str) -> bool:
    """Whether ``path`` is in a git repository with a commit (Sacred crashes in one without: sacred#915)."""
    try:
        import git

        git.Repo(path, search_parent_directories=True).head.commit
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
    onnx_export = None  # write one model step as ONNX here: after training, or from checkpoint with `export`


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
        raise UserError(f"{key}={value!r} must be a positive integer")


def _check_positive_number(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise UserError(f"{key}={value!r} must be a positive, finite number")


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


def build_model_config(ntoken, model_type, emsize, nhid, nlayers, dropout, tied) -> ModelConfig:
    try:
        return ModelConfig(ntoken, model_type, emsize, nhid, nlayers, dropout, tied)
    except ValueError as problem:
        raise UserError(str(problem)) from None


@ex.main
def train(
    _run, _log, dataset, batch_size, bptt, clip, dropout, emsize, epochs, log_interval, lr, model_type,
    nhid, nlayers, save, tied, max_batches, device, eval_batch_size, onnx_export,
):  # fmt: skip
    """Train a language model, keep the best one by validation loss, and report its test perplexity."""
    try:
        return _train(**locals())
    except UserError as problem:
        raise error(str(problem)) from None


def _train(
    _run, _log, dataset, batch_size, bptt, clip, dropout, emsize, epochs, log_interval, lr, model_type,
    nhid, nlayers, save, tied, max_batches, device, eval_batch_size, onnx_export,
):  # fmt: skip
    for key in ("batch_size", "bptt", "epochs", "log_interval", "eval_batch_size"):
        _check_positive_int(key, locals()[key])
    _check_positive_int("max_batches", max_batches, allow_none=True)
    _check_positive_number("lr", lr)
    _check_positive_number("clip", clip)
    model_config = build_model_config(1, model_type, emsize, nhid, nlayers, dropout, tied)
    device = resolve_device(device)

    corpus = load_dataset(dataset, log=_log.info)
    if corpus.train.numel() < batch_size * 2:
        raise UserError(
            f"batch_size={batch_size} needs at least {2 * batch_size} training tokens, "
            f"but the training split has {corpus.train.numel()}; lower batch_size"
        )
    vocab = corpus.vocab
    model_config = build_model_config(len(vocab), model_type, emsize, nhid, nlayers, dropout, tied)
    model = RNNModel(model_config).to(device)
    _log.info(
        "model: %s, %d parameters, vocabulary %d, device %s",
        model_type, sum(p.numel() for p in model.parameters()), len(vocab), device,
    )  # fmt: skip
    train_data = batchify(corpus.train, batch_size).to(device)  # (rows, B)
    valid_ids = corpus.valid.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    state = TrainState(lr=lr)
    reporter = Reporter(interactive=_INTERACTIVE, log_metric=_run.log_scalar)
    meta = {"wordlm_version": __version__, "config": dict(_run.config)}

    def save_best(current: TrainState) -> None:
        save_checkpoint(
            save, model, vocab,
            meta={**meta, "valid_loss": current.best_val_loss, "epoch": current.best_epoch},
        )  # fmt: skip

    interrupted = False
    started = time.perf_counter()
    try:
        fit(
            model, train_data, valid_ids, optimizer, state,
            epochs=epochs, bptt=bptt, clip=clip, eval_batch_size=eval_batch_size,
            log_interval=log_interval, max_batches=max_batches, save_best=save_best, reporter=reporter,
        )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        reporter.close()
        print("-" * 89)
        print(f"Exiting from training early (epoch {state.epoch}, batch {state.batch})", flush=True)
        if state.best_epoch == 0:
            print(f"No epoch finished yet: saving the current model to {save} and testing it")
            save_checkpoint(save, model, vocab, meta={**meta, "epoch": 0, "interrupted_at": state.to_dict()})
    training_seconds = time.perf_counter() - started

    best = load_checkpoint(save, map_location=device)
    model.load_state_dict(best["model_state"])
    test_loss, test_tokens = evaluate_loss(model, corpus.test.to(device), eval_batch_size, bptt)
    test_ppl = perplexity(test_loss)
    print("=" * 89)
    print(f"| End of training | test loss {test_loss:5.2f} | test ppl {test_ppl:8.2f}")
    print("=" * 89, flush=True)
    _run.log_scalar("test.loss", test_loss)
    _run.log_scalar("test.ppl", test_ppl)
    _run.info.update(
        interrupted=interrupted,
        stopped_at={"epoch": state.epoch, "batch": state.batch} if interrupted else None,
        best_epoch=state.best_epoch,
        best_valid_ppl=perplexity(state.best_val_loss) if state.best_epoch else None,
        test_ppl=test_ppl,
        test_tokens=test_tokens,
        training_seconds=training_seconds,
        tokens_seen=state.tokens_seen,
        tokens_per_second=state.tokens_seen / training_seconds if training_seconds > 0 else None,
    )
    _run.add_artifact(save, name=os.path.basename(save))
    if onnx_export:
        _log.info("wrote %s", export_onnx(model, onnx_export, vocab))
    return test_ppl


def _load_model(checkpoint, device):
    """The checkpoint's model on ``device`` (eval mode) and its vocabulary."""
    model, vocab = model_from_checkpoint(load_checkpoint(checkpoint))
    return model.to(resolve_device(device)), vocab


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
    check_sampling_options(words=words, temperature=temperature, top_k=top_k, top_p=top_p, samples=samples)
    prompt = "" if prompt is None else str(prompt)
    model, vocab = _load_model(checkpoint, device)
    _, unknown = encode_prompt(vocab, prompt)
    if unknown:
        _log.warning(
            "prompt words not in the checkpoint's vocabulary, %s: %s",
            f"read as {UNK}" if UNK in vocab else f"left out (it has no {UNK})", " ".join(unknown),
        )  # fmt: skip
    generator = torch.Generator(device=model.encoder.weight.device).manual_seed(seed)
    texts = generate_words(
        model, vocab, words=words, prompt=prompt, samples=samples, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos, generator=generator,
    )  # fmt: skip
    output = format_samples(prompt, texts)
    if outf == "-":
        sys.stdout.write(output)
        sys.stdout.flush()
    else:
        Path(outf).write_text(output, encoding="utf-8")
        _log.info("wrote %d sample(s), %d words, to %s", samples, sum(map(len, texts)), outf)


@ex.command
def evaluate(_run, _log, checkpoint, dataset, split, text, line_scores, eval_batch_size, bptt, device):
    """Print a checkpoint's perplexity on a split of dataset (`split`) or on any text file (`text`)."""
    try:
        return _evaluate(**locals())
    except UserError as problem:
        raise error(str(problem)) from None


def _evaluate(_run, _log, checkpoint, dataset, split, text, line_scores, eval_batch_size, bptt, device):
    _check_positive_int("eval_batch_size", eval_batch_size)
    _check_positive_int("bptt", bptt)
    if text is None and split not in SPLITS:
        raise UserError(f"split={split!r} is not a split; use one of {', '.join(SPLITS)}")
    model, vocab = _load_model(checkpoint, device)
    path = Path(text) if text is not None else resolve_dataset(dataset) / f"{split}.txt"
    ids, unknown = tokenize_for_scoring(path, vocab, model.config.ntoken)
    ids = ids.to(model.encoder.weight.device)
    if unknown:
        _log.info("%d of %d tokens are not in the checkpoint's vocabulary and were read as <unk>", unknown, len(ids))
    loss, count = evaluate_loss(model, ids, eval_batch_size, bptt)
    ppl = perplexity(loss)
    print(f"| evaluate {path} | tokens {count} | loss {loss:5.2f} | ppl {ppl:8.2f}", flush=True)
    _run.info.update(scored=str(path), tokens=count, unknown=unknown, loss=loss, ppl=ppl)
    if line_scores:
        if EOS not in vocab:
            raise UserError(f"line_scores needs {EOS} in the checkpoint's vocabulary to find the lines; it has none")
        scores = score_lines(ids, target_log_probs(model, ids, eval_batch_size, bptt), vocab.word2idx[EOS])
        Path(line_scores).write_text("".join(json.dumps(record) + "\n" for record in scores), encoding="utf-8")
        _log.info("wrote the log-probabilities of %d lines to %s", len(scores), line_scores)
    return ppl


@ex.command
def export(_log, checkpoint, onnx_export):
    """Write a checkpoint's model as ONNX: `python main.py export with checkpoint=model.pt onnx_export=model.onnx`."""
    try:
        model, vocab = _load_model(checkpoint, "cpu")
        target = onnx_export or Path(checkpoint).with_suffix(".onnx")
        _log.info("wrote %s", export_onnx(model, target, vocab))
        return str(target)
    except UserError as problem:
        raise error(str(problem)) from None


_OBSERVER_FLAGS = ("-F", "--file_storage", "-m", "--mongo_db", "-s", "--sql", "-t", "--tiny_db",
                   "-S", "--s3", "-G", "--gcs", "-u", "--unobserved")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run Sacred's command line, recording runs in ``runs/`` unless an observer flag or ``-u`` is given."""
    argv = list(sys.argv if argv is None else argv)
    observed = any(arg.startswith(flag) for arg in argv[1:] for flag in _OBSERVER_FLAGS)
    if not observed and not ex.observers:
        ex.observers.append(FileStorageObserver(os.environ.get("WORDLM_RUNS_DIR", "runs")))
    ex.run_commandline(argv)
