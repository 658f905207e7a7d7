"""Test-time adaptation of a trained checkpoint: the cache pointer and dynamic evaluation, tuned on validation.

    python benchmarks/adapt.py --checkpoint ptb.pt --dataset penn --record docs/runs/budget_2h/x.json [--quick]

Scores the checkpoint on the valid and test splits of ``--dataset`` three ways, each with what
``python main.py evaluate with checkpoint=... split=...`` computes (``wordlm.evaluation.evaluate_text``, the
same keys): plainly; with the continuous cache pointer (Grave, Joulin & Usunier 2017: ``cache_window``,
``cache_theta``, ``cache_lambda``); and with dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, SGD
variant: ``dynamic_lr``, ``dynamic_decay``). As both papers do, each method's parameters are chosen on the
validation split only, by a coordinate search over a small grid (each coordinate in turn is swept over its grid
with the others held at their best so far: 7 grid points a method with the default grids), and the best setting
of each is then run once on test. Every pass is timed.

A dynamic evaluation grid point is a pass over valid at batch 1, model and gradient steps (minutes for a 2x650
LSTM on WikiText-2). The cache pointer's model pass does not depend on its window, θ or λ, so it runs once a
split (``wordlm.evaluation.cache_pointer_states``: the top-layer states and the model's log-probabilities) and
each cache grid point only mixes in the cache (``cache_mixed_loss``: products of each state with the window's
before it, no model): the same floats as evaluate's ``cache_pointer_loss``, which is these two halves.

Options beside the required ``--checkpoint``, ``--dataset`` and ``--record``: ``--windows 500,1000,2000`` sets the
cache windows tried, ``--cache-theta 0.5,1,2`` and ``--cache-lambda 0.1,0.2,0.3`` its flatness θ and its weight λ
(the search starts at each list's middle value); ``--dynamic-lr 0.3,1,3`` (or ``--lrs``) and ``--dynamic-decay
0,0.01`` set dynamic evaluation's grid (lrs above 0, decays from 0 to 1); ``--skip-cache`` and ``--skip-dynamic``
leave a method out (its record fields are then written as null, so that no figure of an earlier run stands beside
this run's);
``--dynamic-tune-tokens N`` scores dynamic evaluation's grid on the first N tokens of valid only (a grid point
over WikiText-2's whole valid split takes a quarter of an hour on 2 cores); ``--quick`` shrinks the grids to two
points a coordinate (for tests); ``--device``, ``--eval-batch-size`` and ``--bptt`` are evaluate's.

The record named by ``--record`` (a JSON object; created if missing, its other fields kept) gains
``test_ppl_plain``, ``valid_ppl_plain``, ``test_ppl_cache``, ``valid_ppl_cache``, ``cache_params``,
``cache_seconds_test`` (the whole cache evaluation of test: its model pass and the mixing),
``test_ppl_dynamic_eval``, ``valid_ppl_dynamic_eval``, ``dynamic_eval_params``, ``dynamic_eval_seconds_test``,
``adapt_tuning_seconds`` (all the valid passes of both searches, the cache's one model pass over valid included),
``adapt_command``, ``adapt_cpu``, ``adapt_threads``, and beside them ``plain_seconds_test``,
``cache_states_seconds_valid`` and ``cache_states_seconds_test`` (the cache's one model pass over each split;
the test one is part of ``cache_seconds_test``), ``adapt_grid`` (every valid grid point: method, parameters,
perplexity, seconds; a cache point's seconds are its mixing alone, the model pass being
``cache_states_seconds_valid``), ``adapt_grid_edges`` (chosen values that end their grid, where a wider one might
do better), ``adapt_skipped`` (the methods left out: ``cache``, ``dynamic_eval``), ``adapt_checkpoint``,
``adapt_dataset``, ``adapt_device``, ``adapt_torch`` and ``adapt_commit``. With ``--dynamic-tune-tokens``,
``valid_ppl_dynamic_eval`` is that of the slice, and ``dynamic_tune_tokens`` and ``valid_ppl_plain_dynamic_tune``
(the plain perplexity of the same slice, to compare it with) say so; both are null without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from budget import commit, cpu_name  # noqa: E402  (benchmarks/ is on the path: this file runs as a script)

import wordlm  # noqa: E402
from wordlm.data.datasets import resolve_dataset  # noqa: E402
from wordlm.errors import UserError  # noqa: E402
from wordlm.evaluation import (  # noqa: E402
    cache_mixed_loss,
    cache_pointer_states,
    check_evaluation_options,
    evaluate_text,
    perplexity,
)

# Grave et al. used a window of 500 on PTB and 2000 on WikiText-2 for their LSTM; AWD-LSTM's pointer.py used
# θ 1.0, λ 0.1 on PTB and θ 0.662, λ 0.128 on WikiText-2 (evaluate's defaults). Each search starts at ``start``.
CACHE_GRID = {"cache_lambda": [0.05, 0.1, 0.2], "cache_theta": [0.3, 0.662, 1.0], "cache_window": [500, 1000, 2000]}
CACHE_START = {"cache_window": 500, "cache_theta": 0.662, "cache_lambda": 0.1}
# SGD steps on each segment's mean loss (no clipping): training takes lr 20-35 on clipped gradients; decay is
# the fraction of the way back to the trained weights taken after each step (Krause et al.'s λ).
DYNAMIC_GRID = {"dynamic_lr": [0.1, 0.3, 1.0, 3.0, 10.0], "dynamic_decay": [0.0, 0.001, 0.01]}
DYNAMIC_START = {"dynamic_lr": 1.0, "dynamic_decay": 0.0}
QUICK_CACHE_GRID = {"cache_lambda": [0.1, 0.2], "cache_theta": [0.3, 1.0], "cache_window": [20, 50]}
QUICK_CACHE_START = {"cache_window": 20, "cache_theta": 0.3, "cache_lambda": 0.1}
QUICK_DYNAMIC_GRID = {"dynamic_lr": [0.1, 1.0], "dynamic_decay": [0.0, 0.01]}
QUICK_DYNAMIC_START = {"dynamic_lr": 0.1, "dynamic_decay": 0.0}


def coordinate_search(
    grid: dict[str, list], start: dict, score: Callable[[dict], float], rounds: int = 1
) -> tuple[dict, float]:
    """The grid point with the lowest ``score``, found one coordinate at a time.

    A round sweeps every coordinate in ``grid``'s order over its values with the others held at the best point
    so far; rounds repeat while one changes something (``rounds`` at most). A point is scored once, however
    often the sweeps reach it; of equal scores the first kept wins. Returns the best point and its score.
    """
    seen: dict[tuple, float] = {}

    def cost(point: dict) -> float:
        key = tuple(point[name] for name in grid)
        if key not in seen:
            seen[key] = score(point)
        return seen[key]

    best = dict(start)
    best_cost = cost(best)
    for _ in range(rounds):
        moved = False
        for name, values in grid.items():
            for value in values:
                point = {**best, name: value}
                if cost(point) < best_cost:  # ties keep the earlier point
                    best, best_cost, moved = point, cost(point), True
        if not moved:
            break
    return best, best_cost


class Scorer:
    """Scores one split as ``main.py evaluate`` does, timing each pass: ``evaluate_text``, or the cache pointer as
    its two halves (``cache_states`` once, then ``cache`` a setting), which give ``evaluate_text``'s floats."""

    def __init__(self, lm: wordlm.LanguageModel, ids: torch.Tensor, eval_batch_size: int, bptt: int) -> None:
        self.lm, self.ids, self.keys = lm, ids, {"eval_batch_size": eval_batch_size, "bptt": bptt}
        self.cache_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, **options) -> tuple[float, float]:
        """Perplexity and seconds of one pass with ``options`` (evaluate's cache and dynamic evaluation keys)."""
        started = time.perf_counter()
        loss, _, _ = evaluate_text(self.lm.model, self.ids, **self.keys, **options)
        return perplexity(loss), time.perf_counter() - started

    def cache_states(self) -> float:
        """Run the cache pointer's model pass over the split (at evaluate's chunk) and keep what it gives; its
        seconds."""
        started = time.perf_counter()
        self.cache_inputs = cache_pointer_states(self.lm.model, self.ids)
        if self.ids.is_cuda:  # the pass's kernels are timed here, not in the first mixing
            torch.cuda.synchronize(self.ids.device)
        return time.perf_counter() - started

    def cache(self, cache_window: int, cache_theta: float, cache_lambda: float) -> tuple[float, float]:
        """Perplexity and seconds of the cache pointer with these keys, from ``cache_states``' pass: the mixing
        alone, no model pass."""
        check_evaluation_options(**self.keys, cache_window=cache_window, cache_theta=cache_theta,
                                 cache_lambda=cache_lambda, dynamic_lr=0.0, dynamic_decay=0.0)  # fmt: skip
        assert self.cache_inputs is not None, "cache_states first"
        started = time.perf_counter()
        loss, _ = cache_mixed_loss(*self.cache_inputs, cache_window, cache_theta, cache_lambda)
        return perplexity(loss), time.perf_counter() - started

    def drop_cache_states(self) -> None:
        """Free ``cache_states``' tensors (N x H floats: hundreds of MB on a large split)."""
        self.cache_inputs = None


