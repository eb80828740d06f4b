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
# (add PYTHON=/path/to/venv/bin/python where `python` has no torch). bitsandbytes and torchao
# are not on the GPU machine: unpack their wheels into .gpusite/site (git-ignored, carried
# with the run) and the suite puts that folder on PYTHONPATH.
#
# Steps, each under `timeout` and within a total budget (BUDGET_S, default 470 s: the suite
# must end within 8 minutes on the H200); the later steps are the ones the budget cuts:
#   1. calibrate: the roofline's constants measured on DEVICE (device_model.json)      ~10 s
#   2. correctness: the op vs eager (every plan pair) and the runlora backend vs eager, on
#      DEVICE in bf16 (fp32 on CPU); QLoRA (check_qlora.py) if bitsandbytes imports     ~40-80 s
#   2b. fused vs ATen per layer (bench_fused.py, fused.json): the Triton kernels' first bf16
#      correctness check, their tuned blocks, every pair timed, the compiled layer too;
#      TinyLlama's four layer shapes (on CPU: the Triton interpreter, tiny, correctness)  ~60-90 s
#   3a. TinyLlama step under the shipped defaults (bench_model.py, warmup 2, repeats 5): frozen
#      + inductor, peft + inductor, runlora (flops, merged plans off in bf16), runlora_roofline
#      (the candidate CUDA default criterion), step ms and peak GiB each                 ~100-150 s
#   3. criteria step: tinyllama11 with merged plans allowed (the candidate precision default),
#      runlora by flops / roofline / time (time measures the fused pair too and takes it where
#      >= 3% faster) (criteria_model.json)                                               ~100-150 s
#   3c. the same TinyLlama step with torch.compile(mode="reduce-overhead") (inductor's CUDA
#      graphs): peft + inductor, runlora, runlora_roofline; each row counts inductor's
#      cudagraph_skips (0 = every graph kept its CUDA graphs)                            ~80-120 s
#   5. QLoRA step (bitsandbytes NF4 base): tinyllama11 B=8 S=1024 r=16, peft eager, peft +
#      inductor, runlora and runlora_opaque with the 4-bit sites rewritten (--rewrite-4bit);
#      then torch.profiler's per-op tables of peft + inductor and runlora (profile_step.py)
#   5b. DoRA step (bench_dora.py): hidden 2048, 2 layers, B=4, S=1024, r=16, peft DoRA eager and
#      + inductor, runlora DoRA and LoRA (table in summary.md)
#   5c. paper rows (RunLoRA's Llama configs, forward + backward as the paper timed, merged plans
#      allowed as RunLoRA does): llama_130m b=64 r=8 and llama_350m b=48 r=128, peft eager
#      beside peft + inductor and runlora                                                ~100-150 s each
#   4. if time is left: bench_criteria: flops / roofline / calibrated roofline / time, one layer
#   6. if time is left: pytest tests/test_qlora.py (export matching on this torch)
#   7. with EXTRA=1, if time is left: bench_layer and the five-mode tinyllama11 step
#   8. collect: every JSON of the run merged into suite.json (the per-step JSON files leave
#      $OUT, device_model.json stays), and one table (step, model, mode, ms, peak GiB,
#      x peft + inductor, CUDA-graph skips, plans) printed and put first in summary.md
# Step limits in the order run: 60, 60 (+90 QLoRA check), 100, 150, 150, 120, 150, 120, 150,
# 150 x 2, then the optional ones; the budget (BUDGET_S, 470 s) cuts from the end, so on a slow
# day the paper rows and the optional steps go first (summary.md says which were skipped).
# A step that fails or times out is recorded and the next one runs. Every result file is
# written as it grows, so a step cut short keeps what it measured. $OUT ends with at most 6
# files (the device tool returns no more than 8): suite.log, summary.md, suite.json,
# device_model.json, qlora_profile.md (EXTRA=1's steps put their tables in summary.md only).
#
# Env: OUT (required), DEVICE (cuda|cpu, default cuda), QUICK (1: tiny sizes), PYTHON
# (default python), INNER (inductor|aot_eager), BUDGET_S, EXTRA (1: step 7), STEPS (comma-
# separated step names: run only those; the CI dry run, tests/test_benchmarks_smoke.py, uses
# STEPS=tinyllama_defaults,reduce_overhead,paper_rows).
set -u

