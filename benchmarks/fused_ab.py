"""The fused decoder loss of a git revision against the working tree's, as paired steps in one process.

    python benchmarks/fused_ab.py REV [--pairs 60] [--backend onednn|blas] [--tokens 1120] [--hidden 200]
                                      [--vocab 33278] [--dtype float32|bfloat16]

A change to ``wordlm/models/fused.py`` that buys a few percent cannot be seen in separate runs on a VM whose
speed drifts by tens of percent; here both versions run in one process, on the same tensors, one step
of each in turn (forward and backward of ``linear_cross_entropy``, at the default config's decoder
shapes unless told otherwise; with ``--dtype bfloat16`` the path ``amp='bf16'`` takes, from bfloat16
features). For each pair the ratio ``REV's time / the working tree's`` is taken; the
median over the pairs (with its quartiles) is what the change buys. Both versions must give the same
loss. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wordlm.models import fused  # noqa: E402
from wordlm.system import tune_cpu_allocator  # noqa: E402


def load_revision(revision: str, folder: str):
    """``wordlm/models/fused.py`` as it was at ``revision``, imported as a module of its own."""
    for fused_path in ("wordlm/models/fused.py", "wordlm/fused.py"):  # (wordlm/fused.py before the package's re-layout)
        shown = subprocess.run(["git", "show", f"{revision}:{fused_path}"], cwd=ROOT, capture_output=True,
                               text=True)  # fmt: skip
        if shown.returncode == 0:
            break
    if shown.returncode != 0:
        sys.exit(f"error: git has no wordlm/models/fused.py at {revision!r} ({shown.stderr.strip()}); "
                 "give a commit of this repository, e.g. HEAD~1")  # fmt: skip
    source = shown.stdout
    if fused_path == "wordlm/fused.py":  # a revision before the re-layout imports wordlm.cache, now wordlm.data.cache
        source = source.replace("from wordlm.cache import", "from wordlm.data.cache import")
    path = Path(folder) / "fused_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fused_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="a git revision whose wordlm/models/fused.py is the baseline, e.g. HEAD~1")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--backend", default=fused.available_backends()[0], choices=fused.available_backends())
    parser.add_argument("--tokens", type=int, default=32 * 35, help="rows of h: batch × bptt")
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=33278, help="WikiText-2's vocabulary by default")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the products' dtype (bfloat16: the path amp='bf16' takes)")  # fmt: skip
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tune_cpu_allocator()  # what `python main.py` does on a CPU
    with tempfile.TemporaryDirectory() as folder:
        baseline = load_revision(args.revision, folder)
    if dtype != torch.float32 and "dtype" not in inspect.signature(baseline.linear_cross_entropy).parameters:
        sys.exit(f"error: wordlm/models/fused.py at {args.revision!r} has no bfloat16 path (it came with commit "
                 "9e7071a); give a later revision or leave --dtype at float32")  # fmt: skip
    versions = {"revision": baseline, "working tree": fused}
    used = {}
    for name, module in versions.items():
        if hasattr(module, "set_backend"):  # (revisions before the backends existed have only BLAS)
            # (revisions before 'auto' existed default to oneDNN; before the Backend object, a tuple BACKENDS)
            known = module.available_backends() if hasattr(module, "available_backends") else module.BACKENDS
            module.set_backend(args.backend if args.backend in known else known[0])
        used[name] = module.BACKEND.name if hasattr(module, "BACKEND") else getattr(module, "_backend", "blas")

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(dtype).requires_grad_()
    weight = (torch.rand(args.vocab, args.hidden, generator=generator) * 0.2 - 0.1).requires_grad_()
    bias = torch.zeros(args.vocab, requires_grad=True)
    targets = torch.randint(args.vocab, (args.tokens,), generator=generator)

    def step(module) -> tuple[float, float]:
        start = time.perf_counter()
        extra = () if dtype == torch.float32 else (dtype,)  # (revisions before 9e7071a take no dtype)
        loss = module.linear_cross_entropy(hidden, weight, bias, targets, *extra)
        torch.autograd.grad(loss, [hidden, weight, bias])
        return time.perf_counter() - start, loss.item()

    losses = {}
    for name, module in versions.items():  # warm-up: two steps of each; the second's loss is compared
        step(module)
        losses[name] = step(module)[1]
    times = {name: [] for name in versions}
    for pair in range(args.pairs):  # which version goes first alternates, so neither gets the warmer cache
        for name in list(versions)[:: 1 if pair % 2 == 0 else -1]:
            times[name].append(step(versions[name])[0])
    ratios = sorted(old / new for old, new in zip(times["revision"], times["working tree"]))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    result = {
        "revision": args.revision,
        "backend": args.backend,
        "dtype": args.dtype,
        "backends_used": used,
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "revision_ms_median": 1000 * statistics.median(times["revision"]),
        "working_tree_ms_median": 1000 * statistics.median(times["working tree"]),
        "pairs": len(ratios),
        "loss_gap": abs(losses["revision"] - losses["working tree"]),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decoder {args.tokens} x {args.hidden} x "
          f"{args.vocab} in {args.dtype}, products: {used['revision']} (revision), {used['working tree']} "
          f"(working tree), {args.pairs} pairs")  # fmt: skip
    print(f"{args.revision}: {result['revision_ms_median']:.1f} ms a step; working tree: "
          f"{result['working_tree_ms_median']:.1f} ms; the working tree is {result['ratio_median']:.3f}x as fast "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}); loss gap {result['loss_gap']:.2e}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
