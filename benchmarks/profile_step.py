"""Where a training step's time goes: torch.profiler's per-op table for one or more modes.

    python benchmarks/profile_step.py --quick --qlora nf4 --modes peft_inductor,runlora
    python benchmarks/profile_step.py --device cuda --dtype bfloat16 --models tinyllama11 \\
        --batch 8 --seq 1024 --qlora nf4 --rewrite-4bit --modes peft_inductor,runlora --out prof.md

Builds each mode exactly as ``bench_model.py`` does (same model, batch, backend), runs the
warm-up steps, then profiles ``--steps`` steps and writes, per mode: the step's wall time, the
host (CPU) time and device time the profiler saw, and the ``--rows`` ops with the most self
device time (self CPU time on a CPU run). Comparing two modes' tables shows whether a gap is
kernels (device time) or host overhead (CPU time with the device waiting).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_model  # noqa: E402
import common  # noqa: E402


def profile_mode(name: str, mode: str, args: argparse.Namespace) -> str:
    """The markdown section for one mode."""
    spec, dtype = bench_model.MODELS[name], common.DTYPES[args.dtype]
    model = bench_model.build_base(spec, layers=args.layers, seq=args.seq, dtype=dtype, device=args.device)
    if args.qlora:
        model = bench_model.quantize_base(model, args.qlora, dtype, args.device)
    model = bench_model.add_lora(model, rank=args.rank, fp32_adapters=False)
    batch = bench_model.make_batch(spec, batch=args.batch, seq=args.seq, device=args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    compiled, _ = bench_model.compile_model(model, mode, inner=args.inner, allow_merged=args.allow_merged,
                                            rewrite_4bit=args.rewrite_4bit)
    step = bench_model.make_step(compiled, batch, None, trainable)
    common.warm_up(step, device=args.device, warmup=args.warmup)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    common.sync(args.device)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        common.sync(args.device)
    wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
    events = prof.key_averages()
    cuda = args.device == "cuda"
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    host_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
    device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / args.steps if cuda else None
    table = events.table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60)
    del compiled, model, step
    bench_model._free(args.device)
    device_text = f", device (kernels) {device_ms:.1f} ms" if device_ms is not None else ""
    return (f"## {name} {mode}\n\nper step (profiled, {args.steps} steps): wall {wall_ms:.1f} ms, host ops "
            f"{host_ms:.1f} ms{device_text}\n\n```\n{table}\n```\n")


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="one model name (default tinyllama11; llama_tiny with --quick)")
    parser.add_argument("--modes", default="peft_inductor,runlora", help="comma-separated bench_model modes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    parser.add_argument("--qlora", choices=["nf4", "fp4"], help="4-bit bitsandbytes base (QLoRA)")
    parser.add_argument("--rewrite-4bit", action="store_const", const=True, default=None,
                        help="runlora modes: rewrite 4-bit sites on CUDA too")
    parser.add_argument("--allow-merged", action="store_true", help="runlora modes: merged plans in bf16 too")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="default 1024 (128 with --quick)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, help="override the model's layer count")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=20, help="ops listed per mode")
    parser.add_argument("--quick", action="store_true", help="CPU smoke size: llama_tiny, B=2, S=128")
    parser.add_argument("--out", help="write the markdown here too")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step: --device cuda but torch.cuda.is_available() is False")
    name = bench_model.model_name(args.models or (bench_model.QUICK_MODEL if args.quick else "tinyllama11"))
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (128 if args.quick else 1024)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(bench_model.ALL_MODES) - {"frozen_inductor"}
    if unknown or "frozen_inductor" in modes:
        parser.error(f"unknown or unsupported modes {sorted(unknown | ({'frozen_inductor'} & set(modes)))}")
    sections = [profile_mode(name, mode, args) for mode in modes]
    env = common.environment(args.device)
    text = (f"# Step profile: {name}, B={args.batch} S={args.seq} r={args.rank} {args.dtype}"
            + (f", QLoRA {args.qlora}" if args.qlora else "") + "\n\n"
            + f"{env['date']}, {env.get('gpu') or env['cpu']}, torch {env['torch']}\n\n" + "\n".join(sections))
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
