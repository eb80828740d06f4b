#!/usr/bin/env bash
# One prepared benchmark run on a GPU machine (H200: Python 3.12, torch 2.11+cu130,
# transformers, peft preinstalled; nothing installs from the network), from the repo root:
#
#     OUT=/path/to/out bash benchmarks/gpu_suite.sh
#
# Dry check on a CPU (tiny sizes, aot_eager behind the compiled modes unless INNER is set):
#
#     DEVICE=cpu QUICK=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh
#
# (add PYTHON=/path/to/venv/bin/python where `python` has no torch)
#
# Steps, each under `timeout` and within a total budget (BUDGET_S, default 480 s):
#   1. correctness: the op vs eager (every plan pair) and the runlora backend vs eager, on
#      DEVICE in bf16 (fp32 on CPU); then pytest tests/test_ops.py if it, pytest and hypothesis exist
#   2. bench_layer: 16384x4096x4096x8, 8192x2048x5632x16, 8192x5632x2048x16, bf16
#   3. bench_model: tinyllama11, B=8 S=1024 r=16, bf16 base and adapters, all five modes
#   4. if time is left: RunLoRA README rows (llama_130m b=64 r=8, llama_350m b=48 r=128,
#      forward + backward only, merged plans allowed as RunLoRA does)
# A step that fails or times out is recorded and the next one runs. Every result file is
# written as it grows, so a step cut short keeps what it measured. $OUT gets at most 8 files
# (the device tool returns no more): suite.log, summary.md, layer.json, model.json,
# paper_llama_130m.json, paper_llama_350m.json.
#
# Env: OUT (required), DEVICE (cuda|cpu, default cuda), QUICK (1: tiny sizes), PYTHON
# (default python), INNER (inductor|aot_eager), BUDGET_S.
set -u

: "${OUT:?set OUT to an output directory}"
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-480}
if [ "$QUICK" = 1 ]; then INNER=${INNER:-aot_eager}; else INNER=${INNER:-inductor}; fi
if [ "$DEVICE" = cuda ]; then DTYPE=bfloat16; else DTYPE=float32; fi
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1  # the repo root, whatever the caller's directory
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/suite.log"
SUMMARY="$OUT/summary.md"
MD_DIR=$(mktemp -d)
: >"$LOG"
SECONDS=0

log() { echo "[$(printf '%4d' "$SECONDS")s] $*" | tee -a "$LOG"; }

left() { echo $((BUDGET_S - SECONDS)); }

# run_step NAME LIMIT_S CMD...: runs CMD under timeout (capped by the budget left), logs it.
STEPS=()
run_step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  local budget
  budget=$(left)
  if [ "$budget" -lt 20 ]; then
    log "SKIP $name: ${budget}s of the budget left"
    STEPS+=("| $name | skipped | 0 |")
    return 0
  fi
  [ "$limit" -gt "$budget" ] && limit=$budget
  log "START $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s"
  log "END $name rc=$rc in $((SECONDS - start))s"
  STEPS+=("| $name | $rc | $((SECONDS - start)) |")
  return 0
}

write_summary() {
  {
    echo "# runlora_fx GPU suite ($(date -Is))"
    echo
    echo "DEVICE=$DEVICE QUICK=$QUICK INNER=$INNER DTYPE=$DTYPE, $((SECONDS))s of ${BUDGET_S}s"
    echo
    echo "| step | rc | s |"
    echo "|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    for md in "$MD_DIR"/*.md; do
      [ -e "$md" ] || continue
      echo
      cat "$md"
    done
  } >"$SUMMARY"
}
trap write_summary EXIT

# --- environment --------------------------------------------------------------------------
{
  echo "== environment"
  date -Is
  timeout 60 "$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")' 2>&1
  timeout 60 "$PYTHON" -c 'import transformers, peft; print("transformers", transformers.__version__, "peft", peft.__version__)' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1
} >>"$LOG" 2>&1

# --- 1. correctness -----------------------------------------------------------------------
cat >"$MD_DIR/check.py" <<'EOF'
import sys, torch, torch.nn.functional as F, runlora_fx
dev = sys.argv[1]
dt = torch.bfloat16 if dev == "cuda" else torch.float32
torch.manual_seed(0)
n, i, o, r, s = 512, 256, 384, 16, 2.0
x = torch.randn(n, i, device=dev, dtype=dt, requires_grad=True)
W = torch.randn(o, i, device=dev, dtype=dt) / i ** 0.5
A = (torch.randn(r, i, device=dev, dtype=dt) / i ** 0.5).requires_grad_()
B = (torch.randn(o, r, device=dev, dtype=dt) * 0.1).requires_grad_()
dy = torch.randn(n, o, device=dev, dtype=dt)
def ref(x, W, A, B):
    return F.linear(x, W) + F.linear(F.linear(x, A), B) * s
