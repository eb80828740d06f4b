"""DoRA training step on the CPU: peft DoRA + inductor vs runlora DoRA, and plain LoRA both ways.

    .venv/bin/python benchmarks/bench_dora.py                 # hidden 512, 2 layers, B=2, S=256, r=16
    .venv/bin/python benchmarks/bench_dora.py --repeats 15 --json dora.json
    .venv/bin/python benchmarks/bench_dora.py --base bnb_nf4  # QDoRA: bitsandbytes NF4 bases (double-quantized)
    .venv/bin/python benchmarks/bench_dora.py --dropout 0.1   # peft's dropout form (a second base GEMM)

One thread (``torch.set_num_threads(1)``) on the CPU, fp32 by default (``--device cuda --dtype
bfloat16`` on a GPU: adapters in the model's dtype), a random-weight Llama (no hub), peft LoRA on all
7 projections. A step is forward + loss + backward (grads set to None after). Modes are compiled
and warmed up one after another, then timed round-robin (repeat k of every mode, then k+1), so
load from other users of a shared machine falls on every mode alike; medians are reported.
Memory is the bytes autograd saves for backward in one step (``saved_tensors_hooks``, one count
per storage, parameters excluded): torch's allocator is invisible to tracemalloc.

peft's ``dequantize_module_weight`` graph-breaks Dynamo on every DoRA layer; importing
runlora_fx after peft registers a polyfill for it (``passes/dora.py``), so "peft DoRA +
inductor" here is one graph too (its best case), not the split graphs plain peft gets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import peft  # noqa: F401  before runlora_fx: the DoRA polyfill is then in place for every mode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runlora_fx  # noqa: E402
from bench_model import quantize_base  # noqa: E402
from common import environment, saved_activation_bytes, time_interleaved  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {
    "peft DoRA eager": (True, "eager"),
    "peft DoRA + inductor": (True, "inductor"),
    "runlora DoRA": (True, "runlora"),
    "runlora LoRA": (False, "runlora"),
    "peft LoRA + inductor": (False, "inductor"),
}


def build(use_dora: bool, args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(dtype)
    if args.base == "bnb_nf4":
        # W quantized from the model's dtype, as peft's DoRA then dequantizes it to x's dtype
        quantize_base(model, "nf4", dtype, args.device, source_dtype=dtype)
    model = get_peft_model(model.to(args.device), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                             target_modules=TARGETS, use_dora=use_dora,
                                                             lora_dropout=args.dropout),
                           autocast_adapter_dtype=False)  # adapters in the model's dtype, as runlora's DoRA needs
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def prepare(name: str, args):
    use_dora, compiler = MODES[name]
    model = build(use_dora, args)
    backend = runlora_fx.make_backend(inner=args.inner) if compiler == "runlora" else args.inner
    compiled = model if compiler == "eager" else torch.compile(model, backend=backend)
    torch.manual_seed(1)
    ids = torch.randint(0, 1024, (args.batch, args.seq), device=args.device)
    params = [p for p in model.parameters()]

    def step():
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None

    return step, params, backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--md", default=None, help="also write the table and ratios here")
    parser.add_argument("--base", choices=("dense", "bnb_nf4"), default="dense")
    parser.add_argument("--inner", default="inductor", help="the compiler under every compiled mode (smoke tests: aot_eager)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    names = [m for m in args.modes.split(",") if m]
    steps, saved, sites = {}, {}, {}
    for name in names:
        step, params, backend = prepare(name, args)
        steps[name] = step
        step()  # compile outside the hooks
        saved[name] = saved_activation_bytes(step, params)
        if not isinstance(backend, str):
            sites[name] = sum(r.rewritten for r in backend.reports)
    timings = time_interleaved(steps, device=args.device, warmup=args.warmup, repeats=args.repeats)
    rows = []
    for name in names:
        t = timings[name]
        rows.append({"mode": name, "median_ms": round(t.median_ms, 1), "min_ms": round(t.min_ms, 1),
                     "saved_MiB": round(saved[name] / 2**20, 2), "sites": sites.get(name),
                     "times_ms": [round(v, 1) for v in t.times_ms]})
    lines = [f"DoRA step: {args.device} {args.dtype}, base {args.base}, dropout {args.dropout}, hidden {args.hidden}, "
             f"{args.layers} layers, B={args.batch}, S={args.seq}, r={args.rank}", "",
             f"| mode | step ms (median of {args.repeats}) | min ms | saved activations MiB | sites rewritten |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['median_ms']} | {row['min_ms']} | {row['saved_MiB']} | "
                     f"{row['sites'] if row['sites'] is not None else '-'} |")
    by = {row["mode"]: row["median_ms"] for row in rows}
    lines.append("")
    if "peft DoRA + inductor" in by and "runlora DoRA" in by:
        lines.append(f"runlora DoRA speed-up vs peft DoRA + inductor: {by['peft DoRA + inductor'] / by['runlora DoRA']:.3f}x")
    if "peft DoRA eager" in by and "runlora DoRA" in by:
        lines.append(f"runlora DoRA speed-up vs peft DoRA eager: {by['peft DoRA eager'] / by['runlora DoRA']:.3f}x")
    if "runlora LoRA" in by and "runlora DoRA" in by:
        lines.append(f"runlora DoRA / runlora LoRA time: {by['runlora DoRA'] / by['runlora LoRA']:.3f}x")
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(args.device), "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
