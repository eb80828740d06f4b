"""``torch.ops.runlora.dora_linear``: DoRA at LoRA's cost, registered with torch.library.

The op computes, with the norm detached (``plans/dora.py`` has the formulas and both forms)::

    c = ‖W + sBA‖_row;  g = magnitude / c
    peft:       Y = X Wᵀ + b + (g − 1) ⊙ (X_l Wᵀ) + g ⊙ s (X_l Aᵀ) Bᵀ       X_l = x_lora or X
    torchtune:  Y = g ⊙ (X Wᵀ + b + s (X_l Aᵀ) Bᵀ)

and returns ``(Y, v, c)``: v = the unscaled LoRA-layer output the magnitude gradient needs
(dm = Σ dY ⊙ v / c, one reduction), c the row norms. Only Y is differentiable; a rewritten
graph reads ``getitem(op, 0)``. The plans (``norm_plan``, ``forward_plan``, ``backward_plan``)
are string arguments, kept by torch.compile, torch.export and save/load.

``runlora::row_sq_norms(W)`` gives ‖W‖²_row for ``norm_lowrank``, computed once per frozen W:
cached on W's identity, data pointer and version counter (``W._version``), so an in-place
change of W (a merge, an optimizer step on an unfrozen W) recomputes it.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plans import Needs, catalogue, parse_plan, resolve_plan
from ..plans.dora import DORA_FORMS, dora_backward, dora_forward, norm_plan

__all__ = ["dora_linear", "row_sq_norms", "check_dora_args", "clear_row_norm_cache", "row_norm_cache_info"]

_WHERE = "runlora.dora_linear"
_CACHE: dict = {}  # id(W) -> (weakref(W), data_ptr, version, shape, dtype, sq_norms)
_STATS = {"hits": 0, "misses": 0}


def clear_row_norm_cache() -> None:
    """Forgets every cached ‖W‖²_row."""
    _CACHE.clear()
    _STATS.update(hits=0, misses=0)


def row_norm_cache_info() -> dict:
    """{"hits", "misses", "entries"} of the ‖W‖²_row cache."""
    return {**_STATS, "entries": len(_CACHE)}


def _cached_sq_norms(weight: Tensor) -> Tensor:
    key = id(weight)
    entry = _CACHE.get(key)
    state = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    if entry is not None and entry[0]() is weight and entry[1:5] == state:
        _STATS["hits"] += 1
        return entry[5]
    _STATS["misses"] += 1
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    sq = weight.detach().to(acc).square().sum(dim=1)
    try:
        ref = weakref.ref(weight, lambda _, k=key: _CACHE.pop(k, None))
    except TypeError:  # not weak-referenceable: do not cache
        return sq
    _CACHE[key] = (ref, *state, sq)
    return sq


@torch.library.custom_op("runlora::row_sq_norms", mutates_args=())
def row_sq_norms(weight: Tensor) -> Tensor:
    """‖W‖²_row (fp32 for a low-precision W), cached per frozen W and its version counter."""
    return _cached_sq_norms(weight).clone()


@row_sq_norms.register_fake
def _row_sq_norms_fake(weight):
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return weight.new_empty((weight.shape[0],), dtype=acc)


def check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm, forward_plan,
                    backward_plan) -> None:
    """Raises ValueError naming the argument, what was expected and what was got."""
    if weight.dim() != 2:
        raise ValueError(f"{_WHERE}: weight must be 2-D (out, in); got shape {tuple(weight.shape)}")
    o, i = weight.shape
    if x.shape[-1] != i:
        raise ValueError(f"{_WHERE}: x has shape {tuple(x.shape)}, expected (..., {i})")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, i) or tuple(lora_B.shape) != (o, r):
        raise ValueError(f"{_WHERE}: lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, expected "
                         f"(r, {i}) and ({o}, r)")
    if tuple(magnitude.shape) != (o,):
        raise ValueError(f"{_WHERE}: magnitude has shape {tuple(magnitude.shape)}, expected ({o},)")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"{_WHERE}: bias has shape {tuple(bias.shape)}, expected ({o},)")
    if x_lora is not None and tuple(x_lora.shape) != tuple(x.shape):
        raise ValueError(f"{_WHERE}: x_lora has shape {tuple(x_lora.shape)}, expected {tuple(x.shape)}")
    dtypes = {"x": x.dtype, "weight": weight.dtype, "lora_A": lora_A.dtype, "lora_B": lora_B.dtype,
              "magnitude": magnitude.dtype}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{_WHERE}: x, weight, lora_A, lora_B and magnitude must share a dtype; got {dtypes}")
    if form not in DORA_FORMS:
        raise ValueError(f"{_WHERE}: form={form!r}, expected one of {DORA_FORMS}")
    norm_plan(norm)
    for spec, kind in ((forward_plan, "forward"), (backward_plan, "backward")):
        try:
            names = parse_plan(spec).names
            plans = [resolve_plan(name, 0, kind) for name in names]
        except ValueError as exc:
            raise ValueError(f"{_WHERE}: {kind}_plan={spec!r}: {exc}") from None
        if form == "torchtune" and x_lora is not None and any(p.merged for p in plans):
            raise ValueError(f"{_WHERE}: {kind} plan {spec!r} merges W + sBA, illegal with torchtune's "
                             "separate LoRA input (dropout)")


@torch.library.custom_op("runlora::dora_linear", mutates_args=())
def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    x_lora: Optional[Tensor] = None,
    form: str = "peft",
    norm_plan: str = "norm_lowrank",
    forward_plan: str = "forward1",
    backward_plan: str = "backward1",
) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, v, c) of a DoRA layer (module docstring) by the named plans."""
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm_plan, forward_plan, backward_plan)
    o, i = weight.shape
    y, v, c = dora_forward(x.reshape(-1, i), weight, bias, lora_A, lora_B, magnitude, scaling,
                           None if x_lora is None else x_lora.reshape(-1, i), form, norm_plan, forward_plan,
                           _cached_sq_norms)
    return y.reshape(*x.shape[:-1], o), v.reshape(*x.shape[:-1], o), c


