"""Training throughput of 1 and 2 processes (torchrun, gloo) on this machine's CPUs, and of one GPU.

    python benchmarks/distributed.py [--configs default] [--batches 20] [--warmup 3] [--repeats 3]

On the CPU, the same global batch is trained three ways, each in fresh processes: 1 process with 1
thread, 1 process with 2 threads, and ``torchrun --standalone --nproc_per_node=2`` (2 processes, 1
thread each, each training half of the batch's columns; DDP all-reduces the gradients over gloo). The
scaling efficiency is tokens/s of 2 processes over twice that of 1 process with 1 thread; the fair
comparison on a 2-core machine is 1 process with 2 threads, which uses the same cores. With CUDA,
one process on one GPU trains each of ``--gpu-configs``. Every run is wordlm's own training path
(``train_epoch`` with the ``World`` the CLI uses); the best of ``--repeats`` runs is kept, since other
work on a shared machine only ever slows a run down. The last line printed is one JSON object.

Configs are the experiment's: ``default`` (the config scope) or a named config such as
``zaremba_medium`` or ``smoke``, read from wordlm.experiment so they cannot drift from the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wordlm.data.corpus import batchify  # noqa: E402
from wordlm.data.datasets import load_dataset  # noqa: E402
from wordlm.models import ModelConfig, RNNModel  # noqa: E402
from wordlm.system import tune_cpu_allocator  # noqa: E402
from wordlm.training.distributed import start_world, stop_world  # noqa: E402
from wordlm.training.trainer import Reporter, TrainState, train_epoch  # noqa: E402


def experiment_config(name: str) -> dict:
    """The training config the CLI would use: the defaults, with a named config's keys on top."""
    from wordlm.experiment import ex

    config = dict(ex.configurations[0]())
    if name != "default":
        config.update(ex.named_configs[name]())
    return config


# ----------------------------------------------------------------------------- one measured run
def worker(args) -> None:
    """Train ``warmup + batches`` batches; rank 0 writes tokens/s of the timed ones to ``args.out``."""
    torch.set_num_threads(args.threads)
    cfg = experiment_config(args.config)
    world, device = start_world(torch.device(args.device))
    try:
        if device.type == "cpu":
            tune_cpu_allocator()  # what `python main.py` does on a CPU
        with world.local_rank_first():
            corpus = load_dataset(args.dataset or cfg["dataset"])
        torch.manual_seed(cfg["seed"])
        model_config = ModelConfig(len(corpus.vocab), cfg["model_type"], cfg["emsize"], cfg["nhid"], cfg["nlayers"],
                                   cfg["dropout"], cfg["tied"], cfg["init_range"])  # fmt: skip
        model = RNNModel(model_config).to(device)
        batch, bptt = cfg["batch_size"], cfg["bptt"]
        data = batchify(corpus.train, batch)[:, world.share(batch)].contiguous().to(device)  # (rows, B/N)
        if data.size(0) <= (args.warmup + args.batches) * bptt:
            raise SystemExit(f"the training split is too short for {args.warmup + args.batches} batches of {bptt}")
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
        stamps = []

        def after_batch() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        with open(os.devnull, "w") as quiet:
            train_epoch(
                world.wrap(model), data, optimizer, TrainState(lr=cfg["lr"]), bptt=bptt, clip=cfg["clip"],
                log_interval=10**9, max_batches=args.warmup + args.batches, reporter=Reporter(stream=quiet),
                after_batch=after_batch, world=world,
            )  # fmt: skip
        seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - stamps[0]
        timed = args.batches if args.warmup else args.batches - 1
        if world.is_main:
            result = {
                "tokens_per_s": batch * bptt * timed / seconds,
                "ms_per_batch": 1000 * seconds / timed,
                "processes": world.size,
                "threads": torch.get_num_threads(),
                "device": str(device),
                "vocabulary": len(corpus.vocab),
            }
            Path(args.out).write_text(json.dumps(result))
        world.barrier()  # leave together
    finally:
        stop_world()


