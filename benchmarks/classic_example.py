"""A full training run of the classic word_language_model example, for its validation curve.

    python benchmarks/classic_example.py --epochs 2 --out classic.json [--dataset PATH_OR_NAME]

Trains as PyTorch's classic example does with its own defaults: LSTM 2×200, untied, dropout 0.2,
batch 20, bptt 35, lr 20 divided by 4 whenever the validation loss does not improve, clip 0.25,
hand-written SGD, evaluation at batch 10, seed 1111. The model and loops are the benchmark's faithful
copies in ``speed.py`` (written for this project, not the example's code). Prints a line per epoch and
writes the curve and the best model's test loss as JSON, for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from speed import ROOT, ClassicModel, classic_evaluate, repackage

from wordlm.data.corpus import batchify, get_batch, load_corpus
from wordlm.data.datasets import resolve_dataset


def train_epoch(model, data, bptt, lr, clip, log_interval=200, should_stop=None) -> int:
    """One epoch of the classic loop; with ``should_stop`` (called with the batches done) it ends at the first
    batch where that says so. Returns the batches trained."""
    criterion = torch.nn.NLLLoss()
    model.train()
    hidden = model.init_hidden(data.size(1))
    total, start = 0.0, time.perf_counter()
    for batch, i in enumerate(range(0, data.size(0) - 1, bptt), 1):
        inputs, targets = get_batch(data, i, bptt)
        model.zero_grad()
        hidden = repackage(hidden)
        output, hidden = model(inputs, hidden)
        loss = criterion(output, targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        total += loss.item()
        if batch % log_interval == 0:
            ms = (time.perf_counter() - start) * 1000 / log_interval
            print(f"| batch {batch:5d} | lr {lr:g} | ms/batch {ms:6.1f} | loss {total / log_interval:5.2f}", flush=True)
            total, start = 0.0, time.perf_counter()
        if should_stop is not None and should_stop(batch):
            return batch
    return len(range(0, data.size(0) - 1, bptt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = ROOT.parent / "shared" / "data" / "wikitext-2"
    parser.add_argument("--dataset", default=str(default_data) if default_data.is_dir() else "wikitext-2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(1111)
    corpus = load_corpus(resolve_dataset(args.dataset))
    train_data = batchify(corpus.train, 20)
    model = ClassicModel(len(corpus.vocab), 200, 200, 2, 0.2, tied=False)
    lr, best, best_state, curve = 20.0, None, None, []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train_epoch(model, train_data, 35, lr, 0.25)
        val_loss = classic_evaluate(model, corpus.valid, 35)
        seconds = time.perf_counter() - start
        curve.append({"epoch": epoch, "valid_loss": val_loss, "valid_ppl": math.exp(val_loss), "lr": lr,
                      "seconds": seconds})  # fmt: skip
        ppl = math.exp(val_loss)
        print(f"| end of epoch {epoch} | {seconds:.0f} s | valid loss {val_loss:.3f} | valid ppl {ppl:.2f}", flush=True)
        if best is None or val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
        else:
            lr /= 4.0
        Path(args.out).write_text(json.dumps({"curve": curve}, indent=1))
    model.load_state_dict(best_state)
    test_loss = classic_evaluate(model, corpus.test, 35)
    print(f"| test loss {test_loss:.3f} | test ppl {math.exp(test_loss):.2f}")
    result = {"curve": curve, "test_loss": test_loss, "test_ppl": math.exp(test_loss),
              "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
