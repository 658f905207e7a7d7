"""The best perplexity in a fixed time: the classic example's loop and wordlm, each for the same wall-clock budget.

    python benchmarks/budget.py --minutes 30 --out docs/runs/budget_30min/<name>.json [--preset P] [key=value ...]

Trains the classic example's model with its own loop and defaults (``classic_example.py``: LSTM 2×200, lr 20
divided by 4 when validation does not improve) until ``--minutes`` of training and validation are spent: the
epoch under way ends at that batch and is validated, as wordlm's ``time_budget`` does. Then trains wordlm from
Python (``wordlm.train``) with ``time_budget=--minutes`` and the given preset and keys, one after the other on
the same machine. Each best-by-validation model is tested on the test split. Writes one JSON record: the
budget, the data, the CPU, torch, each side's test perplexity and epochs (fractional: a cut epoch counts its
share), wordlm's keys that differ from the defaults, and the commit. ``--skip-classic`` leaves the classic side
out; ``--save model.pt`` keeps wordlm's checkpoint (its best model by validation) for ``adapt.py``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from classic_example import train_epoch
from speed import ROOT, ClassicModel, classic_evaluate

import wordlm
from wordlm.config import defaults, make_config
from wordlm.data.corpus import batchify, load_corpus
from wordlm.data.datasets import resolve_dataset


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def classic_for(minutes: float, folder: Path) -> dict:
    """The classic example's run, cut at ``minutes`` of training and validation (kept for one more validation,
    estimated as wordlm's ``time_budget`` does: the last one's time, or before any half the training time
    per token over the validation tokens)."""
    torch.manual_seed(1111)
    corpus = load_corpus(folder)
    train_data = batchify(corpus.train, 20)
    batches = len(range(0, train_data.size(0) - 1, 35))
    model = ClassicModel(len(corpus.vocab), 200, 200, 2, 0.2, tied=False)
    lr, best, best_state, epochs, valid_seconds = 20.0, None, None, 0.0, None
    started = time.perf_counter()
    deadline = started + 60 * minutes

    def should_stop(batch: int) -> bool:
        now = time.perf_counter()
        trained = epochs * batches + batch  # batches so far
        reserve = valid_seconds or corpus.valid.numel() * (now - started) / (trained * 20 * 35) / 2
        return now + reserve >= deadline

    while time.perf_counter() < deadline - (valid_seconds or 0.0):
        done = train_epoch(model, train_data, 35, lr, 0.25, should_stop=should_stop)
        epochs += done / batches
        valid_start = time.perf_counter()
        val_loss = classic_evaluate(model, corpus.valid, 35)
        valid_seconds = time.perf_counter() - valid_start
        print(f"| classic | {epochs:.2f} epochs | valid ppl {math.exp(val_loss):.2f}", flush=True)
        if best is None or val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
        else:
            lr /= 4.0
        if done < batches:
            break
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    test_loss = classic_evaluate(model, corpus.test, 35)
    return {"test_ppl": math.exp(test_loss), "epochs": round(epochs, 3), "seconds": round(seconds, 1)}


def wordlm_for(minutes: float, dataset: str, folder: Path, preset: str | None, keys: dict, save: str | None) -> dict:
    """wordlm's run from Python with ``time_budget=minutes`` on ``dataset`` as named (its folder: ``folder``);
    its save files go to ``save`` (to adapt the model afterwards), or else to a temporary folder."""
    with tempfile.TemporaryDirectory() as scratch:
        fixed = {"dataset": dataset, "time_budget": minutes, "save": save or str(Path(scratch) / "budget.pt")}
        run = wordlm.train(preset=preset, **{"epochs": 10_000, **keys, **fixed})
    cfg, base = run.config, defaults(save=run.config["save"])
    config = {key: value for key, value in cfg.items() if value != base.get(key) and key not in ("save", "save_last")}
    last = run.history.get("valid.ppl", [])
    epochs = run.info["tokens_seen"] / (batchify(load_corpus(folder).train, cfg["batch_size"]).numel())
    return {"test_ppl": run.test_ppl, "epochs": round(epochs, 3), "seconds": round(run.info["seconds_trained"], 1),
            "config": config, "validations": len(last), "valid_ppl_by_epoch": [round(ppl, 2) for _, ppl in last],
            "best_valid_ppl": run.best_valid_ppl}  # fmt: skip


def parse_keys(pairs: list[str]) -> dict:
    keys = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            keys[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            keys[key] = text  # a bare word: a string, as Sacred reads it
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--dataset", default="wikitext-2")
    parser.add_argument("--preset", default=None, help="a wordlm preset (wordlm.PRESETS)")
    parser.add_argument("--skip-classic", action="store_true", help="leave the classic example out (its figures: null)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--save", default=None, help="keep wordlm's checkpoint here, .last.pt beside it (default: a temporary folder)"
    )
    parser.add_argument("keys", nargs="*", help="wordlm keys, key=value as after `main.py with`")
    args = parser.parse_args()
    keys = parse_keys(args.keys)
    make_config(args.preset, **keys)  # an unknown key or preset before any training
    started_at = commit()  # the code that runs: HEAD may move while it does
    folder = resolve_dataset(args.dataset)
    classic = None if args.skip_classic else classic_for(args.minutes, folder)
    ours = wordlm_for(args.minutes, args.dataset, folder, args.preset, keys, args.save)
    record = {
        "minutes": args.minutes, "dataset": args.dataset, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "classic_test_ppl": classic and classic["test_ppl"],
        "classic_epochs": classic and classic["epochs"], "classic_seconds": classic and classic["seconds"],
        "wordlm_test_ppl": ours["test_ppl"], "wordlm_epochs": ours["epochs"], "wordlm_seconds": ours["seconds"],
        "wordlm_preset": args.preset, "wordlm_config": ours["config"], "commit": started_at,
        "wordlm_best_valid_ppl": ours["best_valid_ppl"], "valid_ppl_by_epoch": ours["valid_ppl_by_epoch"],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }  # fmt: skip
    if classic:
        record["ratio"] = ours["test_ppl"] / classic["test_ppl"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    classic_ppl = f"{classic['test_ppl']:.2f} ({classic['epochs']} epochs)" if classic else "not run"
    print(f"{args.minutes:g} minutes: classic test ppl {classic_ppl}; wordlm {ours['test_ppl']:.2f} "
          f"({ours['epochs']} epochs); record in {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
