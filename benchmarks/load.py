"""How fast corpora load: wordlm next to the classic two-pass tokenizer, and a WikiText-103-sized corpus.

Run from the repository root (docs/DATA.md has the figures of a run):

    .venv/bin/python benchmarks/load.py

Part 1 loads WikiText-2 (``--corpus``: a name or a folder, resolved as ``dataset=`` is) with
- the classic example's tokenizer, written again here: one pass to build the vocabulary, a second
  to turn each line into a tensor, then ``torch.cat``;
- wordlm cold: hash the files, tokenize them in one pass, write the cache (an empty cache folder);
- wordlm without its cache (``load_corpus``): the tokenizing alone;
- wordlm warm: hash the files and read the cache.
Each is timed ``--repeat`` times and the median is shown, with its speed-up over the classic one.
The text files are in the page cache for all of them (each is read before timing starts).

Part 2 writes a synthetic corpus the size of WikiText-103 (``--big-tokens`` training tokens,
Zipf-distributed over a 267,735-word vocabulary, about 57 tokens a line) to a temporary folder, then
loads it cold and warm, each in its own process so that its peak memory is its own: the peak resident
set of that process's memory map (``VmHWM`` in /proc; ``ru_maxrss`` would include the parent's, as
Linux carries it across fork and exec).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import wordlm.data.cache  # noqa: E402
from wordlm.data.corpus import SPLITS, load_corpus  # noqa: E402
from wordlm.data.datasets import load_dataset, resolve_dataset  # noqa: E402

WT103_VOCABULARY = 267_735
WT103_EVAL_TOKENS = {"valid": 217_646, "test": 245_569}
WT103_TOKENS_PER_LINE = 57  # 103,227,021 tokens on 1,801,350 lines


def classic_load(folder: Path) -> dict[str, torch.Tensor]:
    """Tokenize as the classic word_language_model example does: two passes a file, a tensor a line."""
    word2idx: dict[str, int] = {}
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        with open(path, encoding="utf8") as handle:  # pass 1: the vocabulary
            for line in handle:
                for word in line.split() + ["<eos>"]:
                    if word not in word2idx:
                        word2idx[word] = len(word2idx)
        with open(path, encoding="utf8") as handle:  # pass 2: the ids
            lines = [
                torch.tensor([word2idx[word] for word in line.split() + ["<eos>"]], dtype=torch.int64)
                for line in handle
            ]
        splits[split] = torch.cat(lines)
    return splits


def median_seconds(load, repeat: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        started = time.perf_counter()
        load()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare_on(folder: Path, repeat: int) -> None:
    """Part 1: print the load times of ``folder`` by each method, with ratios to the classic one."""
    size = sum((folder / f"{split}.txt").stat().st_size for split in SPLITS)
    classic = classic_load(folder)  # also reads the files into the page cache
    corpus = load_corpus(folder)
    same = all(torch.equal(classic[split], corpus.split(split)) for split in SPLITS)
    # The ids can only match when valid/test have no word that train lacks (the classic vocabulary spans all three).
    assert same or any(corpus.unknown_counts.values()), "wordlm's ids differ from the classic ones"
    tokens = sum(corpus.split(split).numel() for split in SPLITS)
    print(f"{folder}: {size / 1e6:.1f} MB, {tokens:,} tokens, vocabulary {len(corpus.vocab):,}")
    print(f"  ids {'identical to' if same else 'unlike (valid/test words unknown to train)'} the classic ones")
    print(f"  median of {repeat} runs (warm: of {max(repeat, 5)})")
    with tempfile.TemporaryDirectory() as scratch:
        caches = iter(range(10**6))
        fresh = {"dir": None}

        def new_cache() -> None:
            fresh["dir"] = Path(scratch) / f"cache-{next(caches)}"

        def cached() -> None:
            load_dataset(folder, cache_dir=fresh["dir"])

        rows = [
            ("classic two-pass tokenizer", median_seconds(lambda: classic_load(folder), repeat)),
            ("wordlm cold: hash, tokenize, write cache", median_seconds(cached, repeat, before=new_cache)),
            ("wordlm tokenizing alone (no cache)", median_seconds(lambda: load_corpus(folder), repeat)),
            ("wordlm warm: hash, read cache", median_seconds(cached, max(repeat, 5))),
        ]
    baseline = rows[0][1]
    print(f"  {'method':<42} {'seconds':>8} {'speed-up':>9}")
    for name, seconds in rows:
        print(f"  {name:<42} {seconds:8.3f} {baseline / seconds:8.1f}x")


def _word(rank: int) -> str:
    """A distinct lower-case word for each rank: bijective base 26, four letters for the first 456,976."""
    number, letters = rank + 18_279, []  # 18,279 = the first number written with four letters
    while number:
        number, digit = divmod(number - 1, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(reversed(letters))


def write_synthetic(folder: Path, train_tokens: int, seed: int = 0) -> dict[str, int]:
    """Write a Zipf-distributed corpus with WikiText-103's sizes, a bounded piece at a time; return token counts."""
    rng = np.random.default_rng(seed)
    words = [_word(rank) for rank in range(WT103_VOCABULARY)]
    cdf = np.cumsum(1.0 / np.arange(1, WT103_VOCABULARY + 1))  # Zipf's law, exponent 1
    cdf /= cdf[-1]
    counts = {}
    for split, wanted in {"train": train_tokens, **WT103_EVAL_TOKENS}.items():
        written = 0
        with open(folder / f"{split}.txt", "w", encoding="utf-8") as out:
            while written < wanted:
                lines = min(20_000, (wanted - written) // WT103_TOKENS_PER_LINE + 1)
                lengths = rng.integers(0, 2 * WT103_TOKENS_PER_LINE - 1, size=lines)  # words a line, 56 on average
                ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
                line_words = [words[i] for i in ids.tolist()]
                ends = np.cumsum(lengths).tolist()
                lines_text = (
                    " ".join(line_words[end - n : end]) for n, end in zip(lengths.tolist(), ends, strict=True)
                )
                out.write("\n".join(lines_text) + "\n")
                written += int(lengths.sum()) + lengths.size  # words, and one <eos> a line
        counts[split] = written
    return counts


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def child(mode: str, folder: str, cache: str) -> None:
    """Load ``folder`` once in this process and print what it cost as JSON (run by ``measure``)."""
    after_imports = peak_rss_mb()
    peaks = {}
    tokenize = wordlm.data.cache.tokenize_corpus

    def tokenize_and_note_the_peak(*args, **kwargs):
        tokenized = tokenize(*args, **kwargs)
        peaks["after_tokenizing"] = peak_rss_mb()
        return tokenized

    wordlm.data.cache.tokenize_corpus = tokenize_and_note_the_peak
    started = time.perf_counter()
    corpus = load_dataset(folder, cache_dir=cache)
    seconds = time.perf_counter() - started
    result = {
        "mode": mode,
        "seconds": seconds,
        "tokens": sum(corpus.split(split).numel() for split in SPLITS),
        "vocabulary": len(corpus.vocab),
        "rss_after_imports_mb": after_imports,
        "peak_rss_tokenizing_mb": peaks.get("after_tokenizing", 0),
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(result))


def measure(mode: str, folder: Path, cache: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(folder), str(cache)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def big_corpus(train_tokens: int, scratch_parent: str | None) -> None:
    """Part 2: generate the synthetic corpus, then time a cold and a warm load in fresh processes."""
    with tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        folder, cache = Path(scratch) / "synthetic", Path(scratch) / "cache"
        folder.mkdir()
        started = time.perf_counter()
        counts = write_synthetic(folder, train_tokens)
        size = sum((folder / f"{split}.txt").stat().st_size for split in SPLITS)
        print(
            f"synthetic WikiText-103-sized corpus: {sum(counts.values()):,} tokens "
            f"(train {counts['train']:,}), {size / 1e6:,.0f} MB, written in {time.perf_counter() - started:.0f} s"
        )
        for mode in ("cold", "warm"):
            result = measure(mode, folder, cache)
            tokenizing = f", {result['peak_rss_tokenizing_mb']:,.0f} MB when tokenized" if mode == "cold" else ""
            print(
                f"  {mode}: {result['seconds']:6.1f} s, vocabulary {result['vocabulary']:,}; peak RSS "
                f"{result['peak_rss_mb']:,.0f} MB ({result['rss_after_imports_mb']:,.0f} MB after imports{tokenizing})"
            )
        megabytes = 4 * counts["train"] / 1e6
        print(f"  ids: int32 while tokenizing and in the cache ({megabytes:,.0f} MB for train), int64 in the Corpus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="wikitext-2", help="a corpus name or folder (default: wikitext-2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the median is shown (default: 3)")
    parser.add_argument(
        "--big-tokens", type=int, default=103_000_000, help="training tokens of the synthetic corpus; 0 skips it"
    )
    parser.add_argument(
        "--tmp", default=None, help="where to write the synthetic corpus (default: the system's temp folder)"
    )
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    load = os.getloadavg()[0]
    print(f"wordlm load benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}")
    compare_on(resolve_dataset(args.corpus), args.repeat)
    if args.big_tokens:
        big_corpus(args.big_tokens, args.tmp)


if __name__ == "__main__":
    main()