def read_record(path: Path) -> dict:
    """The record's fields (``{}`` when the file does not exist yet); a file that is no JSON object is an error."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise UserError(f"--record {path}: cannot read it as JSON ({problem})") from None
    if not isinstance(record, dict):
        raise UserError(f"--record {path}: holds a JSON {type(record).__name__}, not an object")
    return record


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` whole or not at all: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(json.dumps(record, indent=1) + "\n")
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def check_record_writable(path: Path) -> None:
    """Fail before any scoring when the record's folder cannot take the file."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if path.is_dir() or not os.access(folder if not path.exists() else path, os.W_OK):
        raise UserError(f"--record {path}: cannot write there; give a JSON file in a writable folder")


def parse_values(text: str | None, kind: type) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(value < 0 for value in values):
        raise UserError(f"{text!r}: give one or more numbers, none negative")
    return sorted(set(values))


def grids(args) -> tuple[dict, dict, dict, dict]:
    """The cache's and dynamic evaluation's grids and starting points, with ``--windows``, ``--cache-theta``,
    ``--cache-lambda``, ``--dynamic-lr`` and ``--dynamic-decay`` applied."""
    if args.quick:
        cache, cache_start = dict(QUICK_CACHE_GRID), dict(QUICK_CACHE_START)
        dynamic, dynamic_start = dict(QUICK_DYNAMIC_GRID), dict(QUICK_DYNAMIC_START)
    else:
        cache, cache_start = dict(CACHE_GRID), dict(CACHE_START)
        dynamic, dynamic_start = dict(DYNAMIC_GRID), dict(DYNAMIC_START)
    windows, thetas, lambdas = (parse_values(args.windows, int), parse_values(args.thetas, float),
                                parse_values(args.lambdas, float))  # fmt: skip
    lrs, decays = parse_values(args.lrs, float), parse_values(args.decays, float)
    if windows:
        if 0 in windows:
            raise UserError("--windows: a window of 0 is no cache; give windows of 1 or more words")
        cache["cache_window"], cache_start["cache_window"] = windows, windows[0]
    if thetas:
        if 0 in thetas:
            raise UserError("--cache-theta: θ 0 makes every word in the window equally likely; give positive values")
        cache["cache_theta"], cache_start["cache_theta"] = thetas, thetas[len(thetas) // 2]
    if lambdas:
        if 0 in lambdas or lambdas[-1] > 1:
            raise UserError("--cache-lambda: give the cache's weights in the mixture, above 0 and at most 1")
        cache["cache_lambda"], cache_start["cache_lambda"] = lambdas, lambdas[len(lambdas) // 2]
    if lrs:
        if 0 in lrs:
            raise UserError("--dynamic-lr: an lr of 0 is no dynamic evaluation; give positive values")
        dynamic["dynamic_lr"], dynamic_start["dynamic_lr"] = lrs, lrs[len(lrs) // 2]
    if decays:
        if decays[-1] > 1:
            raise UserError(f"--dynamic-decay: {decays[-1]:g} is more than the whole way back to the trained "
                            "weights; give fractions from 0 to 1")  # fmt: skip
        dynamic["dynamic_decay"], dynamic_start["dynamic_decay"] = decays, decays[0]
    return cache, cache_start, dynamic, dynamic_start


def at_edges(best: dict, grid: dict) -> list[str]:
    """``key=value`` for each coordinate whose best value ends its grid (a 0 excepted: nothing lies below it), where
    a wider grid might do better."""
    return [f"{name}={best[name]:g}" for name, values in grid.items()
            if len(values) > 1 and best[name] in (values[0], values[-1]) and best[name] != 0]  # fmt: skip


def show(params: dict) -> str:
    return ", ".join(f"{name.split('_', 1)[1]} {value:g}" for name, value in params.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a wordlm checkpoint (the save= file of a run)")
    parser.add_argument("--dataset", required=True, help="the corpus it was trained on: a name or a folder")
    parser.add_argument("--record", required=True, help="JSON record to add the figures to (created if missing)")
    parser.add_argument("--quick", action="store_true", help="two-point grids (for tests)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as evaluate's device=)")
    parser.add_argument("--eval-batch-size", type=int, default=10, help="plain evaluation's columns (evaluate's)")
    parser.add_argument("--bptt", type=int, default=35, help="dynamic evaluation's segment length (evaluate's)")
    parser.add_argument("--windows", help="cache windows to try, e.g. 500,1000,2000 (instead of the grid's)")
    parser.add_argument("--cache-theta", dest="thetas", help="cache flatness values θ to try, e.g. 0.5,1,2")
    parser.add_argument("--cache-lambda", dest="lambdas", help="cache weights λ to try, e.g. 0.1,0.2,0.3")
    parser.add_argument("--dynamic-lr", "--lrs", dest="lrs",
                        help="dynamic evaluation lrs to try, e.g. 0.3,1,3 (instead of the grid's)")  # fmt: skip
    parser.add_argument("--dynamic-decay", dest="decays",
                        help="dynamic evaluation decays to try, e.g. 0,0.01 (instead of the grid's)")  # fmt: skip
    parser.add_argument("--dynamic-tune-tokens", type=int, metavar="N",
                        help="score dynamic evaluation's grid on valid's first N tokens (default: all)")  # fmt: skip
    parser.add_argument("--skip-cache", action="store_true", help="leave the cache pointer out")
    parser.add_argument("--skip-dynamic", action="store_true", help="leave dynamic evaluation out (the slow one)")
    args = parser.parse_args()
    try:
        run(args)
    except UserError as problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


def run(args) -> None:
    # every input is checked before the first pass: a bad one costs a line, not an hour
    cache_grid, cache_start, dynamic_grid, dynamic_start = grids(args)
    for key, value in (("--eval-batch-size", args.eval_batch_size), ("--bptt", args.bptt)):
        if value < 1:
            raise UserError(f"{key}={value}: give a positive whole number")
    tune_tokens = args.dynamic_tune_tokens
    if tune_tokens is not None and tune_tokens < 2:
        raise UserError(f"--dynamic-tune-tokens={tune_tokens}: give the number of valid tokens to tune on, 2 or more")
    record_path = Path(args.record)
    record = read_record(record_path)
    check_record_writable(record_path)
    lm = wordlm.load(args.checkpoint, args.device)
    folder = resolve_dataset(args.dataset)
    splits = {}
    for split in ("valid", "test"):
        splits[split], unknown = lm.tokenize(folder / f"{split}.txt")
        if unknown:
            print(f"note: {unknown} {split} tokens are not in the checkpoint's vocabulary and were read as <unk>; "
                  "is --dataset the corpus it was trained on?", flush=True)  # fmt: skip
    valid, test = (Scorer(lm, splits[split], args.eval_batch_size, args.bptt) for split in ("valid", "test"))
    # dynamic evaluation's grid on a slice of valid, or on all of it
    tune = valid if tune_tokens is None else Scorer(lm, splits["valid"][:tune_tokens], args.eval_batch_size, args.bptt)
    print(f"{args.checkpoint}: valid {len(splits['valid']):,} tokens, test {len(splits['test']):,}, "
          f"{torch.get_num_threads()} threads, {lm.device}", flush=True)  # fmt: skip

    valid_plain, valid_plain_seconds = valid()
    test_plain, test_plain_seconds = test()
    print(f"plain: valid {valid_plain:.2f} ({valid_plain_seconds:.1f} s), test {test_plain:.2f} "
          f"({test_plain_seconds:.1f} s)", flush=True)  # fmt: skip

    passes = []

    def on_valid(method: str, scorer: Callable[..., tuple[float, float]]) -> Callable[[dict], float]:
        def score(params: dict) -> float:
            ppl, seconds = scorer(**params)
            passes.append({"method": method, "params": params, "valid_ppl": ppl, "seconds": round(seconds, 2)})
            print(f"  valid | {method} | {show(params)} | ppl {ppl:.2f} | {seconds:.1f} s", flush=True)
            return ppl

        return score

    skipped = [method for method, skip in (("cache", args.skip_cache), ("dynamic_eval", args.skip_dynamic)) if skip]
    cache_fields = dict.fromkeys(("test_ppl_cache", "valid_ppl_cache", "cache_params", "cache_seconds_test",
                                  "cache_states_seconds_valid", "cache_states_seconds_test"))  # fmt: skip
    dynamic_fields = dict.fromkeys(("test_ppl_dynamic_eval", "valid_ppl_dynamic_eval", "dynamic_eval_params",
                                    "dynamic_eval_seconds_test"))  # fmt: skip
    rows = [("plain", "", valid_plain, test_plain, test_plain_seconds)]
    edges = []
    tuning_started = time.perf_counter()
    if not args.skip_cache:
        states_seconds_valid = valid.cache_states()
        print(f"  valid | cache | the model's pass (states, log-probabilities), once | {states_seconds_valid:.1f} s",
              flush=True)  # fmt: skip
        cache_params, valid_cache = coordinate_search(cache_grid, cache_start, on_valid("cache", valid.cache))
        cache_params = {name: cache_params[name] for name in ("cache_window", "cache_theta", "cache_lambda")}
        valid.drop_cache_states()
        edges += at_edges(cache_params, cache_grid)
    tune_fields = {"dynamic_tune_tokens": None, "valid_ppl_plain_dynamic_tune": None}
    if not args.skip_dynamic:
        if tune is not valid:
            tune_fields = {"dynamic_tune_tokens": len(tune.ids), "valid_ppl_plain_dynamic_tune": tune()[0]}
            print(f"  valid | dynamic evaluation tuned on the first {len(tune.ids):,} tokens: plain ppl "
                  f"{tune_fields['valid_ppl_plain_dynamic_tune']:.2f}", flush=True)  # fmt: skip
        dynamic_params, valid_dynamic = coordinate_search(dynamic_grid, dynamic_start, on_valid("dynamic_eval", tune))
        edges += at_edges(dynamic_params, dynamic_grid)
    tuning_seconds = time.perf_counter() - tuning_started
    if edges:
        print(f"note: best at the end of its grid: {', '.join(edges)}; a wider grid may do better (--windows, "
              "--cache-theta, --cache-lambda, --dynamic-lr and --dynamic-decay set them)", flush=True)  # fmt: skip
    if not args.skip_cache:
        states_seconds_test = test.cache_states()
        test_cache, mix_seconds = test.cache(**cache_params)
        test.drop_cache_states()
        cache_seconds = states_seconds_test + mix_seconds
        cache_fields = {
            "test_ppl_cache": test_cache, "valid_ppl_cache": valid_cache,
            "cache_params": {name: cache_params[f"cache_{name}"] for name in ("window", "theta", "lambda")},
            "cache_seconds_test": round(cache_seconds, 2),
            "cache_states_seconds_valid": round(states_seconds_valid, 2),
            "cache_states_seconds_test": round(states_seconds_test, 2),
        }  # fmt: skip
        rows.append(("cache pointer", show(cache_params), valid_cache, test_cache, cache_seconds))
    if not args.skip_dynamic:
        test_dynamic, dynamic_seconds = test(**dynamic_params)
        dynamic_fields = {
            "test_ppl_dynamic_eval": test_dynamic, "valid_ppl_dynamic_eval": valid_dynamic,
            "dynamic_eval_params": {**{name.split("_", 1)[1]: value for name, value in dynamic_params.items()},
                                    "bptt": args.bptt},
            "dynamic_eval_seconds_test": round(dynamic_seconds, 2),
        }  # fmt: skip
        rows.append(("dynamic evaluation", show(dynamic_params), valid_dynamic, test_dynamic, dynamic_seconds))

    record.update({
        "test_ppl_plain": test_plain, "valid_ppl_plain": valid_plain,
        "plain_seconds_test": round(test_plain_seconds, 2),
        **cache_fields, **dynamic_fields, **tune_fields,
        "adapt_tuning_seconds": round(tuning_seconds, 1), "adapt_grid": passes,
        "adapt_grid_edges": edges, "adapt_skipped": skipped,
        "adapt_checkpoint": str(args.checkpoint), "adapt_dataset": args.dataset,
        "adapt_command": shlex.join(["python", "benchmarks/adapt.py", *sys.argv[1:]]),
        "adapt_cpu": cpu_name(), "adapt_threads": torch.get_num_threads(), "adapt_device": str(lm.device),
        "adapt_torch": torch.__version__, "adapt_commit": commit(),
    })  # fmt: skip
    write_record(record_path, record)

    print(f"{'method':<19} {'parameters (tuned on valid)':<34} {'valid':>8} {'test':>8} {'test s':>8}")
    for method, params, valid_ppl, test_ppl, seconds in rows:
        print(f"{method:<19} {params:<34} {valid_ppl:8.2f} {test_ppl:8.2f} {seconds:8.1f}")
    once = "" if args.skip_cache else " (the cache's model pass over valid included)"
    print(f"tuning: {len(passes)} valid grid points, {tuning_seconds:.1f} s{once}; record in {record_path}", flush=True)


if __name__ == "__main__":
    main()
