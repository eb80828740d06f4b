"""``torch.ops.runlora.lora_linear_group``: sibling LoRA layers that read the same x, computed together.

k sites y_j = x @ W_jᵀ + b_j + s_j ((x_l @ A_jᵀ) @ B_jᵀ) that share x (and x_l) keep their own
W_j, b_j, A_j, B_j, s_j and output; only the thin GEMMs that re-read x are concatenated::

    XA_cat = X_l · [A_1; …; A_k]ᵀ                      (n × Σr_j, x read once)
    dA_cat = [s_1Z_1 | … | s_kZ_k]ᵀ · X_l               (Σr_j × i, x read once)   Z_j = dY_j · B_j
    dX     = Σ_j dY_j · W_j  +  [s_1Z_1 | … | s_kZ_k] · [A_1; …; A_k]    (one GEMM, inner Σr_j)

Per member, the forward plan is forward1 (its slice of XA_cat feeds its output) or forward2
(Y_j = X(W_j + s_jB_jA_j)ᵀ, reads nothing shared). The backward plan is backward1 or backward5:
dA via Z and dB via a recomputed XA (its slice of one recomputed XA_cat), dX split (its Z in the
concatenated GEMM) or merged (dY_j(W_j + s_jB_jA_j)). backward4 (and the dominated plans) go
through T = X_lᵀdY_j per member and share nothing: ``GROUPABLE_BACKWARD`` says which plans a
member may have. FLOPs equal the members' own plans; bytes and launches are fewer
(``choose/group.py`` prices it).

Plans are one string per kind, the members' plan strings joined by ";" (torch.library has no
``str[]``): ``"forward1;forward1;forward2"``. Each may be piecewise in n. Autograd saves the
op's inputs only, as ``runlora.lora_linear`` does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plans import BACKWARD_PLANS, FORWARD_PLANS, Needs, parse_plan, resolve_plan, rows_as_output
from ..plans.catalogue import merged_weight_for_backward

__all__ = ["GROUPABLE_BACKWARD", "check_group_args", "lora_linear_group", "lora_linear_group_backward",
           "join_plans", "run_group_backward", "run_group_forward", "split_plans"]

# Backward plans whose dA and dB read X_l through Z and a recomputed XA: what a group shares.
GROUPABLE_BACKWARD = frozenset(name for name, p in BACKWARD_PLANS.items() if p.da == "z" and p.db == "xa")

_WHERE = "runlora.lora_linear_group"


def join_plans(plans: Sequence[str]) -> str:
    """The members' plan strings as the op takes them."""
    return ";".join(str(p) for p in plans)


def split_plans(spec: str, k: int, kind: str) -> list[str]:
    """The members' plan strings; ValueError when there are not ``k``."""
    plans = spec.split(";")
    if len(plans) != k:
        raise ValueError(f"{_WHERE}: {kind}_plans={spec!r} names {len(plans)} plans, expected one per member ({k})")
    return plans