: "${OUT:?set OUT to an output directory}"
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-470}
EXTRA=${EXTRA:-0}
STEPS=${STEPS:-}
if [ "$QUICK" = 1 ]; then INNER=${INNER:-aot_eager}; else INNER=${INNER:-inductor}; fi
if [ "$DEVICE" = cuda ]; then DTYPE=bfloat16; else DTYPE=float32; fi
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1  # the repo root, whatever the caller's directory
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpusite/site ] && export PYTHONPATH="$PWD/.gpusite/site:$PYTHONPATH"
LOG="$OUT/suite.log"
SUMMARY="$OUT/summary.md"
MD_DIR=$(mktemp -d)
JSON_DIR="$MD_DIR/json"  # the new steps' JSON files, merged into $OUT/suite.json by step 8
mkdir -p "$JSON_DIR"
: >"$LOG"
SECONDS=0

log() { echo "[$(printf '%4d' "$SECONDS")s] $*" | tee -a "$LOG"; }

left() { echo $((BUDGET_S - SECONDS)); }

# run_step NAME LIMIT_S CMD...: runs CMD under timeout (capped by the budget left), logs it.
STEP_ROWS=()
run_step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ -n "$STEPS" ] && [[ ",$STEPS," != *",$name,"* ]]; then
    return 0  # not asked for (STEPS)
  fi
  local budget
  budget=$(left)
  if [ "$budget" -lt 20 ]; then
    log "SKIP $name: ${budget}s of the budget left"
    STEP_ROWS+=("| $name | skipped | 0 |")
    return 0
  fi
  [ "$limit" -gt "$budget" ] && limit=$budget
  log "START $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s"
  log "END $name rc=$rc in $((SECONDS - start))s"
  STEP_ROWS+=("| $name | $rc | $((SECONDS - start)) |")
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
    printf '%s\n' "${STEP_ROWS[@]}"
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
  timeout 60 "$PYTHON" -c 'import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda",
"transformers", transformers.__version__, "peft", peft.__version__)' 2>&1
  [ -z "$STEPS" ] && timeout 60 "$PYTHON" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1
} >>"$LOG" 2>&1

# --- 1. calibrate ------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then CAL_DTYPES=float32; else CAL_DTYPES=bfloat16,float32; fi
run_step calibrate 60 "$PYTHON" -m runlora_fx.cli calibrate --device "$DEVICE" --dtypes "$CAL_DTYPES" \
  --json "$OUT/device_model.json"
DEVICE_MODEL_ARGS=()
[ -s "$OUT/device_model.json" ] && DEVICE_MODEL_ARGS=(--device-model "$OUT/device_model.json")

# --- 2. correctness -----------------------------------------------------------------------
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
if dev == "cuda":  # the fused pair's Triton kernels (bench_fused.py checks them at model sizes)
    oks.append(check("op fused/fused", lambda x, W, A, B: torch.ops.runlora.lora_linear(
        x, W, None, A, B, s, None, None, "fused", "fused")))
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

if [ -n "$STEPS" ] && [[ "$STEPS" != *qlora* ]]; then
  HAVE_BNB=0  # no QLoRA step asked for: spare the import
elif "$PYTHON" -c 'import bitsandbytes' 2>/dev/null; then
  HAVE_BNB=1
  run_step check_qlora 90 "$PYTHON" benchmarks/check_qlora.py --device "$DEVICE" --dtype "$DTYPE" --inner "$INNER"
else
  HAVE_BNB=0
  log "SKIP check_qlora and the QLoRA step: bitsandbytes does not import"
fi

# --- 2b. the fused plan vs the ATen plans, one layer --------------------------------------
if [ "$QUICK" = 1 ]; then FUSED_ARGS=(--quick); else FUSED_ARGS=(--allow-merged); fi
run_step bench_fused 100 "$PYTHON" benchmarks/bench_fused.py --device "$DEVICE" "${FUSED_ARGS[@]}" --compiled \
  --inner "$INNER" --json "$OUT/fused.json" --md "$MD_DIR/0_fused.md"

if [ "$QUICK" = 1 ]; then
  MODEL_ARGS=(--quick)
else
  MODEL_ARGS=(--models tinyllama11 --batch 8 --seq 1024 --rank 16)
fi

# --- 3a. TinyLlama step under the shipped defaults, and the candidate CUDA criterion ------
if [ "$QUICK" = 1 ]; then
  STEP_ARGS=(--quick --layers 1 --batch 1 --seq 16 --warmup 1 --repeats 1)
else
  STEP_ARGS=(--models tinyllama11 --batch 8 --seq 1024 --rank 16 --warmup 2 --repeats 5)
fi
run_step tinyllama_defaults 150 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
  --inner "$INNER" "${STEP_ARGS[@]}" --modes frozen_inductor,peft_inductor,runlora,runlora_roofline \
  --json "$JSON_DIR/tinyllama_defaults.json" --md "$MD_DIR/2a_tinyllama_defaults.md"

