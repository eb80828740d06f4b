"""QLoRA ops: ``runlora.lora_linear_4bit`` (a packed 4-bit base) and ``runlora.dequantize_4bit``.

Matches (peft on a bitsandbytes ``Linear4bit``, Dynamo or torch.export graph)::

    base = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, (o, i), absmax, 64, 'nf4',
                                                    bias=b, absmax_8bit=..., absmax_code=..., absmax_offset=...)
    y    = base + linear(linear(x, A), B) * s

and (torchao's NF4Tensor as torch.export unwraps it, see ``passes/quantized.py``)::

    data = torch.ops.export.access_subclass_inner_tensor.default(nf4_weight, 'quantized_data')  # ... x5
    base = aten.linear(x, <dequantization of the five inner tensors>)

Rewrite to::

    y = torch.ops.runlora.lora_linear_4bit.default(x, [packed, absmax, absmax_8bit, absmax_code, absmax_offset],
                                                   'bnb_nf4', [64], [o, i], b, A, B, s, None, None,
                                                   'forward1', 'backward1')

``quant_type`` names the packed format, ``qtensors`` and ``quant_args`` its pieces
(``QUANT_FORMATS``). The op dequantizes W inside the forward (once per call; merged plans
fold sBA into that dequantized W), dequantizes again in the backward only when dX is
needed, and saves only its inputs: the packed weight and its quantization state, never the
dequantized weight. Each format is undone exactly as its library does (bitsandbytes'
``dequantize_4bit`` with double quantization; torchao's ``NF4Tensor.to(dtype)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..plans import Needs, resolve_plan, rows_as_output
from .dense import check_lora_args

__all__ = ["QUANT_FORMATS", "dequantize_4bit", "dequantize_4bit_op", "lora_linear_4bit", "lora_linear_4bit_backward",
           "nf4_parts", "no_grads_for", "packed_weight_like"]

_NESTED_BLOCKSIZE = 256  # bitsandbytes' only supported block size for the absmax of absmax


def _dequantize_bnb(qtensors, quant_args, shape, dtype, quant_type):
    qweight, absmax, absmax_8bit, absmax_code, absmax_offset = qtensors
    (blocksize,) = quant_args
    if absmax_8bit is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax_8bit, absmax, absmax_code, _NESTED_BLOCKSIZE, torch.float32) + absmax_offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(qweight, absmax, blocksize, quant_type, list(shape), dtype)


def _dequantize_torchao_nf4(qtensors, quant_args, shape, dtype):
    """torchao's NF4Tensor: two 4-bit codes per byte (high nibble first) looked up in the
    16-entry ``nf4`` table, times per-block scales that are themselves int8-quantized in
    blocks of ``scaler_block_size`` around ``scaler_mean``; computed in the weight's dtype."""
    quantized_data, quantized_scalers, quantization_factor, scaler_mean, nf4 = qtensors
    block_size, scaler_block_size = quant_args
    weight_dtype = scaler_mean.dtype
    high = nf4[(quantized_data >> 4).long()]
    low = nf4[(quantized_data & 0b1111).long()]
    scales = (quantized_scalers.view(-1, scaler_block_size) / quantization_factor.unsqueeze(-1)).flatten()
    scales = scales.to(weight_dtype) + scaler_mean
    per_byte = scales.unsqueeze(-1).expand(scales.shape[0], block_size // 2).flatten()
    weight = torch.stack([high * per_byte, low * per_byte], dim=-1).reshape(list(shape))
    return weight.to(dtype)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One packed 4-bit layout: the names of its tensors and integer arguments, and its dequantizer."""

    tensors: tuple
    args: tuple
    dequantize: Callable


QUANT_FORMATS = {
    "bnb_nf4": QuantFormat(("qweight", "absmax", "absmax_8bit", "absmax_code", "absmax_offset"), ("blocksize",),
                           lambda q, a, s, d: _dequantize_bnb(q, a, s, d, "nf4")),
    "bnb_fp4": QuantFormat(("qweight", "absmax", "absmax_8bit", "absmax_code", "absmax_offset"), ("blocksize",),
                           lambda q, a, s, d: _dequantize_bnb(q, a, s, d, "fp4")),
    "torchao_nf4": QuantFormat(("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"),
                               ("block_size", "scaler_block_size"), _dequantize_torchao_nf4),
}


def dequantize_4bit(qtensors, quant_type: str, quant_args, shape, dtype: torch.dtype) -> Tensor:
    """The o×i weight in ``dtype`` from a packed 4-bit form (``QUANT_FORMATS[quant_type]``)."""
    return QUANT_FORMATS[quant_type].dequantize(list(qtensors), list(quant_args), list(shape), dtype)


# runlora::dequantize_4bit is a plain dispatcher op with a Python kernel rather than a
# torch.library.custom_op: it runs once or twice per 4-bit site per step inside compiled
# graphs, and custom_op's autograd and dynamo-disable wrappers cost 13-31 µs a call more
# (measured on the CPU, BENCHMARKS.md). Its inputs never need grad (packed weights), so it
# has no autograd formula.
_LIB = torch.library.Library("runlora", "FRAGMENT")
_LIB.define("dequantize_4bit(Tensor?[] qtensors, str quant_type, int[] quant_args, int[] shape, ScalarType dtype, "
            "str phase) -> Tensor")


def dequantize_4bit_op(qtensors, quant_type: str, quant_args, shape, dtype: torch.dtype, phase: str) -> Tensor:
    """``dequantize_4bit`` as one opaque op, for the lowered path (``passes/lower.py``).

    ``phase`` ("forward" or "backward") does nothing but keep a site's two calls distinct:
    AOTAutograd's CSE would otherwise merge them into one dequantized W kept for backward,
    the very copy QLoRA must not hold.
    """
    return dequantize_4bit(qtensors, quant_type, quant_args, shape, dtype)


_LIB.impl("dequantize_4bit", dequantize_4bit_op, "CompositeExplicitAutograd")


@torch.library.register_fake("runlora::dequantize_4bit")
def _fake_dequantize(qtensors, quant_type, quant_args, shape, dtype, phase):
    return qtensors[0].new_empty(list(shape), dtype=dtype)


def nf4_parts(weight) -> Optional[tuple[list, list]]:
    """(qtensors, quant_args) of a contiguous torchao NF4Tensor (format "torchao_nf4"), else None."""
    if "NF4" not in type(weight).__name__ or not weight.is_contiguous():
        return None
    return ([weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
             weight.nf4], [int(weight.block_size), int(weight.scaler_block_size)])


def packed_weight_like(where: str, x, qtensors, quant_type: str, quant_args, shape) -> Tensor:
    """Checks a packed 4-bit W's pieces against ``QUANT_FORMATS`` (ValueError naming ``where``, what
    was expected and what was got) and returns a stand-in with W's shape and x's dtype and device,
    holding no memory, for the dense argument checks."""
    fmt = QUANT_FORMATS.get(quant_type)
    if fmt is None:
        raise ValueError(f"{where}: quant_type must be one of {sorted(QUANT_FORMATS)}; got {quant_type!r}")
    if len(qtensors) != len(fmt.tensors) or len(quant_args) != len(fmt.args):
        raise ValueError(f"{where}: {quant_type} takes tensors {list(fmt.tensors)} and args "
                         f"{list(fmt.args)}; got {len(qtensors)} tensors and {len(quant_args)} args")
    if len(shape) != 2:
        raise ValueError(f"{where}: shape must be [out, in]; got {list(shape)}")
    return x.new_empty(()).expand(*shape)


def _check(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan,
           backward_plan):
    weight_like = packed_weight_like("runlora.lora_linear_4bit", x, qtensors, quant_type, quant_args, shape)
    check_lora_args(x, weight_like, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan, backward_plan)


@torch.library.custom_op("runlora::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(
    x: Tensor, qtensors: list[Optional[Tensor]], quant_type: str, quant_args: list[int], shape: list[int],
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, x_lora: Optional[Tensor] = None,
    adapter_dtype: Optional[torch.dtype] = None, forward_plan: str = "forward1", backward_plan: str = "backward1",
) -> Tensor:
    """y = x @ dequant(W).T + bias + scaling * ((x_lora @ A.T) @ B.T), by the plan for this n."""
    _check(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan,
           backward_plan)
    o, i = shape
    weight = dequantize_4bit(qtensors, quant_type, quant_args, shape, x.dtype)
    x2 = x.reshape(-1, i)
    plan = resolve_plan(forward_plan, x2.shape[0], "forward")
    y = plan.run(x2, weight, bias, lora_A, lora_B, scaling, None if x_lora is None else x_lora.reshape(-1, i),
                 adapter_dtype)
    return rows_as_output(y, x)


@lora_linear_4bit.register_fake
def _fake(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, scaling, x_lora=None,
          adapter_dtype=None, forward_plan="forward1", backward_plan="backward1"):
    _check(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, x_lora, adapter_dtype, forward_plan,
           backward_plan)
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=torch.promote_types(x.dtype, lora_A.dtype))


@torch.library.custom_op("runlora::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward(
    grad_y: Tensor, x: Tensor, qtensors: list[Optional[Tensor]], quant_type: str, quant_args: list[int],
    shape: list[int], lora_A: Tensor, lora_B: Tensor, scaling: float, x_lora: Optional[Tensor],
    adapter_dtype: Optional[torch.dtype], backward_plan: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_x_lora, grad_A, grad_B); W is dequantized only when grad_x is needed."""
    o, i = shape
    weight = dequantize_4bit(qtensors, quant_type, quant_args, shape, x.dtype) if needs[0] else None
    g2 = grad_y.reshape(-1, o)
    plan = resolve_plan(backward_plan, g2.shape[0], "backward")
    gx, gxl, ga, gb = plan.run(g2, x.reshape(-1, i), weight, lora_A, lora_B, scaling,
                               None if x_lora is None else x_lora.reshape(-1, i), adapter_dtype, Needs(*needs))
    empty = x.new_empty(0)
    return (empty if gx is None else gx.reshape(x.shape), empty.clone() if gxl is None else gxl.reshape(x.shape),
            lora_A.new_empty(0) if ga is None else ga, lora_B.new_empty(0) if gb is None else gb)