def check_group_args(x, weights, biases, lora_As, lora_Bs, scalings, x_lora, adapter_dtype, forward_plans,
                     backward_plans) -> None:
    """Raises ValueError naming the member and argument, what was expected and what was got."""
    k = len(weights)
    if k == 0 or not (len(biases) == len(lora_As) == len(lora_Bs) == len(scalings) == k):
        raise ValueError(f"{_WHERE}: expected one weight, bias, lora_A, lora_B and scaling per member; got "
                         f"{len(weights)}, {len(biases)}, {len(lora_As)}, {len(lora_Bs)}, {len(scalings)}")
    i = x.shape[-1]
    lora_in = (x if x_lora is None else x_lora).dtype if adapter_dtype is None else adapter_dtype
    merged_ok = x_lora is None and lora_in == x.dtype
    fplans, bplans = split_plans(forward_plans, k, "forward"), split_plans(backward_plans, k, "backward")
    for j, (w, b, a, bb) in enumerate(zip(weights, biases, lora_As, lora_Bs)):
        where = f"{_WHERE}: member {j}"
        if w.dim() != 2 or w.shape[1] != i:
            raise ValueError(f"{where}: weight has shape {tuple(w.shape)}, expected (o, {i}) to match x {tuple(x.shape)}")
        o = w.shape[0]
        if a.dim() != 2 or a.shape[1] != i:
            raise ValueError(f"{where}: lora_A has shape {tuple(a.shape)}, expected (r, {i})")
        if bb.dim() != 2 or tuple(bb.shape) != (o, a.shape[0]):
            raise ValueError(f"{where}: lora_B has shape {tuple(bb.shape)}, expected ({o}, {a.shape[0]})")
        if b is not None and tuple(b.shape) != (o,):
            raise ValueError(f"{where}: bias has shape {tuple(b.shape)}, expected ({o},)")
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            raise ValueError(f"{where}: x, weight and bias must share a dtype; got x {x.dtype}, weight {w.dtype}")
        if not (a.dtype == bb.dtype == lora_in):
            raise ValueError(f"{where}: the LoRA branch computes in {lora_in} but got lora_A {a.dtype}, "
                             f"lora_B {bb.dtype}")
        for spec, kind in ((fplans[j], "forward"), (bplans[j], "backward")):
            try:
                names = parse_plan(spec).names
                chosen = [resolve_plan(name, 0, kind) for name in names]
            except ValueError as exc:
                raise ValueError(f"{where}: {kind} plan {spec!r}: {exc}") from None
            for name, plan in zip(names, chosen):
                if plan.merged and not merged_ok:
                    raise ValueError(f"{where}: {kind} plan {name!r} merges W + sBA, which needs x_lora=None and "
                                     f"one dtype; got x {x.dtype}, LoRA input {lora_in}")
                if kind == "backward" and name not in GROUPABLE_BACKWARD:
                    raise ValueError(f"{where}: backward plan {name!r} shares nothing in a group; expected one of "
                                     f"{sorted(GROUPABLE_BACKWARD)}")
    if x_lora is not None and tuple(x_lora.shape) != tuple(x.shape):
        raise ValueError(f"{_WHERE}: x_lora has shape {tuple(x_lora.shape)}, expected x's shape {tuple(x.shape)}")


def _lora_input(x, x_lora, adapter_dtype):
    src = x if x_lora is None else x_lora
    return src if adapter_dtype is None or src.dtype == adapter_dtype else src.to(adapter_dtype)


def _cat_rows(tensors: list) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def _cat_cols(tensors: list) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def run_group_forward(x2, weights, biases, lora_As, lora_Bs, scalings, xl2, adapter_dtype, fplans) -> tuple:
    """(the members' outputs, {forward1 member: its X_l·A_jᵀ}) on 2-D x (n × i); ``fplans``
    resolved plan names, one per member. The products are for a chain that keeps them.

    # XA_cat = X_l [A_1; …; A_k]ᵀ over the forward1 members; Y_j = X W_jᵀ + b_j + s_j XA_j B_jᵀ
    """
    split = [j for j, name in enumerate(fplans) if not FORWARD_PLANS[name].merged]
    xa = {}
    if split:
        xl = _lora_input(x2, xl2, adapter_dtype)
        xa_cat = torch.mm(xl, _cat_rows([lora_As[j] for j in split]).t())
        xa = dict(zip(split, torch.split(xa_cat, [lora_As[j].shape[0] for j in split], dim=1)))
    outs = []
    for j, name in enumerate(fplans):
        w, b, a, bb, s = weights[j], biases[j], lora_As[j], lora_Bs[j], scalings[j]
        if j not in xa:
            outs.append(FORWARD_PLANS[name].run(x2, w, b, a, bb, s, xl2, adapter_dtype))
            continue
        base = torch.nn.functional.linear(x2, w, b)
        out_dtype = torch.promote_types(base.dtype, xa[j].dtype)
        outs.append(torch.addmm(base.to(out_dtype), xa[j], bb.t(), alpha=s))
    return outs, xa


