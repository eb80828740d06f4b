"""One LoRA layer, forward + backward, through every way runlora_fx can compute it.

    python benchmarks/bench_layer.py                                 # CPU fp32, incl. 4096x1024x2752x64
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --json out/layer.json --md out/layer.md
    python benchmarks/bench_layer.py --grid 4096x1024x2752x64 --grid 512x1024x2752x64
    python benchmarks/bench_layer.py --quick                         # seconds, tiny

A grid point ``NxIxOxR`` is N tokens, I in features, O out features, rank R. One step is
``y = layer(x)`` then ``autograd.grad(y, (x, A, B), dy)``: W (and bias) frozen. Modes:

    frozen              F.linear(x, W, b), grad of x only: the limit
    peft_eager          F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s, as peft computes it
    peft_inductor       the same function under torch.compile (inductor)
    forward1/backward5  torch.ops.runlora.lora_linear with that plan pair, eager (6 pairs)
    runlora_aten        torch.compile(peft fn, backend=make_backend(lowering="aten"))
    runlora_opaque      torch.compile(peft fn, backend=make_backend(lowering="opaque"))
    runlora_*_merged    the same with allow_merged=True (bf16/fp16 only; fp32 merges by default)

Columns: median ms per step; GFLOP/s of the FLOPs the mode performs; "x limit" = time ÷
(frozen time × FLOPs ÷ frozen FLOPs), the frozen layer's speed taken as the attainable one,
with FLOPs from ``runlora_fx.plans`` (forward + backward plan; peft keeps x@A, so its count is
forward1 + backward1 less the recomputed x@A) and frozen FLOPs 2nio + 2nio; speedups vs
peft_eager and peft_inductor (their ms ÷ this ms); and the bytes autograd saved for backward
(unique storages, parameters excluded; x itself is counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import types
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import runlora_fx  # noqa: E402
from runlora_fx.plans import parse_plan  # noqa: E402
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS  # noqa: E402

PLAN_PAIRS = [(f, b) for f in FORWARD_PLANS for b in ("backward1", "backward4", "backward5")]
MERGED = ["runlora_aten_merged", "runlora_opaque_merged"]
ALL_MODES = ["frozen", "peft_eager", "peft_inductor"] + [f"{f}/{b}" for f, b in PLAN_PAIRS] + \
    ["runlora_aten", "runlora_opaque"] + MERGED

TARGET = "4096x1024x2752x64"
DEFAULT_GRID = {"cpu": [TARGET, "512x1024x2752x64"],
                "cuda": ["16384x4096x4096x8", "8192x2048x5632x16", "8192x5632x2048x16"]}
QUICK_GRID = ["256x128x384x8"]

COLUMNS = [
    common.Column("shape", "n x i -> o, r"),
    common.Column("mode", "mode"),
    common.Column("plan", "plan"),
    common.Column("ms", "ms", "{:.2f}"),
    common.Column("gflops_per_s", "GFLOP/s", "{:.1f}"),
    common.Column("x_limit", "x limit", "{:.3f}"),
    common.Column("speedup_vs_peft_eager", "vs peft_eager", "{:.2f}x"),
    common.Column("speedup_vs_peft_inductor", "vs peft_inductor", "{:.2f}x"),
    common.Column("saved_mib", "saved MiB", "{:.2f}"),
    common.Column("first_s", "1st call s", "{:.1f}"),
]


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: tokens, in features, out features, rank, dtype."""

    n: int
    i: int
    o: int
    r: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.n}x{self.i}->{self.o}, r{self.r} {str(self.dtype).removeprefix('torch.')}"


def parse_point(spec: str, dtype: torch.dtype) -> Point:
    """Parses ``NxIxOxR`` (e.g. ``4096x1024x2752x64``)."""
    parts = spec.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"grid point {spec!r}: expected NxIxOxR, e.g. {TARGET}")
    return Point(*map(int, parts), dtype)


def frozen_flops(p: Point) -> int:
    """Forward 2nio + backward (dX only) 2nio."""
    return 4 * p.n * p.i * p.o


