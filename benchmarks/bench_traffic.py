"""Step-cost counter: kernels, bytes and FLOPs of a compiled LoRA training step, without a GPU.

    python benchmarks/bench_traffic.py                      # TinyLlama shape, 1 layer, B=8 S=1024 bf16 (~6 min)
    python benchmarks/bench_traffic.py --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --layers 1 --seq 32 --batch 4 --vocab 128 --rank 4 --dtype float32   # seconds

Each mode compiles one training step (forward with the loss, backward; no optimizer) of a
Llama built from config numbers with random weights, on the CPU, with inductor. The counter
reads inductor's post-grad FX graphs (``torch._inductor.config.post_grad_custom_post_pass``:
the forward and backward graphs after partitioning and inductor's own graph passes, just
before lowering) and prices them with a GPU-like fusion model:

    extern kernels    mm, addmm, bmm, baddbmm, attention (sdpa) and custom ops (runlora.*):
                      one launch each; bytes = every tensor input + every output; FLOPs 2mkn
                      (attention 4·b·h·s_q·s_k·d forward, 10·... backward)
    views             view, reshape, permute, expand, slice, getitem, ...: free
    fused kernels     every other tensor op joins a producer's kernel unless that would
                      create a cycle through an extern kernel (inductor's vertical fusion);
                      one launch per kernel; bytes = the distinct tensors it reads from
                      outside + the tensors it writes that are used outside (or returned)
    opaque runlora op its plan's kernels (``choose/roofline.py``'s kernel lists)

and estimates the H200 step from them (the roofline's H200 entry: each kernel takes
max(FLOPs ÷ peak, bytes ÷ bandwidth) + a launch). "lora" columns = mode − frozen_inductor.

Shapes: the step is compiled at the real shape and never run (the compiled graphs raise
instead of running; the backward is compiled eagerly, ``torch._functorch.config.
force_non_lazy_backward_lowering``), so a TinyLlama-shaped layer at B=8, S=1024 costs only its
compilation on a CPU, and the runlora pass chooses plans at the real token count. The
vocabulary defaults to 1024: the head is frozen and the same in every mode, so it only moves
the frozen base's totals. Every mode (not only frozen_inductor, as in ``bench_model.py``) takes
input embeddings that need grad, so layer 0 computes dX like any other layer and the LoRA
columns are per-layer figures that hold for a model of any depth. Counts are per compiled
step (``fullgraph=True``: one forward and one backward graph); the per-layer part scales with
``--layers``. "fwd out" is what the forward graphs return besides their inputs (the saved
activations, plus the loss and logits); "saved o×i" counts those shaped like a site's weight.
``--merged-forward-cse`` puts back the lowering before merged dX was recomputed (BENCHMARKS.md,
"Merged plans: memory").

``--fused`` adds an analytic table (no compile): what LoRA adds per layer, in bytes and
launches, under forward1/backward1, forward2/backward5 and the fused pair (Triton kernels,
``ops/fused.py``, which run only on CUDA and so cannot be compiled here), each site priced as the
roofline's kernel list for its plans (``choose/roofline.py``; X·Aᵀ kept for dB where the
lowered chain keeps it), minus the frozen layer's two GEMMs; beside the counted peft + inductor
row of the same run, when ``--modes`` counted it with frozen_inductor (``--modes ""``: the
analytic table alone, seconds).

Limits: CPU inductor, not Triton; the post-grad graph is device-independent up to CPU vs CUDA
decompositions (CPU attention is ``_scaled_dot_product_flash_attention_for_cpu``, counted as
flash attention), but CPU fusion differs, so fusion is modelled, not read from the CPU
scheduler (its C++ kernel count is printed for reference, ``cpp kernels``). The model fuses
greedily along producer edges only (no horizontal fusion of siblings, no split reductions, no
epilogue fusion into GEMMs); pointwise FLOPs are not counted; bytes assume every kernel reads
and writes each tensor once (no cache reuse).
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import pathlib
import sys
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch._inductor import config as inductor_config
from torch._inductor import metrics as inductor_metrics
from torch._inductor.custom_graph_pass import CustomGraphPass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_model  # noqa: E402
import common  # noqa: E402

import runlora_fx  # noqa: E402
from runlora_fx import options  # noqa: E402
from runlora_fx._compat import size_hint  # noqa: E402
from runlora_fx.choose.lora_product import keeps_lora_product  # noqa: E402
from runlora_fx.choose.roofline import DEVICE_MODELS, KERNELS, Layout, backward_kernels, forward_kernels  # noqa: E402
from runlora_fx.choose.roofline import has_bias as sym_has_bias  # noqa: E402
from runlora_fx.plans import Needs, resolve_plan  # noqa: E402
from runlora_fx.plans.catalogue import i as sym_i, n as sym_n, o as sym_o, r as sym_r  # noqa: E402

__all__ = ["StepCost", "count_graph", "fused_rows", "main"]

aten = torch.ops.aten

# mode -> make_backend settings (None: not runlora). Modes of bench_model.py that run no
# compiled graph (peft_eager, runlora_eager) or measure on the device (runlora_time) are absent.
# The H200 figures the ranking check compares with were measured before sibling grouping
# existed, so the runlora modes keep it off; runlora_grouped is today's default pass.
_UNGROUPED = {"group_siblings": False}
MODES = {
    "frozen_inductor": None,
    "peft_inductor": None,
    "runlora": {**_UNGROUPED},
    "runlora_opaque": {"lowering": "opaque", **_UNGROUPED},
    "runlora_merged": {"allow_merged": True, **_UNGROUPED},
    "runlora_roofline": {"criterion": "roofline", "device_model": "H200", **_UNGROUPED},
    "runlora_roofline_merged": {"criterion": "roofline", "device_model": "H200", "allow_merged": True, **_UNGROUPED},
    "runlora_grouped": {},
    "runlora_grouped_merged": {"allow_merged": True},
    # what a CUDA user gets from backend="runlora" (options' CUDA defaults; the counter runs on a CPU)
    "cuda_default": {"criterion": options.default_criterion("cuda"), "device_model": "H200"},
}
DEFAULT_MODES = ["frozen_inductor", "peft_inductor", "runlora", "runlora_merged", "runlora_roofline_merged"]
# H200, bf16, TinyLlama shape, 11 layers, B=8 S=1024, r=16 (BENCHMARKS.md), fastest first;
# peft_inductor and runlora measured within 0.1 ms (57.9 vs 58.0), so they tie.
MEASURED_ORDER = [["frozen_inductor"], ["runlora_roofline_merged"], ["runlora_merged"], ["peft_inductor", "runlora"]]

_VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.expand.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.as_strided.default, aten.alias.default,
    aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.view_as.default,
    aten.unflatten.int, aten.flatten.using_ints, aten.diagonal.default, operator.getitem,
}
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


@dataclasses.dataclass
class StepCost:
    """What one compiled step issues, summed over its graphs.

    Attributes:
        kernels: launches (extern + fused).
        gemms: extern GEMM/attention/custom-op launches among them.
        bytes: bytes read + written.
        flops: GEMM and attention FLOPs.
        est_s: H200 roofline estimate, seconds (sum over kernels of max(flops/peak, bytes/bw) + launch).
        fwd_out_bytes: bytes the forward graphs return that are not their inputs: activations
            saved for backward plus the user outputs (loss, logits).
        saved_weight_like: how many of those saved tensors have a site's weight shape (o×i or i×o).
        cpp_kernels: the C++ kernels CPU inductor generated (reference only).
    """

    kernels: int = 0
    gemms: int = 0
    bytes: int = 0
    flops: int = 0
    est_s: float = 0.0
    fwd_out_bytes: int = 0
    saved_weight_like: int = 0
    cpp_kernels: int = 0


def _value(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _nbytes(val) -> int:
    if isinstance(val, torch.Tensor):
        numel = 1
        for d in val.shape:
            numel *= size_hint(d)
        return numel * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return 0


def _shape(val) -> tuple:
    return tuple(size_hint(d) for d in val.shape)


def _is_tensor_node(node) -> bool:
    val = _value(node)
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and any(
        isinstance(v, torch.Tensor) for v in val))


def _is_extern(node: fx.Node) -> bool:
    if node.target in _GEMMS:
        return True
    name = str(node.target)
    return "scaled_dot_product" in name or "flash_attention" in name or "runlora" in name or "bitsandbytes" in name


def _gemm_flops(node: fx.Node) -> int:
    args = [_value(a) for a in node.args if isinstance(a, fx.Node)]
    if node.target in (aten.mm.default, aten.addmm.default):
        a, b = args[-2:]
        m, k = _shape(a)
        return 2 * m * k * _shape(b)[1]
    if node.target in (aten.bmm.default, aten.baddbmm.default):
        a, b = args[-2:]
        bs, m, k = _shape(a)
        return 2 * bs * m * k * _shape(b)[2]
    name = str(node.target)
    if "scaled_dot_product" in name or "flash_attention" in name:
        backward = "backward" in name  # forward (q, k, v, ...); backward (grad_out, q, k, v, ...)
        (b, h, s_q, d), s_k = _shape(args[int(backward)]), _shape(args[1 + int(backward)])[2]
        # forward: Q·Kᵀ and P·V; backward: Q·Kᵀ again, dV, dP, dQ, dK (FlashAttention's five)
        return (10 if backward else 4) * b * h * s_q * s_k * d
    return 0


def _opaque_runlora_kernels(node: fx.Node) -> Optional[list]:
    """(flops, bytes) of each kernel an opaque runlora.lora_linear(_backward) call runs."""
    name = str(node.target)
    if name not in ("runlora.lora_linear.default", "runlora.lora_linear_backward.default"):
        return None  # other runlora ops (4-bit, groups) count as one extern call, FLOPs not known
    bound = {}
    for index, arg in enumerate(node.target._schema.arguments):
        value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
        bound[arg.name] = _value(value) if isinstance(value, fx.Node) else value
    backward = "backward" in name
    x, weight, lora_A = bound["x"], bound["weight"], bound["lora_A"]
    plan_name = bound["backward_plan" if backward else "forward_plan"]
    needs = Needs(*bound["needs"]) if backward else None
    o_, i_ = _shape(weight)
    n_ = _nbytes(x) // (x.element_size() * i_)
    r_ = _shape(lora_A)[0]
    layout = Layout(dtype=x.dtype, adapter_dtype=lora_A.dtype if lora_A.dtype != x.dtype else None,
                    bias=not backward and bound["bias"] is not None)
    plan = resolve_plan(plan_name, n_, "backward" if backward else "forward").name
    kernels = backward_kernels(plan, needs, layout) if backward else forward_kernels(plan, layout)
    subs = {sym_n: n_, sym_i: i_, sym_o: o_, sym_r: r_, **layout.element_sizes()}
    return [(int(k.flops.subs(subs)), int(k.bytes.subs(subs)), k.dtype) for k in kernels]


def count_graph(graph: fx.Graph, *, dtype: torch.dtype, device: str = "H200", trace: Optional[list] = None) -> StepCost:
    """Prices one post-grad graph with the fusion model of the module docstring.

    Args:
        graph: a post-grad (ATen) graph whose nodes carry ``meta["val"]``.
        dtype: the matmul dtype whose peak rate the estimate uses.
        device: a ``choose.roofline.DEVICE_MODELS`` key.
        trace: if a list, one (kind, what, flops, bytes) entry per kernel is appended.
    """
    model = DEVICE_MODELS[device]
    peak, bandwidth = model.peak(dtype), model.bandwidth
    cost = StepCost()

    def add_kernel(flops: int, nbytes: int, extern: bool, what: str = "") -> None:
        if trace is not None:
            trace.append(("extern" if extern else "fused", what, flops, nbytes))
        cost.kernels += 1
        cost.gemms += int(extern)
        cost.bytes += nbytes
        cost.flops += flops
        cost.est_s += max(flops / peak, nbytes / bandwidth) + model.launch_s

    base: dict = {}          # node -> the node whose storage it views
    group: dict = {}         # compute node -> fused kernel id
    all_deps: dict = {}      # node -> kernel ids it depends on
    ext_deps: dict = {}      # node -> kernel ids it depends on through an extern kernel
    members: dict = {}       # kernel id -> nodes
    for node in graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        deps = set().union(*(all_deps.get(a, ()) for a in inputs)) if inputs else set()
        ext = set().union(*(ext_deps.get(a, ()) for a in inputs)) if inputs else set()
        if node.op != "call_function" or not _is_tensor_node(node):
            base[node] = node
            all_deps[node], ext_deps[node] = deps, ext
            continue
        if node.target in _VIEWS:
            base[node] = base.get(node.args[0], node.args[0]) if isinstance(node.args[0], fx.Node) else node
            all_deps[node], ext_deps[node] = deps, ext
            continue
        base[node] = node
        if _is_extern(node):
            all_deps[node], ext_deps[node] = deps, deps
            opaque = _opaque_runlora_kernels(node)
            if opaque is not None:
                for flops, nbytes, _ in opaque:
                    add_kernel(flops, nbytes, True, str(node.target))
                continue
            nbytes = sum(_nbytes(_value(a)) for a in inputs) + _nbytes(_value(node))
            add_kernel(_gemm_flops(node), nbytes, True, f"{node.name}: {node.target}")
            continue
        candidates = [group[base[a]] for a in inputs if base.get(a) in group and group[base[a]] not in ext]
        gid = max(candidates) if candidates else len(members)
        members.setdefault(gid, []).append(node)
        group[node] = gid
        all_deps[node], ext_deps[node] = deps | {gid}, ext

    for gid, nodes in members.items():
        inside = set(nodes)
        reads = {base[a] for n in nodes for a in n.all_input_nodes
                 if base[a] not in inside and _is_tensor_node(base[a])}
        writes = [n for n in nodes if any(u not in inside for u in n.users)]
        nbytes = sum(_nbytes(_value(a)) for a in reads) + sum(_nbytes(_value(n)) for n in writes)
        add_kernel(0, nbytes, False, " ".join(n.name for n in nodes))
    return cost


def _forward_outputs(graph: fx.Graph, weight_shapes: set) -> tuple[int, int]:
    """(bytes, weight-shaped count) of the non-input tensors a forward graph returns."""
    (output,) = [n for n in graph.nodes if n.op == "output"]
    nbytes = count = 0
    for arg in output.args[0]:
        if isinstance(arg, fx.Node) and arg.op != "placeholder" and isinstance(_value(arg), torch.Tensor):
            nbytes += _nbytes(_value(arg))
            count += _shape(_value(arg)) in weight_shapes
    return nbytes, count


class _Recorder(CustomGraphPass):
    """Collects every post-grad graph inductor compiles (the graph is read, never changed)."""

    def __init__(self):
        self.graphs: list = []

    def __call__(self, graph: fx.Graph) -> None:
        is_backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        self.graphs.append((is_backward, graph))

    def uuid(self):
        return None  # never cached: the counter must see every graph


class _Compiled(Exception):
    """Raised in place of running a compiled graph: the counter needs the graphs, not the step."""


def _compile_only(backend):
    """Wraps a Dynamo backend: compiles the graph (forward and, eagerly, backward), then
    returns a callable that raises ``_Compiled`` instead of running it."""
    def compile_and_stop(gm, example_inputs):
        backend(gm, example_inputs)

        def stop(*_args):
            raise _Compiled
        return stop
    return compile_and_stop


def count_mode(mode: str, args: argparse.Namespace) -> dict:
    """Compiles one mode's step (without running it) and counts its post-grad graphs."""
    from torch._inductor.compile_fx import compile_fx

    spec = bench_model.ModelSpec("llama", args.hidden, args.intermediate, args.layers, args.heads,
                                 kv_heads=args.kv_heads, vocab=args.vocab)
    dtype = common.DTYPES[args.dtype]
    torch._dynamo.reset()
    model = bench_model.build_base(spec, layers=args.layers, seq=args.seq, dtype=dtype, device="cpu")
    # Every mode takes input embeddings that need grad, so layer 0 computes dX as every later
    # layer does: "lora" columns are then what LoRA adds to any layer, layer 0 included.
    batch = bench_model.frozen_batch(model, bench_model.make_batch(spec, batch=args.batch, seq=args.seq, device="cpu"))
    model.requires_grad_(False)
    if mode != "frozen_inductor":
        model = bench_model.add_lora(model, rank=args.rank, fp32_adapters=False)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    settings = MODES[mode]
    runlora_backend = None if settings is None else runlora_fx.make_backend(**settings)
    compiled = torch.compile(model, backend=_compile_only(runlora_backend or compile_fx), fullgraph=True)
    recorder = _Recorder()
    inductor_metrics.reset()
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), \
            inductor_config.patch(post_grad_custom_post_pass=recorder, fx_graph_cache=False):
        try:
            compiled(**batch)
        except _Compiled:
            pass
        else:
            raise RuntimeError(f"bench_traffic: {mode}: nothing was compiled")
    total = StepCost(cpp_kernels=inductor_metrics.generated_kernel_count)
    for is_backward, graph in recorder.graphs:
        cost = count_graph(graph, dtype=dtype)
        for field in ("kernels", "gemms", "bytes", "flops", "est_s"):
            setattr(total, field, getattr(total, field) + getattr(cost, field))
        if not is_backward:
            nbytes, count = _forward_outputs(graph, weight_shapes)
            total.fwd_out_bytes += nbytes
            total.saved_weight_like += count
    if sum(is_backward for is_backward, _ in recorder.graphs) != 1:
        raise RuntimeError(f"bench_traffic: {mode}: expected one forward and one backward graph, "
                           f"got {[('backward' if b else 'forward') for b, _ in recorder.graphs]}")
    sites = None
    if runlora_backend is not None:
        sites = ", ".join(f"{k}: {v}" for k, v in sorted(_plan_counts(runlora_backend).items()))
    row = {"mode": mode, "graphs": len(recorder.graphs), "plans": sites, **dataclasses.asdict(total)}
    del compiled, model, batch
    torch._dynamo.reset()
    return row


