"""Generation speed: words per second with 1 and with 32 samples sampled side by side.

Run from the repository root:

    python benchmarks/generate.py                        # a fresh model of the default shape
    python benchmarks/generate.py --checkpoint model.pt  # a trained one
    python benchmarks/generate.py --device cuda --words 2000 --samples 1 32 256
    python benchmarks/generate.py --threads 1            # steadier on a machine shared with other jobs

Without a checkpoint it times an untrained model of the default config (LSTM, 2 layers of 200,
tied) over a vocabulary of 10,000 words, the size of PTB's; speed does not depend on the weights.
Each figure is the best of ``--repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import time

import torch

from wordlm.checks import resolve_device
from wordlm.generation import sample_ids
from wordlm.models import ModelConfig, RNNModel, WordModel
from wordlm.training.checkpoint import load_checkpoint, model_from_checkpoint


def words_per_second(model: WordModel, samples: int, words: int, repeats: int) -> tuple[float, float]:
    """Best words/s (all samples together) and the matching milliseconds per step."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(0)
    context = [0]

    def run(steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        sample_ids(model, context, words=steps, samples=samples, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(min(words, 50))  # warm-up: kernels, allocator, thread pools
    seconds = min(run(words) for _ in range(repeats))
    return samples * words / seconds, 1000 * seconds / words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="time this checkpoint's model instead of a fresh one")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--words", type=int, default=500, help="tokens sampled per sample in each timed run")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 32], help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the best is kept")
    parser.add_argument("--ntoken", type=int, default=10_000, help="vocabulary size of the fresh model")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    if args.checkpoint:
        model, _ = model_from_checkpoint(load_checkpoint(args.checkpoint))
    else:
        torch.manual_seed(0)
        model = RNNModel(ModelConfig(args.ntoken))
    model = model.to(device).eval()
    config = model.config
    print(
        f"model {config.model_type} {config.nlayers}x{config.nhid}, vocabulary {config.ntoken}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for samples in args.samples:
        rate, ms_per_step = words_per_second(model, samples, args.words, args.repeats)
        print(f"samples {samples:4d} | {args.words} words each | {ms_per_step:7.3f} ms/step | {rate:10.0f} words/s")


if __name__ == "__main__":
    main()