def run_group_backward(grads, x2, weights, lora_As, lora_Bs, scalings, xl2, adapter_dtype, bplans, needs_x: bool,
                       needs_a: Sequence[bool], needs_b: Sequence[bool], lora_products: Optional[dict] = None):
    """(dX, dX_l, [dA_j], [dB_j]) on 2-D tensors; None where not needed.

    ``grads`` are the members' dY_j (n × o_j; None for an output nobody used, read as zero).
    dX_l is separate only when x_lora is given (dropout); else its part is inside dX.
    ``lora_products``: {member: X_l·A_jᵀ} kept from the forward; the others' are recomputed.

    # sZ_j = s_j dY_j B_j;  dA_cat = [sZ_j]ᵀ X_l;  dB_j = dY_jᵀ (s_j XA_j), XA_cat recomputed once
    # dX = Σ_j dY_j W_j (or dY_j (W_j + s_j B_j A_j) when merged) + [sZ_j | split] [A_j | split]
    """
    k = len(weights)
    live = [j for j in range(k) if grads[j] is not None]
    xl = _lora_input(x2, xl2, adapter_dtype)
    plans = [BACKWARD_PLANS[name] for name in bplans]
    g_lora = {j: grads[j] if grads[j].dtype == lora_Bs[j].dtype else grads[j].to(lora_Bs[j].dtype) for j in live}
    dx_split = [j for j in live if needs_x and plans[j].dx == "split"]
    z_users = [j for j in live if needs_a[j] or j in dx_split]
    zs = {j: torch.mm(g_lora[j], lora_Bs[j] * scalings[j]) for j in z_users}  # s on o×r, not n×r

    grad_a: list = [None] * k
    grad_b: list = [None] * k
    a_members = [j for j in live if needs_a[j]]
    if a_members:
        da_cat = torch.mm(_cat_cols([zs[j] for j in a_members]).t(), xl)
        for j, da in zip(a_members, torch.split(da_cat, [lora_As[j].shape[0] for j in a_members], dim=0)):
            grad_a[j] = da
    kept = lora_products or {}
    for j in [j for j in live if needs_b[j] and j in kept]:
        grad_b[j] = torch.addmm(lora_Bs[j], g_lora[j].t(), kept[j], beta=0, alpha=scalings[j])  # s_j·dY_jᵀ·XA_j
    b_members = [j for j in live if needs_b[j] and j not in kept]
    if b_members:
        # X_l [s_1 A_1; …]ᵀ recomputed, never saved; scaled, so no CSE folds it into the forward's XA_cat
        xa_cat = torch.mm(xl, _cat_rows([lora_As[j] * scalings[j] for j in b_members]).t())
        for j, xa_s in zip(b_members, torch.split(xa_cat, [lora_As[j].shape[0] for j in b_members], dim=1)):
            grad_b[j] = torch.mm(g_lora[j].t(), xa_s)
    for j in range(k):  # an unused output: zero gradients, as autograd gives
        if grad_a[j] is None and needs_a[j]:
            grad_a[j] = torch.zeros_like(lora_As[j])
        if grad_b[j] is None and needs_b[j]:
            grad_b[j] = torch.zeros_like(lora_Bs[j])

    grad_x = grad_xl = None
    if needs_x:
        for j in live:
            w = weights[j]
            g_base = grads[j] if grads[j].dtype == w.dtype else grads[j].to(w.dtype)
            if plans[j].dx == "merged":
                w = merged_weight_for_backward(w, lora_As[j], lora_Bs[j], scalings[j])
            grad_x = torch.mm(g_base, w) if grad_x is None else torch.addmm(grad_x, g_base, w)
        if grad_x is None:
            grad_x = x2.new_zeros(x2.shape)
        if dx_split:
            z_cat, a_cat = _cat_cols([zs[j] for j in dx_split]), _cat_rows([lora_As[j] for j in dx_split])
            if xl2 is not None:
                grad_xl = torch.mm(z_cat, a_cat).to(xl2.dtype)
            elif z_cat.dtype == grad_x.dtype:
                grad_x = torch.addmm(grad_x, z_cat, a_cat)  # accumulate_in_gemm
            else:
                grad_x = grad_x + torch.mm(z_cat, a_cat).to(grad_x.dtype)
        elif xl2 is not None:
            grad_xl = xl2.new_zeros(xl2.shape)
    return grad_x, grad_xl, grad_a, grad_b


