"""The fused plan (Triton kernels) against the ATen plans on one LoRA layer: correctness, then time.

    python benchmarks/bench_fused.py --device cuda --allow-merged     # bf16, TinyLlama's four layer shapes
    python benchmarks/bench_fused.py --device cpu --quick             # Triton's interpreter: correctness only

At each grid point ``NxIxOxR`` (x, A and B need gradients, W frozen, no bias):

1. **Correctness.** Every pair (the applicable ATen pairs and ``fused/fused``) through
   ``torch.ops.runlora.lora_linear`` forward + ``autograd.grad``, against a float64 reference
   on the same inputs: relative errors of y, dX, dA and dB. The fused pair passes when each
   error is at most 2x the worst ATen pair's (or under 1e-5). Its kernels have been
   checked on the CPU only through the interpreter, in fp32: this is their first check in bf16.
2. **Block shapes.** ``ops.fused.tune_site`` times the candidate tiles of its three kernels (CUDA).
3. **Time.** Every pair round-robin (``choose.measure.measure_pairs``, the ``criterion="time"``
   measurement itself): median ms; "x ATen" = fused ÷ the fastest ATen pair; "time chooses"
   applies ``choose.select.should_choose_fused`` (fused at least 3% faster).
4. **Kernels** (CUDA): each Triton kernel against the cuBLAS call it replaces or extends:
   K1 vs X·Wᵀ, K3 vs dY·W (each adds an r-wide product to that GEMM), K2 vs dY·B + dYᵀ·S.
5. With ``--compiled`` (first grid point only): the layer under torch.compile: peft + inductor,
   runlora (default criterion) and runlora with the fused pair forced, timed round-robin, their
   outputs and grads checked against eager.

On the CPU (``--device cpu``) the script sets ``TRITON_INTERPRET=1`` before importing Triton, so
the kernels run through the interpreter: step 1 runs, times are the interpreter's and meaningless,
steps 2 and 4 are skipped (no CUDA), and the table says so.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def _device_arg(argv: Sequence[str]) -> Optional[str]:
    for k, arg in enumerate(argv):
        if arg == "--device" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__" and _device_arg(sys.argv[1:]) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse  # noqa: E402
import collections  # noqa: E402
import pathlib  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import runlora_fx  # noqa: E402
from runlora_fx.choose import select  # noqa: E402
from runlora_fx.choose.measure import SiteInputs, TuneKey, measure_pairs  # noqa: E402
from runlora_fx.choose.flops import applicable_plans  # noqa: E402
from runlora_fx.ops import fused  # noqa: E402
from runlora_fx.plans import BACKWARD_PLANS, Needs  # noqa: E402

# TinyLlama-1.1B's distinct layer shapes at B=8, S=1024, r=16: q/o, k/v, gate/up, down
DEFAULT_GRID = ["8192x2048x2048x16", "8192x2048x256x16", "8192x2048x5632x16", "8192x5632x2048x16"]
QUICK_GRID = {"cuda": ["2048x512x512x16", "2048x512x1408x16"], "cpu": ["48x40x36x4", "37x29x45x1"]}
SCALING = 2.0

COLUMNS = [
    common.Column("shape", "n x i -> o, r"),
    common.Column("best_aten", "fastest ATen pair"),
    common.Column("aten_ms", "ATen ms", "{:.3f}"),
    common.Column("fused_ms", "fused ms", "{:.3f}"),
    common.Column("x_aten", "fused x ATen", "{:.3f}"),
    common.Column("chooses", "time chooses"),
    common.Column("fused_err", "fused max rel err", "{:.1e}"),
    common.Column("aten_err", "ATen max rel err", "{:.1e}"),
    common.Column("correct", "correct"),
    common.Column("kernels", "K1 / X·Wᵀ, K3 / dY·W, K2 / (dY·B + dYᵀ·S) ms"),
    common.Column("configs", "tuned blocks (K1; K2; K3)"),
]
COMPILED_COLUMNS = [
    common.Column("shape", "n x i -> o, r"),
    common.Column("mode", "compiled mode"),
    common.Column("ms", "fwd+bwd ms", "{:.3f}"),
    common.Column("err", "max rel err vs eager", "{:.1e}"),
    common.Column("plans", "plans"),
]


def parse_point(spec: str):
    parts = spec.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"grid point {spec!r}: expected NxIxOxR, e.g. 8192x2048x2048x16")
    return tuple(map(int, parts))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_pairs(inputs: SiteInputs, pairs: Sequence[str]) -> dict:
    """{pair: [rel err of y, dX, dA, dB]} against float64 on the same inputs."""
    def exact(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    x, w, a, b = exact(inputs.x), exact(inputs.weight), exact(inputs.lora_A), exact(inputs.lora_B)
    y64 = F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALING
    want = [y64] + list(torch.autograd.grad(y64, (x, a, b), inputs.grad_y.double()))
    errors = {}
    for pair in pairs:
        forward, backward = pair.split("/")
        with torch.enable_grad():
            y = torch.ops.runlora.lora_linear(inputs.x, inputs.weight, None, inputs.lora_A, inputs.lora_B, SCALING,
                                              None, None, forward, backward)
            got = [y] + list(torch.autograd.grad(y, (inputs.x, inputs.lora_A, inputs.lora_B), inputs.grad_y))
        errors[pair] = [_rel(g, w_) for g, w_ in zip(got, want)]
    return errors


def _ms(fn, device: str, warmup: int, repeats: int) -> float:
    return common.time_steps(fn, device=device, warmup=warmup, repeats=repeats).median_ms


def kernel_times(n: int, i: int, o: int, r: int, dtype: torch.dtype, warmup: int, repeats: int) -> str:
    """K1 / X·Wᵀ, K3 / dY·W, K2 / (dY·B + dYᵀ·S), ms each, on the GPU."""
    dev = "cuda"
    x, w, dy = (torch.randn(*s, device=dev, dtype=dtype) for s in ((n, i), (o, i), (n, o)))
    a, b, s_, z = (torch.randn(*s, device=dev, dtype=dtype) for s in ((r, i), (o, r), (n, r), (n, r)))
    mm_lowrank, lowrank_grads = torch.ops.runlora.mm_lowrank, torch.ops.runlora.lowrank_grads
    pairs = [
        (lambda: mm_lowrank(x, w.t(), None, s_, b.t(), SCALING, dtype), lambda: F.linear(x, w)),
        (lambda: mm_lowrank(dy, w, None, z, a, SCALING, dtype), lambda: torch.mm(dy, w)),
        (lambda: lowrank_grads(dy, b, s_, SCALING, True, True), lambda: (torch.mm(dy, b), torch.mm(dy.t(), s_))),
    ]
    cells = []
    for ours, theirs in pairs:
        cells.append(f"{_ms(ours, dev, warmup, repeats):.3f} / {_ms(theirs, dev, warmup, repeats):.3f}")
    return ", ".join(cells)


def run_point(point, *, device: str, dtype: torch.dtype, allow_merged: bool, warmup: int, repeats: int,
              tune: bool) -> dict:
    n, i, o, r = point
    label = f"{n}x{i}->{o}, r{r} {str(dtype).removeprefix('torch.')}"
    fwd, bwd = applicable_plans(allow_merged=allow_merged)
    aten = [f"{f}/{b}" for f in fwd for b in bwd if not BACKWARD_PLANS[b].dominated]
    pairs = aten + [select.FUSED_PAIR]
    key = TuneKey.for_site(device=device, dtype=dtype, adapter_dtype=None, n=n, i=i, o=o, r=r, needs=Needs(),
                           separate_lora_input=False, bias=False)
    inputs = SiteInputs(key)
    row = {"shape": label, "n": n, "i": i, "o": o, "r": r, "pairs": pairs}
    errors = check_pairs(inputs, pairs)
    aten_err = max(max(errors[p]) for p in aten)
    fused_err = max(errors[select.FUSED_PAIR])
    row.update(errors=errors, aten_err=aten_err, fused_err=fused_err,
               correct="ok" if all(e <= max(2 * max(errors[p][k] for p in aten), 1e-5)
                                   for k, e in enumerate(errors[select.FUSED_PAIR])) else "FAIL")
    cuda = device == "cuda"
    configs = fused.tune_site(n, i, o, r, dtype=dtype, device=device) if (tune and cuda) else {}
    row["configs"] = "; ".join(f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
                               for c in configs.values()) or ("-" if cuda else "- (no CUDA)")
    ms = {p: s * 1e3 for p, s in measure_pairs(key, pairs, warmup=warmup, repeats=repeats, inputs=inputs).items()}
    best = min(aten, key=ms.get)
    take, why = select.should_choose_fused(ms[select.FUSED_PAIR], best, ms[best])
    row.update(all_ms=ms, best_aten=best, aten_ms=ms[best], fused_ms=ms[select.FUSED_PAIR],
               x_aten=ms[select.FUSED_PAIR] / ms[best], note=why,
               chooses=("fused" if take else best) if cuda else "- (interpreter times)")
    row["kernels"] = kernel_times(n, i, o, r, dtype, warmup, repeats) if cuda else "- (no CUDA)"
    return row


def compiled_rows(point, *, device: str, dtype: torch.dtype, allow_merged: bool, inner: str, warmup: int,
                  repeats: int) -> list:
    """The layer under torch.compile: peft + inner, runlora, runlora with the fused pair forced."""
    n, i, o, r = point
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype).requires_grad_(grad)

    x, w = rand(n, i, grad=True), rand(o, i, std=i ** -0.5)
    a, b, dy = rand(r, i, std=i ** -0.5, grad=True), rand(o, r, std=0.02, grad=True), rand(n, o)

    def layer(x, w, a, b):
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALING

    backends = {  # mode -> (the torch.compile backend, the runlora backend whose reports name the plans)
        f"peft + {inner}": (inner, None),
        "runlora": runlora_fx.make_backend(inner=inner, allow_merged=allow_merged),
        "runlora fused": runlora_fx.make_backend(inner=inner, forward_plan="fused", backward_plan="fused"),
    }
    backends = {mode: be if isinstance(be, tuple) else (be, be) for mode, be in backends.items()}
    want = [layer(x, w, a, b)]
    want += list(torch.autograd.grad(want[0], (x, a, b), dy))
    steps, errs = {}, {}
    for mode, (backend, runlora_backend) in backends.items():
        torch._dynamo.reset()
        fn = torch.compile(layer, backend=backend)

        def step(fn=fn):
            y = fn(x, w, a, b)
            return [y] + list(torch.autograd.grad(y, (x, a, b), dy))
        errs[mode] = max(_rel(g, w_.double()) for g, w_ in zip(step(), want))
        steps[mode] = step
    times = common.time_interleaved(steps, device=device, warmup=warmup, repeats=repeats)
    label = f"{n}x{i}->{o}, r{r} {str(dtype).removeprefix('torch.')}"
    rows = []
    for mode, (backend, runlora_backend) in backends.items():
        plans = None
        if runlora_backend is not None:
            counts = collections.Counter()
            for report in runlora_backend.reports:
                counts.update(report.plan_counts())
            plans = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            fallbacks = [report.fallback for report in runlora_backend.reports if report.fallback]
            if fallbacks:  # the backend compiled the graph without the rewrite
                plans += f" (NOT APPLIED: {fallbacks[0]})"
        rows.append({"shape": label, "mode": mode, "ms": times[mode].median_ms, "err": errs[mode], "plans": plans})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                        help="default bfloat16 on cuda, float32 on cpu (the interpreter's tl.dot)")
    parser.add_argument("--grid", action="append", type=parse_point, help="NxIxOxR, repeatable")
    parser.add_argument("--allow-merged", action="store_true", help="merged ATen pairs in bf16/fp16 too")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, few repeats")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per pair (default 3; 1 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per pair (default 10; 2 quick)")
    parser.add_argument("--no-tune", action="store_true", help="keep the kernels' default block shapes")
    parser.add_argument("--compiled", action="store_true", help="also the compiled layer, first grid point")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--json", help="write rows and environment here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fused: --device cuda but torch.cuda.is_available() is False")
    why = fused.unavailable_reason(args.device)
    if why is not None:  # e.g. no Triton, or CPU without the interpreter: nothing to compare
        print(f"bench_fused: skipped: {why}")
        return []
    dtype = common.DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    grid = args.grid or [parse_point(s) for s in (QUICK_GRID[args.device] if args.quick else DEFAULT_GRID)]
    warmup = args.warmup or (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 10)
    allow_merged = args.allow_merged or dtype not in (torch.bfloat16, torch.float16)
    env = common.environment(args.device)
    env["triton"] = getattr(fused.triton, "__version__", None)
    env["interpreted"] = fused.INTERPRETED
    env["kernel_source"] = fused.SOURCE_HASH
    title = f"Fused plan vs ATen plans, one layer, {str(dtype).removeprefix('torch.')}, {args.device}" + (
        " (Triton interpreter: correctness only, times meaningless)" if fused.INTERPRETED else "")
    command = ["benchmarks/bench_fused.py"] + list(sys.argv[1:] if argv is None else argv)
    rows, compiled = [], []
    for point in grid:
        print(f"# {'x'.join(map(str, point))}", file=sys.stderr, flush=True)
        rows.append(run_point(point, device=args.device, dtype=dtype, allow_merged=allow_merged, warmup=warmup,
                              repeats=repeats, tune=not args.no_tune))
        table = common.markdown_table(rows, COLUMNS)
        common.write_outputs(rows=rows, env=env, argv=command, table=table, json_path=args.json, md_path=args.md,
                             title=title)
    if args.compiled:
        inner = "aot_eager" if fused.INTERPRETED else args.inner
        compiled = compiled_rows(grid[0], device=args.device, dtype=dtype, allow_merged=allow_merged, inner=inner,
                                 warmup=warmup, repeats=repeats)
        table += "\n\n" + common.markdown_table(compiled, COMPILED_COLUMNS)
        common.write_outputs(rows=rows + compiled, env=env, argv=command, table=table, json_path=args.json,
                             md_path=args.md, title=title)
    print(table)
    for row in rows:
        verdict = "interpreter: times not comparable" if fused.INTERPRETED else row["note"]
        print(f"{row['shape']}: {verdict}; correctness {row['correct']}")
    return rows + compiled


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(r.get("correct") == "FAIL" for r in rows) else 0)
