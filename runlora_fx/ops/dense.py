"""``torch.ops.runlora.lora_linear`` and its backward, registered with torch.library.

The forward op computes, with weights in nn.Linear layout (W: o×i, A: r×i, B: o×r)::

    y = x @ W.T + bias + scaling * ((x_lora @ A.T) @ B.T)      x_lora defaults to x

casting the LoRA input to ``adapter_dtype`` inside when given (peft's fp32 adapters on a
bf16 base). The chosen plans are plain string arguments, so they are part of every graph
that holds the op: torch.compile, torch.export and ``torch.export.save``/``load`` keep them.
A plan string may be piecewise in the token count n (``"forward1|741:forward2"``), resolved
on the concrete n inside the op: no guard, no recompile.

Autograd saves only the op's inputs (x, W, A, B, x_lora): never x@A, never a cast copy of
x, never W + sBA. The backward is its own op, ``runlora.lora_linear_backward``, so the
chosen backward chain is one visible node in backward graphs and exported programs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plans import Needs, parse_plan, resolve_plan, rows_as_output

__all__ = ["lora_linear", "lora_linear_backward", "check_lora_args"]


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_lora_args(x, weight, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan) -> None:
    """Raises ValueError naming the argument, what was expected and what was got."""
    where = "runlora.lora_linear"
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (out, in); got shape {_shape(weight)}")
    o, i = weight.shape
    if x.dim() < 1 or x.shape[-1] != i:
        raise ValueError(f"{where}: x has shape {_shape(x)}, expected (..., {i}) to match weight {_shape(weight)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != i:
        raise ValueError(f"{where}: lora_A has shape {_shape(lora_A)}, expected (r, {i})")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or _shape(lora_B) != (o, r):
        raise ValueError(f"{where}: lora_B has shape {_shape(lora_B)}, expected ({o}, {r})")
    if bias is not None and _shape(bias) != (o,):
        raise ValueError(f"{where}: bias has shape {_shape(bias)}, expected ({o},)")
    if x_lora is not None and _shape(x_lora) != _shape(x):
        raise ValueError(f"{where}: x_lora has shape {_shape(x_lora)}, expected x's shape {_shape(x)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        got = f"x {x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise ValueError(f"{where}: x, weight and bias must share a dtype; got {got}")
    lora_in = (x if x_lora is None else x_lora).dtype if adapter_dtype is None else adapter_dtype
    if not (lora_A.dtype == lora_B.dtype == lora_in):
        raise ValueError(
            f"{where}: the LoRA branch computes in {lora_in} (adapter_dtype={adapter_dtype}) but got "
            f"lora_A {lora_A.dtype}, lora_B {lora_B.dtype}"
        )
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "x_lora": x_lora}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{where}: all tensors must be on one device; got {devices}")
    merged_ok = x_lora is None and lora_A.dtype == x.dtype
    for spec, kind in ((forward_plan, "forward"), (backward_plan, "backward")):
        try:
            chosen_plans = [resolve_plan(name, 0, kind) for name in parse_plan(spec).names]
        except ValueError as exc:  # unknown or malformed: say which argument
            raise ValueError(f"{where}: {kind}_plan={spec!r}: {exc}") from None
        for name, chosen in zip(parse_plan(spec).names, chosen_plans):
            if chosen.merged and not merged_ok:
                raise ValueError(
                    f"{where}: {kind} plan {name!r} merges W + sBA, which needs x_lora=None and one dtype; "
                    f"got x_lora={'given' if x_lora is not None else None}, x {x.dtype}, lora_A {lora_A.dtype}"
                )


@torch.library.custom_op("runlora::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    x_lora: Optional[Tensor] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    forward_plan: str = "forward1",
    backward_plan: str = "backward1",
) -> Tensor:
    """y = x @ W.T + bias + scaling * ((x_lora @ A.T) @ B.T), by the plan for this n."""
    check_lora_args(x, weight, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan)
    i = weight.shape[1]
    x2 = x.reshape(-1, i)
    xl2 = None if x_lora is None else x_lora.reshape(-1, i)
    plan = resolve_plan(forward_plan, x2.shape[0], "forward")
    y = plan.run(x2, weight, bias, lora_A, lora_B, scaling, xl2, adapter_dtype)
    return rows_as_output(y, x)


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                      forward_plan="forward1", backward_plan="backward1"):
    check_lora_args(x, weight, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan)
    out_dtype = torch.promote_types(x.dtype, lora_A.dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("runlora::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    x_lora: Optional[Tensor],
    adapter_dtype: Optional[torch.dtype],
    backward_plan: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_x_lora, grad_A, grad_B) by the backward plan; empty where not needed.

    ``needs`` is [x (and x_lora), lora_A, lora_B]. grad_x_lora is non-empty only when
    x_lora was given: with x_lora = x its part is already inside grad_x.
    """
    i, o = weight.shape[1], weight.shape[0]
    g2 = grad_y.reshape(-1, o)
    plan = resolve_plan(backward_plan, g2.shape[0], "backward")
    gx, gxl, ga, gb = plan.run(
        g2, x.reshape(-1, i), weight, lora_A, lora_B, scaling,
        None if x_lora is None else x_lora.reshape(-1, i), adapter_dtype, Needs(*needs),
    )
    empty = x.new_empty(0)
    return (
        empty if gx is None else gx.reshape(x.shape),
        empty.clone() if gxl is None else gxl.reshape(x.shape),
        lora_A.new_empty(0) if ga is None else ga,
        lora_B.new_empty(0) if gb is None else gb,
    )


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, scaling, x_lora, adapter_dtype, backward_plan, needs):
    parse_plan(backward_plan)
    need_x, need_a, need_b = needs
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        x_lora.new_empty(x_lora.shape) if (need_x and x_lora is not None) else x.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_a else lora_A.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_b else lora_B.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype, _, backward_plan = inputs
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"runlora.lora_linear: {name} requires grad, expected a frozen base layer "
                f"(got {name} of shape {tuple(t.shape)} with requires_grad=True); freeze it or do not rewrite this layer"
            )
    ctx.save_for_backward(x, weight, lora_A, lora_B, x_lora)
    ctx.scaling = scaling
    ctx.adapter_dtype = adapter_dtype
    ctx.backward_plan = backward_plan