def _resolved(spec: str, k: int, n: int, kind: str) -> list[str]:
    return [resolve_plan(p, n, kind).name for p in split_plans(spec, k, kind)]


@torch.library.custom_op("runlora::lora_linear_group", mutates_args=())
def lora_linear_group(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    x_lora: Optional[Tensor] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    forward_plans: str = "forward1",
    backward_plans: str = "backward1",
) -> list[Tensor]:
    """[y_j = x @ W_jᵀ + b_j + s_j ((x_lora @ A_jᵀ) @ B_jᵀ)], the x-reading LoRA GEMMs concatenated."""
    check_group_args(x, weights, biases, lora_As, lora_Bs, scalings, x_lora, adapter_dtype, forward_plans,
                     backward_plans)
    i = x.shape[-1]
    x2 = x.reshape(-1, i)
    xl2 = None if x_lora is None else x_lora.reshape(-1, i)
    fplans = _resolved(forward_plans, len(weights), x2.shape[0], "forward")
    outs, _ = run_group_forward(x2, weights, biases, lora_As, lora_Bs, scalings, xl2, adapter_dtype, fplans)
    return [rows_as_output(y, x) for y in outs]


@lora_linear_group.register_fake
def _lora_linear_group_fake(x, weights, biases, lora_As, lora_Bs, scalings, x_lora=None, adapter_dtype=None,
                            forward_plans="forward1", backward_plans="backward1"):
    check_group_args(x, weights, biases, lora_As, lora_Bs, scalings, x_lora, adapter_dtype, forward_plans,
                     backward_plans)
    return [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.promote_types(x.dtype, a.dtype))
            for w, a in zip(weights, lora_As)]


@torch.library.custom_op("runlora::lora_linear_group_backward", mutates_args=())
def lora_linear_group_backward(
    grads: list[Tensor],
    x: Tensor,
    weights: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    x_lora: Optional[Tensor],
    adapter_dtype: Optional[torch.dtype],
    backward_plans: str,
    needs: list[bool],
) -> list[Tensor]:
    """[grad_x, grad_x_lora, grad_A_1..k, grad_B_1..k]; empty where not needed.

    ``needs`` is [x (and x_lora), A_1..k, B_1..k]. grad_x_lora is non-empty only when x_lora
    was given.
    """
    k = len(weights)
    i = x.shape[-1]
    x2 = x.reshape(-1, i)
    fplans = _resolved(backward_plans, k, x2.shape[0], "backward")
    g2 = [g.reshape(-1, w.shape[0]) for g, w in zip(grads, weights)]
    gx, gxl, ga, gb = run_group_backward(
        g2, x2, weights, lora_As, lora_Bs, scalings, None if x_lora is None else x_lora.reshape(-1, i),
        adapter_dtype, fplans, needs[0], needs[1:1 + k], needs[1 + k:])
    empty = x.new_empty(0)
    return ([empty if gx is None else gx.reshape(x.shape), empty.clone() if gxl is None else gxl.reshape(x.shape)]
            # dA_j are row blocks of one GEMM: an op's outputs may not alias (r_j × i, cheap)
            + [a.new_empty(0) if g is None else g.clone() for g, a in zip(ga, lora_As)]
            + [b.new_empty(0) if g is None else g for g, b in zip(gb, lora_Bs)])


