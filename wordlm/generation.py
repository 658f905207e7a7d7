"""Sampling new text from a trained model (scoring given text is ``wordlm.evaluation``).

Main names: ``check_sampling_options`` (with the limits ``MAX_WORDS``, ``MAX_SAMPLES`` and ``MAX_TOKENS``),
``encode_prompt``, ``filter_logits``, ``sample_next``, ``sample_ids``, ``generate_words`` and ``format_samples``.
Must not import Sacred: every knob is an argument, and randomness comes from an optional
``torch.Generator`` (the global generator when it is ``None``).

Sampling keeps the recurrent state: the context (``<eos>`` and the prompt) runs through the model
once, then each step feeds only the token just sampled, so a step costs the same at word 10 and at
word 10,000. Samples run side by side as the columns of one batch.

Shape letters: ``P`` context length, ``S`` steps sampled, ``B`` samples (columns), ``V`` vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch

from wordlm.checks import check_int
from wordlm.data.corpus import EOS, UNK, Vocabulary
from wordlm.errors import UserError
from wordlm.models import WordModel

__all__ = [
    "MAX_WORDS", "MAX_SAMPLES", "MAX_TOKENS", "check_sampling_options", "encode_prompt", "filter_logits",
    "sample_next", "sample_ids", "generate_words", "format_samples"
]  # fmt: skip

# The most one call samples, so that sampling never asks for memory a machine lacks and always ends:
# - MAX_WORDS: a million tokens a sample is about 7 MB of text and a million steps one after the other, minutes
#   even for a small model (0.2 ms a step at best on a CPU, see _stepwise_kernels); more text is more calls.
# - MAX_SAMPLES: every step holds several (samples, vocabulary) float32 buffers (the logits, their tempered and
#   filtered copies, the cumulative sum, the nucleus' sort); with WikiText-2's 33,278 words 1,000 samples make
#   each 133 MB, so a step stays under 1 GB.
# - MAX_TOKENS: all words x samples ids are held at once, as int64 and then as Python lists of ids and of words
#   before they become text (about 60 bytes a token): 10 million tokens are about 0.6 GB at that peak.
MAX_WORDS = 1_000_000
MAX_SAMPLES = 1_000
MAX_TOKENS = 10_000_000


def check_sampling_options(
    *, words: int, temperature: float, top_k: int, top_p: float, samples: int, stop_at_eos: bool = False
) -> None:
    """Raise ``UserError`` naming the first option whose value cannot be sampled with.

    ``words`` and ``samples`` are also held to ``MAX_WORDS``, ``MAX_SAMPLES`` and, together, ``MAX_TOKENS``.
    """
    check_int("words", words)
    check_int("samples", samples)
    if words > MAX_WORDS:
        raise UserError(f"words={words!r} is more than {MAX_WORDS:,}, the most tokens one sample may have; "
                        "ask for fewer (more calls, with other seeds, give more text)")  # fmt: skip
    if samples > MAX_SAMPLES:
        raise UserError(f"samples={samples!r} is more than {MAX_SAMPLES:,}, the most sampled side by side; "
                        "ask for fewer (more calls, with other seeds, give more samples)")  # fmt: skip
    if words * samples > MAX_TOKENS:
        raise UserError(f"words={words!r} with samples={samples!r} make {words * samples:,} tokens, more than the "
                        f"{MAX_TOKENS:,} one call may sample; lower words or samples")  # fmt: skip
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise UserError(f"temperature={temperature!r} must be a positive, finite number (1.0 = the model's own odds)")
    check_int("top_k", top_k, 0, hint="0 = no limit")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p!r} must be in (0, 1] (1.0 = no limit)")
    if not isinstance(stop_at_eos, bool):
        raise UserError(f"stop_at_eos={stop_at_eos!r} must be True or False")


def encode_prompt(vocab: Vocabulary, prompt: str) -> tuple[list[int], list[str]]:
    """Turn a prompt into the context that primes sampling.

    The context starts with ``<eos>``, so that the prompt is read as the start of a line, as every
    line of the training text was. A line break in the prompt becomes ``<eos>``. Words the vocabulary
    lacks become ``<unk>``, or are left out when the vocabulary has no ``<unk>``.

    Returns:
        ``(ids, unknown)``: the context ids (possibly empty) and the prompt's unknown words, in order.
    """
    words = prompt.replace("\n", f" {EOS} ").split()
    unknown = [word for word in words if word not in vocab]
    if UNK not in vocab:
        words = [word for word in words if word in vocab]
    context = [EOS] if EOS in vocab else []
    return vocab.encode(context + words), unknown


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the ``top_k`` largest and outside the ``top_p`` nucleus.

    The nucleus is the smallest set of most likely words whose probabilities add up to at least
    ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"); the most likely
    word always stays. Words tied with the k-th logit stay too.

    Args:
        logits: ``(B, V)`` unnormalised scores.
        top_k: keep this many words (0 = all).
        top_p: keep the nucleus of this much probability (1.0 = all).

    Returns:
        ``(B, V)`` logits, a new tensor where anything was filtered.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = ranked.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # (B, V): probability of the words ranked higher
        ranked = ranked.masked_fill(mass_above >= top_p, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, ranked)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V), after temperature and filtering; returns ``(B,)``.

    Sampling inverts the cumulative distribution with one uniform number per row, which is exact and
    much faster than ``torch.multinomial`` over many rows on a CPU (0.2 ms instead of 20 ms for
    32 x 10,000). A filtered word adds nothing to the cumulative sum, so it can never be drawn.
    """
    logits = logits.float()
    # Shift the maximum to 0 before dividing, so that a tiny temperature gives -inf, never inf - inf.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # (B, V)
    weights = filter_logits(scaled, top_k, top_p).exp()  # (B, V), unnormalised, the largest is 1
    cumulative = weights.cumsum(dim=-1)  # (B, V), non-decreasing
    total = cumulative[:, -1:]  # (B, 1)
    draw = torch.rand(total.shape, generator=generator, device=total.device) * total  # (B, 1) in [0, total)
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach total
    return torch.searchsorted(cumulative, draw, right=True).squeeze(1)  # (B,): first word with more mass


