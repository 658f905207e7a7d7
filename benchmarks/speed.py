"""Training and evaluation speed of wordlm against the classic word_language_model loop, in one run.

    python benchmarks/speed.py [--dataset PATH_OR_NAME] [--batches 12] [--warmup 3] [--configs default,large]
                               [--repeats 3] [--ablations] [--options [bf16,adaptive,compile]]

For each config, two subprocesses train from the same initial weights with the same dropout RNG:
(a) a faithful plain copy of the classic loop (embedding → LSTM → Linear → log_softmax → NLLLoss,
hand-written SGD, a fresh output tensor every step), written here for the benchmark and run in the
default environment, as users run the classic example; (b) wordlm's own training path (the same
``train_epoch`` and allocator setting the CLI uses). Each then evaluates the same validation tokens
at batch 10. Printed: tokens/s and ratios, GFLOP/s from an explicit FLOP count against the measured
matmul ceiling at the decoder's shapes, evaluation tokens/s, peak memory, and whether the per-batch
losses agree; and a bound, the speed of the same math if a step were nothing but the decoder's products
at that ceiling plus the LSTM kernels (timed alone), as a ratio to the classic loop: an optimistic
limit for any implementation of this math here. Each side runs ``--repeats`` times, interleaved with
the others, and its fastest run counts (with the spread printed): a shared VM's speed moves by tens
of percent from minute to minute. The ratios run by run are printed too (run i of the classic loop
and of wordlm ran back to back), with their median, a figure less moved by a lucky spell of either.
``--options bf16`` on a CPU that cannot run ``amp='bf16'`` (no AVX-512 or AMX: see
``wordlm.system.bfloat16_unavailable``) reports the option as unavailable, with the reason, instead of
timing it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wordlm.data.corpus import batchify, get_batch, load_corpus  # noqa: E402
from wordlm.data.datasets import resolve_dataset  # noqa: E402
from wordlm.evaluation import eval_chunk_tokens  # noqa: E402
from wordlm.models import fused  # noqa: E402
from wordlm.system import bfloat16_unavailable  # noqa: E402

CONFIGS = {
    "default": dict(emsize=200, nhid=200, nlayers=2, dropout=0.2, batch_size=32, bptt=35, lr=20.0, clip=0.25),
    "large": dict(emsize=650, nhid=650, nlayers=2, dropout=0.5, batch_size=32, bptt=35, lr=20.0, clip=0.25),
}
EVAL_BATCH = 10
# wordlm's options that change the math (off by default), for --options
OPTIONS = {
    "wordlm-bf16": {"amp": "bf16"},
    "wordlm-adaptive": {"adaptive_softmax": [2000, 10000]},
    "wordlm-compile": {"compile": True},
}


def option_setting(side: str, ntoken: int) -> dict:
    """What ``side`` changes (nothing for the float32 sides). Adaptive softmax keeps the cutoffs that
    fall inside the vocabulary (a small corpus's has fewer than 10,000 words), at least one."""
    setting = dict(OPTIONS.get(side, {}))
    if "adaptive_softmax" in setting:
        setting["adaptive_softmax"] = [c for c in setting["adaptive_softmax"] if c < ntoken] or [ntoken // 2]
    return setting


def runnable(options: list[str]) -> tuple[list[str], dict[str, str]]:
    """The options this CPU can run, and why each of the others cannot (``amp='bf16'`` needs bfloat16
    support: ``wordlm.system.bfloat16_unavailable``); those are reported, not timed."""
    lacking = bfloat16_unavailable() if "wordlm-bf16" in options else None
    unavailable = {"wordlm-bf16": lacking} if lacking else {}
    return [option for option in options if option not in unavailable], unavailable


# ----------------------------------------------------------------------------- the classic loop
class ClassicModel(nn.Module):
    """The classic example's RNNModel (LSTM), returning flattened log-probabilities."""

    def __init__(self, ntoken, emsize, nhid, nlayers, dropout, tied=True):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self.nlayers, self.nhid, self.ntoken = nlayers, nhid, ntoken

    def forward(self, inputs, hidden):
        emb = self.drop(self.encoder(inputs))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage(hidden):
    return hidden.detach() if isinstance(hidden, torch.Tensor) else tuple(repackage(h) for h in hidden)


def classic_train(model, data, cfg, batches):
    criterion = nn.NLLLoss()
    model.train()
    hidden = model.init_hidden(cfg["batch_size"])
    losses, times = [], []
    for batch, i in enumerate(range(0, data.size(0) - 1, cfg["bptt"])):
        if batch == batches:
            break
        start = time.perf_counter()
        inputs, targets = get_batch(data, i, cfg["bptt"])
        model.zero_grad()
        hidden = repackage(hidden)
        output, hidden = model(inputs, hidden)
        loss = criterion(output, targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-cfg["lr"])
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, times


def classic_evaluate(model, ids, bptt):
    criterion = nn.NLLLoss()
    model.eval()
    data = batchify(ids, EVAL_BATCH)
    total = 0.0
    hidden = model.init_hidden(EVAL_BATCH)
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            inputs, targets = get_batch(data, i, bptt)
            output, hidden = model(inputs, hidden)
            hidden = repackage(hidden)
            total += len(inputs) * criterion(output, targets.reshape(-1)).item()
    return total / (len(data) - 1)


# ----------------------------------------------------------------------------- wordlm's path
def wordlm_train(model, data, cfg, batches, precision=None, network=None):
    from wordlm.training.trainer import FLOAT32, Reporter, TrainState, train_epoch

    losses, times = [], []

    class Timing(Reporter):
        def __init__(self):
            super().__init__()
            self.last = time.perf_counter()

        def interval(self, state, total, ms_per_batch, loss):
            now = time.perf_counter()
            losses.append(loss)
            times.append(now - self.last)
            self.last = now

        def write(self, line):
            pass

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    state = TrainState(lr=cfg["lr"])
    train_epoch(model if network is None else network, data, optimizer, state, bptt=cfg["bptt"], clip=cfg["clip"],
                log_interval=1, max_batches=batches, reporter=Timing(), precision=precision or FLOAT32)  # fmt: skip
    return losses, times


def worker(args) -> None:
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    corpus = load_corpus(resolve_dataset(args.dataset))
    ntoken = len(corpus.vocab)
    if args.impl == "classic":
        model = ClassicModel(ntoken, cfg["emsize"], cfg["nhid"], cfg["nlayers"], cfg["dropout"])
        train, evaluate = classic_train, classic_evaluate
    else:
        from wordlm.evaluation import evaluate_loss
        from wordlm.models import ModelConfig, RNNModel
        from wordlm.system import tune_cpu_allocator
        from wordlm.training.trainer import Precision

        if args.impl != "wordlm-no-allocator":
            tune_cpu_allocator()  # what `python main.py` does on a CPU
        if args.impl == "wordlm-unfused":  # the plain cross_entropy of the logits instead of wordlm.models.fused
            fused.set_enabled(False)
        if args.impl == "wordlm-blas":  # the fused loss with torch.mm's products throughout
            fused.set_backend("blas")
        options = option_setting(args.impl, ntoken)
        model = RNNModel(ModelConfig(ntoken, "LSTM", cfg["emsize"], cfg["nhid"], cfg["nlayers"], cfg["dropout"],
                                     tied="adaptive_softmax" not in options,
                                     adaptive_softmax=options.get("adaptive_softmax")))  # fmt: skip
        if "adaptive_softmax" in options:
            model.decoder.sort_words_by_frequency(torch.bincount(corpus.train, minlength=ntoken))
        precision = Precision(options.get("amp"), "cpu")
        network = torch.compile(model) if options.get("compile") else None

        def train(model, data, cfg, batches):
            return wordlm_train(model, data, cfg, batches, precision, network)

        def evaluate(model, ids, bptt):
            return evaluate_loss(model, ids, EVAL_BATCH, bptt)[0]

    if "adaptive_softmax" not in option_setting(args.impl, ntoken):  # (it has its own output layer)
        model.load_state_dict(torch.load(args.weights, weights_only=True), strict=False)
    started = time.perf_counter()
    data = batchify(corpus.train, cfg["batch_size"])
    torch.manual_seed(1)  # the same dropout masks on both sides
    losses, times = train(model, data, cfg, args.warmup + args.batches)
    valid = corpus.valid[: args.eval_tokens + 1]
    evaluate(model, valid[: 20 * EVAL_BATCH * cfg["bptt"]], cfg["bptt"])  # warm-up
    start = time.perf_counter()
    eval_loss = evaluate(model, valid, cfg["bptt"])
    eval_seconds = time.perf_counter() - start
    timed = times[args.warmup :]
    tokens = cfg["batch_size"] * cfg["bptt"]
    result = {
        "losses": losses,
        "train_tokens_per_s": tokens * len(timed) / sum(timed),
        "eval_tokens_per_s": (valid.numel() - 1) / eval_seconds,
        "eval_loss": eval_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "seconds_to_last_batch": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the driver
def flops_per_step(cfg, ntoken) -> float:
    """Multiply-adds × 2 of one training step: forward, and backward at twice the forward."""
    tokens = cfg["batch_size"] * cfg["bptt"]
    decoder = 2 * tokens * cfg["nhid"] * ntoken
    lstm = sum(
        2 * tokens * 4 * cfg["nhid"] * ((cfg["emsize"] if layer == 0 else cfg["nhid"]) + cfg["nhid"])
        for layer in range(cfg["nlayers"])
    )
    return 3 * (decoder + lstm)


def best_gflops(product, flops, repeats) -> float:
    product()
    product()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def onednn_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with fused.matmul_backend("onednn"):
        return fused.matmul_nt(a, b)


def blas_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b.t())


def matmul_ceiling(tokens, hidden, ntoken, repeats=10) -> float:
    """GFLOP/s of the decoder's three products at their shapes, each in its faster layout and with the
    faster of this torch's libraries (BLAS via ``torch.mm``, and oneDNN where torch has it), whole and
    split into the vocabulary chunks ``wordlm.models.fused`` uses (the whole product writes a vocabulary-sized
    output, whose speed moves with the memory; a chunk's stays in cache), timed in steady state: the
    time-weighted rate of forward, grad-of-input and grad-of-weight together."""
    h = torch.randn(tokens, hidden)
    w = torch.randn(ntoken, hidden)
    g = torch.randn(ntoken, tokens)
    flops = 2 * tokens * hidden * ntoken
    out_vn, out_nv = torch.empty(ntoken, tokens), torch.empty(tokens, ntoken)
    out_nh, out_vh = torch.empty(tokens, hidden), torch.empty(ntoken, hidden)
    forward = [lambda: torch.mm(w, h.t(), out=out_vn), lambda: torch.mm(h, w.t(), out=out_nv)]
    grad_input = [lambda: torch.mm(g.t(), w, out=out_nh)]
    grad_weight = [lambda: torch.mm(g, h, out=out_vh)]
    h_t = h.t().contiguous()
    if "onednn" in fused.available_backends():  # a @ bᵀ with both operands' rows contiguous
        g_t, w_t = g.t().contiguous(), w.t().contiguous()
        forward += [lambda: onednn_nt(w, h), lambda: onednn_nt(h, w)]
        grad_input.append(lambda: onednn_nt(g_t, w_t))
        grad_weight.append(lambda: onednn_nt(g, h_t))
    rows = [slice(start, start + fused.CHUNK) for start in range(0, ntoken, fused.CHUNK)]
    w_chunks = [w[r].t().contiguous() for r in rows]  # (H, ≤CHUNK) each, as the grad of h takes them
    libraries = [blas_nt] + ([onednn_nt] if "onednn" in fused.available_backends() else [])
    for nt in libraries:  # chunk by chunk, as wordlm.models.fused
        forward.append(lambda nt=nt: [nt(w[r], h) for r in rows])
        grad_input.append(lambda nt=nt: [nt(w_chunk, g[r].t()) for w_chunk, r in zip(w_chunks, rows)])
        grad_weight.append(lambda nt=nt: [nt(g[r], h_t) for r in rows])
    rates = [max(best_gflops(product, flops, repeats) for product in products)
             for products in (forward, grad_input, grad_weight)]  # fmt: skip
    return 3 / sum(1 / rate for rate in rates)


def square_matmul_gflops(size=4096, repeats=5) -> float:
    """A large square float32 matmul, with the faster library: the machine's matmul speed at its easiest shape."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = [lambda: a @ b]
    if "onednn" in fused.available_backends():
        b_t = b.t().contiguous()
        products.append(lambda: onednn_nt(a, b_t))
    return max(best_gflops(product, 2 * size**3, repeats) for product in products)


def lstm_seconds(cfg, ntoken, eval_tokens, repeats=5) -> tuple[float, float]:
    """Seconds of the config's ``nn.LSTM`` alone, the kernel both sides run unchanged: one training step's
    forward and backward (batch × bptt tokens), and an evaluation of ``eval_tokens`` at batch 10."""
    torch.manual_seed(0)
    lstm = nn.LSTM(cfg["emsize"], cfg["nhid"], cfg["nlayers"], dropout=cfg["dropout"])
    inputs = torch.randn(cfg["bptt"], cfg["batch_size"], cfg["emsize"], requires_grad=True)
    steps = max(1, eval_tokens // EVAL_BATCH)
    per_call = max(1, eval_chunk_tokens(ntoken) // EVAL_BATCH)  # steps per call, as wordlm's evaluation cuts them
    eval_inputs = torch.randn(steps, EVAL_BATCH, cfg["emsize"])

    def train_step():
        lstm.train()
        lstm(inputs)[0].sum().backward()

    def evaluate():
        lstm.eval()
        with torch.inference_mode():
            for start in range(0, steps, per_call):
                lstm(eval_inputs[start : start + per_call])

    def best(run, count):
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(count):
                run()
            times.append((time.perf_counter() - start) / count)
        return min(times)

    return best(train_step, 5), best(evaluate, 1)


def run_side(impl, config, args, weights) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, "--worker", impl, "--config", config, "--weights", weights, "--out", out,
               "--dataset", args.dataset, "--batches", str(args.batches), "--warmup", str(args.warmup),
               "--eval-tokens", str(args.eval_tokens)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")}
    subprocess.run(command, check=True, env=env)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def best_of(runs: list[dict]) -> dict:
    """One side's figures over its repeated runs: the fastest train and eval rates (the runs least hit by
    other load on a shared machine), their spread, and the first run's losses (every run has the same)."""
    merged = dict(runs[0])
    for key in ("train_tokens_per_s", "eval_tokens_per_s"):
        rates = [r[key] for r in runs]
        merged[key], merged[key + "_spread"] = max(rates), (min(rates), max(rates))
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = ROOT.parent / "shared" / "data" / "wikitext-2"
    parser.add_argument("--dataset", default=str(default_data) if default_data.is_dir() else "wikitext-2")
    parser.add_argument("--configs", default="default,large")
    parser.add_argument("--batches", type=int, default=12, help="timed training batches (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side, interleaved; the fastest of each is reported")  # fmt: skip
    sides = ["classic", "wordlm", "wordlm-unfused", "wordlm-blas", "wordlm-no-allocator", *OPTIONS]
    parser.add_argument("--worker", choices=sides, dest="impl")
    names = [option.removeprefix("wordlm-") for option in OPTIONS]
    parser.add_argument("--options", nargs="?", const=",".join(names), default="", metavar="NAMES",
                        help=f"also time these options that change the math, at each config (comma-separated; "
                             f"all of {', '.join(names)} if none are named)")  # fmt: skip
    parser.add_argument("--square-size", type=int, default=4096,
                        help="the size of the square matmul timed as the machine's easiest product (the suite's "
                             "test uses a small one: 4096^3 takes 10-30 s on 2 cores)")  # fmt: skip
    parser.add_argument("--ablations", action="store_true",
                        help="also run wordlm without each speed-up (default config)")  # fmt: skip
    parser.add_argument("--config", default="default")
    parser.add_argument("--weights")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.impl:
        return worker(args)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: each side needs at least one run")
    if args.square_size < 1:
        parser.error(f"--square-size {args.square_size}: give a matrix size of at least 1")
    options = [f"wordlm-{name.strip()}" for name in args.options.split(",") if name.strip()]
    unknown = [option.removeprefix("wordlm-") for option in options if option not in OPTIONS]
    if unknown:
        parser.error(f"--options {args.options}: no option {', '.join(unknown)}; choose from {', '.join(names)}")
    options, unavailable = runnable(options)

    corpus = load_corpus(resolve_dataset(args.dataset))
    ntoken = len(corpus.vocab)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"corpus {args.dataset} (vocabulary {ntoken}), best of {args.repeats} interleaved runs per side")  # fmt: skip
    square = square_matmul_gflops(args.square_size)
    print(f"large square matmul ({args.square_size}^3): {square:.1f} GFLOP/s")
    summary = {}
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        tokens = cfg["batch_size"] * cfg["bptt"]
        variants = {}
        if args.ablations and name == "default":
            variants["wordlm-unfused"] = "without the fused decoder loss"
            if "onednn" in fused.available_backends():
                variants["wordlm-blas"] = "the fused loss on torch.mm's products only"
            variants["wordlm-no-allocator"] = "without the allocator setting"
        variants.update({option: json.dumps(option_setting(option, ntoken)) for option in options})
        torch.manual_seed(0)
        weights = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
        initial = ClassicModel(ntoken, cfg["emsize"], cfg["nhid"], cfg["nlayers"], cfg["dropout"])
        torch.save(initial.state_dict(), weights)
        runs = {side: [] for side in ("classic", "wordlm", *variants)}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every side
            for side in runs:
                runs[side].append(run_side(side, name, args, weights))
        os.unlink(weights)
        results = {side: best_of(side_runs) for side, side_runs in runs.items()}
        phases = ("train", "eval")
        rates = {side: {phase: [r[f"{phase}_tokens_per_s"] for r in runs[side]] for phase in phases}
                 for side in ("classic", "wordlm")}  # fmt: skip
        # Run i of each side ran back to back with the other's, so their ratio saw the same spell of the VM.
        paired = {phase: [w / c for c, w in zip(rates["classic"][phase], rates["wordlm"][phase])] for phase in phases}
        classic, ours = results["classic"], results["wordlm"]
        ceiling = matmul_ceiling(tokens, cfg["nhid"], ntoken)
        flops = flops_per_step(cfg, ntoken)
        gflops = {side: flops * r["train_tokens_per_s"] / tokens / 1e9
                  for side, r in (("classic", classic), ("wordlm", ours))}  # fmt: skip
        loss_gap = max(abs(a - b) for a, b in zip(classic["losses"], ours["losses"]))
        # An optimistic bound: the step as nothing but the decoder's products at the ceiling plus the LSTM
        # kernels (no softmax exponentials, dropout, clipping or update), for the same math on this machine.
        lstm_train, lstm_eval = lstm_seconds(cfg, ntoken, args.eval_tokens)
        decoder_flops = 2 * cfg["nhid"] * ntoken  # per token, forward; training runs three such products
        bound_train = tokens / (3 * decoder_flops * tokens / (ceiling * 1e9) + lstm_train)
        bound_eval = args.eval_tokens / (decoder_flops * args.eval_tokens / (ceiling * 1e9) + lstm_eval)
        row = {
            "train_ratio": ours["train_tokens_per_s"] / classic["train_tokens_per_s"],
            "eval_ratio": ours["eval_tokens_per_s"] / classic["eval_tokens_per_s"],
            "gflops_fraction": gflops["wordlm"] / ceiling,
            "loss_match": loss_gap < 1e-3,
            "max_loss_gap": loss_gap,
            "classic_train_tokens_per_s": classic["train_tokens_per_s"],
            "wordlm_train_tokens_per_s": ours["train_tokens_per_s"],
            "classic_eval_tokens_per_s": classic["eval_tokens_per_s"],
            "wordlm_eval_tokens_per_s": ours["eval_tokens_per_s"],
            "run_rates": rates,
            "paired_ratios": paired,
            "paired_train_ratio_median": statistics.median(paired["train"]),
            "paired_eval_ratio_median": statistics.median(paired["eval"]),
            "spread": {
                side: {"train": r["train_tokens_per_s_spread"], "eval": r["eval_tokens_per_s_spread"]}
                for side, r in results.items()
            },
            "bound_train_ratio": bound_train / classic["train_tokens_per_s"],
            "bound_eval_ratio": bound_eval / classic["eval_tokens_per_s"],
            "train_fraction_of_bound": ours["train_tokens_per_s"] / bound_train,
            "eval_fraction_of_bound": ours["eval_tokens_per_s"] / bound_eval,
            "bound_train_tokens_per_s": bound_train,
            "bound_eval_tokens_per_s": bound_eval,
            "ntoken": ntoken,
            "lstm_train_step_ms": 1000 * lstm_train,
            "lstm_eval_ms": 1000 * lstm_eval,
            "classic_gflops": gflops["classic"],
            "wordlm_gflops": gflops["wordlm"],
            "matmul_ceiling_gflops": ceiling,
            "square_matmul_gflops": square,
            "square_matmul_size": args.square_size,
            "gflops_fraction_of_square": gflops["wordlm"] / square,
            "classic_eval_ppl": float(torch.tensor(classic["eval_loss"]).exp()),
            "wordlm_eval_ppl": float(torch.tensor(ours["eval_loss"]).exp()),
            "classic_peak_rss_mb": classic["peak_rss_mb"],
            "wordlm_peak_rss_mb": ours["peak_rss_mb"],
        }
        summary[name] = row
        print(f"\n== {name}: {cfg['nlayers']}x{cfg['nhid']} LSTM, batch {cfg['batch_size']}, bptt {cfg['bptt']}, "
              f"{flops / 1e9:.1f} GFLOP per step")  # fmt: skip
        print(f"{'':24s}{'classic':>12s}{'wordlm':>12s}{'ratio':>9s}")
        print(f"{'train tokens/s':24s}{row['classic_train_tokens_per_s']:12.0f}{row['wordlm_train_tokens_per_s']:12.0f}"
              f"{row['train_ratio']:9.2f}")  # fmt: skip
        print(f"{'train GFLOP/s':24s}{gflops['classic']:12.1f}{gflops['wordlm']:12.1f}"
              f"   decoder-shape ceiling {ceiling:.1f} (wordlm at {row['gflops_fraction']:.0%}; "
              f"{row['gflops_fraction_of_square']:.0%} of the square matmul)")  # fmt: skip
        print(f"{'eval tokens/s (batch 10)':24s}{row['classic_eval_tokens_per_s']:12.0f}"
              f"{row['wordlm_eval_tokens_per_s']:12.0f}{row['eval_ratio']:9.2f}")  # fmt: skip
        print(f"{'bound tokens/s':24s}{'train':>12s}{bound_train:12.0f}{row['bound_train_ratio']:9.2f}"
              f"   wordlm at {row['train_fraction_of_bound']:.0%} of it "
              f"(LSTM {1000 * lstm_train:.1f} ms a step)")  # fmt: skip
        print(f"{'':24s}{'eval':>12s}{bound_eval:12.0f}{row['bound_eval_ratio']:9.2f}"
              f"   wordlm at {row['eval_fraction_of_bound']:.0%} of it (LSTM {1000 * lstm_eval:.0f} ms)")  # fmt: skip
        print("  (bound: the decoder's products at the ceiling plus the LSTM kernels alone, the same math)")
        print(f"{'eval ppl':24s}{row['classic_eval_ppl']:12.3f}{row['wordlm_eval_ppl']:12.3f}")
        print(f"{'peak RSS MB':24s}{row['classic_peak_rss_mb']:12.0f}{row['wordlm_peak_rss_mb']:12.0f}")
        for side in ("classic", "wordlm"):
            (train_low, train_high), (eval_low, eval_high) = row["spread"][side]["train"], row["spread"][side]["eval"]
            print(f"  {side} over {args.repeats} runs: train {train_low:.0f}-{train_high:.0f}, "
                  f"eval {eval_low:.0f}-{eval_high:.0f} tokens/s")  # fmt: skip
        for phase in phases:
            print(f"  wordlm / classic, run by run ({phase}): {', '.join(f'{r:.2f}' for r in paired[phase])} "
                  f"(median {statistics.median(paired[phase]):.2f})")  # fmt: skip
        print(f"per-batch losses agree: {row['loss_match']} "
              f"(max gap {loss_gap:.2e} over {len(ours['losses'])} batches)")  # fmt: skip
        if variants or unavailable:
            print("variants (loss gap: the largest per-batch gap to wordlm's float32 run):")
        for side, lacking in unavailable.items():
            row[f"{side}_unavailable"] = lacking
            print(f"  {json.dumps(OPTIONS[side]):40s} unavailable: {lacking}")
        for side, what in variants.items():
            result = results[side]
            row[f"{side}_train_tokens_per_s"] = result["train_tokens_per_s"]
            row[f"{side}_eval_tokens_per_s"] = result["eval_tokens_per_s"]
            gap = max(abs(a - b) for a, b in zip(result["losses"], ours["losses"]))
            row[f"{side}_loss_gap"] = gap
            if side in OPTIONS:
                row[f"{side}_setting"] = option_setting(side, ntoken)
            print(f"  {what:40s} train {result['train_tokens_per_s']:7.0f} tokens/s "
                  f"({result['train_tokens_per_s'] / ours['train_tokens_per_s']:.2f}x wordlm, "
                  f"{result['train_tokens_per_s'] / classic['train_tokens_per_s']:.2f}x classic), eval "
                  f"{result['eval_tokens_per_s']:7.0f} tokens/s, loss gap {gap:.3f}, "
                  f"{result['seconds_to_last_batch']:.0f} s to the last batch")  # fmt: skip
    first = summary[args.configs.split(",")[0]]
    print(json.dumps({**{k: first[k] for k in ("train_ratio", "eval_ratio", "gflops_fraction", "loss_match")},
                      "configs": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
