"""Does the Transformer's memory of the words before its chunk help? One model trained with it and without it.

    python benchmarks/transformer_window.py --batches 600 [--dataset wikitext-2] [--valid-tokens 60000]

Trains two copies of one Transformer (same initial weights, same batches, same dropout masks) for
``--batches`` batches of WikiText-2's training text:

- ``memory``: as wordlm trains it, the memory carried from chunk to chunk, so every word attends to
  itself and the bptt - 1 words before it, wherever the chunk boundary falls;
- ``no memory``: the memory reset to zeros before every chunk, so a word sees only the words before it
  in its own chunk (0 to bptt - 1 of them), as the classic example's Transformer does.

Each is then scored on the first ``--valid-tokens`` tokens of the validation text the way it was trained
(``evaluate_loss``; or chunk by chunk of bptt words, the memory reset before each), and the validation
perplexities are printed. Model: emsize 200, nhid 200, 2 layers, 2 heads, dropout 0.2, tied; Adam lr 1e-3,
clip 0.25, batch 20, bptt 35.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from wordlm.data.corpus import batchify, batchify_eval, get_batch, load_corpus
from wordlm.data.datasets import resolve_dataset
from wordlm.models import ModelConfig, build_model
from wordlm.training.trainer import Reporter, TrainState, evaluate_loss, train_epoch

BATCH, BPTT, EVAL_BATCH = 20, 35, 10


class Quiet(Reporter):
    def write(self, line: str) -> None:
        pass


@torch.inference_mode()
def windowed_loss(model, ids: torch.Tensor) -> float:
    """Mean loss with the memory reset before every chunk of BPTT words (the classic example's evaluation)."""
    model.eval()
    total, count = 0.0, 0
    for source in batchify_eval(ids, EVAL_BATCH):
        if source is None or source.size(1) == 0:
            continue
        for i in range(0, source.size(0) - 1, BPTT):
            inputs, targets = get_batch(source, i, BPTT)
            features, _ = model.features(inputs, model.init_hidden(source.size(1)))
            total += model.decoder.nll_sum(features, targets).item()
            count += targets.numel()
    return total / count


def train(config: ModelConfig, weights: dict, data: torch.Tensor, batches: int, memory: bool):
    model = build_model(config)
    model.load_state_dict(weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = TrainState(lr=1e-3)

    def forget() -> None:
        state.hidden = model.init_hidden(data.size(1))

    torch.manual_seed(1)  # the same dropout masks for both
    start = time.perf_counter()
    train_epoch(model, data, optimizer, state, bptt=BPTT, clip=0.25, log_interval=10**9, max_batches=batches,
                reporter=Quiet(), after_batch=None if memory else forget)  # fmt: skip
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"
    parser.add_argument("--dataset", default=str(default_data) if default_data.is_dir() else "wikitext-2")
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--valid-tokens", type=int, default=60_000)
    args = parser.parse_args()
    corpus = load_corpus(resolve_dataset(args.dataset))
    data = batchify(corpus.train, BATCH)
    valid = corpus.valid[: args.valid_tokens]
    config = ModelConfig(len(corpus.vocab), "Transformer", emsize=200, nhid=200, nlayers=2, dropout=0.2, window=BPTT)
    torch.manual_seed(0)
    weights = build_model(config).state_dict()
    for memory in (True, False):
        model, seconds = train(config, weights, data, args.batches, memory)
        loss = evaluate_loss(model, valid, EVAL_BATCH)[0] if memory else windowed_loss(model, valid)
        name = "memory" if memory else "no memory"
        print(f"{name:9s} | {args.batches} batches in {seconds:6.1f} s | valid ppl {math.exp(loss):8.2f}", flush=True)


if __name__ == "__main__":
    main()