def _backward(ctx, grad_y):
    x, weight, lora_A, lora_B, x_lora = ctx.saved_tensors
    # Trailing arguments left at their schema defaults are not counted: pad to all ten.
    need = tuple(ctx.needs_input_grad) + (False,) * (10 - len(ctx.needs_input_grad))
    needs = [bool(need[0] or need[6]), bool(need[3]), bool(need[4])]
    gx, gxl, ga, gb = torch.ops.runlora.lora_linear_backward(
        grad_y, x, weight, lora_A, lora_B, ctx.scaling, x_lora, ctx.adapter_dtype, ctx.backward_plan, needs
    )
    return (
        gx if need[0] else None, None, None,
        ga if need[3] else None, gb if need[4] else None,
        None, gxl if need[6] else None, None, None, None,
    )


lora_linear.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.runlora.lora_linear)
def _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, scaling, x_lora_shape=None,
                       adapter_dtype=None, forward_plan="forward1", backward_plan="backward1", *args, **kwargs):
    o, i = weight_shape
    n = math.prod(x_shape[:-1])
    return int(resolve_plan(forward_plan, n, "forward").flops(n, i, o, a_shape[0]))


@register_flop_formula(torch.ops.runlora.lora_linear_backward)
def _lora_linear_backward_flops(gy_shape, x_shape, weight_shape, a_shape, b_shape, scaling, x_lora_shape,
                                adapter_dtype, backward_plan, needs, *args, **kwargs):
    o, i = weight_shape
    n = math.prod(x_shape[:-1])
    plan = resolve_plan(backward_plan, n, "backward")
    return int(plan.flops(n, i, o, a_shape[0], Needs(*needs)))
