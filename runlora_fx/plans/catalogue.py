"""The RunLoRA plan catalogue: every way to compute a LoRA layer's forward and backward.

A LoRA layer in nn.Linear layout (W: o×i frozen, A: r×i, B: o×r, s a float) computes::

    Y = X Wᵀ + b + s (X_l Aᵀ) Bᵀ        X: n×i tokens, X_l = X or dropout(X)

Plans keep the names of RunLoRA (Cherniuk, Mikhalev, Oseledets, arXiv 2312.03415). Each is a
small record: a name, its formulas, its FLOPs as a sympy expression in n, i, o, r (and the
requires-grad flags), and an implementation in plain ATen calls. Plans are data: the
selector (``choose/``), the ops (``ops/``) and the inductor lowering (``passes/lower.py``) only
walk this catalogue.

Backward plans are built from three independent choices, each a formula below (G = dY):

    dX   split : dX = G W + s Z A              Z = G B       (n×r)
         merged: dX = G (W + s B A)            never forms Z for dX
    dA   via Z : dA = s Zᵀ X_l
         via T : dA = s Bᵀ Tᵀ                  T = X_lᵀ G    (i×o)
    dB   via XA: dB = s Gᵀ (X_l Aᵀ)            X_l Aᵀ recomputed (or kept: keep_lora_product)
         via T : dB = s Tᵀ Aᵀ

An intermediate (Z, X_l Aᵀ, T, W + sBA) is computed once if any needed gradient uses it.
Under r(i+o) < i·o only backward1, backward4 and backward5 can be cheapest; the other five
are kept for completeness and marked dominated.

Beside the paper's plans, which FLOPs decide, ``CHAIN_RECORDS`` holds the choices bytes decide
(each with the bytes it saves and the memory it adds, sympy in n, i, o, r and the element
sizes e_x, e_a, e_y):

    scale_on_small_side   s applied to an r-wide operand (s·B, s·Z, s·A), never to an n×o or
                          n×i tensor                                       (every plan)
    accumulate_in_gemm    the LoRA term added by the GEMM that makes it (addmm, beta=1), never
                          written and read back: Y = addmm(X·Wᵀ, X·Aᵀ, s·Bᵀ),
                          dX = addmm(dY·W, s·Z, A)                          (forward1, split dX)
    keep_lora_product     X_l·Aᵀ (n×r) kept from forward1 for dB = s·dYᵀ·(X_l·Aᵀ) instead of
                          recomputed from X_l (n×i): a priced choice (``choose/lora_product.py``);
                          the lowered chain takes it, the opaque op always recomputes

``FUSED_FORWARD_PLANS`` / ``FUSED_BACKWARD_PLANS`` hold ``fused``, the LoRAFusion-style pair that
runs this project's Triton kernels (``ops/fused.py``) instead of ATen calls::

    forward   S = X_l·Aᵀ (torch.mm, n×r); Y = X·Wᵀ + b + s·S·Bᵀ in one GEMM (K1)
    backward  Z, dB = dY·B, s·dYᵀ·S in one pass over dY (K2); dX = dY·W + s·Z·A in one GEMM (K3);
              dA = s·Zᵀ·X_l (torch.mm). With x_lora separate (dropout) dX and dX_l are returned
              apart: dX = dY·W and dX_l = s·Z·A by torch.mm, K1 and K2 as above.

Its FLOPs are forward1's and backward1's; what it saves is bytes and launches (each kernel's,
with the other plans', in ``choose/roofline.py``'s ``KERNELS``). It runs only on
CUDA, so it is kept apart from the paper's plans, which every device runs: the FLOPs and
roofline criteria never rank it, and ``criterion="time"`` chooses it only where it measured
faster than the best ATen pair (``choose/select.py``). Looked up by name like the others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import sympy
import torch
import torch.nn.functional as F

__all__ = [
    "rows_as_output",
    "ForwardPlan",
    "BackwardPlan",
    "Needs",
    "FORWARD_PLANS",
    "BACKWARD_PLANS",
    "FUSED_FORWARD_PLANS",
    "FUSED_BACKWARD_PLANS",
    "fused_forward_with_lora_product",
    "forward_plan",
    "backward_plan",
    "merged_weight_for_backward",
    "forward1_with_lora_product",
    "ChainRecord",
    "CHAIN_RECORDS",
    "e_x",
    "e_a",
    "e_y",
    "n",
    "i",
    "o",
    "r",
]

n, i, o, r = sympy.symbols("n i o r", positive=True, integer=True)
# Element sizes in bytes: x, W, bias and the base GEMMs; the adapter dtype (A, B, X_l, X·Aᵀ,
# Z, T); the op's output and dY (the promotion of the two).
e_x, e_a, e_y = sympy.symbols("e_x e_a e_y", positive=True, integer=True)


@dataclasses.dataclass(frozen=True)
class Needs:
    """Which gradients the backward must produce (W and bias are frozen)."""

    x: bool = True
    lora_A: bool = True
    lora_B: bool = True


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """One forward chain.

    Attributes:
        name: the paper's name.
        merged: whether it forms W + sBA (needs X_l = X and one dtype throughout).
        formula: the chain, as written in the paper.
        flops_expr: FLOPs as a sympy expression in n, i, o, r.
        run: the implementation on 2-D tensors (x, W, b, A, B, s, x_lora_or_None, adapter_dtype).
        dominated: never cheapest when r(i+o) < i·o.
        fused: runs the Triton kernels of ``ops/fused.py`` (CUDA only, chosen only by time).
    """

    name: str
    merged: bool
    formula: str
    flops_expr: sympy.Expr
    run: Callable[..., torch.Tensor]
    dominated: bool = False
    fused: bool = False

    def flops(self, n_=n, i_=i, o_=o, r_=r) -> sympy.Expr:
        """FLOPs at the given sizes (ints or sympy expressions)."""
        return _at_sizes(self.flops_expr, n_, i_, o_, r_)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """One backward chain, as its three choices (see the module docstring)."""

    name: str
    dx: str  # "split" | "merged"
    da: str  # "z" | "t"
    db: str  # "xa" | "t"
    dominated: bool = False
    fused: bool = False  # the Triton kernels of ops/fused.py run it (the module docstring)

    @property
    def merged(self) -> bool:
        return self.dx == "merged"

    @property
    def formula(self) -> str:
        if self.fused:
            return "Z, dB = dY·B, s·dYᵀ·(X·Aᵀ) in one pass over dY; dX = dY·W + s·Z·A in one GEMM; dA = s·Zᵀ·X"
        dx = "dX = dY·W + s·Z·A" if self.dx == "split" else "dX = dY·(W + s·B·A)"
        da = "dA = s·Zᵀ·X" if self.da == "z" else "dA = s·Bᵀ·Tᵀ"
        db = "dB = s·dYᵀ·(X·Aᵀ)" if self.db == "xa" else "dB = s·Tᵀ·Aᵀ"
        return f"{dx}; {da}; {db}"

    def flops(self, n_=n, i_=i, o_=o, r_=r, needs: Needs = Needs()) -> sympy.Expr:
        """FLOPs at the given sizes, counting only what the needed gradients use."""
        terms = _backward_terms(self, needs)
        total = sum((_MATMUL_FLOPS[t] for t in terms), sympy.Integer(0))
        return _at_sizes(total, n_, i_, o_, r_)

    def run(self, *args, **kwargs):
        return (_run_backward_fused if self.fused else _run_backward)(self, *args, **kwargs)


@functools.lru_cache(maxsize=4096)
def _at_sizes(expr: sympy.Expr, n_, i_, o_, r_) -> sympy.Expr:
    # xreplace, not subs(simultaneous=True): the keys are plain symbols, so the result is the
    # same, and subs' fresh Dummies defeat sympy's cache (~4 ms a call, 100 ms a site).
    # Cached: a model repeats a handful of layer shapes across hundreds of sites.
    sizes = {n: n_, i: i_, o: o_, r: r_}
    return sympy.sympify(expr.xreplace({k: sympy.sympify(v) for k, v in sizes.items()}))


# --- FLOPs of each matmul a plan may issue (2·m·k·n each) --------------------------------
_MATMUL_FLOPS = {
    "G@W": 2 * n * o * i,  # dY·W (dX base part, or dY·(W+sBA) when merged)
    "Z=G@B": 2 * n * o * r,
    "Z@A": 2 * n * r * i,
    "ZT@X": 2 * r * n * i,
    "XA": 2 * n * i * r,
    "GT@XA": 2 * o * n * r,
    "T=XT@G": 2 * i * n * o,
    "BT@TT": 2 * r * o * i,
    "TT@AT": 2 * o * i * r,
    "B@A": 2 * o * r * i,
}


def _backward_terms(plan: BackwardPlan, needs: Needs) -> list[str]:
    terms: list[str] = []
    if needs.x:
        terms.append("G@W")
        terms.extend(["Z@A"] if plan.dx == "split" else ["B@A"])
    if needs.lora_A:
        terms.append("ZT@X" if plan.da == "z" else "BT@TT")
    if needs.lora_B:
        terms.extend(["XA", "GT@XA"] if plan.db == "xa" else ["TT@AT"])
    uses_z = (needs.x and plan.dx == "split") or (needs.lora_A and plan.da == "z")
    uses_t = (needs.lora_A and plan.da == "t") or (needs.lora_B and plan.db == "t")
    if uses_z:
        terms.append("Z=G@B")
    if uses_t:
        terms.append("T=XT@G")
    return terms


# --- forward implementations -------------------------------------------------------------
def rows_as_output(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A chain's 2-D result (n, o) in x's leading shape, as a tensor of its own, not a view.

    ``reshape`` would return a view of a tensor made inside the op or autograd.Function, and
    autograd refuses (or, through an opaque op, miscounts) an in-place op on such a view:
    ``y += r``, ``y.mul_(2)``, ``y.view(-1, o).add_(b)`` on a site's output. ``aten._unsafe_view``
    is how ``matmul`` folds its own result: the same storage, no view relation to track.
    """
    return torch.ops.aten._unsafe_view(rows, (*x.shape[:-1], rows.shape[-1]))