@dora_linear.register_fake
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora=None, form="peft",
                      norm_plan="norm_lowrank", forward_plan="forward1", backward_plan="backward1"):
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm_plan, forward_plan, backward_plan)
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, _, _, backward_plan = inputs
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{_WHERE}: {name} of shape {tuple(t.shape)} requires grad, expected a frozen base "
                               "layer; freeze it or do not rewrite this layer")
    _, v, c = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, x_lora, v, c)
    ctx.scaling, ctx.form, ctx.backward_plan = scaling, form, backward_plan
    ctx.mark_non_differentiable(v, c)


def _backward(ctx, grad_y, _grad_v, _grad_c):
    x, weight, lora_A, lora_B, magnitude, x_lora, v, c = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))
    o, i = weight.shape
    needs = Needs(x=bool(need[0] or need[7]), lora_A=bool(need[3]), lora_B=bool(need[4]))
    gx, gxl, ga, gb, gm = dora_backward(
        grad_y.reshape(-1, o), x.reshape(-1, i), weight, lora_A, lora_B, magnitude, ctx.scaling,
        None if x_lora is None else x_lora.reshape(-1, i), v.reshape(-1, o), c, ctx.form, ctx.backward_plan,
        needs, bool(need[5]))
    return (
        gx.reshape(x.shape) if need[0] and gx is not None else None, None, None,
        ga if need[3] else None, gb if need[4] else None, gm if need[5] else None, None,
        gxl.reshape(x.shape) if need[7] and gxl is not None else None, None, None, None, None,
    )


dora_linear.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.runlora.dora_linear)
def _dora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, m_shape, scaling, x_lora_shape=None,
                       form="peft", norm="norm_lowrank", forward_plan="forward1", backward_plan="backward1",
                       *args, **kwargs):
    o, i = weight_shape
    n = math.prod(x_shape[:-1])
    r = a_shape[0]
    fplan = resolve_plan(forward_plan, n, "forward")
    norm_flops = norm_plan(norm).flops(fplan.merged).xreplace({catalogue.i: i, catalogue.o: o, catalogue.r: r})
    return int(fplan.flops(n, i, o, r) + norm_flops)