@lora_linear_4bit_backward.register_fake
def _fake_backward(grad_y, x, qtensors, quant_type, quant_args, shape, lora_A, lora_B, scaling, x_lora,
                   adapter_dtype, backward_plan, needs):
    need_x, need_a, need_b = needs
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            x_lora.new_empty(x_lora.shape) if (need_x and x_lora is not None) else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_a else lora_A.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_b else lora_B.new_empty(0))


_N_ARGS = 13
_X, _QTENSORS, _A, _B, _X_LORA = 0, 1, 6, 7, 9  # argument positions


def no_grads_for(qtensors):
    """The backward's entry for a ``qtensors`` argument: torch.library flattens a list holding only
    tensors into one input each (so one None each), else keeps it whole (one None)."""
    return [None] * len(qtensors) if all(t is not None for t in qtensors) else None


def _setup_context(ctx, inputs, output):
    (x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype, _,
     backward_plan) = inputs
    if bias is not None and bias.requires_grad:
        raise RuntimeError("runlora.lora_linear_4bit: bias requires grad, expected a frozen base layer")
    ctx.save_for_backward(x, lora_A, lora_B, x_lora, *qtensors)
    ctx.meta = (quant_type, list(quant_args), list(shape), scaling, adapter_dtype, backward_plan)


