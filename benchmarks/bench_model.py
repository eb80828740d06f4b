"""LoRA training step (forward, backward, AdamW) of HF models, peft vs the runlora backend.

    python benchmarks/bench_model.py --quick                       # CPU, tiny Llama, ~3 min on 2 cores
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --models tinyllama11 \\
        --batch 8 --seq 1024 --rank 16 --json out/model.json --md out/model.md
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --models llama_60m \\
        --batch 64 --seq 1024 --rank 8 --no-optimizer                # a RunLoRA README row

Models are built from explicit config numbers with random weights (no hub access). peft
LoRA (``target_modules="all-linear"``, dropout 0, alpha = 2r) goes on every linear projection
but the output head. Modes:

    frozen_inductor   the base model alone, all parameters frozen, compiled with inductor;
                      the input embeddings require grad so backward runs through every layer
    peft_eager        the peft model, eager
    peft_inductor     torch.compile(peft model) (inductor)
    runlora           torch.compile(peft model, backend=runlora_fx.make_backend())
    runlora_opaque    the same with lowering="opaque" (the op stays one kernel call)
    runlora_eager     (not default) the pass, then the rewritten graph runs eagerly (inner="eager"):
                      the nearest thing to RunLoRA's own eager module swap
    runlora_roofline  (not default) runlora with criterion="roofline"
    runlora_time      (not default) runlora with criterion="time": plans measured at compile
                      time (the first step's seconds include the measuring; cache as usual)

``--dtype bfloat16`` puts the base in bf16 and keeps the adapters in bf16 (peft's
``autocast_adapter_dtype=False``); ``--fp32-adapters`` gives peft's default fp32 adapters.
Every mode of a model is built, compiled and warmed up first, then the modes are timed
round-robin (repeat k of every mode, then k+1), so load that comes and goes on a shared
machine falls on all modes alike; all of a model's modes stay in memory together.
Columns: median step ms after warm-up; peak memory (the mode's resident memory plus the most
its timed steps allocated on top, as ``torch.cuda.max_memory_allocated`` would show with
that mode alone; '-' on CPU); the first step's seconds (compilation + one step); speedups
vs peft_eager and peft_inductor (their ms ÷ this ms); "x frozen" = this ms ÷ frozen ms; the
LoRA sites the runlora pass rewrote and the plans it chose.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import pathlib
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import runlora_fx  # noqa: E402

DEFAULT_MODES = ["frozen_inductor", "peft_eager", "peft_inductor", "runlora", "runlora_opaque"]
CRITERION_MODES = {"runlora_roofline": "roofline", "runlora_time": "time"}  # runlora, another criterion
ALL_MODES = DEFAULT_MODES + ["runlora_eager", *CRITERION_MODES]
QUICK_MODEL = "llama_tiny"

COLUMNS = [
    common.Column("model", "model"),
    common.Column("mode", "mode"),
    common.Column("ms", "step ms", "{:.1f}"),
    common.Column("peak_gib", "peak GiB", "{:.2f}"),
    common.Column("first_s", "1st step s", "{:.1f}"),
    common.Column("pass_share", "pass % of 1st", "{:.1%}"),
    common.Column("speedup_vs_peft_eager", "vs peft_eager", "{:.2f}x"),
    common.Column("speedup_vs_peft_inductor", "vs peft_inductor", "{:.2f}x"),
    common.Column("x_frozen", "x frozen", "{:.2f}"),
    common.Column("sites", "sites"),
    common.Column("plans", "plans"),
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The numbers that define a model's shape.

    Attributes:
        family: "llama", "roberta" or "opt".
        hidden, intermediate, layers, heads: the usual; ``kv_heads`` for grouped-query attention.
        vocab: vocabulary size.
        embed_proj: OPT's word_embed_proj_dim (project_in/out), else None.
    """

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: Optional[int] = None
    vocab: int = 32000
    embed_proj: Optional[int] = None


