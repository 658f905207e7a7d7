"""What each of wordlm's CPU speed-ups buys, measured as paired steps in one process.

    python benchmarks/ablations.py [--dataset PATH_OR_NAME] [--pairs 40] [--eval-pairs 12]

``benchmarks/speed.py`` times whole runs in separate processes; on a shared VM whose speed drifts by
tens of percent from one minute to the next, the difference between two such runs is mostly drift.
Here one model trains the default config, and each speed-up is switched off and on for alternate
steps: every "off" step is paired with the "on" step next to it, so both see the same machine. For
each pair the ratio ``off / on`` of the step times is taken; the median over the pairs (with its
quartiles) is what the speed-up buys. Switching a speed-up takes one unmeasured step to settle (the
allocator's heap, the decoder's pooled weight, oneDNN's kernels), so each measured step follows one of its own kind.

Speed-ups: ``fused`` (wordlm.models.fused's decoder loss, against ``F.cross_entropy`` on the logits),
``onednn`` (the fused loss's products on oneDNN where it is the faster library on this CPU, against
``torch.mm``'s BLAS for all of them; where torch has oneDNN) and
``allocator`` (wordlm.system.tune_cpu_allocator, against a fixed 128 KiB mmap threshold: glibc's
starting value, without the raise glibc makes after freeing a mapped block, so this is a strict
"off"; memory the heap kept from the "on" steps is still reused, so the page faults of "off" steps
vary from run to run); evaluation pairs for ``fused`` and ``onednn`` too. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wordlm.data.corpus import batchify, get_batch, load_corpus  # noqa: E402
from wordlm.data.datasets import resolve_dataset  # noqa: E402
from wordlm.evaluation import evaluate_loss  # noqa: E402
from wordlm.models import (  # noqa: E402
    ModelConfig,
    RNNModel,
    detach_hidden,
    fused,  # noqa: E402
)
from wordlm.system import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, tune_cpu_allocator  # noqa: E402

GLIBC_DEFAULT_THRESHOLD = 128 << 10  # glibc's initial mmap threshold (set explicitly, it stays fixed)


class Toggle:
    """Switch one speed-up on or off in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if name == "allocator" else None

    def set(self, on: bool) -> None:
        if self.name == "fused":
            fused.set_enabled(on)
        elif self.name == "onednn":  # the fused loss's products: each on its faster library, or all on torch.mm's
            fused.set_backend(fused.available_backends()[0] if on else "blas")
        else:  # allocator: wordlm's threshold, or glibc's default (the big buffers come from fresh mmaps)
            threshold = 1 << 30 if on else GLIBC_DEFAULT_THRESHOLD
            self._libc.mallopt(_M_MMAP_THRESHOLD, threshold)
            self._libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1 if on else GLIBC_DEFAULT_THRESHOLD)


def summary(off: list[float], on: list[float]) -> dict:
    ratios = sorted(a / b for a, b in zip(off, on))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "on_ms_median": 1000 * statistics.median(on),
        "off_ms_median": 1000 * statistics.median(off),
        "pairs": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = ROOT.parent / "shared" / "data" / "wikitext-2"
    parser.add_argument("--dataset", default=str(default_data) if default_data.is_dir() else "wikitext-2")
    parser.add_argument("--pairs", type=int, default=40, help="measured training step pairs per speed-up")
    parser.add_argument("--eval-pairs", type=int, default=12, help="measured evaluation pairs (fused)")
    parser.add_argument("--eval-tokens", type=int, default=4000, help="tokens per timed evaluation")
    args = parser.parse_args()
    if args.pairs < 1 or args.eval_pairs < 0:
        parser.error("--pairs must be at least 1 and --eval-pairs at least 0")

    tune_cpu_allocator()
    corpus = load_corpus(resolve_dataset(args.dataset))
    ntoken = len(corpus.vocab)
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(ntoken, "LSTM", 200, 200, 2, 0.2, tied=True))  # the default config
    data = batchify(corpus.train, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    hidden = model.init_hidden(32)
    position = 0

    def train_step() -> tuple[float, int]:
        """One step as train_epoch takes it (forward, backward, clip 0.25, SGD); its time and page faults."""
        nonlocal hidden, position
        if position + 36 > data.size(0):
            position = 0
        inputs, targets = get_batch(data, position, 35)
        position += 35
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, hidden = model(inputs, detach_hidden(hidden), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        hidden = detach_hidden(hidden)
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, corpus {args.dataset} (vocabulary {ntoken}), "
          f"default config (2x200 LSTM, batch 32, bptt 35); ratio = off / on time of paired steps")  # fmt: skip
    for _ in range(3):
        train_step()  # warm-up
    results = {}
    toggles = ["fused"] + (["onednn"] if "onednn" in fused.available_backends() else [])
    toggles += ["allocator"] if sys.platform.startswith("linux") else []
    for name in toggles:
        toggle = Toggle(name)
        times = {True: [], False: []}
        faults = {True: [], False: []}
        for pair in range(2 * args.pairs):
            on = pair % 2 == 0
            toggle.set(on)
            train_step()  # settles the switch
            seconds, step_faults = train_step()
            times[on].append(seconds)
            faults[on].append(step_faults)
        toggle.set(True)
        row = summary(times[False], times[True])
        row["faults_per_step_on"], row["faults_per_step_off"] = (statistics.median(faults[k]) for k in (True, False))
        results[f"train_{name}"] = row
        print(f"train, without {name:9s}: {row['ratio_median']:.3f}x slower (quartiles {row['ratio_quartiles'][0]:.3f}"
              f"-{row['ratio_quartiles'][1]:.3f}; median step {row['off_ms_median']:.0f} against "
              f"{row['on_ms_median']:.0f} ms; page faults per step {row['faults_per_step_off']:.0f} against "
              f"{row['faults_per_step_on']:.0f}; {row['pairs']} pairs)")  # fmt: skip

    ids = corpus.valid[: args.eval_tokens + 1]
    for name in [toggle for toggle in toggles if toggle != "allocator"] if args.eval_pairs else []:
        toggle = Toggle(name)
        times = {True: [], False: []}
        for on in (True, False):  # warm-up of each kind
            toggle.set(on)
            evaluate_loss(model, ids, 10)
        for pair in range(2 * args.eval_pairs):
            on = pair % 2 == 0
            toggle.set(on)
            start = time.perf_counter()
            evaluate_loss(model, ids, 10)
            times[on].append(time.perf_counter() - start)
        toggle.set(True)
        row = summary(times[False], times[True])
        results[f"eval_{name}"] = row
        print(f"eval (batch 10), without {name}: {row['ratio_median']:.3f}x slower (quartiles "
              f"{row['ratio_quartiles'][0]:.3f}-{row['ratio_quartiles'][1]:.3f}; median "
              f"{row['off_ms_median']:.0f} against {row['on_ms_median']:.0f} ms "
              f"per {ids.numel() - 1} tokens)")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