def fp64(*ts):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in ts]
x64, W64, A64, B64 = fp64(x, W, A, B)
y64 = ref(x64, W64, A64, B64)
g64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
tol = 3e-2 if dt == torch.bfloat16 else 1e-4
def err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()
def check(name, fn):
    y = fn(x, W, A, B)
    g = torch.autograd.grad(y, (x, A, B), dy)
    errs = [err(y, y64)] + [err(a, b) for a, b in zip(g, g64)]
    ok = max(errs) < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:<24} rel err y,dx,dA,dB = " + ", ".join(f"{e:.1e}" for e in errs))
    return ok
oks = [check("peft eager", ref)]
for f in ("forward1", "forward2"):
    for b in ("backward1", "backward4", "backward5"):
        oks.append(check(f"op {f}/{b}", lambda x, W, A, B, f=f, b=b: torch.ops.runlora.lora_linear(
            x, W, None, A, B, s, None, None, f, b)))
inner = sys.argv[2]
for lowering in ("aten", "opaque"):
    for merged in (None, True):
        torch._dynamo.reset()
        be = runlora_fx.make_backend(inner=inner, lowering=lowering, allow_merged=merged)
        ok = check(f"backend {lowering}{' merged' if merged else ''}", torch.compile(ref, backend=be))
        sites = sum(rep.rewritten for rep in be.reports)
        print(f"     sites rewritten: {sites}, plans: {[rep.plan_counts() for rep in be.reports]}")
        oks.append(ok and sites == 1)
sys.exit(0 if all(oks) else 1)
EOF
run_step check_op_vs_eager 60 "$PYTHON" "$MD_DIR/check.py" "$DEVICE" "$INNER"
if [ -f tests/test_ops.py ] && "$PYTHON" -c 'import pytest, hypothesis' 2>/dev/null; then
  run_step pytest_test_ops 50 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_ops.py
else
  log "SKIP pytest_test_ops: tests/test_ops.py, pytest or hypothesis missing"
fi

# --- 2. layer -----------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
  LAYER_ARGS=(--quick)
else
  LAYER_ARGS=(--grid 16384x4096x4096x8 --grid 8192x2048x5632x16 --grid 8192x5632x2048x16)
fi
run_step bench_layer 150 "$PYTHON" benchmarks/bench_layer.py --device "$DEVICE" --dtype "$DTYPE" \
  --inner "$INNER" "${LAYER_ARGS[@]}" --json "$OUT/layer.json" --md "$MD_DIR/1_layer.md"

# --- 3. model -----------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
  MODEL_ARGS=(--quick)
else
  MODEL_ARGS=(--models tinyllama11 --batch 8 --seq 1024 --rank 16)
fi
run_step bench_model_tinyllama11 210 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
  --inner "$INNER" "${MODEL_ARGS[@]}" --modes peft_eager,peft_inductor,runlora,frozen_inductor,runlora_opaque \
  --json "$OUT/model.json" --md "$MD_DIR/2_model.md"

# --- 4. RunLoRA README rows, if time is left ----------------------------------------------
paper_row() {  # paper_row MODEL BATCH RANK LIMIT_S
  local model=$1 batch=$2 rank=$3 limit=$4 size_args
  if [ "$QUICK" = 1 ]; then size_args=(--layers 1 --batch 1 --seq 64); else size_args=(--batch "$batch" --seq 1024); fi
  if [ "$(left)" -lt 60 ]; then
    log "SKIP paper_$model: $(left)s left"
    STEPS+=("| paper_$model | skipped | 0 |")
    return 0
  fi
  run_step "paper_$model" "$limit" "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
    --inner "$INNER" --models "$model" "${size_args[@]}" --rank "$rank" --no-optimizer --allow-merged \
    --modes peft_eager,runlora_eager,runlora,peft_inductor --warmup 2 --repeats 5 \
    --json "$OUT/paper_$model.json" --md "$MD_DIR/3_paper_$model.md"
}
paper_row llama_130m 64 8 100
paper_row llama_350m 48 128 $(($(left) - 5))

log "suite done in ${SECONDS}s"