def _plan_counts(backend) -> dict:
    counts: dict = {}
    for report in backend.reports:
        for key, value in report.plan_counts().items():
            counts[key] = counts.get(key, 0) + value
    return counts


def add_lora_columns(rows: Sequence[dict]) -> None:
    """``lora_*`` = this mode − frozen_inductor, in place (None without a frozen row)."""
    frozen = next((r for r in rows if r["mode"] == "frozen_inductor"), None)
    for row in rows:
        for key in ("kernels", "bytes", "flops", "est_s", "fwd_out_bytes"):
            row[f"lora_{key}"] = None if frozen is None else row[key] - frozen[key]
        row["est_ms"] = row["est_s"] * 1e3
        row["lora_est_ms"] = None if frozen is None else row["lora_est_s"] * 1e3
        for key in ("bytes", "lora_bytes", "fwd_out_bytes", "lora_fwd_out_bytes"):
            row[key.replace("bytes", "gib")] = None if row[key] is None else row[key] / 2**30
        for key in ("flops", "lora_flops"):
            row[key.replace("flops", "gflop")] = None if row[key] is None else row[key] / 1e9


def ranking_check(rows: Sequence[dict]) -> tuple[bool, str]:
    """Whether the estimate orders the modes as the H200 measured them (MEASURED_ORDER):
    each tier strictly faster than the next; modes within a tier are not ordered."""
    est = {r["mode"]: r["est_s"] for r in rows}
    tiers = [[m for m in tier if m in est] for tier in MEASURED_ORDER]
    tiers = [t for t in tiers if t]
    ok = all(max(est[m] for m in a) < min(est[m] for m in b) for a, b in zip(tiers, tiers[1:]))
    ranked = " < ".join(f"{m} {est[m] * 1e3:.2f}" for m in sorted(est, key=est.get))
    measured = " < ".join("{" + ", ".join(t) + "}" if len(t) > 1 else t[0] for t in tiers)
    verdict = ("PASS" if ok else "FAIL") if len(tiers) >= 2 else "n/a: fewer than two measured tiers counted"
    return ok, f"ranking check ({verdict}): estimated ms {ranked}; H200 measured {measured}"