def _backward(ctx, grad_y):
    x, lora_A, lora_B, x_lora, *qtensors = ctx.saved_tensors
    quant_type, quant_args, shape, scaling, adapter_dtype, backward_plan = ctx.meta
    # One entry per argument passed (trailing defaults may be absent), structured like the inputs.
    passed = len(ctx.needs_input_grad)
    need = tuple(ctx.needs_input_grad) + (False,) * (_N_ARGS - passed)
    needs = [bool(need[_X] or need[_X_LORA]), bool(need[_A]), bool(need[_B])]
    gx, gxl, ga, gb = torch.ops.runlora.lora_linear_4bit_backward(
        grad_y, x, qtensors, quant_type, quant_args, shape, lora_A, lora_B, scaling, x_lora, adapter_dtype,
        backward_plan, needs)
    grads = [None] * _N_ARGS
    grads[_QTENSORS] = no_grads_for(qtensors)
    grads[_X] = gx if need[_X] else None
    grads[_A] = ga if need[_A] else None
    grads[_B] = gb if need[_B] else None
    grads[_X_LORA] = gxl if need[_X_LORA] else None
    return tuple(grads[:passed])


lora_linear_4bit.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.runlora.lora_linear_4bit)
def _flops(x_shape, *args, **kwargs):
    shape, a_shape = args[3], args[5]
    forward_plan = args[10] if len(args) > 10 else kwargs.get("forward_plan", "forward1")
    n = math.prod(x_shape[:-1])
    return int(resolve_plan(forward_plan, n, "forward").flops(n, shape[1], shape[0], a_shape[0]))
