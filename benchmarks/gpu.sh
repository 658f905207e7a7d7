#!/usr/bin/env bash
# What a lent GPU machine should measure, in under 10 minutes on one GPU (issue 34, item 5):
#
#     bash benchmarks/gpu.sh                      # from anywhere; results in $OUT, else ./gpu_out
#     GPU_STEPS="medium" bash benchmarks/gpu.sh   # one step alone (zaremba_medium, when the others left too little)
#
# Steps, in order, each under its own timeout and all within GPU_BUDGET_S seconds (default 570) from the start;
# a step that fails or times out is reported and the next one runs:
#   env     nvidia-smi, torch / CUDA / cuDNN / NCCL versions, the devices         (benchmarks/gpu_checks.py env)
#   cudnn   the same LSTM weights on the CPU and on CUDA (cuDNN): losses within 1e-4, gradients within 1e-3
#   amp     the smoke preset trained with amp=fp16 and amp=bf16 (finite, and it learns), and the float32 model's
#           loss under each autocast within 0.05 nats of float32's
#   nccl    torchrun, 2 processes on 2 GPUs over NCCL, the smoke preset (only where 2 GPUs exist)
#   speed   training tokens/s of the default model (WikiText-2) and of zaremba_medium (PTB), and an estimate of
#           zaremba_medium's 39 epochs
#   medium  zaremba_medium trained to the end on PTB, if the estimate fits in the time left (PTB from
#           $WORDLM_DATA/penn, ../shared/data/penn, shared/data/penn or data/penn; nothing is downloaded)
#   tests   the test suite's tests about devices and precision (-k cuda/cudnn/fp16/bf16/device), on this machine
#           where device=auto now means CUDA: what the CPU-only suite never saw
# Each step writes $OUT/<step>.log (and gpu_checks.py's $OUT/<step>.json); $OUT/summary.txt has a line per
# step. On a machine without CUDA the script prints one line, `error: no CUDA device: ...`, and exits 2
# before any work. The python is $PYTHON, else the first of .venv/bin/python, python3 and python whose torch
# sees a GPU; it needs torch and numpy (and sacred, pytest for the nccl and tests steps).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKS="$ROOT/benchmarks/gpu_checks.py"
BUDGET=${GPU_BUDGET_S:-570}
STEPS=${GPU_STEPS:-env cudnn amp nccl speed medium tests}
TESTS_RESERVE=45 # seconds the tests step keeps back from medium

# -- refuse in one line where no python here sees a CUDA device
if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); else candidates=("$ROOT/.venv/bin/python" python3 python); fi
PY="" refusal="" fallback=""
for candidate in "${candidates[@]}"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    line=$("$candidate" "$CHECKS" preflight 2>/dev/null)
    code=$?
    line=${line##*$'\n'} # its one line (the last, should an import have printed something)
    if [ "$code" -eq 0 ]; then PY=$candidate DEVICES=$line && break; fi
    case $code in
        2) refusal=${refusal:-$line} ;; # a torch without CUDA: the most telling reason
        *) fallback=${fallback:-$line} ;;
    esac
done
if [ -z "$PY" ]; then
    echo "${refusal:-${fallback:-error: no CUDA device: no python here runs torch (tried: ${candidates[*]})}}" >&2
    exit 2
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wordlm_gpu.XXXXXX") # checkpoints and corpora: not results
export WORDLM_OFFLINE=1 WORDLM_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
cd "$ROOT"
SUMMARY="$OUT/summary.txt"
{
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
    echo "benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit"
    echo "${DEVICES#ok: }"
    echo "budget ${BUDGET} s; steps: $STEPS"
} >"$SUMMARY"

left() { echo $((BUDGET - SECONDS)); }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget has less), its output in
# $OUT/NAME.log, and add a line to the summary: status, seconds, the command's last line (a rule of = skipped)
step() {
    local name=$1 limit=$2 remaining status started code
    shift 2
    remaining=$(left)
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    if [ "$limit" -lt 15 ]; then
        echo "$name: skipped (out of time: ${remaining} s of the budget left)" | tee -a "$SUMMARY"
        return
    fi
    started=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    code=$?
    case $code in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAIL (exit $code)" ;;
    esac
    echo "$name: $status, $((SECONDS - started)) s | $(grep -v '^=*$' "$OUT/$name.log" | tail -n 1 | cut -c 1-400)" |
        tee -a "$SUMMARY"
}

wanted env && step env 30 bash -c 'nvidia-smi; "$0" "$1" env --out "$2" --work "$3"' "$PY" "$CHECKS" "$OUT" "$WORK"
"$PY" "$CHECKS" corpus --out "$OUT" --work "$WORK" >/dev/null # the tiny corpus the smoke runs train on
wanted cudnn && step cudnn 90 "$PY" "$CHECKS" cudnn --out "$OUT" --work "$WORK"
wanted amp && step amp 90 "$PY" "$CHECKS" amp --out "$OUT" --work "$WORK"
if wanted nccl; then
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    if [ "$gpus" -ge 2 ]; then
        step nccl 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 main.py -u with smoke \
            "dataset=$WORK/tiny" "save=$WORK/ddp.pt"
    else
        echo "nccl: skipped (1 GPU; torchrun with NCCL needs 2)" | tee -a "$SUMMARY"
    fi
fi
wanted speed && step speed 150 "$PY" "$CHECKS" speed --out "$OUT" --work "$WORK"
if wanted medium; then
    reserve=10
    wanted tests && reserve=$((reserve + TESTS_RESERVE))
    window=$(($(left) - reserve))
    # the python decides from speed's estimate whether the 39 epochs fit in the window, less its start-up
    step medium "$window" "$PY" "$CHECKS" medium --out "$OUT" --work "$WORK" --seconds "$((window - 20))"
fi
if wanted tests; then
    workers=()
    "$PY" -c 'import xdist' 2>/dev/null && workers=(-n 8)
    step tests $(($(left) - 10)) "$PY" -m pytest -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} \
        -k "cuda or cudnn or fp16 or bf16 or device" tests/
fi
echo "total: $SECONDS s of ${BUDGET}; results in $OUT" | tee -a "$SUMMARY"
rm -rf "$WORK"