COLUMNS = [
    common.Column("mode", "mode"),
    common.Column("kernels", "kernels"),
    common.Column("lora_kernels", "LoRA +kernels"),
    common.Column("gib", "GiB moved", "{:.2f}"),
    common.Column("lora_gib", "LoRA +GiB", "{:.3f}"),
    common.Column("gflop", "GFLOP", "{:.0f}"),
    common.Column("lora_gflop", "LoRA +GFLOP", "{:.1f}"),
    common.Column("est_ms", "est. H200 ms", "{:.2f}"),
    common.Column("lora_est_ms", "LoRA +ms", "{:.3f}"),
    common.Column("fwd_out_gib", "fwd out GiB", "{:.3f}"),
    common.Column("saved_weight_like", "saved o×i"),
    common.Column("cpp_kernels", "cpp kernels"),
    common.Column("plans", "plans"),
]


# --- the fused plan, analytically ------------------------------------------------------------
FUSED_PAIRS = [("forward1", "backward1"), ("forward2", "backward5"), ("fused", "fused")]


def layer_sites(args: argparse.Namespace) -> dict:
    """{site: (in, out)} of one Llama decoder layer with the counter's sizes."""
    h, inter = args.hidden, args.intermediate
    kv = args.kv_heads * (h // args.heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def fused_rows(args: argparse.Namespace, counted: Sequence[dict] = ()) -> list:
    """Per plan pair: bytes and launches LoRA adds to one layer (every site needs dX, dA, dB), analytic.

    A site costs its plans' roofline kernels (``forward_kernels`` + ``backward_kernels``, X·Aᵀ kept
    where ``keeps_lora_product`` keeps it) minus the frozen layer's Y = X·Wᵀ and dX = dY·W.
    ``counted``: this run's rows; with frozen_inductor and peft_inductor among them, each pair's
    ratio to what peft + inductor adds per layer (counted from its compiled graphs).
    """
    dtype = common.DTYPES[args.dtype]
    layout = Layout(dtype=dtype)
    n = args.batch * args.seq
    rows = []
    for fwd, bwd in FUSED_PAIRS:
        total_bytes = total_kernels = 0
        per_site = {}
        for name, (i_, o_) in layer_sites(args).items():
            subs = {sym_n: n, sym_i: i_, sym_o: o_, sym_r: args.rank, sym_has_bias: 0, **layout.element_sizes()}
            keep = keeps_lora_product(fwd, bwd, Needs(), n, i_, args.rank, dtype=dtype).keep
            kernels = forward_kernels(fwd, layout) + backward_kernels(bwd, Needs(), layout, keeps_lora_product=keep)
            frozen = [KERNELS["Y0 = X·Wᵀ + b"], KERNELS["dX = G·W"]]
            added = sum(int(k.bytes.xreplace(subs)) for k in kernels) - sum(int(k.bytes.xreplace(subs)) for k in frozen)
            per_site[name] = added
            total_bytes += added
            total_kernels += len(kernels) - len(frozen)
        rows.append({"pair": f"{fwd}/{bwd}", "lora_bytes": total_bytes, "lora_kernels": total_kernels,
                     "q_proj_bytes": per_site["q_proj"]})
    by_mode = {r["mode"]: r for r in counted}
    peft = by_mode.get("peft_inductor") if "frozen_inductor" in by_mode else None
    layers = max(args.layers, 1)  # the counted rows are per step: every layer's sites
    peft_bytes, peft_kernels = (None, None) if peft is None else (peft["lora_bytes"] / layers,
                                                                  peft["lora_kernels"] / layers)
    for row in rows:
        row["lora_mib"] = row["lora_bytes"] / 2**20
        row["q_proj_mib"] = row["q_proj_bytes"] / 2**20
        row["vs_peft_bytes"] = None if peft is None else row["lora_bytes"] / peft_bytes
        row["vs_peft_kernels"] = None if peft is None else row["lora_kernels"] / peft_kernels
    if peft is not None:
        rows.append({"pair": "peft + inductor (counted)", "lora_bytes": peft_bytes, "lora_mib": peft_bytes / 2**20,
                     "lora_kernels": peft_kernels, "q_proj_mib": None, "vs_peft_bytes": 1.0, "vs_peft_kernels": 1.0})
    return rows


FUSED_COLUMNS = [
    common.Column("pair", "plan pair (per layer, analytic)"),
    common.Column("lora_mib", "LoRA +MiB", "{:.1f}"),
    common.Column("lora_kernels", "LoRA +kernels", "{:g}"),
    common.Column("q_proj_mib", "q_proj +MiB", "{:.1f}"),
    common.Column("vs_peft_bytes", "÷ peft+inductor bytes", "{:.3f}"),
    common.Column("vs_peft_kernels", "÷ peft+inductor kernels", "{:.3f}"),
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of: {','.join(MODES)}")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (static)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--merged-forward-cse", action="store_true",
                        help="reproduce the lowering before merged dX was recomputed (BENCHMARKS.md, "
                             "'Merged plans: memory'): backward4/5 form W + sBA as the forward does")
    parser.add_argument("--fused", action="store_true",
                        help="also print the analytic per-layer table of forward1/backward1, forward2/backward5 and "
                             "the fused pair, beside peft + inductor when counted")
    parser.add_argument("--json", help="write rows and environment here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {list(MODES)}")
    return args


def _same_spelling_as_forward(grad_y, weight, lora_A, lora_B, scaling):
    g = grad_y if grad_y.dtype == weight.dtype else grad_y.to(weight.dtype)
    return torch.mm(g, torch.addmm(weight, lora_B, lora_A, alpha=scaling))


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Counts every mode; returns the rows (also printed, with the ranking check)."""
    args = parse_args(argv)
    if args.merged_forward_cse:
        import runlora_fx.passes.lower as lower
        lower._merged_grad_x = _same_spelling_as_forward
    env = common.environment("cpu")
    title = (f"Step-cost counter, Llama hidden {args.hidden} inter {args.intermediate}, {args.layers} layer(s), "
             f"B={args.batch} S={args.seq} r={args.rank} {args.dtype}")
    command = ["benchmarks/bench_traffic.py"] + list(sys.argv[1:] if argv is None else argv)
    rows = []
    table = check = ""
    for mode in args.modes:
        rows.append(count_mode(mode, args))
        print(f"# {mode}: {rows[-1]['kernels']} kernels", file=sys.stderr, flush=True)
        add_lora_columns(rows)  # written after every mode: a run cut short keeps what it counted
        table = common.markdown_table(rows, COLUMNS)
        _, check = ranking_check(rows)
        common.write_outputs(rows=rows, env=env, argv=command, table=table + "\n\n" + check,
                             json_path=args.json, md_path=args.md, title=title)
    if args.fused:
        fused = fused_rows(args, rows)
        text = common.markdown_table(fused, FUSED_COLUMNS)
        best = next(r for r in fused if r["pair"] == "fused/fused")
        line = (f"fused pair: +{best['lora_mib']:.1f} MiB and +{best['lora_kernels']} kernels per layer"
                + ("" if best["vs_peft_bytes"] is None else
                   f", {best['vs_peft_bytes']:.3f}x the bytes and {best['vs_peft_kernels']:.3f}x the kernels "
                   "peft + inductor adds"))
        table, check = "\n\n".join(t for t in (table, text) if t), "\n".join(c for c in (check, line) if c)
        common.write_outputs(rows=rows + fused, env=env, argv=command, table=table + "\n\n" + check,
                             json_path=args.json, md_path=args.md, title=title)
    print(table)
    print(check)
    line = cuda_default_line(rows, args.dtype)
    if line:
        print(line)
    return rows


def cuda_default_line(rows: Sequence[dict], dtype: str) -> Optional[str]:
    """What LoRA adds under the CUDA default (cuda_default) beside peft + inductor, when both were counted."""
    by = {r["mode"]: r for r in rows}
    ours, peft = by.get("cuda_default"), by.get("peft_inductor")
    if ours is None or peft is None or ours["lora_bytes"] is None:
        return None
    merged = "allowed" if options.default_allow_merged(common.DTYPES[dtype]) else "off"
    return (f"CUDA default (criterion={options.default_criterion('cuda')}, merged plans {merged} in {dtype}): "
            f"LoRA adds +{ours['lora_kernels']} kernels, +{ours['lora_bytes'] / 2**30:.3f} GiB; peft + inductor "
            f"+{peft['lora_kernels']} kernels, +{peft['lora_bytes'] / 2**30:.3f} GiB "
            f"({ours['lora_kernels'] / peft['lora_kernels']:.2f}x kernels, "
            f"{ours['lora_bytes'] / peft['lora_bytes']:.2f}x bytes)")


if __name__ == "__main__":
    main()
