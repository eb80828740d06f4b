"""``torch.ops.runlora.dora_linear``: DoRA at LoRA's cost, registered with torch.library.

The op computes, with the norm detached (``plans/dora.py`` has the formulas and both forms)::

    c = ‖W + sBA‖_row;  g = magnitude / c
    peft:       Y = X Wᵀ + b + (g − 1) ⊙ (X_l Wᵀ) + g ⊙ s (X_l Aᵀ) Bᵀ       X_l = x_lora or X
    torchtune:  Y = g ⊙ (X Wᵀ + b + s (X_l Aᵀ) Bᵀ)

With ``adapter_dtype`` (peft's default fp32 adapters on a bf16 base: A, B and m in fp32, x and
W in bf16) the base GEMM runs in W's dtype and the rest in the adapters' (``plans/dora.py``).
The op returns ``(Y, v, c)``: v = the unscaled LoRA-layer output the magnitude gradient needs
(dm = Σ dY ⊙ v / c, one reduction), c the row norms. Only Y is differentiable; a rewritten
graph reads ``getitem(op, 0)``. The plans (``norm_plan``, ``forward_plan``, ``backward_plan``)
are string arguments, kept by torch.compile, torch.export and save/load.

``runlora::dora_linear_4bit`` is the same layer on a packed 4-bit W (QDoRA: peft on a
bitsandbytes ``Linear4bit``, torchtune on a torchao NF4Tensor as torch.export unwraps it),
taking W as ``runlora.lora_linear_4bit`` does (``qtensors``, ``quant_type``, ``quant_args``,
``shape``; ``ops/quantized.py``). It dequantizes W once per forward for the base GEMM and the
norm together, again in backward only when dX is needed, and saves the packed weight, never
the dequantized one.

``runlora::row_sq_norms(W)`` gives ‖W‖²_row for ``norm_lowrank``, computed once per frozen W:
cached on W's identity, data pointer and version counter (``W._version``), so an in-place
change of W (a merge, an optimizer step on an unfrozen W) recomputes it.
``runlora::row_sq_norms_4bit`` is the same for a packed W, cached on the packed tensor, so
a hit dequantizes nothing.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plans import Needs, catalogue, parse_plan, resolve_plan
from ..plans.dora import DORA_FORMS, dora_backward_nd, dora_forward_nd, norm_plan
from .quantized import dequantize_4bit, no_grads_for, packed_weight_like

__all__ = ["dora_linear", "dora_linear_4bit", "row_sq_norms", "row_sq_norms_4bit", "check_dora_args",
           "clear_row_norm_cache", "row_norm_cache_info"]

_WHERE = "runlora.dora_linear"
_CACHE: dict = {}  # (id(owner), what) -> (weakref(owner), (data_ptr, version, shape, dtype), sq_norms)
_STATS = {"hits": 0, "misses": 0}


def clear_row_norm_cache() -> None:
    """Forgets every cached ‖W‖²_row."""
    _CACHE.clear()
    _STATS.update(hits=0, misses=0)


def row_norm_cache_info() -> dict:
    """{"hits", "misses", "entries"} of the ‖W‖²_row cache."""
    return {**_STATS, "entries": len(_CACHE)}


def _sq_norms(weight: Tensor) -> Tensor:
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return weight.detach().to(acc).square().sum(dim=1)


def _cached(owner: Tensor, what: tuple, compute) -> Tensor:
    """``compute()`` cached on ``owner`` (its identity, data pointer, version and shape) and ``what``."""
    key = (id(owner), what)
    entry = _CACHE.get(key)
    state = (owner.data_ptr(), owner._version, tuple(owner.shape), owner.dtype)
    if entry is not None and entry[0]() is owner and entry[1] == state:
        _STATS["hits"] += 1
        return entry[2]
    _STATS["misses"] += 1
    sq = compute()
    try:
        ref = weakref.ref(owner, lambda _, k=key: _CACHE.pop(k, None))
    except TypeError:  # not weak-referenceable: do not cache
        return sq
    _CACHE[key] = (ref, state, sq)
    return sq


def _cached_sq_norms(weight: Tensor) -> Tensor:
    return _cached(weight, (), lambda: _sq_norms(weight))


def _cached_sq_norms_4bit(qtensors, quant_type, quant_args, shape, dtype) -> Tensor:
    """‖dequant(W)‖²_row, cached on the packed tensor (qtensors[0]): a hit dequantizes nothing."""
    what = (quant_type, tuple(quant_args), tuple(shape), dtype)
    return _cached(qtensors[0], what,
                   lambda: _sq_norms(dequantize_4bit(qtensors, quant_type, quant_args, shape, dtype)))


@torch.library.custom_op("runlora::row_sq_norms", mutates_args=())
def row_sq_norms(weight: Tensor) -> Tensor:
    """‖W‖²_row (fp32 for a low-precision W), cached per frozen W and its version counter."""
    return _cached_sq_norms(weight).clone()


@row_sq_norms.register_fake
def _row_sq_norms_fake(weight):
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return weight.new_empty((weight.shape[0],), dtype=acc)


@torch.library.custom_op("runlora::row_sq_norms_4bit", mutates_args=())
def row_sq_norms_4bit(qtensors: list[Optional[Tensor]], quant_type: str, quant_args: list[int], shape: list[int],
                      dtype: torch.dtype) -> Tensor:
    """‖W‖²_row of the packed 4-bit W dequantized to ``dtype`` (fp32 for a low-precision
    dtype), cached per packed tensor and its version counter."""
    return _cached_sq_norms_4bit(qtensors, quant_type, quant_args, shape, dtype).clone()


@row_sq_norms_4bit.register_fake
def _row_sq_norms_4bit_fake(qtensors, quant_type, quant_args, shape, dtype):
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return qtensors[0].new_empty((shape[0],), dtype=acc)


def check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm, forward_plan,
                    backward_plan, adapter_dtype=None) -> None:
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
    base = {"x": x.dtype, "weight": weight.dtype}
    adapters = {"lora_A": lora_A.dtype, "lora_B": lora_B.dtype, "magnitude": magnitude.dtype}
    if adapter_dtype is None and len({*base.values(), *adapters.values()}) > 1:
        raise ValueError(f"{_WHERE}: x, weight, lora_A, lora_B and magnitude must share a dtype; got "
                         f"{dict(base, **adapters)}")
    if adapter_dtype is not None and (len(set(base.values())) > 1 or set(adapters.values()) != {adapter_dtype}):
        raise ValueError(f"{_WHERE}: with adapter_dtype={adapter_dtype}, x and weight must share a dtype and "
                         f"lora_A, lora_B and magnitude be {adapter_dtype}; got {dict(base, **adapters)}")
    if adapter_dtype is not None and x_lora is not None:
        raise ValueError(f"{_WHERE}: adapter_dtype={adapter_dtype} with a separate x_lora (dropout) is not supported")
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
        if adapter_dtype is not None and any(p.merged for p in plans):
            raise ValueError(f"{_WHERE}: {kind} plan {spec!r} merges W + sBA, not used with adapter_dtype "
                             f"{adapter_dtype} (adapters in another dtype than W)")


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
    adapter_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, v, c) of a DoRA layer (module docstring) by the named plans; ``adapter_dtype``: A, B
    and m in another dtype than x and W (``plans/dora.py``), Y and v then in that dtype."""
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm_plan, forward_plan, backward_plan,
                    adapter_dtype)
    return dora_forward_nd(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm_plan, forward_plan,
                           _cached_sq_norms, adapter_dtype)


