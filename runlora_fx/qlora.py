"""QLoRA: ``runlora.lora_linear_4bit``, the op for a 4-bit (bitsandbytes NF4/FP4) base weight.

Matches (peft on a bitsandbytes ``Linear4bit``, Dynamo graph)::

    base = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, (o, i), absmax, 64, 'nf4',
                                                    bias=b, absmax_8bit=..., absmax_code=..., absmax_offset=...)
    y    = base + linear(linear(x, A), B) * s

Rewrite to::

    y = torch.ops.runlora.lora_linear_4bit.default(x, packed, absmax, absmax_8bit, absmax_code, absmax_offset,
                                                   [o, i], 64, 'nf4', b, A, B, s, None, None, 'forward1', 'backward1')

The op dequantizes W inside the forward (once per call; merged plans fold sBA into that
dequantized W), dequantizes again in the backward only when dX is needed, and saves only its
inputs: the packed weight and its quantization state, never the dequantized weight.
Double quantization (absmax stored as 8-bit blocks of 256 with their own absmax and offset)
is undone exactly as bitsandbytes' own ``gemm_4bit`` does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .cost import resolve_plan
from .lowering import lowered_lora_linear
from .ops import check_lora_args
from .plans import Needs

__all__ = ["dequantize_4bit", "lora_linear_4bit", "lora_linear_4bit_backward", "lora_linear_nf4"]

_NESTED_BLOCKSIZE = 256  # bitsandbytes' only supported block size for the absmax of absmax


def dequantize_4bit(qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype):
    """The o×i weight in ``dtype`` from bitsandbytes' packed 4-bit form."""
    if absmax_8bit is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax_8bit, absmax, absmax_code, _NESTED_BLOCKSIZE, torch.float32) + absmax_offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(qweight, absmax, blocksize, quant_type, list(shape), dtype)


def _check(x, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan, quant_type):
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"runlora.lora_linear_4bit: quant_type must be 'nf4' or 'fp4'; got {quant_type!r}")
    if len(shape) != 2:
        raise ValueError(f"runlora.lora_linear_4bit: shape must be [out, in]; got {list(shape)}")
    weight_like = x.new_empty(()).expand(*shape)  # shape, dtype and device of W, no memory
    check_lora_args(x, weight_like, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan)


@torch.library.custom_op("runlora::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(
    x: Tensor, qweight: Tensor, absmax: Tensor, absmax_8bit: Optional[Tensor], absmax_code: Optional[Tensor],
    absmax_offset: Optional[Tensor], shape: list[int], blocksize: int, quant_type: str, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, scaling: float, x_lora: Optional[Tensor] = None,
    adapter_dtype: Optional[torch.dtype] = None, forward_plan: str = "forward1", backward_plan: str = "backward1",
) -> Tensor:
    """y = x @ dequant(W).T + bias + scaling * ((x_lora @ A.T) @ B.T), by the plan for this n."""
    _check(x, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan, quant_type)
    o, i = shape
    weight = dequantize_4bit(qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type,
                             x.dtype)
    x2 = x.reshape(-1, i)
    plan = resolve_plan(forward_plan, x2.shape[0], "forward")
    y = plan.run(x2, weight, bias, lora_A, lora_B, scaling, None if x_lora is None else x_lora.reshape(-1, i),
                 adapter_dtype)
    return y.reshape(*x.shape[:-1], o)


@lora_linear_4bit.register_fake
def _fake(x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, bias, lora_A,
          lora_B, scaling, x_lora=None, adapter_dtype=None, forward_plan="forward1", backward_plan="backward1"):
    _check(x, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan, quant_type)
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=torch.promote_types(x.dtype, lora_A.dtype))


