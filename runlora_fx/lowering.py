"""Lower ``runlora.lora_linear`` nodes into their chosen ATen chain for inductor.

Matches (the rewritten torch-level graph)::

    y = torch.ops.runlora.lora_linear.default(x, W, b, A, B, s, None, None, 'forward2', 'backward5')

Rewrite to::

    y = runlora_fx.lowering.lowered_lora_linear(x, W, b, A, B, s, None, None, 'forward2', 'backward5')

``lowered_lora_linear`` is an autograd.Function whose forward and backward are the plan's
mm/addmm calls (``plans.py``), so AOTAutograd traces them into the joint graph and inductor
fuses the scaling, casts and adds around them with no op boundary or per-call dispatch.
Inductor does not reassociate matmuls, so the chosen chain survives. A piecewise plan is
resolved at the traced n's size hint without installing a guard: every plan is exact, so
a dynamic graph stays one graph and only the plan for other n may be the costlier one (the
opaque op, by contrast, resolves the piecewise plan on every call).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ._compat import size_hint
from .cost import resolve_plan
from .plans import Needs

__all__ = ["lowered_lora_linear", "lower_runlora_ops"]


class _LoweredLoRA(torch.autograd.Function):
    """The plan's chain as an autograd.Function. ``weight`` may also be a weight-only
    quantized tensor subclass that dequantizes on ``.to(dtype)`` (torchao's NF4Tensor): it is
    dequantized in forward, and in backward only when dX is needed; for a dense W in x's
    dtype ``.to`` returns W itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype, forward_plan, backward_plan):
        i, o = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, i)
        xl2 = None if x_lora is None else x_lora.reshape(-1, i)
        plan = resolve_plan(forward_plan, size_hint(x2.shape[0]), "forward")
        y = plan.run(x2, weight.to(x.dtype), bias, lora_A, lora_B, scaling, xl2, adapter_dtype)
        ctx.save_for_backward(x, weight, lora_A, lora_B, x_lora)
        ctx.scaling, ctx.adapter_dtype, ctx.backward_plan = scaling, adapter_dtype, backward_plan
        return y.reshape(*x.shape[:-1], o)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, x_lora = ctx.saved_tensors
        need = ctx.needs_input_grad
        i, o = weight.shape[1], weight.shape[0]
        g2 = grad_y.reshape(-1, o)
        plan = resolve_plan(ctx.backward_plan, size_hint(g2.shape[0]), "backward")
        needs = Needs(x=need[0] or need[6], lora_A=need[3], lora_B=need[4])
        gx, gxl, ga, gb = plan.run(
            g2, x.reshape(-1, i), weight.to(x.dtype) if needs.x else None, lora_A, lora_B, ctx.scaling,
            None if x_lora is None else x_lora.reshape(-1, i), ctx.adapter_dtype, needs,
        )
        return (
            None if gx is None or not need[0] else gx.reshape(x.shape), None, None,
            ga if need[3] else None, gb if need[4] else None, None,
            None if gxl is None or not need[6] else gxl.reshape(x.shape), None, None, None,
        )


def lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                        forward_plan="forward1", backward_plan="backward1"):
    """Same contract as ``torch.ops.runlora.lora_linear``, as traceable ATen calls."""
    return _LoweredLoRA.apply(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype,
                              forward_plan, backward_plan)


def lower_runlora_ops(gm: fx.GraphModule) -> int:
    """Replaces every runlora.lora_linear node of ``gm`` by ``lowered_lora_linear``; returns the count."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.runlora.lora_linear.default:
            node.target = lowered_lora_linear
            count += 1
    if count:
        gm.recompile()
    return count