def plan_flops(p: Point, forward: str, backward: str) -> int:
    """FLOPs of a forward/backward plan pair at this point, from the sympy catalogue."""
    return int(FORWARD_PLANS[forward].flops(p.n, p.i, p.o, p.r) + BACKWARD_PLANS[backward].flops(p.n, p.i, p.o, p.r))


def peft_flops(p: Point) -> int:
    """peft's autograd: forward1 + backward1, but x@A is saved, not recomputed (2nir less)."""
    return plan_flops(p, "forward1", "backward1") - 2 * p.n * p.i * p.r


class Layer:
    """The tensors of one LoRA layer (nn.Linear layout) and the upstream gradient."""

    def __init__(self, p: Point, device: str, scaling: float = 2.0):
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, std=1.0, grad=False):
            t = (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=p.dtype)
            return t.requires_grad_(grad)

        self.x = rand(p.n, p.i, grad=True)
        self.weight = rand(p.o, p.i, std=p.i ** -0.5)
        self.bias = None
        self.lora_A = rand(p.r, p.i, std=p.i ** -0.5, grad=True)
        self.lora_B = rand(p.o, p.r, std=0.02, grad=True)
        self.scaling = scaling
        self.grad_y = rand(p.n, p.o)

    @property
    def params(self) -> list:
        return [self.weight, self.bias, self.lora_A, self.lora_B]


def make_peft_fn(scaling: float) -> Callable:
    """The peft computation; ``scaling`` is a closure constant, as peft's is to Dynamo."""
    def peft_lora(x, weight, bias, lora_A, lora_B):
        return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling
    return peft_lora


def make_op_fn(scaling: float, forward: str, backward: str) -> Callable:
    """The runlora op with a fixed plan pair, eager."""
    def op_lora(x, weight, bias, lora_A, lora_B):
        return torch.ops.runlora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, None, None, forward, backward)
    return op_lora


def frozen_fn(x, weight, bias, lora_A, lora_B):
    """The base layer alone."""
    return F.linear(x, weight, bias)