# ----------------------------------------------------------------------------- the driver
def measure(args, config: str, device: str, threads: int, processes: int) -> dict:
    """Best of ``args.repeats`` fresh runs of one setup."""
    best = None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "result.json"
            worker_args = [str(Path(__file__).resolve()), "--worker", "--config", config, "--device", device,
                           "--threads", str(threads), "--batches", str(args.batches), "--warmup", str(args.warmup),
                           "--out", str(out)] + (["--dataset", args.dataset] if args.dataset else [])  # fmt: skip
            if processes == 1:
                command = [sys.executable, *worker_args]
            else:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command = [*launcher, f"--nproc_per_node={processes}", *worker_args]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(command, check=True, env=env)
            result = json.loads(out.read_text())
        if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
            best = result
    return best


def describe(name: str) -> str:
    cfg = experiment_config(name)
    return (
        f"{name}: {cfg['model_type']} {cfg['nlayers']}x{cfg['nhid']}, emsize {cfg['emsize']}, "
        f"{'tied, ' if cfg['tied'] else ''}batch {cfg['batch_size']}, bptt {cfg['bptt']}, dropout {cfg['dropout']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default", help="comma-separated configs timed on the CPU")
    parser.add_argument("--gpu-configs", default="default,zaremba_medium", help="configs timed on one GPU")
    parser.add_argument("--dataset", help="a corpus for every config (default: each config's own)")
    parser.add_argument("--batches", type=int, default=20, help="timed training batches (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setup; the fastest is kept")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU figures even with CUDA")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shared = ROOT.parent / "shared" / "data"
    if "WORDLM_DATA" not in os.environ and shared.is_dir():
        os.environ["WORDLM_DATA"] = str(shared)  # the corpora this project's machines keep there
    if args.worker:
        worker(args)
        # End here, past the interpreter's and C++'s clean-up: on a busy 2-core VM about 1 two-process run in
        # 20 had a worker abort at exit, after its result was written and its gloo group destroyed ("terminate
        # called without an active exception", no Python frame left; 8 of 170 runs of two benchmarks side by
        # side, 0 of 120 since).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPU cores, load average {load}, torch {torch.__version__}, "
          f"{args.batches} timed batches after {args.warmup} warm-up, best of {args.repeats} runs")  # fmt: skip
    report: dict = {"cpu": {}, "gpu": {}}
    for config in filter(None, args.configs.split(",")):
        one = measure(args, config, "cpu", threads=1, processes=1)
        two_threads = measure(args, config, "cpu", threads=2, processes=1)
        two = measure(args, config, "cpu", threads=1, processes=2)
        efficiency = two["tokens_per_s"] / (2 * one["tokens_per_s"])
        versus_threads = two["tokens_per_s"] / two_threads["tokens_per_s"]
        print(f"\nCPU, {describe(config)}, vocabulary {one['vocabulary']}")
        print(f"  {'setup':<34}{'tokens/s':>10}{'ms/batch':>10}")
        for label, result in (("1 process x 1 thread", one), ("1 process x 2 threads", two_threads),
                              ("2 processes x 1 thread (torchrun)", two)):  # fmt: skip
            print(f"  {label:<34}{result['tokens_per_s']:>10,.0f}{result['ms_per_batch']:>10.1f}")
        print(f"  scaling efficiency, 2 processes vs 1 process x 1 thread: {efficiency:.0%}")
        print(f"  2 processes vs 1 process x 2 threads (same cores): {versus_threads:.2f}x")
        report["cpu"][config] = {"1x1": one, "1x2": two_threads, "2x1": two, "efficiency": efficiency,
                                 "versus_two_threads": versus_threads}  # fmt: skip
    if torch.cuda.is_available() and not args.no_gpu:
        print(f"\nGPU: {torch.cuda.get_device_name(0)}, one process")
        for config in filter(None, args.gpu_configs.split(",")):
            result = measure(args, config, "cuda", threads=1, processes=1)
            figures = f"{result['tokens_per_s']:,.0f} tokens/s, {result['ms_per_batch']:.1f} ms/batch"
            print(f"  {describe(config)}, vocabulary {result['vocabulary']}: {figures}")
            report["gpu"][config] = result
    else:
        print("\nGPU: no CUDA device here, so no GPU figures")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
