"""A trained model as users hold it: ``LanguageModel`` (sample, generate, score, save) and ``load``.

Main names: ``load``, ``LanguageModel`` and ``Text``. Must not import Sacred. What its methods return is what the
command line's ``generate`` writes and ``evaluate`` prints: both call them.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Iterable
from pathlib import Path

import torch

from wordlm.checks import (
    check_checkpoint_path,
    check_output,
    check_positive_int,
    check_seed,
    path_problem,
    resolve_device,
)
from wordlm.data.corpus import EOS, Vocabulary
from wordlm.errors import UserError
from wordlm.evaluation import evaluate_text, perplexity, score_lines, target_log_probs, tokenize_for_scoring
from wordlm.generation import check_sampling_options, format_samples, generate_words
from wordlm.models import ModelConfig, WordModel
from wordlm.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

__all__ = ["Text", "load", "LanguageModel"]

Text = str | os.PathLike | torch.Tensor  # text itself, a UTF-8 file, or the ids ``LanguageModel.tokenize`` gave

_KINDS = {"text": "a str (text)", "file": "a pathlib.Path (a file)", "ids": "a 1-D tensor of word ids",
          "lines": "a list of lines of text (each a str)"}  # fmt: skip


def _shown(value) -> str:
    """``value`` for an error line: its repr, shortened and on one line."""
    return " ".join(reprlib.repr(value).split())


def _text_argument(key: str, value, kinds: tuple[str, ...], ntoken: int) -> str | Path | torch.Tensor | list[str]:
    """Check an argument that holds text (``"text"``: a ``str``), a file (``"file"``: a path-like), word ids
    (``"ids"``: a tensor) or lines (``"lines"``: an iterable of one-line ``str``) before any work, whichever of them
    ``kinds`` allows; the one check of every method of ``LanguageModel`` that takes text.

    Returns:
        the ``str``, the path as a ``Path``, the ids as a ``(N,)`` long tensor (``N >= 2``, each below ``ntoken``),
        or the lines as a list.

    Raises:
        UserError: one line naming ``key``: a value of another type, or a tensor that holds no ids this model scores.
    """
    if isinstance(value, str) and "text" in kinds:
        return value
    if isinstance(value, os.PathLike) and "file" in kinds:
        return Path(value)
    if "lines" in kinds:
        if isinstance(value, (str, bytes)):
            raise UserError(f"{key} must be a list of lines, not one string; split it first, e.g. text.splitlines()")
        if isinstance(value, Iterable) and not isinstance(value, (torch.Tensor, os.PathLike)):
            lines = list(value)
            for number, line in enumerate(lines, 1):
                if not isinstance(line, str) or "\n" in line or "\r" in line:
                    raise UserError(
                        f"line {number} of score's {key} is {_shown(line)}; each must be one line of text (a str)"
                    )
            return lines
    if not isinstance(value, torch.Tensor) or "ids" not in kinds:
        allowed = [_KINDS[kind] for kind in kinds]
        allowed = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise UserError(f"{key}={_shown(value)} must be {allowed}")
    what = f"{key} (a tensor of shape {tuple(value.shape)}, {value.dtype})"
    if value.dim() != 1:
        raise UserError(f"{what} must be a 1-D tensor of word ids, as tokenize gives")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise UserError(f"{what} must hold integer word ids (torch.long), as tokenize gives")
    if value.numel() < 2:
        raise UserError(f"{what} has {value.numel()} id(s); scoring needs at least two (the first is only context)")
    low, high = int(value.min()), int(value.max())
    if low < 0 or high >= ntoken:
        raise UserError(f"{what} holds the id {low if low < 0 else high}; word ids run from 0 to {ntoken - 1} "
                        "(the checkpoint's vocabulary), as tokenize gives")  # fmt: skip
    return value.long()


def load(path: str | os.PathLike, device: str = "auto") -> LanguageModel:
    """Load a checkpoint (written by training or by ``LanguageModel.save``); nothing in the file is run.

    Args:
        path: the checkpoint file.
        device: where the model goes: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises:
        UserError: the file is missing, damaged or no wordlm checkpoint, or the device is not here; the
            message is the line ``generate.py``/``main.py evaluate`` print.
    """
    path = check_checkpoint_path(path)
    payload = load_checkpoint(path)
    model, vocab = model_from_checkpoint(payload)
    meta = payload.get("meta")
    return LanguageModel(model.to(resolve_device(device)), vocab, meta if isinstance(meta, dict) else None)


def _holds_training_state(path: str) -> bool:
    """Whether ``path`` is a wordlm checkpoint holding training state, as ``resume=`` asks of one."""
    if not os.path.isfile(path):
        return False
    try:
        return bool(load_checkpoint(path).get("training"))
    except UserError:  # no checkpoint at all, or an unreadable one: nothing resume could use
        return False


class LanguageModel:
    """A trained word-level language model and its vocabulary.

    Attributes:
        model: the ``WordModel`` (in eval mode).
        vocab: its ``Vocabulary`` (id = index into ``vocab.idx2word``).
        config: the model's ``ModelConfig`` (``model.config``).
        meta: what the checkpoint recorded beside the model (the training config, the validation loss), or ``{}``.
    """

    def __init__(self, model: WordModel, vocab: Vocabulary, meta: dict | None = None) -> None:
        if len(vocab) != model.config.ntoken:
            raise UserError(f"the vocabulary has {len(vocab)} words, the model {model.config.ntoken}; they do not fit")
        self.model = model.eval()
        self.vocab = vocab
        self.meta = dict(meta or {})

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sample(
        self, words: int = 1000, prompt: str = "", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 257, samples: int = 1, stop_at_eos: bool = False,
    ) -> list[list[str]]:  # fmt: skip
        """The words of each sample, the prompt excluded (``<eos>`` a word of its own); see ``generate``."""
        prompt = self._prompt(prompt)
        check_sampling_options(
            words=words, temperature=temperature, top_k=top_k, top_p=top_p, samples=samples, stop_at_eos=stop_at_eos
        )
        check_seed(seed)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate_words(
            self.model, self.vocab, words=words, prompt=prompt, samples=samples,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos, generator=generator,
        )  # fmt: skip

    def generate(
        self, words: int = 1000, prompt: str = "", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 257, samples: int = 1, stop_at_eos: bool = False,
    ) -> str:  # fmt: skip
        """Sample text after ``prompt``: the text ``generate.py with checkpoint=... outf=-`` writes with these keys.

        Args:
            words: tokens to sample per sample (an ``<eos>``, a line break, counts as one), at most
                ``wordlm.generation.MAX_WORDS`` (1,000,000).
            prompt: text (a ``str``) that primes the model; its words the vocabulary lacks become ``<unk>``.
            temperature: below 1 more likely words, above 1 more surprising ones.
            top_k: sample among the k most likely words only (0 = all).
            top_p: sample among the most likely words whose probabilities add up to ``top_p`` (1 = all).
            seed: the same seed gives the same text (on the same device).
            samples: texts sampled side by side; with more than one each is headed ``--- sample n of m ---``.
                At most ``MAX_SAMPLES`` (1,000), and ``words * samples`` at most ``MAX_TOKENS`` (10,000,000).
            stop_at_eos: end each sample at its first ``<eos>``.

        Returns:
            The prompt and what follows it, ``<eos>`` written as a line break; the text ends with one.

        Raises:
            UserError: a value that cannot be sampled with, in the command line's words.
        """
        texts = self.sample(words=words, prompt=prompt, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, samples=samples, stop_at_eos=stop_at_eos)  # fmt: skip
        return format_samples(prompt or "", texts)  # the prompt is a str or None, as sample checked

    def _prompt(self, prompt) -> str:
        """``prompt`` checked (``None`` is no prompt)."""
        return "" if prompt is None else _text_argument("prompt", prompt, ("text",), self.config.ntoken)

    def _ids(self, text) -> torch.Tensor:
        """The ids of ``text`` (a ``str``, a path or ids) on the model's device, after the one check of ``text``."""
        text = _text_argument("text", text, ("text", "file", "ids"), self.config.ntoken)
        return text.to(self.device) if isinstance(text, torch.Tensor) else self.tokenize(text)[0]

    def tokenize(self, text: str | os.PathLike) -> tuple[torch.Tensor, int]:
        """Token ids of ``text`` (a ``str``) or of the UTF-8 file a path names, as training read its corpus.

        Returns:
            ``(ids, unknown)``: ``(N,)`` ids on the model's device, and how many tokens became ``<unk>``.

        Raises:
            UserError: ``text`` is neither a ``str`` nor a path, no such file, fewer than two tokens, or words the
                vocabulary lacks and it has no ``<unk>``.
        """
        text = _text_argument("text", text, ("text", "file"), self.config.ntoken)
        ids, unknown = tokenize_for_scoring(text, self.vocab, self.config.ntoken)
        return ids.to(self.device), unknown

    def loss(self, text: Text, eval_batch_size: int = 10) -> tuple[float, int]:
        """Mean cross-entropy (nats per token) of ``text`` and how many tokens it covers (all but the first).

        ``text`` is a ``str`` of text, a path (``pathlib.Path``) of a UTF-8 file, or ids from ``tokenize`` (a 1-D
        integer tensor of at least two ids). ``eval_batch_size`` is the command line's key, with its default; the
        hidden state goes on from chunk to chunk, so no ``bptt`` changes the figure.

        Raises:
            UserError: ``text`` of another type or ids the model has no words for, or one of ``tokenize``'s.
        """
        check_positive_int("eval_batch_size", eval_batch_size)
        ids = self._ids(text)
        return evaluate_text(self.model, ids, eval_batch_size=eval_batch_size)[:2]

    def perplexity(self, text: Text, eval_batch_size: int = 10) -> float:
        """Perplexity of ``text``: the figure ``main.py evaluate with text=FILE`` prints for a file of it.

        ``text`` is a ``str`` of text (``lm.perplexity(Path("notes.txt").read_text())``), a path
        (``lm.perplexity(Path("notes.txt"))``) or ids from ``tokenize``; a ``str`` is always text, never a path.
        Raises ``UserError`` as ``loss`` does.
        """
        return perplexity(self.loss(text, eval_batch_size)[0])

    def line_scores(self, text: Text, eval_batch_size: int = 10) -> list[dict]:
        """Per line of ``text`` (as for ``perplexity``): ``{"line", "tokens", "logprob"}``, as ``line_scores=`` writes.

        A line's tokens are its words and its ``<eos>``; the text's first token is context only.
        Raises ``UserError`` as ``loss`` does, and where the vocabulary has no ``<eos>``.
        """
        check_positive_int("eval_batch_size", eval_batch_size)
        if EOS not in self.vocab:
            raise UserError(f"line_scores needs {EOS} in the checkpoint's vocabulary to find the lines; it has none")
        ids = self._ids(text)
        return score_lines(ids, target_log_probs(self.model, ids, eval_batch_size), self.vocab.word2idx[EOS])

    def score(self, lines: Iterable[str], eval_batch_size: int = 10) -> list[float]:
        """Each line's total natural-log probability, its ``<eos>`` included, the lines read as one text.

        The first line's first word is context only (nothing comes before it), as in ``line_scores=``;
        ``lm.score(Path("t.txt").read_text().splitlines())`` gives the ``logprob`` values that
        ``main.py evaluate with text=t.txt line_scores=...`` writes.

        Raises:
            UserError: ``lines`` is one string or no list of lines, or a line is no ``str`` or holds a line break.
        """
        lines = _text_argument("lines", lines, ("lines",), self.config.ntoken)
        records = self.line_scores("".join(line + "\n" for line in lines), eval_batch_size)
        return [record["logprob"] for record in records]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model, vocabulary and ``meta`` as a checkpoint that ``load`` and the command line read.

        Written atomically: a reader sees the previous file or the complete new one; a symbolic link is
        written through. The file holds no optimizer state, so it cannot be ``resume``d, only used.

        So a checkpoint that holds training state (training's ``save`` and ``save_last``, the file this model may
        have been loaded from) is never replaced with less than it held: saving over one is refused, the file is
        left as it was, and the message says to save elsewhere. Any other file is replaced, the file this model
        was loaded from included when it holds no training state (``save`` writes all it held).

        Raises:
            UserError: ``path`` is a folder, a device or FIFO, a checkpoint holding training state, or cannot be
                written.
        """
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        output = check_output("save", path, example="model.pt", text=False)  # the command line's policy for save=
        if output.kind == "file" and _holds_training_state(path):
            raise UserError(
                f"save={path!r} holds training state that resume= needs, which save would drop (it writes the model "
                "alone); save the model to another file"
            )
        try:
            save_checkpoint(path, self.model, self.vocab, **({"meta": self.meta} if self.meta else {}))
        except OSError as problem:
            raise UserError(f"cannot write save={path!r}: {path_problem(problem)}") from None
        return Path(path)
