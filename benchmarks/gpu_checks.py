"""The checks ``benchmarks/gpu.sh`` runs on a CUDA machine, one step a call; each writes ``OUT/<step>.json``.

    python benchmarks/gpu_checks.py STEP --out DIR --work DIR [--seconds S]

Steps:
    preflight  one line: the CUDA devices, or ``error: no CUDA device: <why>`` and exit 2 (3: no torch at all)
    env        torch, CUDA, cuDNN and NCCL versions, each device's name, memory and capability
    corpus     a tiny corpus cut from the shipped WikiText-2 (``WORK/tiny``), for the steps below and torchrun
    cudnn      the same weights on the CPU and on CUDA (cuDNN's LSTM): their validation losses agree to 1e-4 nats
               and one batch's gradients to 1e-3 (relative); also the smoke preset trained on each, side by side
    amp        the smoke preset trained on CUDA in float32, amp=fp16 and amp=bf16: finite losses, test perplexity
               below the vocabulary's size; and the float32 model's loss on one batch under each autocast
               within 0.05 nats of float32's
    speed      training tokens/s (the second of two short epochs, validation excluded) of the default model on
               WikiText-2 and of zaremba_medium on PTB (WikiText-2 where PTB is absent), and how long
               zaremba_medium's 39 epochs would take
    medium     zaremba_medium trained to the end on PTB when ``speed``'s estimate fits in ``--seconds``;
               ``time_budget`` stops it, tested, should the estimate be short
Each prints one line (``STEP: ok ...``, ``STEP: FAIL ...`` or ``STEP: skipped ...``) and exits 0 when the step
passed or was skipped, 1 when a check failed. PTB is looked for in ``$WORDLM_DATA/penn``, ``../shared/data/penn``,
``shared/data/penn`` and ``data/penn``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHIPPED_WT2 = ROOT / "wordlm" / "data" / "corpora-data" / "wikitext-2"
TINY_TOKENS = {"train": 20_000, "valid": 3_000, "test": 3_000}
SAME_WEIGHTS_LOSS_TOLERANCE = 1e-4  # nats: float32 sums over a few thousand tokens, in another order
GRADIENT_TOLERANCE = 1e-3  # largest difference over the largest gradient entry
AMP_LOSS_TOLERANCE = 0.05  # nats: one batch's loss under autocast against float32's, the same weights
ZAREMBA_MEDIUM_EPOCHS = 39
BATCHES = 300  # --batches: training batches of each of speed's two short epochs
DEVICE = "cuda"  # --device: "cpu" runs the steps' code on a CPU (a dry run of this file, not a check of CUDA)


def write(out: Path, step: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


# ----------------------------------------------------------------------------- preflight and environment
def preflight() -> int:
    """One line: the devices (exit 0), or why there is no CUDA device (exit 2; 3: no torch)."""
    try:
        import torch
    except Exception as problem:  # noqa: BLE001 - any failure to import is the answer
        print(f"error: no CUDA device: {sys.executable} cannot import torch ({type(problem).__name__}: {problem})")
        return 3
    try:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif not torch.cuda.is_available():
            reason = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
        else:
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            print(f"ok: {len(names)} CUDA device(s): {', '.join(names)}; torch {torch.__version__}, "
                  f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {sys.executable}")  # fmt: skip
            return 0
    except Exception as problem:  # noqa: BLE001
        reason = f"{type(problem).__name__}: {problem}".replace("\n", " ")
    print(f"error: no CUDA device: {reason}")
    return 2


def env(out: Path, work: Path, seconds: float) -> bool:
    import torch

    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}",
                        "multiprocessors": props.multi_processor_count})  # fmt: skip
    nccl = None
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a build without NCCL
        pass
    result = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "devices": devices,
              "cpu_threads": torch.get_num_threads(), "cpu": cpu_name()}  # fmt: skip
    write(out, "env", result)
    print(f"env: ok {len(devices)} x {devices[0]['name'] if devices else '?'}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {result['cudnn']}, NCCL {nccl}")  # fmt: skip
    return True


def cpu_name() -> str:
    """The CPU's name, as the budget records give it (``budget.cpu_name``: this file runs from benchmarks/)."""
    from budget import cpu_name as budget_cpu_name

    return budget_cpu_name()


