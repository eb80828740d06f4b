"""Lower ``runlora.lora_linear`` / ``lora_linear_4bit`` nodes into their chosen ATen chain for inductor.

Matches (the rewritten torch-level graph)::

    y = torch.ops.runlora.lora_linear.default(x, W, b, A, B, s, None, None, 'forward2', 'backward5')
    y = torch.ops.runlora.lora_linear_4bit.default(x, [packed, ...], 'bnb_nf4', [64], [o, i], b, A, B, s, ...)

Rewrite to::

    y = runlora_fx.passes.lower.lowered_lora_linear(x, W, b, A, B, s, None, None, 'forward2', 'backward5')
    y = runlora_fx.passes.lower.lowered_lora_linear_4bit(x, [packed, ...], 'bnb_nf4', [64], [o, i], b, A, B, s, ...)

Both are one autograd.Function whose forward and backward are the plan's mm/addmm calls
(``plans/catalogue.py``), so AOTAutograd traces them into the joint graph and inductor fuses the
scaling, casts and adds around them with no op boundary or per-call dispatch. A 4-bit
weight is dequantized inside it by ``runlora.dequantize_4bit`` (opaque, so AOTAutograd
cannot merge the forward and backward calls into one saved copy), in forward and in
backward only when dX is needed, and never saved. Inductor does not reassociate matmuls, so
the chosen chain survives. A piecewise plan is resolved at the traced n's size hint without
installing a guard: every plan is exact, so a dynamic graph stays one graph and only the
plan for other n may be the costlier one (the opaque op, by contrast, resolves the
piecewise plan on every call).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .._compat import size_hint
from .. import ops  # noqa: F401  registers torch.ops.runlora.*
from ..ops.quantized import nf4_parts
from ..plans import Needs, resolve_plan

__all__ = ["lowered_lora_linear", "lowered_lora_linear_4bit", "lora_linear_nf4", "lower_runlora_ops"]


@dataclasses.dataclass(frozen=True)
class _WeightTensor:
    """W itself (``.to`` returns W when already in x's dtype); or torchao's NF4Tensor,
    dequantized by ``runlora.dequantize_4bit``; or another weight-only quantized subclass
    that dequantizes on ``.to(dtype)``."""

    def shape(self, weight):
        return tuple(weight.shape)

    def materialize(self, parts, dtype, phase):
        weight = parts[0]
        nf4 = nf4_parts(weight) if type(weight) is not torch.Tensor else None
        if nf4 is None:
            return weight.to(dtype)
        return torch.ops.runlora.dequantize_4bit(nf4[0], "torchao_nf4", nf4[1], list(weight.shape), dtype, phase)


@dataclasses.dataclass(frozen=True)
class _Packed4bit:
    """A packed 4-bit weight as ``runlora.lora_linear_4bit`` takes it (``ops/quantized.py``: ``QUANT_FORMATS``)."""

    quant_type: str
    quant_args: tuple
    out_in: tuple

    def shape(self, *_):
        return self.out_in

    def materialize(self, parts, dtype, phase):
        return torch.ops.runlora.dequantize_4bit(list(parts), self.quant_type, list(self.quant_args),
                                                 list(self.out_in), dtype, phase)


class _LoweredLoRA(torch.autograd.Function):
    """The plan's chain as an autograd.Function; ``weight`` (a ``_WeightTensor`` or ``_Packed4bit``)
    turns ``*parts`` into W: in forward, and in backward only when dX is needed."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan, weight,
                *parts):
        o, i = weight.shape(*parts)
        x2 = x.reshape(-1, i)
        xl2 = None if x_lora is None else x_lora.reshape(-1, i)
        plan = resolve_plan(forward_plan, size_hint(x2.shape[0]), "forward")
        y = plan.run(x2, weight.materialize(parts, x.dtype, "forward"), bias, lora_A, lora_B, scaling, xl2, adapter_dtype)
        ctx.save_for_backward(x, lora_A, lora_B, x_lora, *parts)
        ctx.scaling, ctx.adapter_dtype, ctx.backward_plan, ctx.weight = scaling, adapter_dtype, backward_plan, weight
        return y.reshape(*x.shape[:-1], o)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, x_lora, *parts = ctx.saved_tensors
        need_x, _, need_a, need_b, need_xl = ctx.needs_input_grad[:5]
        o, i = ctx.weight.shape(*parts)
        g2 = grad_y.reshape(-1, o)
        plan = resolve_plan(ctx.backward_plan, size_hint(g2.shape[0]), "backward")
        needs = Needs(x=need_x or need_xl, lora_A=need_a, lora_B=need_b)
        weight = ctx.weight.materialize(parts, x.dtype, "backward") if needs.x else None
        gx, gxl, ga, gb = plan.run(g2, x.reshape(-1, i), weight, lora_A, lora_B, ctx.scaling,
                                   None if x_lora is None else x_lora.reshape(-1, i), ctx.adapter_dtype, needs)
        grads = (
            None if gx is None or not need_x else gx.reshape(x.shape), None,
            ga if need_a else None, gb if need_b else None,
            None if gxl is None or not need_xl else gxl.reshape(x.shape),
        )
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                        forward_plan="forward1", backward_plan="backward1"):
    """Same contract as ``torch.ops.runlora.lora_linear``, as traceable ATen calls."""
    return _LoweredLoRA.apply(x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan,
                              _WeightTensor(), weight)


def lowered_lora_linear_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, scaling,
                             x_lora=None, adapter_dtype=None, forward_plan="forward1", backward_plan="backward1"):
    """Same contract as ``torch.ops.runlora.lora_linear_4bit``, as traceable calls."""
    weight = _Packed4bit(quant_type, tuple(int(a) for a in quant_args), tuple(int(d) for d in shape))
    return _LoweredLoRA.apply(x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan,
                              weight, *qtensors)


def lora_linear_nf4(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                    forward_plan="forward1", backward_plan="backward1"):
    """The LoRA layer on a torchao ``NF4Tensor`` base (torchtune's QLoRA).

    NF4Tensor is a tensor subclass that dequantizes on ``.to(dtype)``; a torch.library op
    cannot take it, so this path is the lowered autograd.Function (above), which
    torch.compile traces subclass and all. Same contract as ``lora_linear_4bit``: dequantize
    in forward, again in backward only for dX; save the NF4 weight, never its dequantized copy.
    """
    return lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype,
                               forward_plan, backward_plan)


def lower_runlora_ops(gm: fx.GraphModule) -> int:
    """Replaces every runlora op node of ``gm`` by its lowered form; returns the count."""
    lowered = {torch.ops.runlora.lora_linear.default: lowered_lora_linear,
               torch.ops.runlora.lora_linear_4bit.default: lowered_lora_linear_4bit}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in lowered:
            node.target = lowered[node.target]
            count += 1
    if count:
        gm.recompile()
    return count