def _lora_input(x: torch.Tensor, x_lora: Optional[torch.Tensor], adapter_dtype) -> torch.Tensor:
    src = x if x_lora is None else x_lora
    return src if adapter_dtype is None or src.dtype == adapter_dtype else src.to(adapter_dtype)


def forward1_with_lora_product(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """(Y, X_l Aᵀ): forward1 and the n×r product it forms, for a chain that keeps it.

    The LoRA term is accumulated by its own GEMM (``accumulate_in_gemm``) with s as the GEMM's
    alpha (``scale_on_small_side``): no n×o tensor is written for it or scaled. The result
    dtype is what eager's ``base + lora`` gives: the base dtype promoted with the adapter
    dtype (peft's fp32 adapters on a bf16 base give fp32, cast back by the graph).
    """
    base = F.linear(x, weight, bias)
    xa = F.linear(_lora_input(x, x_lora, adapter_dtype), lora_A)
    out_dtype = torch.promote_types(base.dtype, xa.dtype)
    return torch.addmm(base.to(out_dtype), xa, lora_B.t(), alpha=scaling), xa


def _forward1(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """Y = X Wᵀ + b + s (X_l Aᵀ) Bᵀ (see ``forward1_with_lora_product``)."""
    return forward1_with_lora_product(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype)[0]


def _merged_weight(weight, lora_A, lora_B, scaling):
    # W + s·B·A in W's dtype: one o×r×i GEMM, never saved.
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


def merged_weight_for_backward(weight, lora_A, lora_B, scaling):
    """W + s·B·A for a merged dX = dY (W + sBA), spelled (Wᵀ + s·AᵀBᵀ)ᵀ.

    The same sum and products as the forward's ``addmm(W, B, A, alpha=s)``, written transposed
    so that a traced joint graph's CSE cannot fold the backward's copy into forward2's: folded,
    the partitioner would keep that o×i weight for backward (one per site, ~0.9 GiB on the H200
    step of BENCHMARKS.md) instead of recomputing it from W, A and B at the 2·i·r·o FLOPs the
    plan's count already assumes. Every merged backward (the op, the lowered chain, sibling
    groups, DoRA) forms its merged weight here.
    """
    return torch.addmm(weight.t(), lora_A.t(), lora_B.t(), alpha=scaling).t()


def _forward2(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """Y = X (W + s B A)ᵀ + b."""
    return F.linear(x, _merged_weight(weight, lora_A, lora_B, scaling), bias)


FORWARD_PLANS: dict[str, ForwardPlan] = {
    p.name: p
    for p in [
        ForwardPlan(
            "forward1", False, "Y = X·W + s·(X·A)·B", 2 * n * i * o + 2 * n * i * r + 2 * n * r * o, _forward1
        ),
        ForwardPlan("forward2", True, "Y = X·(W + s·B·A)", 2 * n * i * o + 2 * i * r * o, _forward2),
    ]
}

BACKWARD_PLANS: dict[str, BackwardPlan] = {
    p.name: p
    for p in [
        BackwardPlan("backward1", "split", "z", "xa"),
        BackwardPlan("backward2", "split", "t", "t", dominated=True),
        BackwardPlan("backward3", "split", "z", "t", dominated=True),
        BackwardPlan("backward4", "merged", "t", "t"),
        BackwardPlan("backward5", "merged", "z", "xa"),
        BackwardPlan("backward6", "merged", "z", "t", dominated=True),
        BackwardPlan("backward7", "merged", "t", "xa", dominated=True),
        BackwardPlan("backward8", "split", "t", "xa", dominated=True),
    ]
}


def forward_plan(name: str) -> ForwardPlan:
    """Looks a forward plan up by name, with an error that lists the known ones."""
    plan = FORWARD_PLANS.get(name) or FUSED_FORWARD_PLANS.get(name)
    if plan is None:
        raise ValueError(f"unknown forward plan {name!r}; known: {sorted(FORWARD_PLANS)}, and "
                         f"{sorted(FUSED_FORWARD_PLANS)} (Triton kernels, CUDA only)")
    return plan


def backward_plan(name: str) -> BackwardPlan:
    """Looks a backward plan up by name, with an error that lists the known ones."""
    plan = BACKWARD_PLANS.get(name) or FUSED_BACKWARD_PLANS.get(name)
    if plan is None:
        raise ValueError(f"unknown backward plan {name!r}; known: {sorted(BACKWARD_PLANS)}, and "
                         f"{sorted(FUSED_BACKWARD_PLANS)} (Triton kernels, CUDA only)")
    return plan


# --- backward implementation -------------------------------------------------------------
def _scaled_mm(a, b, scaling, like):
    """s·(a @ b) with s as the GEMM's alpha (``scale_on_small_side``: no elementwise pass).

    ``addmm`` with beta=0 ignores its input (NaN and inf in it included); ``like`` is any tensor
    that broadcasts to the result (a parameter or a view of one), so no buffer is made for it.
    """
    return torch.addmm(like, a, b, beta=0, alpha=scaling)


def _run_backward(plan: BackwardPlan, grad_y, x, weight, lora_A, lora_B, scaling, x_lora, adapter_dtype, needs: Needs,
                  lora_product=None):
    """Gradients (dX, dX_l, dA, dB) on 2-D tensors; None where not needed.

    dX_l is returned separately only when the LoRA input is its own tensor (dropout); with
    X_l = X its contribution is already inside dX. The base part dY·W runs in W's dtype, the
    LoRA part in the adapter dtype, as eager autograd does for the graph it replaces.
    ``lora_product``: X_l·Aᵀ kept from the forward (``keep_lora_product``); None: recomputed.
    """
    separate = x_lora is not None
    xl = _lora_input(x, x_lora, adapter_dtype)
    g_lora = grad_y if grad_y.dtype == lora_B.dtype else grad_y.to(lora_B.dtype)
    uses_z = (needs.x and plan.dx == "split") or (needs.lora_A and plan.da == "z")
    uses_t = (needs.lora_A and plan.da == "t") or (needs.lora_B and plan.db == "t")
    z = torch.mm(g_lora, lora_B) if uses_z else None  # Z, n×r; s goes into the GEMMs that read it
    t = torch.mm(xl.t(), g_lora) if uses_t else None  # T, i×o

    grad_x = grad_xl = grad_a = grad_b = None
    if needs.x:
        # weight may be None when dX is not needed (a quantized base is then not dequantized).
        g_base = grad_y if grad_y.dtype == weight.dtype else grad_y.to(weight.dtype)
        if plan.dx == "merged":
            grad_x = torch.mm(g_base, merged_weight_for_backward(weight, lora_A, lora_B, scaling))
        else:
            base = torch.mm(g_base, weight)
            if separate:
                grad_x, grad_xl = base, _scaled_mm(z, lora_A, scaling, lora_A[0]).to(x_lora.dtype)
            elif z.dtype == base.dtype:
                grad_x = torch.addmm(base, z, lora_A, alpha=scaling)  # accumulate_in_gemm: no n×i dX_l
            else:
                grad_x = base.add_(_scaled_mm(z, lora_A, scaling, lora_A[0]).to(base.dtype))
    if needs.lora_A:
        grad_a = _scaled_mm(z.t(), xl, scaling, lora_A) if plan.da == "z" else _scaled_mm(lora_B.t(), t.t(), scaling,
                                                                                         lora_A)
    if needs.lora_B:
        if plan.db == "xa" and lora_product is not None:
            grad_b = _scaled_mm(g_lora.t(), lora_product, scaling, lora_B)
        elif plan.db == "xa":
            # s·(X_l Aᵀ) as X_l (s·A)ᵀ: recomputed, never saved. Spelled apart from the forward's
            # X_l Aᵀ so a joint graph's CSE cannot fold the two and keep the forward's n×r result.
            xa_s = torch.mm(xl, (lora_A * scaling).t())
            grad_b = torch.mm(g_lora.t(), xa_s)
        else:
            grad_b = _scaled_mm(t.t(), lora_A.t(), scaling, lora_B)
    return grad_x, grad_xl, grad_a, grad_b


# --- the fused plan (Triton kernels, ops/fused.py) -------------------------------------------
def _fused_ops():
    """torch.ops.runlora.mm_lowrank and lowrank_grads, which ``ops/fused.py`` registers when Triton imports."""
    try:
        return torch.ops.runlora.mm_lowrank, torch.ops.runlora.lowrank_grads
    except AttributeError:
        raise RuntimeError("runlora: plan 'fused' runs the Triton kernels of runlora_fx/ops/fused.py, which are not "
                           "registered here (is Triton installed? `pip install triton`)") from None


def fused_forward_with_lora_product(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """(Y, S): the fused forward and the n×r S = X_l·Aᵀ it forms, for a chain that keeps S for dB.

    S by torch.mm (cuBLAS), then one Triton GEMM (K1) starts each output tile from X·Wᵀ, adds
    s·S·Bᵀ as one more K = r product and the bias, and writes the tile once. Output dtype as
    forward1's: the base dtype promoted with the adapter dtype.
    """
    mm_lowrank, _ = _fused_ops()
    lora_product = F.linear(_lora_input(x, x_lora, adapter_dtype), lora_A)
    out_dtype = torch.promote_types(x.dtype, lora_product.dtype)
    return mm_lowrank(x, weight.t(), bias, lora_product, lora_B.t(), scaling, out_dtype), lora_product


def _forward_fused(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """Y = X·Wᵀ + b + s·(X_l·Aᵀ)·Bᵀ, the LoRA term inside the base GEMM (see ``fused_forward_with_lora_product``)."""
    return fused_forward_with_lora_product(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype)[0]


def _run_backward_fused(plan: BackwardPlan, grad_y, x, weight, lora_A, lora_B, scaling, x_lora, adapter_dtype,
                        needs: Needs, lora_product=None):
    """The fused backward on 2-D tensors; the same contract as ``_run_backward``.

    # Z, dB = dY·B, s·dYᵀ·S          one pass over dY (K2); S kept, or recomputed
    # dX    = dY·W + s·Z·A            one GEMM (K3); dY cast to W's dtype tile by tile
    # dA    = s·Zᵀ·X_l                torch.mm
    With a separate x_lora, dX = dY·W and dX_l = s·Z·A are two results, so K3 has nothing to
    fuse: both are torch.mm, as in backward1.
    """
    mm_lowrank, lowrank_grads = _fused_ops()
    uses_z = needs.x or needs.lora_A
    xl = _lora_input(x, x_lora, adapter_dtype) if needs.lora_A or (needs.lora_B and lora_product is None) else None
    if needs.lora_B and lora_product is None:
        # S recomputed as (A·X_lᵀ)ᵀ, a transposed view K2 reads as is: spelled apart from the
        # forward's X_l·Aᵀ so a joint graph's CSE cannot fold the two (``keep_lora_product`` decides).
        lora_product = torch.mm(lora_A, xl.t()).t()
    z = grad_b = None
    if uses_z or needs.lora_B:
        z, grad_b = lowrank_grads(grad_y, lora_B, lora_product if needs.lora_B else None, scaling, uses_z,
                                  needs.lora_B)
    grad_x = grad_xl = grad_a = None
    if needs.x:
        if x_lora is not None:
            g_base = grad_y if grad_y.dtype == weight.dtype else grad_y.to(weight.dtype)
            grad_x = torch.mm(g_base, weight)
            grad_xl = _scaled_mm(z, lora_A, scaling, lora_A[0]).to(x_lora.dtype)
        else:
            grad_x = mm_lowrank(grad_y, weight, None, z, lora_A, scaling, x.dtype)
    if needs.lora_A:
        grad_a = _scaled_mm(z.t(), xl, scaling, lora_A)
    return grad_x, grad_xl, grad_a, grad_b if needs.lora_B else None


FUSED_FORWARD_PLANS: dict[str, ForwardPlan] = {
    "fused": ForwardPlan(
        "fused", False, "S = X·A (mm); Y = X·W + s·S·B in one Triton GEMM",
        2 * n * i * o + 2 * n * i * r + 2 * n * r * o, _forward_fused, fused=True),
}

FUSED_BACKWARD_PLANS: dict[str, BackwardPlan] = {
    # backward1's matmuls (so its FLOPs): K2, K3, and torch.mm for dA (and for S when recomputed)
    "fused": BackwardPlan("fused", "split", "z", "xa", fused=True),
}


# --- choices the bytes decide, beside the paper's plans ------------------------------------
@dataclasses.dataclass(frozen=True)
class ChainRecord:
    """A choice that leaves FLOPs (nearly) alone and saves bytes moved.

    Attributes:
        name: the record's name.
        formula: the chain as the plans run it.
        instead_of: the spelling it avoids.
        applies_to: which plans or paths take it.
        bytes_saved: read + write bytes per step against ``instead_of`` (sympy).
        flops_saved: FLOPs per step against ``instead_of`` (sympy).
        memory_added: bytes held from forward to backward (sympy; 0 for most).
    """

    name: str
    formula: str
    instead_of: str
    applies_to: str
    bytes_saved: sympy.Expr
    flops_saved: sympy.Expr = sympy.Integer(0)
    memory_added: sympy.Expr = sympy.Integer(0)


CHAIN_RECORDS: dict[str, ChainRecord] = {
    rec.name: rec
    for rec in [
        ChainRecord(
            "scale_on_small_side",
            "s as the alpha of the GEMM that reads the LoRA operand: Y = addmm(Y0, X·Aᵀ, Bᵀ, alpha=s); "
            "dX = addmm(dY·W, Z, A, alpha=s); dA = s·(Zᵀ·X_l) and dB = s·(dYᵀ·X_lAᵀ) as addmm(beta=0, alpha=s)",
            "an elementwise ·s over the n×o LoRA term (forward) and over Z (n×r, backward)",
            "every plan (the recomputed X_l·(s·A)ᵀ scales A, r×i, so CSE cannot fold it into the forward's)",
            # forward: a pass over n×o (read + write); backward: one over n×r
            2 * n * o * e_y + 2 * n * r * e_a,
        ),
        ChainRecord(
            "accumulate_in_gemm",
            "Y = addmm(X·Wᵀ + b, X·Aᵀ, Bᵀ, alpha=s); dX = addmm(dY·W, Z, A, alpha=s)",
            "L = (X·Aᵀ)·Bᵀ written, then Y = Y0 + L read back (and dX_l = s·Z·A, then dX += dX_l)",
            "forward1; the split dX of backward1/2/3/8 when X_l = X in one dtype",
            # forward: L written and read once more; backward: dX_l written and read once more
            2 * n * o * e_y + 2 * n * i * e_x,
        ),
        ChainRecord(
            "keep_lora_product",
            "dB = s·dYᵀ·(X_l·Aᵀ), X_l·Aᵀ kept from forward1",
            "dB = dYᵀ·(X_l·(s·A)ᵀ), X_l·Aᵀ recomputed from X_l",
            "forward1 with a backward whose dB goes through X_l·Aᵀ (backward1/5/7/8), lowered chain only",
            (n * i + r * i + n * r) * e_a + 2 * r * i * e_a,  # the recompute GEMM and its s·A pass
            2 * n * i * r,
            n * r * e_a,
        ),
    ]
}