def _out_dtype(x, adapter_dtype):
    return x.dtype if adapter_dtype is None else torch.promote_types(x.dtype, adapter_dtype)


@dora_linear.register_fake
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora=None, form="peft",
                      norm_plan="norm_lowrank", forward_plan="forward1", backward_plan="backward1", adapter_dtype=None):
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, x_lora, form, norm_plan, forward_plan, backward_plan,
                    adapter_dtype)
    shape = (*x.shape[:-1], weight.shape[0])
    out = _out_dtype(x, adapter_dtype)
    return x.new_empty(shape, dtype=out), x.new_empty(shape, dtype=out), magnitude.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, _, _, backward_plan, *rest = inputs
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{_WHERE}: {name} of shape {tuple(t.shape)} requires grad, expected a frozen base "
                               "layer; freeze it or do not rewrite this layer")
    _, v, c = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, x_lora, v, c)
    ctx.scaling, ctx.form, ctx.backward_plan = scaling, form, backward_plan
    ctx.adapter_dtype = rest[0] if rest else None
    ctx.mark_non_differentiable(v, c)


def _backward(ctx, grad_y, _grad_v, _grad_c):
    x, weight, lora_A, lora_B, magnitude, x_lora, v, c = ctx.saved_tensors
    passed = len(ctx.needs_input_grad)
    need = tuple(ctx.needs_input_grad) + (False,) * (13 - passed)
    needs = Needs(x=bool(need[0] or need[7]), lora_A=bool(need[3]), lora_B=bool(need[4]))
    gx, gxl, ga, gb, gm = dora_backward_nd(grad_y, x, weight, lora_A, lora_B, magnitude, ctx.scaling, x_lora, v, c,
                                           ctx.form, ctx.backward_plan, needs, bool(need[5]), ctx.adapter_dtype)
    grads = (gx if need[0] else None, None, None, ga if need[3] else None, gb if need[4] else None,
             gm if need[5] else None, None, gxl if need[7] else None, None, None, None, None, None)
    return grads[:passed]


dora_linear.register_autograd(_backward, setup_context=_setup_context)


# --- on a packed 4-bit W -----------------------------------------------------------------
def _check_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, x_lora, form, norm,
                forward_plan, backward_plan, adapter_dtype=None):
    weight_like = packed_weight_like("runlora.dora_linear_4bit", x, qtensors, quant_type, quant_args, shape)
    check_dora_args(x, weight_like, bias, lora_A, lora_B, magnitude, x_lora, form, norm, forward_plan,
                    backward_plan, adapter_dtype)