@contextlib.contextmanager
def _stepwise_kernels(device: torch.device):
    """Run single time steps on PyTorch's own CPU kernels rather than oneDNN's.

    oneDNN's RNN kernel has a fixed cost per call, which a sequence amortises but a single step does
    not: one LSTM step (2 x 200, batch 1) took 0.66 ms with it and 0.21 ms without (best of 30
    calls, torch 2.13 on a 2-core AMD EPYC). Training and evaluation run whole chunks; this does not
    touch them.
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@torch.inference_mode()
def sample_ids(
    model: WordModel,
    context: list[int],
    *,
    words: int,
    samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``words`` tokens in each of ``samples`` columns after ``context``.

    Args:
        model: the language model; it is put in eval mode (no dropout) and left there.
        context: ids that prime the hidden state; empty means a first token drawn uniformly.
        words: steps to sample.
        samples: columns sampled side by side (one batch).
        temperature, top_k, top_p: as in ``sample_next``.
        stop_id: when given, stop as soon as every column has sampled this id (``<eos>``).
        generator: source of randomness; the same seed gives the same tokens.

    Returns:
        ``(S, B)`` sampled ids, ``S <= words``; a column may go on past its ``stop_id``.
    """
    check_sampling_options(words=words, temperature=temperature, top_k=top_k, top_p=top_p, samples=samples)
    model.eval()
    device = model.device
    hidden = model.init_hidden(samples)
    if context:
        inputs = torch.tensor(context, device=device).view(-1, 1).expand(-1, samples)  # (P, B)
        logits, hidden = model(inputs, hidden)  # (P, B, V)
        logits = logits[-1]  # (B, V)
    else:
        logits = torch.zeros(samples, model.config.ntoken, device=device)  # (B, V): uniform
    sampled = torch.empty(words, samples, dtype=torch.long, device=device)  # (S, B)
    stopped = torch.zeros(samples, dtype=torch.bool, device=device)  # (B,)
    with _stepwise_kernels(device):
        for step in range(words):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            sampled[step] = token
            if stop_id is not None:
                stopped |= token == stop_id
                if bool(stopped.all()):
                    return sampled[: step + 1]
            if step + 1 < words:
                logits, hidden = model(token.view(1, -1), hidden)  # (1, B, V): one new token per column
                logits = logits[0]
    return sampled


def generate_words(
    model: WordModel,
    vocab: Vocabulary,
    *,
    words: int,
    prompt: str = "",
    samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = False,
    generator: torch.Generator | None = None,
) -> list[list[str]]:
    """Sample ``samples`` continuations of ``prompt``, each of at most ``words`` tokens.

    With ``stop_at_eos`` each continuation ends with its first ``<eos>``. Unknown prompt words are
    handled as ``encode_prompt`` says; call it first to learn which they were.

    Returns:
        One list of words per sample, the prompt excluded.
    """
    context, _ = encode_prompt(vocab, prompt)
    stop_id = vocab.word2idx.get(EOS) if stop_at_eos else None
    sampled = sample_ids(
        model, context, words=words, samples=samples, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_id=stop_id, generator=generator,
    ).t().tolist()  # fmt: skip
    if stop_id is not None:
        sampled = [column[: column.index(stop_id) + 1] if stop_id in column else column for column in sampled]
    return [vocab.decode(column) for column in sampled]


def _readable(words: list[str]) -> str:
    """Join words into text where each ``<eos>`` ends a line; the text ends with a line break."""
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(line)
            line = []
        else:
            line.append(word)
    if line:
        lines.append(line)
    return "".join(" ".join(line) + "\n" for line in lines)


def format_samples(prompt: str, samples: list[list[str]]) -> str:
    """Readable text of sampled continuations, each after the prompt as it was typed.

    ``<eos>`` becomes a line break. When there are several samples each is headed by a line
    ``--- sample n of m ---``.
    """
    head = prompt.replace("\n", f" {EOS} ").split()
    texts = [_readable(head + words) for words in samples]
    if len(texts) > 1:
        texts = [f"--- sample {n} of {len(texts)} ---\n{text}" for n, text in enumerate(texts, 1)]
    return "".join(texts)