@torch.library.custom_op("runlora::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward(
    grad_y: Tensor, x: Tensor, qweight: Tensor, absmax: Tensor, absmax_8bit: Optional[Tensor],
    absmax_code: Optional[Tensor], absmax_offset: Optional[Tensor], shape: list[int], blocksize: int, quant_type: str,
    lora_A: Tensor, lora_B: Tensor, scaling: float, x_lora: Optional[Tensor], adapter_dtype: Optional[torch.dtype],
    backward_plan: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_x_lora, grad_A, grad_B); W is dequantized only when grad_x is needed."""
    o, i = shape
    weight = None
    if needs[0]:
        weight = dequantize_4bit(qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize,
                                 quant_type, x.dtype)
    g2 = grad_y.reshape(-1, o)
    plan = resolve_plan(backward_plan, g2.shape[0], "backward")
    gx, gxl, ga, gb = plan.run(g2, x.reshape(-1, i), weight, lora_A, lora_B, scaling,
                               None if x_lora is None else x_lora.reshape(-1, i), adapter_dtype, Needs(*needs))
    empty = x.new_empty(0)
    return (empty if gx is None else gx.reshape(x.shape), empty.clone() if gxl is None else gxl.reshape(x.shape),
            lora_A.new_empty(0) if ga is None else ga, lora_B.new_empty(0) if gb is None else gb)


@lora_linear_4bit_backward.register_fake
def _fake_backward(grad_y, x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type,
                   lora_A, lora_B, scaling, x_lora, adapter_dtype, backward_plan, needs):
    need_x, need_a, need_b = needs
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            x_lora.new_empty(x_lora.shape) if (need_x and x_lora is not None) else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_a else lora_A.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_b else lora_B.new_empty(0))


_N_ARGS = 17


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, bias, lora_A, lora_B,
     scaling, x_lora, adapter_dtype, _, backward_plan) = inputs
    if bias is not None and bias.requires_grad:
        raise RuntimeError("runlora.lora_linear_4bit: bias requires grad, expected a frozen base layer")
    ctx.save_for_backward(x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, lora_A, lora_B, x_lora)
    ctx.meta = (list(shape), blocksize, quant_type, scaling, adapter_dtype, backward_plan)


def _backward(ctx, grad_y):
    x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, lora_A, lora_B, x_lora = ctx.saved_tensors
    shape, blocksize, quant_type, scaling, adapter_dtype, backward_plan = ctx.meta
    need = tuple(ctx.needs_input_grad) + (False,) * (_N_ARGS - len(ctx.needs_input_grad))
    needs = [bool(need[0] or need[13]), bool(need[10]), bool(need[11])]
    gx, gxl, ga, gb = torch.ops.runlora.lora_linear_4bit_backward(
        grad_y, x, qweight, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type,
        lora_A, lora_B, scaling, x_lora, adapter_dtype, backward_plan, needs)
    grads = [None] * _N_ARGS
    grads[0] = gx if need[0] else None
    grads[10] = ga if need[10] else None
    grads[11] = gb if need[11] else None
    grads[13] = gxl if need[13] else None
    return tuple(grads)


lora_linear_4bit.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.runlora.lora_linear_4bit)
def _flops(x_shape, *args, **kwargs):
    shape, a_shape = args[5], args[9]
    forward_plan = args[14] if len(args) > 14 else kwargs.get("forward_plan", "forward1")
    n = math.prod(x_shape[:-1])
    return int(resolve_plan(forward_plan, n, "forward").flops(n, shape[1], shape[0], a_shape[0]))


def lora_linear_nf4(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                    forward_plan="forward1", backward_plan="backward1"):
    """The LoRA layer on a torchao ``NF4Tensor`` base (torchtune's QLoRA).

    NF4Tensor is a tensor subclass that dequantizes on ``.to(dtype)``; a torch.library op
    cannot take it, so this path is the lowered autograd.Function (``lowering.py``), which
    torch.compile traces subclass and all. Same contract as ``lora_linear_4bit``: dequantize
    in forward, again in backward only for dX; save the NF4 weight, never its dequantized copy.
    """
    return lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype,
                               forward_plan, backward_plan)
