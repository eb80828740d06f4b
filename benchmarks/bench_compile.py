"""Compile time to the first training step, cold and warm: plain inductor vs the runlora backend.

    python benchmarks/bench_compile.py                              # 2-layer peft Llama, hidden 256, 2 repeats
    python benchmarks/bench_compile.py --repeats 3 --json out/compile.json --md out/compile.md

Each measurement is a fresh Python process (this script re-runs itself with ``--child``) that
builds the model from a config (random weights, seed 0), then times ``torch.compile(model, ...)``
plus the first forward and backward (``loss.backward()``): that is "time to first step".
Imports and building the model are not counted; the children import a snapshot of runlora_fx
taken at the start. "cold" uses an empty ``TORCHINDUCTOR_CACHE_DIR``;
"warm" is a second process on the directory the cold one filled, as a restarted job sees it.
Per repeat the order is cold inductor, cold runlora, warm inductor, warm runlora, so load from
other processes on a shared machine falls on both modes alike. The child also reports
``counters["aot_autograd"]`` (AOTAutogradCache hit / miss / bypass) and the FX graph cache hits.

Modes: ``inductor`` is ``torch.compile(model)``; ``runlora`` is
``torch.compile(model, backend="runlora")``; ``install`` (not default) is
``runlora_fx.install()`` + ``torch.compile(model)``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

MODES = ("inductor", "runlora", "install")
DEFAULT_MODES = ("inductor", "runlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(mode: str, hidden: int, layers: int, batch: int, seq: int, rank: int) -> dict:
    """One process: build, compile + first step; returns seconds and cache counters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    import runlora_fx

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                      vocab_size=1024)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    installed = runlora_fx.install() if mode == "install" else None
    start = time.perf_counter()
    compiled = torch.compile(model, backend="runlora") if mode == "runlora" else torch.compile(model)
    compiled(input_ids=ids, labels=ids).loss.backward()
    seconds = time.perf_counter() - start
    if installed is not None:
        installed.uninstall()
    return {"mode": mode, "first_step_s": seconds, "aot_autograd": dict(counters["aot_autograd"]),
            "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
            "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0)}


def snapshot_package() -> str:
    """A copy of runlora_fx's sources for the children: the install pass's cache key hashes them,
    so edits to the tree between a cold and a warm child would otherwise miss for that reason."""
    import runlora_fx

    root = tempfile.mkdtemp(prefix="bench_compile_pkg_")
    shutil.copytree(os.path.dirname(runlora_fx.__file__), os.path.join(root, "runlora_fx"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_child(args, mode: str, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join([args.package, os.environ.get("PYTHONPATH", "")])}
    env.pop("RUNLORA_DUMP_DIR", None)
    cmd = [sys.executable, __file__, "--child", mode, "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_state(row: dict) -> str:
    aot = row["aot_autograd"]
    return ", ".join(f"{k.replace('autograd_cache_', '')}={v}" for k, v in sorted(aot.items())
                     if k.startswith("autograd_cache_")) or "-"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.hidden, args.layers, args.batch, args.seq, args.rank)))
        return

    import common

    args.package = snapshot_package()
    rows = []
    for repeat in range(args.repeats):
        dirs = {mode: tempfile.mkdtemp(prefix=f"bench_compile_{mode}_") for mode in args.modes}
        for start in ("cold", "warm"):
            for mode in args.modes:
                row = run_child(args, mode, dirs[mode])
                row.update(start=start, repeat=repeat)
                rows.append(row)
                print(f"repeat {repeat} {start:4s} {mode:8s} {row['first_step_s']:7.2f} s  AOTAutogradCache: "
                      f"{cache_state(row)}", file=sys.stderr)
    summary = []
    for start in ("cold", "warm"):
        for mode in args.modes:
            times = [r["first_step_s"] for r in rows if r["start"] == start and r["mode"] == mode]
            last = [r for r in rows if r["start"] == start and r["mode"] == mode][-1]
            summary.append({"start": start, "mode": mode, "median_s": statistics.median(times),
                            "all_s": ", ".join(f"{t:.1f}" for t in times), "aot_cache": cache_state(last),
                            "fx_hits": last["fxgraph_cache_hit"]})
    columns = [common.Column("start", "start"), common.Column("mode", "mode"),
               common.Column("median_s", "time to first step, median s", "{:.1f}"),
               common.Column("all_s", "each repeat s"), common.Column("aot_cache", "AOTAutogradCache (last repeat)"),
               common.Column("fx_hits", "FX graph cache hits")]
    table = common.markdown_table(summary, columns)
    print(table)
    title = (f"Compile time to first step: {args.layers}-layer peft Llama, hidden {args.hidden}, "
             f"B={args.batch}, S={args.seq}, r={args.rank}")
    common.write_outputs(rows=rows, env=common.environment("cpu"), argv=sys.argv, table=table,
                         json_path=args.json, md_path=args.md, title=title)


if __name__ == "__main__":
    main()
