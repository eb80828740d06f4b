"""Sibling LoRA layers on one x (q/k/v-like), forward + backward: grouped vs one op per site.

    python benchmarks/bench_group.py                      # x 4096x2048, outs 2048/512/512, r=16, fp32, 1 thread
    python benchmarks/bench_group.py --quick              # seconds, tiny
    python benchmarks/bench_group.py --repeats 9 --json out/group.json

One step is ``ys = layer_j(x) for each j`` then ``autograd.grad(Σ_j (ys_j·dy_j).sum(), (x, A_j, B_j))``;
W_j and b_j frozen. Modes, timed round-robin (``common.time_interleaved``) so background load on
a shared machine hits all alike:

    peft_eager            F.linear(x, W_j, b_j) + s_j F.linear(F.linear(x, A_j), B_j), per site
    sites/<plans>         torch.ops.runlora.lora_linear per site, eager
    group/<plans>         one torch.ops.runlora.lora_linear_group, eager
    inductor_sites        torch.compile(peft fn, backend=make_backend(group_siblings=False)) (lowered, inductor)
    inductor_group        the same with group_siblings=True

<plans> is forward1/backward1 (nothing merged: every x-reading GEMM is shared) and the FLOPs
choice at this shape (forward2/backward5 for every member in fp32: the forward shares nothing,
the backward shares dA and the recomputed XA). Columns: median and min ms of a step, and the
group's time ÷ the per-site time of the same plans.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import runlora_fx  # noqa: E402
from runlora_fx.choose import choose  # noqa: E402
from runlora_fx.ops.group import join_plans  # noqa: E402


def make_case(n, i, outs, r, dtype, scales):
    torch.manual_seed(0)
    x = torch.randn(n, i, dtype=dtype, requires_grad=True)
    ws = [torch.randn(o, i, dtype=dtype) / i ** 0.5 for o in outs]
    bs = [torch.randn(o, dtype=dtype) for o in outs]
    As = [(torch.randn(r, i, dtype=dtype) / i ** 0.5).requires_grad_() for _ in outs]
    Bs = [(torch.randn(o, r, dtype=dtype) * 0.05).requires_grad_() for o in outs]
    dys = [torch.randn(n, o, dtype=dtype) for o in outs]
    return x, ws, bs, As, Bs, list(scales[:len(outs)]), dys


def peft_fn(x, ws, bs, As, Bs, scales):
    return [F.linear(x, w, b) + s * F.linear(F.linear(x, a), bb) for w, b, a, bb, s in zip(ws, bs, As, Bs, scales)]


def steps_for(case, fwd, bwd, inductor):
    x, ws, bs, As, Bs, scales, dys = case
    inputs = (x, *As, *Bs)

    def run(fn):
        def step():
            ys = fn()
            torch.autograd.grad(sum((y * dy).sum() for y, dy in zip(ys, dys)), inputs)
        return step

    steps = {"peft_eager": run(lambda: peft_fn(x, ws, bs, As, Bs, scales))}
    plan_sets = {"forward1/backward1": (["forward1"] * len(ws), ["backward1"] * len(ws)), "chosen": (fwd, bwd)}
    for label, (f, b) in plan_sets.items():
        steps[f"sites/{label}"] = run(lambda f=f, b=b: [
            torch.ops.runlora.lora_linear(x, w, bias, a, bb, s, None, None, f[j], b[j])
            for j, (w, bias, a, bb, s) in enumerate(zip(ws, bs, As, Bs, scales))])
        steps[f"group/{label}"] = run(lambda f=f, b=b: torch.ops.runlora.lora_linear_group(
            x, ws, bs, As, Bs, scales, None, None, join_plans(f), join_plans(b)))
    if inductor:
        for label, grouped in (("inductor_sites", False), ("inductor_group", True)):
            backend = runlora_fx.make_backend(group_siblings=grouped)
            compiled = torch.compile(peft_fn, backend=backend)
            steps[label] = run(lambda compiled=compiled: compiled(x, ws, bs, As, Bs, scales))
            steps[label].backend = backend
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--i", type=int, default=2048)
    parser.add_argument("--outs", default="2048,512,512")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.i, args.outs, args.r, args.repeats, args.warmup = 64, 32, "32,16,16", 4, 2, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    outs = [int(o) for o in args.outs.split(",")]
    dtype = getattr(torch, args.dtype)
    case = make_case(args.n, args.i, outs, args.r, dtype, (2.0, 0.5, 1.5, 1.0, 1.0, 1.0))
    picks = [choose(args.n, args.i, o, args.r, dtype=dtype, allow_merged=dtype not in (torch.bfloat16, torch.float16))
             for o in outs]
    fwd, bwd = [str(p.forward) for p in picks], [str(p.backward) for p in picks]
    steps = steps_for(case, fwd, bwd, inductor=not args.no_inductor)
    try:
        timings = common.time_interleaved(steps, device="cpu", warmup=args.warmup, repeats=args.repeats)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, when called from a test
    rows = []
    for name, t in timings.items():
        rows.append({"mode": name, "median_ms": t.median_ms, "min_ms": t.min_ms,
                     "first_s": t.first_s, "ms": list(t.times_ms)})
    by = {row["mode"]: row for row in rows}
    for row in rows:
        other = row["mode"].replace("group", "sites")
        row["group_vs_sites"] = (row["median_ms"] / by[other]["median_ms"]) if other != row["mode"] else None
    for name in ("inductor_sites", "inductor_group"):
        if name in steps:
            by[name]["summary"] = steps[name].backend.reports[0].summary()
    print(f"n={args.n} i={args.i} outs={outs} r={args.r} {args.dtype} threads={args.threads} "
          f"chosen plans: {', '.join(f'{f}/{b}' for f, b in zip(fwd, bwd))}; repeats={args.repeats}")
    print("| mode | median ms | min ms | group ÷ sites (median) |\n|---|---|---|---|")
    for row in rows:
        ratio = "-" if row["group_vs_sites"] is None else f"{row['group_vs_sites']:.3f}"
        print(f"| {row['mode']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {ratio} |")
    for row in rows:
        if "summary" in row:
            print(f"{row['mode']}: {row['summary']}")
    if args.json:
        import json
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "env": common.environment("cpu"),
                                                       "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