MODELS = {
    # RunLoRA paper's Llama configs (their configs/*.json, vocab 32000).
    "llama_60m": ModelSpec("llama", 512, 1376, 8, 8),
    "llama_130m": ModelSpec("llama", 768, 2048, 12, 12),
    "llama_250m": ModelSpec("llama", 768, 2560, 24, 16),
    "llama_350m": ModelSpec("llama", 1024, 2736, 24, 16),
    "llama_1.3b": ModelSpec("llama", 2048, 5461, 24, 32),
    "roberta_base": ModelSpec("roberta", 768, 3072, 12, 12, vocab=50265),
    "roberta_large": ModelSpec("roberta", 1024, 4096, 24, 16, vocab=50265),
    "opt_350m": ModelSpec("opt", 1024, 4096, 24, 16, vocab=50272, embed_proj=512),
    # TinyLlama-1.1B's shape, 11 of its 22 layers (DESIGN.md's measured point).
    "tinyllama11": ModelSpec("llama", 2048, 5632, 11, 32, kv_heads=4),
    # --quick: small enough for a CPU.
    "llama_tiny": ModelSpec("llama", 256, 688, 2, 4, vocab=1024),
}


def model_name(name: str) -> str:
    """Accepts HF-style spellings too: ``roberta-base`` -> ``roberta_base``."""
    key = name.replace("-", "_")
    if key not in MODELS:
        raise SystemExit(f"bench_model: unknown model {name!r}; known: {sorted(MODELS)}")
    return key


def build_base(spec: ModelSpec, *, layers: Optional[int], seq: int, dtype: torch.dtype, device: str):
    """The HF model with random weights (seed 0), in ``dtype`` on ``device``, in train mode."""
    from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, RobertaConfig,
                              RobertaForMaskedLM)

    n_layers = layers or spec.layers
    common_kw = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=n_layers,
                     num_attention_heads=spec.heads, use_cache=False)
    if spec.family == "llama":
        config = LlamaConfig(intermediate_size=spec.intermediate, num_key_value_heads=spec.kv_heads or spec.heads,
                             max_position_embeddings=max(seq, 2048), **common_kw)
        cls = LlamaForCausalLM
    elif spec.family == "roberta":
        config = RobertaConfig(intermediate_size=spec.intermediate, max_position_embeddings=max(seq + 2, 514),
                               **common_kw)
        cls = RobertaForMaskedLM
    elif spec.family == "opt":
        config = OPTConfig(ffn_dim=spec.intermediate, word_embed_proj_dim=spec.embed_proj,
                           max_position_embeddings=max(seq, 2048), **common_kw)
        cls = OPTForCausalLM
    else:
        raise ValueError(f"bench_model: unknown family {spec.family!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).train()


def quantize_base(model, quant_type: str, dtype: torch.dtype, device: str, source_dtype: torch.dtype = torch.float32):
    """QLoRA base: every nn.Linear but the output head becomes a bitsandbytes Linear4bit
    (double quantization on, computing in ``dtype``), holding the same weights quantized from
    ``source_dtype`` (the dtype its dequantization gives back)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type=quant_type, device=device)
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", source_dtype), requires_grad=False,
                                             quant_type=quant_type)._quantize(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=child.bias.requires_grad)
                setattr(module, child_name, q)
    return model


def add_lora(model, *, rank: int, fp32_adapters: bool):
    """peft LoRA on all linear layers but the head; adapters in the base dtype unless fp32_adapters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)


def make_batch(spec: ModelSpec, *, batch: int, seq: int, device: str) -> dict:
    """Random token ids; labels = ids (causal LM loss, or MLM loss over every token)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def frozen_batch(model, batch: dict) -> dict:
    """Input embeddings as a leaf that requires grad, so backward runs through every layer."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
    return {"inputs_embeds": embeds.requires_grad_(True), "labels": batch["labels"]}


def compile_model(model, mode: str, *, inner: str, allow_merged: Optional[bool], rewrite_4bit: Optional[bool] = None):
    """Wraps the model for ``mode``; returns (callable model, runlora backend or None)."""
    if mode == "peft_eager":
        return model, None
    if mode in ("peft_inductor", "frozen_inductor"):
        return torch.compile(model, backend=inner), None
    lowering = "opaque" if mode == "runlora_opaque" else "aten"
    inner = "eager" if mode == "runlora_eager" else inner
    backend = runlora_fx.make_backend(inner=inner, lowering=lowering, allow_merged=allow_merged,
                                      criterion=CRITERION_MODES.get(mode, "flops"), rewrite_4bit=rewrite_4bit)
    return torch.compile(model, backend=backend), backend


def make_step(model, batch: dict, optimizer, grads_of: Sequence[torch.Tensor]):
    """One training step: forward with the loss, backward, optimizer step (if any).

    The grads of ``grads_of`` are dropped after each step, so no step accumulates.
    """
    def step():
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for t in grads_of:
            t.grad = None
        return loss
    return step


