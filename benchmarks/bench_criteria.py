"""Which plan pair each criterion chooses for one LoRA layer, and how fast that pair runs.

    python benchmarks/bench_criteria.py                       # CPU fp32: 64 .. 4096 tokens, 1024 -> 2752, r=64
    python benchmarks/bench_criteria.py --grid 64x1024x2752x64 --grid 4096x1024x2752x64
    python benchmarks/bench_criteria.py --device cuda --dtype bfloat16 --allow-merged --json out/criteria.json
    python benchmarks/bench_criteria.py --quick               # seconds, tiny

At each grid point ``NxIxOxR`` (all of x, A, B need gradients, no bias, W frozen):

1. ``flops`` and ``roofline`` choose from their models (``runlora_fx.choose.choose``; the
   roofline with the device's table entry, ``runlora_fx.choose.roofline.DEVICE_MODELS``). With
   ``--device-model FILE.json`` (``runlora-fx calibrate --json``) a fourth row,
   ``roofline_calibrated``, uses the measured constants.
2. ``time`` chooses by measuring: a fresh ``Autotuner`` (empty cache in a temporary
   directory) times every applicable pair (``--tune-repeats`` repeats).
3. Then, separately, every applicable pair is timed again, round-robin (``--repeats``;
   ``torch.ops.runlora.lora_linear`` forward + ``autograd.grad``, the tuner's own step), and
   each criterion's pair is looked up in that run. "x best" = chosen ms ÷ the fastest pair's
   ms in the same run; time's choice can miss the best when pairs are within noise.

One row per point and criterion: the pair, its FLOPs, its ms, the best pair and its ms.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import runlora_fx  # noqa: E402,F401  registers the op
from runlora_fx.choose.measure import Autotuner, SiteInputs  # noqa: E402
from runlora_fx.plans import backward_plan, forward_plan  # noqa: E402
from runlora_fx.choose import choose, time_request  # noqa: E402

CRITERIA = ("flops", "roofline", "time")
DEFAULT_GRID = {
    "cpu": ["64x1024x2752x64", "512x1024x2752x64", "1024x1024x2752x64", "2048x1024x2752x64", "4096x1024x2752x64"],
    "cuda": ["1024x4096x4096x16", "4096x14336x4096x16", "8192x2048x5632x16", "16384x4096x4096x8"],
}
QUICK_GRID = ["64x128x384x8", "512x128x384x8"]

COLUMNS = [
    common.Column("shape", "n x i -> o, r"),
    common.Column("criterion", "criterion"),
    common.Column("pair", "chosen pair"),
    common.Column("gflop", "GFLOP", "{:.2f}"),
    common.Column("ms", "ms", "{:.2f}"),
    common.Column("best_pair", "fastest pair"),
    common.Column("best_ms", "fastest ms", "{:.2f}"),
    common.Column("x_best", "x best", "{:.3f}"),
]


def parse_point(spec: str):
    parts = spec.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"grid point {spec!r}: expected NxIxOxR, e.g. 4096x1024x2752x64")
    return tuple(map(int, parts))


def pair_flops(pair: str, n: int, i: int, o: int, r: int) -> int:
    f, b = pair.split("/")
    return int(forward_plan(f).flops(n, i, o, r) + backward_plan(b).flops(n, i, o, r))  # by name: fused too


def run_point(point, *, device: str, dtype: torch.dtype, allow_merged: bool, warmup: int, repeats: int,
              tune_repeats: int, cache_dir: str, device_model: Optional[str] = None) -> list:
    n, i, o, r = point
    args = dict(allow_merged=allow_merged, dtype=dtype, device=device)
    chosen = {}
    for criterion in ("flops", "roofline"):
        c = choose(n, i, o, r, criterion=criterion, **args)
        chosen[criterion] = f"{c.forward}/{c.backward}"
    if device_model:
        c = choose(n, i, o, r, criterion="roofline", device_model=device_model, **args)
        chosen["roofline_calibrated"] = f"{c.forward}/{c.backward}"
    tuner = Autotuner(cache_dir=cache_dir, repeats=tune_repeats, warmup=warmup, persist=False)
    c = choose(n, i, o, r, criterion="time", tuner=tuner, **args)
    chosen["time"] = f"{c.forward}/{c.backward}" + ("" if c.criterion == "time" else f" ({c.criterion})")
    key, pairs = time_request(n, i, o, r, needs=runlora_fx.Needs(), separate_lora_input=False, mixed_dtype=False,
                              include_dominated=False, n_hint=None, adapter_dtype=None, bias=False, **args)
    inputs = SiteInputs(key)
    steps = {pair: inputs.step(*pair.split("/")) for pair in pairs}
    with torch.enable_grad():
        timings = common.time_interleaved(steps, device=device, warmup=warmup, repeats=repeats)
    ms = {pair: t.median_ms for pair, t in timings.items()}
    best = min(ms, key=ms.get)
    label = f"{n}x{i}->{o}, r{r} {str(dtype).removeprefix('torch.')}"
    rows = []
    for criterion in [c for c in (*CRITERIA, "roofline_calibrated") if c in chosen]:
        pair = chosen[criterion].split(" ")[0]
        rows.append({
            "shape": label, "n": n, "i": i, "o": o, "r": r, "criterion": criterion, "pair": chosen[criterion],
            "gflop": pair_flops(pair, n, i, o, r) / 1e9, "ms": ms[pair], "best_pair": best, "best_ms": ms[best],
            "x_best": ms[pair] / ms[best], "all_ms": ms, "tuned_ms": {p: s * 1e3 for p, s in (c.measured or {}).items()},
            "tune_s": tuner.spent_s,
        })
    return rows


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    parser.add_argument("--grid", action="append", type=parse_point, help="NxIxOxR, repeatable")
    parser.add_argument("--allow-merged", action="store_true", help="merged plans in bf16/fp16 too")
    parser.add_argument("--quick", action="store_true", help=f"tiny grid {QUICK_GRID}, few repeats")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per pair (default 2; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per pair (default 10 cuda, 5 cpu)")
    parser.add_argument("--tune-repeats", type=int, default=None, help="the tuner's repeats (default 3 cpu, 10 cuda)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device-model", metavar="FILE.json",
                        help="measured roofline constants (runlora-fx calibrate --json): adds roofline_calibrated")
    parser.add_argument("--json", help="write rows and environment here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_criteria: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = common.DTYPES[args.dtype]
    grid = args.grid or [parse_point(s) for s in (QUICK_GRID if args.quick else DEFAULT_GRID[args.device])]
    cuda = args.device == "cuda"
    warmup = args.warmup or (1 if args.quick else 2)
    repeats = args.repeats or (2 if args.quick else 10 if cuda else 5)
    tune_repeats = args.tune_repeats or (2 if args.quick else 10 if cuda else 3)
    allow_merged = args.allow_merged or dtype not in (torch.bfloat16, torch.float16)
    env = common.environment(args.device)
    command = ["benchmarks/bench_criteria.py"] + list(sys.argv[1:] if argv is None else argv)
    rows: list = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for point in grid:
            print(f"# {'x'.join(map(str, point))}", file=sys.stderr, flush=True)
            rows += run_point(point, device=args.device, dtype=dtype, allow_merged=allow_merged, warmup=warmup,
                              repeats=repeats, tune_repeats=tune_repeats, cache_dir=cache_dir,
                              device_model=args.device_model)
            table = common.markdown_table(rows, COLUMNS)
            common.write_outputs(rows=rows, env=env, argv=command, table=table, json_path=args.json,
                                 md_path=args.md, title="Plan choice by criterion, one layer, forward + backward")
    print(table)
    return rows


if __name__ == "__main__":
    main()
