"""DoRA's parts as plan records: the row norms, the per-row scale and the magnitude gradient.

DoRA (Liu et al., arXiv 2402.09353) in nn.Linear layout, with the norm detached as peft and
torchtune do (W: o×i frozen, A: r×i, B: o×r, m: (o,) trainable, s a float)::

    c = ‖W + sBA‖_row                      (o,), no gradient flows through c
    g = m / c
    v = X Wᵀ + s (X_l Aᵀ) Bᵀ               the LoRA layer (``catalogue.py``'s plans)
    Y = g ⊙ v + rest                        rest: the bias, or peft's dropout correction

Two producer forms (``DORA_FORMS``) differ only in ``rest`` and in which input v reads:

    peft       Y = X Wᵀ + b + (g − 1) ⊙ (X_l Wᵀ) + g ⊙ s (X_l Aᵀ) Bᵀ
               X_l = X:  v = X Wᵀ + s(XAᵀ)Bᵀ,  rest = b
               X_l ≠ X:  v = X_l Wᵀ + s(X_lAᵀ)Bᵀ, rest = (X − X_l) Wᵀ + b (peft's second base GEMM)
    torchtune  Y = g ⊙ (X Wᵀ + b + s (X_l Aᵀ) Bᵀ):  v includes b and reads X for its base, rest = 0

Backward, with G = g ⊙ dY: the catalogue's backward plan runs on G (dX, dA, dB of v) and

    dm = Σ_tokens (dY ⊙ v) / c               one reduction over the saved v

peft's dropout form adds dX = dY W and dX_l = dX_l(v) − dY W.

Adapters in another dtype than the base (peft's default fp32 adapters on a bf16 base:
``adapter_dtype``): the base GEMM and dY·W run in W's dtype, everything else (the LoRA
chain, the norms, g, v, Y) in the adapter dtype, as eager's promotions do; Y comes out in
the adapter dtype (the graph casts it back). Merged plans are not used then.

Row norms (``NORM_PLANS``), both exact up to rounding:

    norm_merged   c = ‖W + sBA‖_row                 2·o·r·i + 3·o·i (free of the GEMM when the
                                                    forward forms W + sBA anyway: forward2)
    norm_lowrank  c² = ‖W‖²_row + Σ_k B ∘ (2s·W Aᵀ + s²·B (A Aᵀ))
                  2·o·i·r + 2·r²·i + 2·o·r² + 4·o·r, with ‖W‖²_row computed once per frozen W

The identity: ‖W_j + s(BA)_j‖² = ‖W_j‖² + 2s·(BA)_j·W_j + s²·‖(BA)_j‖², with
(BA)_j·W_j = Σ_k B_jk (W Aᵀ)_jk and ‖(BA)_j‖² = B_j (A Aᵀ) B_jᵀ: nothing o×i is formed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import sympy
import torch
import torch.nn.functional as F

from .catalogue import Needs, i, n, o, r, rows_as_output
from .piecewise import resolve_plan

__all__ = [
    "DORA_FORMS",
    "NORM_PLANS",
    "DORA_EXTRA_FLOPS",
    "NormPlan",
    "norm_plan",
    "dora_row_norms",
    "dora_forward",
    "dora_forward_nd",
    "dora_backward",
    "dora_backward_nd",
]

DORA_FORMS = ("peft", "torchtune")


@dataclasses.dataclass(frozen=True)
class NormPlan:
    """One way to compute DoRA's detached row norms c = ‖W + sBA‖_row.

    Attributes:
        name: the record's name (the op's ``norm_plan`` argument).
        formula: the chain.
        flops_expr: FLOPs per call, sympy in i, o, r.
        shared_flops_expr: FLOPs per call when the forward plan forms W + sBA anyway (None:
            nothing to share).
        run: ``run(W, A, B, s, merged_or_None, w_sq_fn) -> c`` on 2-D tensors, c in A's dtype
            (W's too, except for adapters in another dtype than W).
    """

    name: str
    formula: str
    flops_expr: sympy.Expr
    shared_flops_expr: Optional[sympy.Expr]
    run: Callable[..., torch.Tensor]

    def flops(self, merged_forward: bool = False) -> sympy.Expr:
        if merged_forward and self.shared_flops_expr is not None:
            return self.shared_flops_expr
        return self.flops_expr


def _norm_merged(weight, lora_A, lora_B, scaling, merged, w_sq_fn):
    """c = ‖W + sBA‖_row, from the merged weight when the forward formed it (W in the adapters'
    dtype first when they differ, as peft's ``W.to(x.dtype)``)."""
    if merged is None:
        merged = torch.addmm(weight.to(lora_A.dtype), lora_B, lora_A, alpha=scaling)
    return torch.linalg.vector_norm(merged, dim=1)


def _norm_lowrank(weight, lora_A, lora_B, scaling, merged, w_sq_fn):
    """c² = ‖W‖²_row + Σ_k B ∘ (2s·W Aᵀ + s²·B (A Aᵀ)), accumulated in fp32; W Aᵀ in W's dtype."""
    acc = torch.float32 if lora_A.dtype in (torch.float16, torch.bfloat16) else lora_A.dtype
    wa = torch.mm(weight, lora_A.t().to(weight.dtype)).to(acc)  # o×r
    a32, b32 = lora_A.to(acc), lora_B.to(acc)
    gram = torch.mm(a32, a32.t())  # r×r
    cross = torch.addmm(wa, b32, gram, beta=2.0 * scaling, alpha=scaling * scaling)  # 2s·WAᵀ + s²·B·AAᵀ
    c2 = w_sq_fn(weight).to(acc) + (b32 * cross).sum(dim=1)
    return c2.clamp_min(0).sqrt().to(lora_A.dtype)


NORM_PLANS: dict[str, NormPlan] = {
    p.name: p
    for p in [
        NormPlan("norm_merged", "c = ‖W + s·B·A‖_row", 2 * o * r * i + 3 * o * i, 3 * o * i, _norm_merged),
        NormPlan("norm_lowrank", "c² = ‖W‖²_row + Σ B∘(2s·W·Aᵀ + s²·B·A·Aᵀ)",
                 2 * o * i * r + 2 * r * r * i + 2 * o * r * r + 4 * o * r, None, _norm_lowrank),
    ]
}

# FLOPs DoRA adds to the LoRA layer's plans, per form: the scale g ⊙ v (+ rest) in forward,
# G = g ⊙ dY and dm = Σ dY ⊙ v / c in backward; peft's dropout form adds its second base GEMM.
DORA_EXTRA_FLOPS = {
    "forward": 2 * n * o + o,
    "backward": 3 * n * o + o,
    "peft_dropout_forward": 2 * n * i * o + n * i,
    "peft_dropout_backward": 2 * n * o * i + n * i,
}


def norm_plan(name: str) -> NormPlan:
    """Looks a norm plan up by name, with an error that lists the known ones."""
    try:
        return NORM_PLANS[name]
    except KeyError:
        raise ValueError(f"unknown DoRA norm plan {name!r}; known: {sorted(NORM_PLANS)}") from None


def _plain_sq_norms(weight):
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return weight.to(acc).square().sum(dim=1)


def dora_row_norms(weight, lora_A, lora_B, scaling, plan: str, merged=None, w_sq_fn=_plain_sq_norms):
    """c = ‖W + sBA‖_row (detached: computed without autograd) by the named norm plan."""
    with torch.no_grad():
        # w_sq_fn sees W itself, not a detached alias: a cache keys on W's identity
        return norm_plan(plan).run(weight.detach(), lora_A.detach(), lora_B.detach(), scaling, merged,
                                   lambda _: w_sq_fn(weight))


def _v_inputs(x, x_lora, form):
    """(input of v's base part, v's separate LoRA input or None, whether v includes the bias)."""
    if form == "torchtune":
        return x, x_lora, True
    return (x if x_lora is None else x_lora), None, False


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm, forward,
                 w_sq_fn=_plain_sq_norms, adapter_dtype=None):
    """(Y, v, c) on 2-D tensors by the named plans (see the module docstring).

    Forms W + sBA once when either the forward plan or the norm plan needs it.
    """
    x_v, xl_v, v_bias = _v_inputs(x, x_lora, form)
    fplan = resolve_plan(forward, x.shape[0], "forward")
    merged = None
    if fplan.merged or norm == "norm_merged":
        merged = torch.addmm(weight.to(lora_A.dtype), lora_B, lora_A, alpha=scaling)
    c = dora_row_norms(weight, lora_A, lora_B, scaling, norm, merged, w_sq_fn)
    b_v = bias if v_bias else None
    if fplan.merged:
        v = F.linear(x_v, merged, b_v)
    else:
        v = fplan.run(x_v, weight, b_v, lora_A, lora_B, scaling, xl_v, adapter_dtype)
    g = magnitude / c
    if form == "peft" and x_lora is not None:
        rest = F.linear(x - x_lora, weight, bias)
        y = torch.addcmul(rest, v, g)
    elif form == "peft" and bias is not None:
        y = torch.addcmul(bias.to(v.dtype), v, g)
    else:
        y = v * g
    return y, v, c


def dora_backward(grad_y, x, weight, lora_A, lora_B, magnitude, scaling, x_lora, v, c, form, backward,
                  needs: Needs, need_magnitude: bool, adapter_dtype=None):
    """(dX, dX_l, dA, dB, dm) on 2-D tensors; None where not needed.

    G = g ⊙ dY runs through the catalogue's backward plan; dm = Σ_tokens (dY ⊙ v) / c.
    """
    x_v, xl_v, _ = _v_inputs(x, x_lora, form)
    g = magnitude / c
    grad_v = grad_y * g
    bplan = resolve_plan(backward, grad_y.shape[0], "backward")
    gx, gxl, ga, gb = bplan.run(grad_v, x_v, weight, lora_A, lora_B, scaling, xl_v, adapter_dtype, needs)
    if form == "peft" and x_lora is not None:
        # rest = (X − X_l) Wᵀ: dX = dY W, and v read X_l: dX_l = dX_l(v) − dY W
        gxl = None
        if needs.x:
            base = torch.mm(grad_y, weight)
            gxl = gx - base
            gx = base
    gm = (grad_y * v).sum(dim=0).div_(c) if need_magnitude else None
    return gx, gxl, ga, gb, gm


def _rows(t: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1, width)


def dora_forward_nd(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm, forward,
                    w_sq_fn=_plain_sq_norms, adapter_dtype=None):
    """``dora_forward`` on the ops' tensors: x and x_lora (..., i); Y and v (..., o)."""
    o, i = weight.shape
    y, v, c = dora_forward(x.reshape(-1, i), weight, bias, lora_A, lora_B, magnitude, scaling, _rows(x_lora, i),
                           form, norm, forward, w_sq_fn, adapter_dtype)
    return rows_as_output(y, x), rows_as_output(v, x), c


def dora_backward_nd(grad_y, x, weight, lora_A, lora_B, magnitude, scaling, x_lora, v, c, form, backward,
                     needs: Needs, need_magnitude: bool, adapter_dtype=None):
    """``dora_backward`` on the ops' tensors: dX and dX_l come back in x's shape (None where not
    computed); ``weight`` may be None when dX is not needed."""
    o, i = c.shape[0], x.shape[-1]
    gx, gxl, ga, gb, gm = dora_backward(grad_y.reshape(-1, o), x.reshape(-1, i), weight, lora_A, lora_B, magnitude,
                                        scaling, _rows(x_lora, i), v.reshape(-1, o), c, form, backward, needs,
                                        need_magnitude, adapter_dtype)
    return (None if gx is None else gx.reshape(x.shape), None if gxl is None else gxl.reshape(x.shape), ga, gb, gm)