@lora_linear_group_backward.register_fake
def _lora_linear_group_backward_fake(grads, x, weights, lora_As, lora_Bs, scalings, x_lora, adapter_dtype,
                                     backward_plans, needs):
    k = len(weights)
    split_plans(backward_plans, k, "backward")
    need_x = needs[0]
    return ([x.new_empty(x.shape) if need_x else x.new_empty(0),
             x_lora.new_empty(x_lora.shape) if (need_x and x_lora is not None) else x.new_empty(0)]
            + [a.new_empty(a.shape) if need else a.new_empty(0) for a, need in zip(lora_As, needs[1:1 + k])]
            + [b.new_empty(b.shape) if need else b.new_empty(0) for b, need in zip(lora_Bs, needs[1 + k:])])


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scalings, x_lora, adapter_dtype, _, backward_plans = inputs
    for j, (w, b) in enumerate(zip(weights, biases)):
        for name, t in (("weight", w), ("bias", b)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"{_WHERE}: member {j}: {name} requires grad, expected a frozen base layer "
                                   f"(got {name} of shape {tuple(t.shape)} with requires_grad=True)")
    k = len(weights)
    ctx.k = k
    ctx.all_biases = all(b is not None for b in biases)
    ctx.save_for_backward(x, x_lora, *weights, *lora_As, *lora_Bs)
    ctx.scalings, ctx.adapter_dtype, ctx.backward_plans = list(scalings), adapter_dtype, backward_plans


def _backward(ctx, grads):
    k = ctx.k
    x, x_lora, *rest = ctx.saved_tensors
    weights, lora_As, lora_Bs = rest[:k], rest[k:2 * k], rest[2 * k:]
    need = list(ctx.needs_input_grad) + [False] * (10 - len(ctx.needs_input_grad))
    need_x, need_a, need_b, need_xl = bool(need[0]), list(need[3]), list(need[4]), bool(need[6])
    if not isinstance(need_a, list) or len(need_a) != k:
        need_a = [bool(need[3])] * k
    if not isinstance(need_b, list) or len(need_b) != k:
        need_b = [bool(need[4])] * k
    grads = [g if g is not None else x.new_zeros((*x.shape[:-1], w.shape[0]), dtype=torch.promote_types(x.dtype, a.dtype))
             for g, w, a in zip(grads, weights, lora_As)]
    out = torch.ops.runlora.lora_linear_group_backward(
        grads, x, list(weights), list(lora_As), list(lora_Bs), ctx.scalings, x_lora, ctx.adapter_dtype,
        ctx.backward_plans, [need_x or need_xl] + [bool(n) for n in need_a] + [bool(n) for n in need_b])
    gx, gxl, ga, gb = out[0], out[1], out[2:2 + k], out[2 + k:]
    # torch.library reads a list holding a None as one leaf: its gradient is one None.
    return (gx if need_x else None, [None] * k, [None] * k if ctx.all_biases else None,
            [g if n else None for g, n in zip(ga, need_a)], [g if n else None for g, n in zip(gb, need_b)],
            None, gxl if need_xl else None, None, None, None)


lora_linear_group.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.runlora.lora_linear_group)
def _group_flops(x_shape, weight_shapes, bias_shapes, a_shapes, b_shapes, scalings, x_lora_shape=None,
                 adapter_dtype=None, forward_plans="forward1", backward_plans="backward1", *args, **kwargs):
    n = math.prod(x_shape[:-1])
    plans = _resolved(forward_plans, len(weight_shapes), n, "forward")
    return int(sum(FORWARD_PLANS[p].flops(n, w[1], w[0], a[0]) for p, w, a in zip(plans, weight_shapes, a_shapes)))


@register_flop_formula(torch.ops.runlora.lora_linear_group_backward)
def _group_backward_flops(g_shapes, x_shape, weight_shapes, a_shapes, b_shapes, scalings, x_lora_shape,
                          adapter_dtype, backward_plans, needs, *args, **kwargs):
    k = len(weight_shapes)
    n = math.prod(x_shape[:-1])
    plans = _resolved(backward_plans, k, n, "backward")
    return int(sum(BACKWARD_PLANS[p].flops(n, w[1], w[0], a[0], Needs(needs[0], needs[1 + j], needs[1 + k + j]))
                   for j, (p, w, a) in enumerate(zip(plans, weight_shapes, a_shapes))))