# --- 3. criteria, model step, merged plans allowed (on CUDA, "time" measures the fused pair too)
run_step bench_model_criteria 150 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
  --inner "$INNER" "${STEP_ARGS[@]}" --allow-merged --modes runlora,runlora_roofline,runlora_time \
  --json "$OUT/criteria_model.json" --md "$MD_DIR/3_criteria_model.md"

# --- 3c. the TinyLlama step with mode="reduce-overhead" (inductor's CUDA graphs) -----------
cat >"$MD_DIR/reduce_overhead.py" <<'EOF'
"""bench_model.py with every torch.compile in mode="reduce-overhead"; counts cudagraph skips per mode."""
import importlib.util, sys, torch
from torch._dynamo.utils import counters
spec = importlib.util.spec_from_file_location("bench_model", "benchmarks/bench_model.py")
bench_model = importlib.util.module_from_spec(spec)
sys.modules["bench_model"] = bench_model
spec.loader.exec_module(bench_model)
compile_ = torch.compile
def compile_reduce_overhead(model, backend="inductor", **kw):
    if backend != "aot_eager":  # aot_eager (the CPU dry run) takes no mode
        kw.setdefault("mode", "reduce-overhead")
    return compile_(model, backend=backend, **kw)
torch.compile = compile_reduce_overhead
make_step = bench_model.make_step
def make_step_marked(*args, **kw):
    step = make_step(*args, **kw)
    def marked():
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: last step's outputs may be reused
        return step()
    return marked
bench_model.make_step = make_step_marked
prepare_mode = bench_model.prepare_mode
def prepare_counted(name, mode, args):
    before = counters["inductor"]["cudagraph_skips"]
    prepared = prepare_mode(name, mode, args)
    prepared.row["compile_mode"] = "reduce-overhead"
    prepared.row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - before
    print(f"# {name} {mode}: cudagraph_skips {prepared.row['cudagraph_skips']}", file=sys.stderr, flush=True)
    return prepared
bench_model.prepare_mode = prepare_counted
bench_model.main(sys.argv[1:])
EOF
run_step reduce_overhead 120 "$PYTHON" "$MD_DIR/reduce_overhead.py" --device "$DEVICE" --dtype "$DTYPE" \
  --inner "$INNER" "${STEP_ARGS[@]}" --modes peft_inductor,runlora,runlora_roofline \
  --json "$JSON_DIR/reduce_overhead.json" --md "$MD_DIR/3c_reduce_overhead.md"

# --- 5. QLoRA step ------------------------------------------------------------------------
if [ "$HAVE_BNB" = 1 ]; then
  run_step bench_model_qlora 150 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
    --inner "$INNER" "${MODEL_ARGS[@]}" --qlora nf4 --rewrite-4bit --modes peft_eager,peft_inductor,runlora,runlora_opaque --warmup 3 --repeats 5 \
    --json "$OUT/qlora_model.json" --md "$MD_DIR/2_qlora_model.md"
fi

if [ "$HAVE_BNB" = 1 ]; then
  run_step profile_qlora 120 "$PYTHON" benchmarks/profile_step.py --device "$DEVICE" --dtype "$DTYPE" \
    --inner "$INNER" "${MODEL_ARGS[@]}" --qlora nf4 --rewrite-4bit --modes peft_inductor,runlora \
    --out "$OUT/qlora_profile.md"
fi

# --- 5b. DoRA step: peft DoRA eager / + inductor vs runlora DoRA and LoRA ------------------
if [ "$QUICK" = 1 ]; then
  DORA_ARGS=(--hidden 64 --layers 1 --seq 16 --rank 4 --warmup 0 --repeats 1)
else
  DORA_ARGS=(--hidden 2048 --layers 2 --batch 4 --seq 1024 --rank 16 --warmup 3 --repeats 5
             --modes "peft DoRA eager,peft DoRA + inductor,runlora DoRA,runlora LoRA")
fi
run_step bench_dora 150 "$PYTHON" benchmarks/bench_dora.py --device "$DEVICE" --dtype "$DTYPE" --inner "$INNER" \
  "${DORA_ARGS[@]}" --json "$JSON_DIR/dora.json" --md "$MD_DIR/3b_dora.md"

# --- 5c. paper rows: RunLoRA's Llama configs, peft eager beside peft + inductor and runlora --
if [ "$QUICK" = 1 ]; then
  PAPER_ROWS=("--quick --layers 1 --batch 1 --seq 16 --rank 4 --warmup 1 --repeats 1")
else
  PAPER_ROWS=("--models llama_130m --batch 64 --seq 1024 --rank 8 --warmup 2 --repeats 3"
              "--models llama_350m --batch 48 --seq 1024 --rank 128 --warmup 2 --repeats 3")
