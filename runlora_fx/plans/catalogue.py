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
    dB   via XA: dB = s Gᵀ (X_l Aᵀ)            X_l Aᵀ recomputed, never saved
         via T : dB = s Tᵀ Aᵀ

An intermediate (Z, X_l Aᵀ, T, W + sBA) is computed once if any needed gradient uses it.
Under r(i+o) < i·o only backward1, backward4 and backward5 can be cheapest; the other five
are kept for completeness and marked dominated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import sympy
import torch
import torch.nn.functional as F

__all__ = [
    "ForwardPlan",
    "BackwardPlan",
    "Needs",
    "FORWARD_PLANS",
    "BACKWARD_PLANS",
    "forward_plan",
    "backward_plan",
    "merged_weight_for_backward",
    "n",
    "i",
    "o",
    "r",
]

n, i, o, r = sympy.symbols("n i o r", positive=True, integer=True)


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
    """

    name: str
    merged: bool
    formula: str
    flops_expr: sympy.Expr
    run: Callable[..., torch.Tensor]
    dominated: bool = False

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

    @property
    def merged(self) -> bool:
        return self.dx == "merged"

    @property
    def formula(self) -> str:
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
        return _run_backward(self, *args, **kwargs)


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
def _lora_input(x: torch.Tensor, x_lora: Optional[torch.Tensor], adapter_dtype) -> torch.Tensor:
    src = x if x_lora is None else x_lora
    return src if adapter_dtype is None or src.dtype == adapter_dtype else src.to(adapter_dtype)


def _forward1(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype):
    """Y = X Wᵀ + b + s (X_l Aᵀ) Bᵀ, the LoRA product added in the GEMM epilogue.

    The result dtype is what eager's ``base + lora`` gives: the base dtype promoted with the
    adapter dtype (peft's fp32 adapters on a bf16 base give fp32, cast back by the graph).
    """
    base = F.linear(x, weight, bias)
    xa = F.linear(_lora_input(x, x_lora, adapter_dtype), lora_A)
    out_dtype = torch.promote_types(base.dtype, xa.dtype)
    return torch.addmm(base.to(out_dtype), xa, lora_B.t(), alpha=scaling)


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
    try:
        return FORWARD_PLANS[name]
    except KeyError:
        raise ValueError(f"unknown forward plan {name!r}; known: {sorted(FORWARD_PLANS)}") from None


def backward_plan(name: str) -> BackwardPlan:
    """Looks a backward plan up by name, with an error that lists the known ones."""
    try:
        return BACKWARD_PLANS[name]
    except KeyError:
        raise ValueError(f"unknown backward plan {name!r}; known: {sorted(BACKWARD_PLANS)}") from None


# --- backward implementation -------------------------------------------------------------
def _run_backward(plan: BackwardPlan, grad_y, x, weight, lora_A, lora_B, scaling, x_lora, adapter_dtype, needs: Needs):
    """Gradients (dX, dX_l, dA, dB) on 2-D tensors; None where not needed.

    dX_l is returned separately only when the LoRA input is its own tensor (dropout); with
    X_l = X its contribution is already inside dX. The base part dY·W runs in W's dtype, the
    LoRA part in the adapter dtype, as eager autograd does for the graph it replaces.
    """
    separate = x_lora is not None
    xl = _lora_input(x, x_lora, adapter_dtype)
    g_lora = grad_y if grad_y.dtype == lora_B.dtype else grad_y.to(lora_B.dtype)
    uses_z = (needs.x and plan.dx == "split") or (needs.lora_A and plan.da == "z")
    uses_t = (needs.lora_A and plan.da == "t") or (needs.lora_B and plan.db == "t")
    zs = torch.mm(g_lora, lora_B).mul_(scaling) if uses_z else None  # s·Z, n×r
    t = torch.mm(xl.t(), g_lora) if uses_t else None  # T, i×o

    grad_x = grad_xl = grad_a = grad_b = None
    if needs.x:
        # weight may be None when dX is not needed (a quantized base is then not dequantized).
        g_base = grad_y if grad_y.dtype == weight.dtype else grad_y.to(weight.dtype)
        if plan.dx == "merged":
            grad_x = torch.mm(g_base, merged_weight_for_backward(weight, lora_A, lora_B, scaling))
        else:
            base = torch.mm(g_base, weight)
            lora_part = torch.mm(zs, lora_A)
            if separate:
                grad_x, grad_xl = base, lora_part.to(x_lora.dtype)
            elif lora_part.dtype == base.dtype:
                grad_x = base.add_(lora_part)
            else:
                grad_x = base.add_(lora_part.to(base.dtype))
    if needs.lora_A:
        grad_a = torch.mm(zs.t(), xl) if plan.da == "z" else torch.mm(lora_B.t() * scaling, t.t())
    if needs.lora_B:
        if plan.db == "xa":
            # s·(X_l Aᵀ) as X_l (s·A)ᵀ: recomputed, never saved. Spelled apart from the forward's
            # X_l Aᵀ so a joint graph's CSE cannot fold the two and keep the forward's n×r result.
            xa_s = torch.mm(xl, (lora_A * scaling).t())
            grad_b = torch.mm(g_lora.t(), xa_s)
        else:
            grad_b = torch.mm(t.t(), lora_A.t() * scaling)
    return grad_x, grad_xl, grad_a, grad_b