@torch.library.custom_op("runlora::dora_linear_4bit", mutates_args=())
def dora_linear_4bit(
    x: Tensor,
    qtensors: list[Optional[Tensor]],
    quant_type: str,
    quant_args: list[int],
    shape: list[int],
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
    adapter_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, v, c) of a DoRA layer on a packed 4-bit W, dequantized to x's dtype (``adapter_dtype``
    as for ``dora_linear``)."""
    _check_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, x_lora, form,
                norm_plan, forward_plan, backward_plan, adapter_dtype)
    weight = dequantize_4bit(qtensors, quant_type, quant_args, shape, x.dtype)
    return dora_forward_nd(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm_plan, forward_plan,
                           lambda _: _cached_sq_norms_4bit(qtensors, quant_type, quant_args, shape, x.dtype),
                           adapter_dtype)


@dora_linear_4bit.register_fake
def _dora_linear_4bit_fake(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, scaling,
                           x_lora=None, form="peft", norm_plan="norm_lowrank", forward_plan="forward1",
                           backward_plan="backward1", adapter_dtype=None):
    _check_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, x_lora, form,
                norm_plan, forward_plan, backward_plan, adapter_dtype)
    out, dtype = (*x.shape[:-1], shape[0]), _out_dtype(x, adapter_dtype)
    return x.new_empty(out, dtype=dtype), x.new_empty(out, dtype=dtype), magnitude.new_empty((shape[0],))


_N_ARGS_4BIT = 16
_X4, _QTENSORS4, _A4, _B4, _M4, _XL4 = 0, 1, 6, 7, 8, 10  # argument positions


def _setup_context_4bit(ctx, inputs, output):
    (x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, _, _,
     backward_plan, *rest) = inputs
    if bias is not None and bias.requires_grad:
        raise RuntimeError(f"runlora.dora_linear_4bit: bias of shape {tuple(bias.shape)} requires grad, expected a "
                           "frozen base layer; freeze it or do not rewrite this layer")
    _, v, c = output
    ctx.save_for_backward(x, lora_A, lora_B, magnitude, x_lora, v, c, *qtensors)
    ctx.meta = (quant_type, list(quant_args), list(shape), scaling, form, backward_plan, rest[0] if rest else None)
    ctx.mark_non_differentiable(v, c)


def _backward_4bit(ctx, grad_y, _grad_v, _grad_c):
    x, lora_A, lora_B, magnitude, x_lora, v, c, *qtensors = ctx.saved_tensors
    quant_type, quant_args, shape, scaling, form, backward_plan, adapter_dtype = ctx.meta
    passed = len(ctx.needs_input_grad)
    need = tuple(ctx.needs_input_grad) + (False,) * (_N_ARGS_4BIT - passed)
    needs = Needs(x=bool(need[_X4] or need[_XL4]), lora_A=bool(need[_A4]), lora_B=bool(need[_B4]))
    weight = dequantize_4bit(qtensors, quant_type, quant_args, shape, x.dtype) if needs.x else None
    gx, gxl, ga, gb, gm = dora_backward_nd(grad_y, x, weight, lora_A, lora_B, magnitude, scaling, x_lora, v, c, form,
                                           backward_plan, needs, bool(need[_M4]), adapter_dtype)
    grads = [None] * _N_ARGS_4BIT
    grads[_QTENSORS4] = no_grads_for(qtensors)
    grads[_X4] = gx if need[_X4] else None
    grads[_A4] = ga if need[_A4] else None
    grads[_B4] = gb if need[_B4] else None
    grads[_M4] = gm if need[_M4] else None
    grads[_XL4] = gxl if need[_XL4] else None
    return tuple(grads[:passed])


dora_linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_context_4bit)


def _flops(x_shape, o, i, r, norm, forward_plan) -> int:
    n = math.prod(x_shape[:-1])
    fplan = resolve_plan(forward_plan, n, "forward")
    norm_flops = norm_plan(norm).flops(fplan.merged).xreplace({catalogue.i: i, catalogue.o: o, catalogue.r: r})
    return int(fplan.flops(n, i, o, r) + norm_flops)


@register_flop_formula(torch.ops.runlora.dora_linear)
def _dora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, m_shape, scaling, x_lora_shape=None,
                       form="peft", norm="norm_lowrank", forward_plan="forward1", backward_plan="backward1",
                       *args, **kwargs):
    return _flops(x_shape, *weight_shape, a_shape[0], norm, forward_plan)


@register_flop_formula(torch.ops.runlora.dora_linear_4bit)
def _dora_linear_4bit_flops(x_shape, qtensors_shape, quant_type, quant_args, shape, bias_shape, a_shape, b_shape,
                            m_shape, scaling, x_lora_shape=None, form="peft", norm="norm_lowrank",
                            forward_plan="forward1", backward_plan="backward1", *args, **kwargs):
    return _flops(x_shape, *shape, a_shape[0], norm, forward_plan)