fi
for i in "${!PAPER_ROWS[@]}"; do
  # shellcheck disable=SC2086 # one row's arguments, split on purpose
  run_step paper_rows 150 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" --inner "$INNER" \
    ${PAPER_ROWS[$i]} --no-optimizer --allow-merged --modes peft_eager,peft_inductor,runlora \
    --json "$JSON_DIR/paper_rows_$i.json" --md "$MD_DIR/5c_paper_rows_$i.md"
done

# --- 4. criteria, one layer, if time is left ---------------------------------------------
if [ "$QUICK" = 1 ]; then CRITERIA_ARGS=(--quick); else CRITERIA_ARGS=(--allow-merged); fi
run_step bench_criteria 120 "$PYTHON" benchmarks/bench_criteria.py --device "$DEVICE" --dtype "$DTYPE" \
  "${CRITERIA_ARGS[@]}" "${DEVICE_MODEL_ARGS[@]}" --json "$OUT/criteria.json" --md "$MD_DIR/1_criteria.md"

# --- 6. the QLoRA tests (CPU tensors, this machine's torch), if time is left ---------------
if [ "$HAVE_BNB" = 1 ] && "$PYTHON" -c 'import pytest, hypothesis' 2>/dev/null; then
  run_step pytest_test_qlora 90 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_qlora.py
fi

# --- 7. earlier sessions' steps, on request -----------------------------------------------
if [ "$EXTRA" = 1 ]; then
  if [ "$QUICK" = 1 ]; then
    LAYER_ARGS=(--quick)
  else
    LAYER_ARGS=(--grid 16384x4096x4096x8 --grid 8192x2048x5632x16 --grid 8192x5632x2048x16)
  fi
  run_step bench_layer 150 "$PYTHON" benchmarks/bench_layer.py --device "$DEVICE" --dtype "$DTYPE" \
    --inner "$INNER" "${LAYER_ARGS[@]}" --md "$MD_DIR/4_layer.md"
  run_step bench_model_tinyllama11 210 "$PYTHON" benchmarks/bench_model.py --device "$DEVICE" --dtype "$DTYPE" \
    --inner "$INNER" "${MODEL_ARGS[@]}" --modes peft_eager,peft_inductor,runlora,frozen_inductor,runlora_opaque \
    --md "$MD_DIR/5_model.md"
fi

# --- 8. collect: one JSON ($OUT/suite.json), one table (stdout and first in summary.md) ----
cat >"$MD_DIR/collect.py" <<'EOF'
"""Merges the run's JSON files into suite.json and prints one table of every model-step row."""
import json, pathlib, sys
out, json_dir, table_md = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
files = sorted(json_dir.glob("*.json")) + sorted(f for f in out.glob("*.json") if f.name != "suite.json")
suite = {}
for f in files:
    try:
        suite[f.stem] = json.loads(f.read_text())
    except ValueError as error:
        suite[f.stem] = {"unreadable": str(error)}
head = ["step", "model", "mode", "ms", "peak GiB", "x peft+inductor", "cudagraph skips", "plans"]
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for step, data in suite.items():
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or "mode" not in rows[0]:
        continue
    for r in rows:
        r.setdefault("ms", r.get("median_ms"))  # bench_dora.py's rows
    if not all(isinstance(r.get("ms"), (int, float)) for r in rows):
        continue
    ref = {r.get("model"): r["ms"] for r in suite.get("tinyllama_defaults", {}).get("rows", [])
           if r.get("mode") == "peft_inductor"}
    ref.update({r.get("model"): r["ms"] for r in rows if r.get("mode") in ("peft_inductor", "peft DoRA + inductor")})
    for r in rows:
        base = ref.get(r.get("model"))
        peak = r.get("peak_gib")
        cells = [step, r.get("model"), r["mode"], f"{r['ms']:.1f}", "-" if peak is None else f"{peak:.2f}",
                 f"{base / r['ms']:.3f}x" if base and r.get("ms") else "-", r.get("cudagraph_skips", "-"),
                 r.get("plans") or "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
(out / "suite.json").write_text(json.dumps(suite, indent=1))
for f in files:
    if f.parent == json_dir or f.name != "device_model.json":
        f.unlink()
text = "## One table (x peft+inductor: that step's or the defaults step's peft + inductor ms / this ms)\n\n"
table_md.write_text(text + "\n".join(lines) + "\n")
print("\n".join(lines))
EOF
"$PYTHON" "$MD_DIR/collect.py" "$OUT" "$JSON_DIR" "$MD_DIR/0_table.md" 2>&1 | tee -a "$LOG"

log "suite done in ${SECONDS}s"