def _own_code(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo caches compiled graphs on the code object; every mode gets its own, so the modes
    of one grid point can be compiled once each and then timed round-robin without sharing
    (or evicting) each other's cache entries.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag.replace('/', '_')}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def build_mode(mode: str, layer: Layer, p: Point, inner: str):
    """Returns (fn, backend or None, plan label, FLOPs or None until the backend has chosen)."""
    peft = _own_code(make_peft_fn(layer.scaling), mode)
    if mode == "frozen":
        return frozen_fn, None, "base only", frozen_flops(p)
    if mode == "peft_eager":
        return peft, None, "forward1/backward1*", peft_flops(p)
    if mode == "peft_inductor":
        return torch.compile(peft, backend=inner, dynamic=False), None, "forward1/backward1*", peft_flops(p)
    if "/" in mode:
        f, b = mode.split("/")
        return make_op_fn(layer.scaling, f, b), None, mode, plan_flops(p, f, b)
    lowering = "aten" if mode.startswith("runlora_aten") else "opaque"
    allow_merged = True if mode.endswith("_merged") else None
    backend = runlora_fx.make_backend(inner=inner, lowering=lowering, allow_merged=allow_merged)
    return torch.compile(peft, backend=backend, dynamic=False), backend, None, None


def chosen_plan(backend, p: Point):
    """The plan the backend's pass chose, and its FLOPs; peft's if no site was rewritten."""
    sites = [s for report in backend.reports for s in report.sites]
    if not sites:
        return "not rewritten", peft_flops(p)
    site = sites[0]
    f = parse_plan(site.forward_plan).at(p.n)
    b = parse_plan(site.backward_plan).at(p.n)
    return f"{f}/{b}", plan_flops(p, f, b)


def make_step(fn: Callable, layer: Layer, mode: str) -> Callable:
    """One forward + backward: grads of x, A and B (x only for ``frozen``)."""
    inputs = (layer.x,) if mode == "frozen" else (layer.x, layer.lora_A, layer.lora_B)

    def step():
        y = fn(layer.x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
        return torch.autograd.grad(y, inputs, layer.grad_y)
    return step


def run_point(p: Point, modes: Sequence[str], device: str, inner: str, warmup: int, repeats: int) -> list:
    """Times every mode at one point, round-robin; returns their rows (before the ratios)."""
    torch._dynamo.reset()
    layer = Layer(p, device)
    built = {mode: build_mode(mode, layer, p, inner) for mode in modes}
    steps = {mode: make_step(built[mode][0], layer, mode) for mode in modes}
    timings = common.time_interleaved(steps, device=device, warmup=warmup, repeats=repeats)
    rows = []
    for mode in modes:
        _, backend, plan, flops = built[mode]
        if backend is not None:
            plan, flops = chosen_plan(backend, p)
        timing = timings[mode]
        saved = common.saved_activation_bytes(steps[mode], exclude=layer.params)
        rows.append({
            "shape": p.label, "n": p.n, "i": p.i, "o": p.o, "r": p.r, "dtype": str(p.dtype).removeprefix("torch."),
            "mode": mode, "plan": plan, "flops": flops, "ms": timing.median_ms, "min_ms": timing.min_ms,
            "first_s": timing.first_s, "times_ms": timing.times_ms,
            "gflops_per_s": flops / timing.median_ms / 1e6, "saved_bytes": saved, "saved_mib": saved / 2**20,
        })
    torch._dynamo.reset()
    return rows


def add_ratios(rows: Sequence[dict], p: Point) -> None:
    """Fills x_limit and the speedups of one point's rows, in place."""
    by_mode = {row["mode"]: row for row in rows}
    frozen = by_mode.get("frozen")
    for row in rows:
        limit_ms = None if frozen is None else frozen["ms"] * row["flops"] / frozen_flops(p)
        row["limit_ms"] = limit_ms
        row["x_limit"] = common.ratio(row["ms"], limit_ms)
        for ref in ("peft_eager", "peft_inductor"):
            row[f"speedup_vs_{ref}"] = common.ratio(by_mode[ref]["ms"], row["ms"]) if ref in by_mode else None


def modes_for(p: Point, wanted: Optional[Sequence[str]]) -> list:
    """The modes to run at a point: merged variants only where merging is off by default."""
    low_precision = p.dtype in (torch.bfloat16, torch.float16)
    modes = [m for m in ALL_MODES if low_precision or m not in MERGED]
    return [m for m in modes if wanted is None or m in wanted]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    parser.add_argument("--grid", action="append", help=f"NxIxOxR, repeatable (default per device; {TARGET})")
    parser.add_argument("--modes", help=f"comma-separated subset of: {','.join(ALL_MODES)}")
    parser.add_argument("--quick", action="store_true", help=f"tiny grid {QUICK_GRID}, few repeats")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor",
                        help="compiler behind the compiled modes (aot_eager: smoke tests only)")
    parser.add_argument("--warmup", type=int, help="untimed calls incl. the first (default 3; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed calls (default 10 on cuda, 5 on cpu, 3 with --quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--json", help="write rows and environment here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.modes:
        unknown = set(args.modes.split(",")) - set(ALL_MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; known: {ALL_MODES}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Runs the benchmark; returns the rows (also printed as a markdown table)."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_layer: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = common.DTYPES[args.dtype]
    specs = args.grid or (QUICK_GRID if args.quick else DEFAULT_GRID[args.device])
    warmup = args.warmup or (2 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 10 if args.device == "cuda" else 5)
    wanted = args.modes.split(",") if args.modes else None
    env = common.environment(args.device)
    command = ["benchmarks/bench_layer.py"] + list(sys.argv[1:] if argv is None else argv)
    rows: list = []
    for spec in specs:
        p = parse_point(spec, dtype)
        print(f"# {p.label}: {len(modes_for(p, wanted))} modes", file=sys.stderr, flush=True)
        point_rows = run_point(p, modes_for(p, wanted), args.device, args.inner, warmup, repeats)
        add_ratios(point_rows, p)
        rows += point_rows
        table = common.markdown_table(rows, COLUMNS)  # written after every point: a cut-short run keeps them
        common.write_outputs(rows=rows, env=env, argv=command, table=table, json_path=args.json,
                             md_path=args.md, title="LoRA layer, forward + backward")
    print(table)
    return rows


if __name__ == "__main__":
    main()