def site_summary(backend) -> tuple:
    """(rewritten sites, "forward/backward: count" text) over every graph the backend saw."""
    if backend is None:
        return None, None
    counts: dict = {}
    for report in backend.reports:
        for key, value in report.plan_counts().items():
            counts[key] = counts.get(key, 0) + value
    text = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items())) or "none"
    return sum(counts.values()), text


def _free(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Prepared:
    """One mode built, compiled and warmed up, ready to be timed.

    Attributes:
        step: one training step (forward, backward, optimizer).
        first_s: the first step's seconds (compilation + one step).
        resident_gib: CUDA memory this mode holds between steps (model, optimizer state), GiB;
            None on the CPU.
        row: the row's fields known before timing.
        keep: what must stay alive while the step is timed.
    """

    step: object
    first_s: float
    resident_gib: Optional[float]
    row: dict
    keep: tuple


def model_spec(name: str, args: argparse.Namespace) -> ModelSpec:
    """The table's spec, with ``--vocab`` applied (a 32000-wide head can dominate a small CPU step)."""
    spec = MODELS[name]
    return dataclasses.replace(spec, vocab=args.vocab) if getattr(args, "vocab", None) else spec


def prepare_mode(name: str, mode: str, args: argparse.Namespace) -> Prepared:
    """Builds the model for one mode, compiles it and warms it up (nothing timed yet)."""
    spec, dtype = model_spec(name, args), common.DTYPES[args.dtype]
    gc.collect()
    before = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else None  # other modes, leftovers
    model = build_base(spec, layers=args.layers, seq=args.seq, dtype=dtype, device=args.device)
    if args.qlora:
        model = quantize_base(model, args.qlora, dtype, args.device)
    batch = make_batch(spec, batch=args.batch, seq=args.seq, device=args.device)
    if mode == "frozen_inductor":
        model.requires_grad_(False)
        batch = frozen_batch(model, batch)
    else:
        model = add_lora(model, rank=args.rank, fp32_adapters=args.fp32_adapters)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable and not args.no_optimizer else None
    compiled, backend = compile_model(model, mode, inner=args.inner, allow_merged=args.allow_merged,
                                      rewrite_4bit=args.rewrite_4bit)
    leaves = trainable + ([batch["inputs_embeds"]] if "inputs_embeds" in batch else [])
    step = make_step(compiled, batch, optimizer, leaves)
    first_s = common.warm_up(step, device=args.device, warmup=args.warmup)
    resident = torch.cuda.memory_allocated() / 2**30 - before if args.device == "cuda" else None
    sites, plans = site_summary(backend)
    pass_s = sum(r.pass_seconds for r in backend.reports) if backend is not None else None
    row = {
        "model": name, "layers": args.layers or spec.layers, "mode": mode, "batch": args.batch, "seq": args.seq,
        "rank": args.rank, "dtype": args.dtype, "qlora": args.qlora, "adapters": "fp32" if args.fp32_adapters else args.dtype,
        "optimizer": optimizer is not None, "trainable_params": sum(p.numel() for p in trainable),
        "first_s": first_s, "allocated_before_gib": before, "resident_gib": resident, "sites": sites, "plans": plans,
        "pass_s": pass_s, "pass_share": None if pass_s is None else pass_s / first_s,
    }
    return Prepared(step, first_s, resident, row, (compiled, model, optimizer, batch, backend))


def time_round_robin(prepared: dict, args: argparse.Namespace) -> dict:
    """Times every prepared mode in turn, ``args.repeats`` rounds: repeat k of each mode, then
    k+1, so load that comes and goes on a shared machine falls on every mode alike.

    Returns:
        mode -> (step milliseconds, peak GiB or None). On CUDA the peak is the mode's resident
        memory plus the most any of its steps allocated on top of what was held before it,
        i.e. what ``max_memory_allocated`` would show with this mode alone on the device.
    """
    times = {mode: [] for mode in prepared}
    extra = {mode: 0.0 for mode in prepared}
    for _ in range(args.repeats):
        for mode, p in prepared.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            times[mode].append(common.time_once(p.step, device=args.device))
            if args.device == "cuda":
                extra[mode] = max(extra[mode], (torch.cuda.max_memory_allocated() - held) / 2**30)
    peaks = {mode: None if p.resident_gib is None else p.resident_gib + extra[mode] for mode, p in prepared.items()}
    return {mode: (times[mode], peaks[mode]) for mode in prepared}


def run_model(name: str, args: argparse.Namespace) -> list:
    """Every mode of one model: compiled and warmed up one after another, then timed round-robin."""
    _free(args.device)
    prepared = {}
    # Every mode's model stays compiled at once: give Dynamo room for one cache entry per mode.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 4 * len(args.modes))):
        for mode in args.modes:
            prepared[mode] = prepare_mode(name, mode, args)
            print(f"# {name} {mode}: compiled, first step {prepared[mode].first_s:.1f} s", file=sys.stderr, flush=True)
        measured = time_round_robin(prepared, args)
    rows = []
    for mode, p in prepared.items():
        times, peak = measured[mode]
        timing = common.Timing(p.first_s, times)
        rows.append({**p.row, "ms": timing.median_ms, "min_ms": timing.min_ms, "times_ms": timing.times_ms,
                     "peak_gib": peak})
        print(f"# {name} {mode}: {timing.median_ms:.1f} ms", file=sys.stderr, flush=True)
    del prepared, p
    _free(args.device)
    return rows


def add_ratios(rows: Sequence[dict]) -> None:
    """Speedups vs peft_eager / peft_inductor and the ratio to frozen, per model, in place."""
    by_model: dict = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    for row in rows:
        ref = by_model[row["model"]]
        for base in ("peft_eager", "peft_inductor"):
            row[f"speedup_vs_{base}"] = common.ratio(ref[base]["ms"], row["ms"]) if base in ref else None
        row["x_frozen"] = common.ratio(row["ms"], ref["frozen_inductor"]["ms"]) if "frozen_inductor" in ref else None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help=f"comma-separated, of: {','.join(MODELS)} (default tinyllama11)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of: {','.join(ALL_MODES)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    parser.add_argument("--fp32-adapters", action="store_true", help="peft's default fp32 adapters on a bf16 base")
    parser.add_argument("--qlora", choices=["nf4", "fp4"], help="4-bit bitsandbytes base (QLoRA)")
    parser.add_argument("--allow-merged", action="store_true", help="runlora modes: allow merged plans in bf16")
    parser.add_argument("--rewrite-4bit", action="store_const", const=True, default=None,
                        help="runlora modes: rewrite 4-bit sites on CUDA too (default: only off CUDA)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8; 2 with --quick)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 1024; 128 with --quick)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, help="override the model's layer count")
    parser.add_argument("--vocab", type=int, help="override the model's vocabulary (the LM head's width)")
    parser.add_argument("--no-optimizer", action="store_true", help="forward + backward only (RunLoRA's F-B loop)")
    parser.add_argument("--quick", action="store_true", help=f"CPU smoke size: {QUICK_MODEL}, B=2, S=128")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor",
                        help="compiler behind the compiled modes (aot_eager: smoke tests only)")
    parser.add_argument("--warmup", type=int, help="untimed steps incl. the first (default 3; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 10; 3 with --quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--json", help="write rows and environment here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    args.models = [model_name(m) for m in (args.models or (QUICK_MODEL if args.quick else "tinyllama11")).split(",")]
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {ALL_MODES}")
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (128 if args.quick else 1024)
    args.warmup = args.warmup or (2 if args.quick else 3)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.allow_merged = True if args.allow_merged else None
    return args


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Runs the benchmark; returns the rows (also printed as a markdown table)."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_model: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(args.device)
    title = (f"LoRA training step, B={args.batch} S={args.seq} r={args.rank} {args.dtype}"
             f" ({'fp32' if args.fp32_adapters else args.dtype} adapters)"
             + (f", QLoRA {args.qlora} base (bitsandbytes)" if args.qlora else ""))
    command = ["benchmarks/bench_model.py"] + list(sys.argv[1:] if argv is None else argv)
    rows: list = []
    for name in args.models:
        rows += run_model(name, args)
        add_ratios(rows)  # written after every model: a run cut short keeps what it measured
        table = common.markdown_table(rows, COLUMNS)
        common.write_outputs(rows=rows, env=env, argv=command, table=table, json_path=args.json,
                             md_path=args.md, title=title)
    print(table)
    return rows


if __name__ == "__main__":
    main()