# ----------------------------------------------------------------------------- corpora
def tiny_corpus(work: Path) -> Path:
    """The first whole lines of each shipped WikiText-2 split, about ``TINY_TOKENS`` tokens each."""
    folder = work / "tiny"
    if all((folder / f"{split}.txt").is_file() for split in TINY_TOKENS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, budget in TINY_TOKENS.items():
        kept, count = [], 0
        with lzma.open(SHIPPED_WT2 / f"{split}.txt.xz", "rt", encoding="utf-8", newline="") as handle:
            for line in handle:
                if count >= budget:
                    break
                kept.append(line)
                count += len(line.split()) + 1
        (folder / f"{split}.txt").write_text("".join(kept), encoding="utf-8")
    return folder


def corpus(out: Path, work: Path, seconds: float) -> bool:
    print(f"corpus: ok {tiny_corpus(work)}")
    return True


def ptb_folder() -> Path | None:
    places = [Path(os.environ["WORDLM_DATA"]) / "penn"] if os.environ.get("WORDLM_DATA") else []
    places += [ROOT.parent / "shared" / "data" / "penn", ROOT / "shared" / "data" / "penn", ROOT / "data" / "penn"]
    return next((p for p in places if all((p / f"{s}.txt").is_file() for s in TINY_TOKENS)), None)


def quiet_train(log: Path, **keys):
    """``wordlm.train`` with its progress lines appended to ``log`` instead of stdout."""
    import contextlib

    import wordlm

    with log.open("a") as stream, contextlib.redirect_stdout(stream):
        print(f"--- wordlm.train({', '.join(f'{k}={v!r}' for k, v in keys.items())})", flush=True)
        return wordlm.train(**keys)


# ----------------------------------------------------------------------------- cuDNN against the CPU
def cudnn(out: Path, work: Path, seconds: float) -> bool:
    import torch
    import torch.nn.functional as F

    import wordlm

    torch.backends.cudnn.allow_tf32 = False  # float32 against float32: TF32 would round the products to 10 bits
    torch.backends.cuda.matmul.allow_tf32 = False
    folder, log = tiny_corpus(work), out / "cudnn.train.log"
    keys = dict(preset="smoke", dataset=str(folder), dropout=0.0, seed=1111)  # no dropout: nothing random in a step
    runs = {name: quiet_train(log, device=device, save=str(work / f"cudnn_{name}.pt"), **keys)
            for name, device in (("cpu", "cpu"), ("cuda", DEVICE))}  # fmt: skip

    # the same weights (the CPU-trained model) on both devices
    models = {name: wordlm.load(work / "cudnn_cpu.pt", device) for name, device in (("cpu", "cpu"), ("cuda", DEVICE))}
    losses = {device: lm.loss(folder / "valid.txt")[0] for device, lm in models.items()}
    ids = models["cpu"].tokenize(folder / "train.txt")[0]
    steps, columns = 35, 8
    grads = {}
    for device, lm in models.items():
        model = lm.model.train()  # dropout is 0: train mode only lets cuDNN run its backward pass
        data = ids[: steps * columns + 1].to(lm.device)
        inputs, targets = data[:-1].view(columns, steps).t(), data[1:].view(columns, steps).t()  # (T, B)
        features, _ = model.features(inputs, model.init_hidden(columns))
        loss = F.cross_entropy(model.decoder.scores(features).reshape(-1, lm.config.ntoken), targets.reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads[device] = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
        model.eval()
    worst = max((grads["cpu"][n] - grads["cuda"][n]).abs().max().item() for n in grads["cpu"])
    scale = max(g.abs().max().item() for g in grads["cpu"].values())
    loss_gap = abs(losses["cpu"] - losses["cuda"])
    trained_gap = abs(runs["cuda"].test_ppl / runs["cpu"].test_ppl - 1)
    result = {
        "cudnn": torch.backends.cudnn.version(), "tf32": False,
        "same_weights_valid_loss": losses, "same_weights_loss_gap": loss_gap,
        "gradient_gap_relative": worst / scale, "gradient_parameters": sorted(grads["cpu"]),
        "trained_test_ppl": {device: run.test_ppl for device, run in runs.items()},
        "trained_test_ppl_gap_relative": trained_gap,
        "trained_train_loss": {device: run.history.get("train.loss") for device, run in runs.items()},
        "tolerances": {"loss": SAME_WEIGHTS_LOSS_TOLERANCE, "gradient": GRADIENT_TOLERANCE},
    }  # fmt: skip
    ok = loss_gap <= SAME_WEIGHTS_LOSS_TOLERANCE and worst / scale <= GRADIENT_TOLERANCE
    result["ok"] = ok
    write(out, "cudnn", result)
    print(f"cudnn: {'ok' if ok else 'FAIL'} same weights: valid loss cpu {losses['cpu']:.6f} cuda {losses['cuda']:.6f} "
          f"(gap {loss_gap:.1e}), gradients gap {worst / scale:.1e} of the largest; trained 20 batches on each: "
          f"test ppl {runs['cpu'].test_ppl:.3f} / {runs['cuda'].test_ppl:.3f} ({trained_gap:.1e} apart)")  # fmt: skip
    return ok


# ----------------------------------------------------------------------------- mixed precision
def amp(out: Path, work: Path, seconds: float) -> bool:
    import torch
    import torch.nn.functional as F

    import wordlm

    folder, log = tiny_corpus(work), out / "amp.train.log"
    result = {"bf16_supported": torch.cuda.is_bf16_supported() if DEVICE != "cpu" else None}
    for precision in (None, "fp16", "bf16"):
        name = precision or "fp32"
        started = time.perf_counter()
        try:
            run = quiet_train(log, preset="smoke", dataset=str(folder), device=DEVICE, amp=precision,
                              save=str(work / f"amp_{name}.pt"))  # fmt: skip
        except Exception as problem:  # noqa: BLE001 - a failure is the finding
            result[name] = {"error": f"{type(problem).__name__}: {problem}"}
            continue
        losses = [value for _, value in run.history.get("train.loss", [])]
        vocabulary = run.model.config.ntoken  # a uniform guess's perplexity
        trains = finite(run.test_ppl) and all(map(finite, losses)) and run.test_ppl < vocabulary  # it learned
        result[name] = {"test_ppl": run.test_ppl, "train_loss": losses, "trains": trains,
                        "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip

    # the same (float32-trained) weights, one batch's forward loss in float32 and under each autocast
    gaps = {}
    if "test_ppl" in result["fp32"]:
        lm = wordlm.load(work / "amp_fp32.pt", DEVICE)
        data = lm.tokenize(folder / "valid.txt")[0][: 35 * 8 + 1]
        inputs, targets = data[:-1].view(8, 35).t(), data[1:].view(8, 35).t()  # (T, B)
        model, losses = lm.model.eval(), {}
        for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            if DEVICE == "cpu" and name == "fp16":
                continue
            with torch.no_grad(), torch.autocast(lm.device.type, dtype=dtype, enabled=dtype is not None):
                features, _ = model.features(inputs, model.init_hidden(8))
                logits = model.decoder.scores(features).float().reshape(-1, lm.config.ntoken)
                losses[name] = F.cross_entropy(logits, targets.reshape(-1)).item()
        gaps = {name: abs(loss - losses["fp32"]) for name, loss in losses.items() if name != "fp32"}
        result["same_weights_loss"] = losses
    result["same_weights_loss_gap"] = gaps
    ok = (all(result[name].get("trains") for name in ("fp32", "fp16", "bf16"))
          and len(gaps) == 2 and all(gap <= AMP_LOSS_TOLERANCE for gap in gaps.values()))  # fmt: skip
    result.update(ok=ok, tolerance_nats=AMP_LOSS_TOLERANCE)
    write(out, "amp", result)
    shown = ", ".join(f"{name} {result[name]['test_ppl']:.2f}" if "test_ppl" in result[name]
                      else f"{name} {result[name]['error']}" for name in ("fp32", "fp16", "bf16"))  # fmt: skip
    same = ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items())
    print(f"amp: {'ok' if ok else 'FAIL'} smoke test ppl: {shown}; same weights, loss gap to float32: {same or '-'}")
    return ok


# ----------------------------------------------------------------------------- speed and zaremba_medium
def synchronize() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


def timed_run(work: Path, log: Path, preset: str | None, dataset: str, batches: int) -> dict:
    """Two short epochs of ``preset``: the second's training tokens/s, a validation pass's seconds, peak memory."""
    import torch

    from wordlm.data.datasets import resolve_dataset
    from wordlm.evaluation import evaluate_loss

    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
    run = quiet_train(log, preset=preset, dataset=dataset, device=DEVICE, epochs=2, max_batches=batches,
                      save=str(work / "speed.pt"), log_interval=10**6)  # fmt: skip
    rates = [value for _, value in run.history.get("tokens_per_second", [])]
    folder = Path(run.model.meta.get("corpus_folder") or resolve_dataset(dataset))
    valid_ids = run.model.tokenize(folder / "valid.txt")[0]
    synchronize()
    started = time.perf_counter()
    evaluate_loss(run.model.model, valid_ids, run.config["eval_batch_size"])
    synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE != "cpu" else None
    tokens_per_batch = run.config["batch_size"] * run.config["bptt"]
    return {"preset": preset or "(defaults)", "dataset": dataset, "tokens_per_second": rates[-1] if rates else None,
            "tokens_per_second_by_epoch": rates, "ms_per_batch": 1000 * tokens_per_batch / rates[-1] if rates else None,
            "batches_per_epoch_timed": batches, "valid_seconds": round(time.perf_counter() - started, 3),
            "valid_tokens": len(valid_ids), "peak_memory_gib": peak and round(peak, 2)}  # fmt: skip


def speed(out: Path, work: Path, seconds: float) -> bool:
    from wordlm.data.corpus import load_corpus
    from wordlm.data.datasets import resolve_dataset

    log, ptb = out / "speed.train.log", ptb_folder()
    default = timed_run(work, log, None, "wikitext-2", BATCHES)
    medium = timed_run(work, log, "zaremba_medium", str(ptb) if ptb else "wikitext-2", BATCHES)
    result = {"default": default, "zaremba_medium": medium, "ptb": str(ptb) if ptb else None}
    if ptb and medium["tokens_per_second"]:
        train_tokens = load_corpus(resolve_dataset(str(ptb))).train.numel()
        epoch = train_tokens / medium["tokens_per_second"] + medium["valid_seconds"]
        result["zaremba_medium_estimate_s"] = round(ZAREMBA_MEDIUM_EPOCHS * epoch + 1.1 * medium["valid_seconds"] + 30)
    write(out, "speed", result)
    estimate = result.get("zaremba_medium_estimate_s")
    print(f"speed: ok default {default['tokens_per_second']:,.0f} tokens/s on wikitext-2, zaremba_medium "
          f"{medium['tokens_per_second']:,.0f} tokens/s on {'PTB' if ptb else 'wikitext-2 (no PTB here)'}"
          + (f"; its 39 epochs: ~{estimate / 60:.1f} min" if estimate else ""))  # fmt: skip
    return True


def medium(out: Path, work: Path, seconds: float) -> bool:
    ptb = ptb_folder()
    if ptb is None:
        write(out, "medium", {"skipped": "no PTB"})
        print("medium: skipped no PTB here (copy it to data/penn, or set WORDLM_DATA; nothing is downloaded)")
        return True
    if seconds < 60:
        write(out, "medium", {"skipped": "out of time", "seconds_left": seconds})
        print(f"medium: skipped {seconds:.0f} s left; alone: GPU_STEPS='medium' bash benchmarks/gpu.sh")
        return True
    speed_file = out / "speed.json"
    estimate = json.loads(speed_file.read_text()).get("zaremba_medium_estimate_s") if speed_file.is_file() else None
    if estimate is not None and estimate > seconds:
        write(out, "medium", {"skipped": "does not fit", "estimate_s": estimate, "seconds_left": seconds})
        print(f"medium: skipped needs ~{estimate / 60:.1f} min, {seconds / 60:.1f} left; "
              "alone: GPU_STEPS='medium' bash benchmarks/gpu.sh")  # fmt: skip
        return True
    # a net under the estimate: time_budget ends training, then the best model is tested and reported
    budget = max(1.0, (seconds - 45) / 60)
    started = time.perf_counter()
    run = quiet_train(out / "medium.train.log", preset="zaremba_medium", dataset=str(ptb), device=DEVICE,
                      save=str(work / "zaremba_medium.pt"), time_budget=budget)  # fmt: skip
    valid = run.history.get("valid.ppl", [])
    finished = len(valid) >= ZAREMBA_MEDIUM_EPOCHS and not run.info.get("time_budget_spent")
    result = {"test_ppl": run.test_ppl, "best_valid_ppl": run.best_valid_ppl, "best_epoch": run.info.get("best_epoch"),
              "epochs": len(valid), "finished": finished, "seconds": round(time.perf_counter() - started, 1),
              "tokens_per_second": run.info.get("tokens_per_second"), "time_budget_minutes": round(budget, 2),
              "estimate_s": estimate, "valid_ppl": valid, "paper": {"valid": 86.2, "test": 82.7}}  # fmt: skip
    write(out, "medium", result)
    print(f"medium: {'ok' if finished else 'FAIL'} zaremba_medium {len(valid)} of {ZAREMBA_MEDIUM_EPOCHS} epochs in "
          f"{result['seconds'] / 60:.1f} min: test ppl {run.test_ppl:.2f}, valid {run.best_valid_ppl:.2f} "
          "(paper 82.7 / 86.2)")  # fmt: skip
    return finished


STEPS = {"env": env, "corpus": corpus, "cudnn": cudnn, "amp": amp, "speed": speed, "medium": medium}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["preflight", *STEPS])
    parser.add_argument("--out", default="gpu_out", help="where each step's JSON goes")
    parser.add_argument("--work", default=None, help="scratch folder: corpora, checkpoints (default OUT/../gpu_work)")
    parser.add_argument("--seconds", type=float, default=540.0, help="time the step may take (medium)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the code
    parser.add_argument("--batches", type=int, default=300, help="timed batches a short epoch (speed)")
    args = parser.parse_args()
    global DEVICE, BATCHES
    DEVICE, BATCHES = args.device, args.batches
    if args.step == "preflight":
        sys.exit(preflight())
    out = Path(args.out)
    work = Path(args.work) if args.work else out.resolve().parent / "gpu_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sys.exit(0 if STEPS[args.step](out, work, args.seconds) else 1)


if __name__ == "__main__":
    main()
