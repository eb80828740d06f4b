"""The dialect table: every spelling of a linear map the matcher reads, dense and 4-bit alike.

The matcher never looks at targets directly: it asks ``as_linear`` what a node *is*, and
``as_linear`` tries each record of ``LINEAR_DIALECTS`` in order. A record is a name, the
producers that emit it, and a reader that returns a ``LinearView`` or None. Adding a spelling
is one record (and its reader); the matcher does not change.

    dialect                       produced by                        spelled
    nn.Linear module              symbolic_trace                     call_module nn.Linear
    torchao NF4 chain             torch.export                       linear(x, <NF4 dequantization over inner tensors>)
    linear                        Dynamo, export training IR         torch._C._nn.linear / F.linear / aten.linear
    matmul                        Dynamo, export, symbolic_trace     x @ W.T, torch.matmul, aten.matmul
    addmm / mm + views            decomposed ATen IR, GPT-2 Conv1D   view(addmm(b, view(x), W.permute(1, 0)))
    broadcast bmm                 decomposed ATen IR (o_proj)        view(bmm(view(expand(x)), view(expand(W.T))))
    bitsandbytes gemm_4bit        Dynamo / export, x without grad    gemm_4bit(x, packed, [o, i], absmax, ...)
    4-bit autograd region         Dynamo, strict torch.export        autograd_function_apply / wrap_with_set_grad_enabled(...)[0]
    bias added after              torchtune QLoRA/DoRA with bias,    <any of the above, no bias> + b
                                  hand-written x @ W.T + b

The 4-bit readers live in ``quantized.py``; scales, adds and value-preserving casts are
read here too (``as_scale``, ``as_add``, ``strip_noop``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from . import quantized
from .nodes import (ADD_FNS, ADDMM_FNS, LINEAR_FNS, MATMUL_FNS, MUL_FNS, VIEW_FNS, LinearView, WeightRef, arg, aten,
                    cast_dtype, is_call, is_tensor_value, meta_value, rows_chain, view_chain)

__all__ = [
    "LINEAR_DIALECTS",
    "LinearDialect",
    "as_add",
    "as_linear",
    "as_scale",
    "is_tensor_scale",
    "strip_casts",
    "strip_noop",
    "strip_transposes",
]

_TRANSPOSE_FNS = {torch.t, aten.t.default, aten.numpy_T.default}


@dataclasses.dataclass(frozen=True)
class LinearDialect:
    """One spelling of ``x @ W.T (+ bias)``: its name, who emits it, and its reader."""

    name: str
    produced_by: str
    read: Callable[[fx.Node], Optional[LinearView]]


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    if is_call(node, _TRANSPOSE_FNS, ("t",)):
        return True
    if is_call(node, {aten.transpose.int, torch.transpose}, ("transpose",)):
        dims = sorted(d % 2 for d in node.args[1:3])
        return dims == [0, 1]
    if is_call(node, {aten.permute.default, torch.permute}, ("permute",)):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return list(dims) == [1, 0]
    return False


def strip_transposes(node: Any) -> tuple[Any, int]:
    """Follows 2-D transposes back: returns (source node, number of transposes mod 2)."""
    parity = 0
    while isinstance(node, fx.Node) and _is_2d_transpose(node):
        node, parity = node.args[0], parity ^ 1
    return node, parity


def _weight_from(mat: Any, graph_holds_transpose: bool) -> Optional[tuple[WeightRef, tuple]]:
    """mat is the graph's right operand; graph_holds_transpose says if it is W.T."""
    src, parity = strip_transposes(mat)
    if not isinstance(src, fx.Node):
        return None
    chain = []
    cur = mat
    while cur is not src:
        chain.append(cur)
        cur = cur.args[0]
    return WeightRef(src, transposed=bool(parity) != graph_holds_transpose), tuple(chain)


def _read_module(node: fx.Node) -> Optional[LinearView]:
    """``call_module`` of an nn.Linear (symbolic_trace)."""
    if node.op != "call_module" or not isinstance(_owning_module(node), torch.nn.Linear):
        return None
    return LinearView(node, node.args[0], WeightRef(node, transposed=False), None, (node,))


def _read_nf4_chain_linear(node: fx.Node) -> Optional[LinearView]:
    """``linear(x, <torchao NF4 dequantization chain>)`` as torch.export unwraps an NF4Tensor."""
    if not is_call(node, LINEAR_FNS):
        return None
    weight, parity = strip_transposes(arg(node, 1, "weight"))
    if parity or not isinstance(weight, fx.Node) or weight.op != "call_function":
        return None
    found = quantized.as_nf4_chain_weight(weight)
    if found is None:
        return None
    quant, chain = found
    return LinearView(node, node.args[0], WeightRef(quant["source"], transposed=False), arg(node, 2, "bias"),
                      (node,) + chain, quant=quant)


def _read_linear(node: fx.Node) -> Optional[LinearView]:
    """``linear(x, W, b)`` in any of its spellings; W may be read through transposes."""
    if not is_call(node, LINEAR_FNS):
        return None
    ref = _weight_from(arg(node, 1, "weight"), graph_holds_transpose=False)
    if ref is None:
        return None
    return LinearView(node, node.args[0], ref[0], arg(node, 2, "bias"), (node,) + ref[1])


def _read_matmul(node: fx.Node) -> Optional[LinearView]:
    """``x @ M`` with M = W.T (a transposed weight) or an in×out matrix (GPT-2's Conv1D)."""
    if not is_call(node, MATMUL_FNS, ("matmul", "__matmul__")):
        return None
    ref = _weight_from(node.args[1], graph_holds_transpose=True)
    val = meta_value(node.args[1])
    if ref is None or len(getattr(val, "shape", ())) != 2:  # TensorMetadata has no ndim
        return None
    return LinearView(node, node.args[0], ref[0], None, (node,) + ref[1])


def _read_addmm(node: fx.Node) -> Optional[LinearView]:
    """Decomposed / Conv1D form: ``view(addmm(b, view(x), Wt))`` or ``view(mm(view(x), Wt))``."""
    inner = node.args[0] if is_call(node, VIEW_FNS, {"view", "reshape"}) else node
    if not is_call(inner, ADDMM_FNS | {aten.mm.default, torch.mm}):
        return None
    is_addmm = is_call(inner, ADDMM_FNS)
    if is_addmm and (inner.kwargs.get("beta", 1) != 1 or inner.kwargs.get("alpha", 1) != 1):
        return None
    x2, mat = (inner.args[1], inner.args[2]) if is_addmm else (inner.args[0], inner.args[1])
    ref = _weight_from(mat, graph_holds_transpose=True)
    if ref is None:
        return None
    x, flatten_chain = rows_chain(x2)
    views = tuple(n for n in (x2, node) if isinstance(n, fx.Node) and is_call(n, VIEW_FNS, {"view", "reshape"}))
    nodes = (node, inner) if node is not inner else (node,)
    return LinearView(node, x, ref[0], inner.args[0] if is_addmm else None,
                      tuple(dict.fromkeys(nodes + flatten_chain + ref[1] + views)))


def _read_broadcast_bmm(node: fx.Node) -> Optional[LinearView]:
    inner = node.args[0] if is_call(node, VIEW_FNS, {"view", "reshape"}) else node
    if not is_call(inner, {aten.bmm.default}):
        return None
    return _as_broadcast_bmm(node, inner)


def _as_broadcast_bmm(node: fx.Node, bmm: fx.Node) -> Optional[LinearView]:
    """The decomposed ATen IR's linear on an input that is not contiguous (Llama's o_proj)::

        view(bmm(view(expand(x, x.shape)), view(expand(W.permute(1, 0), [b, i, o]))), [..., o])

    x is 3-D and expanded to its own shape; the 2-D weight is broadcast over the batch.
    """
    lhs, lhs_views = view_chain(bmm.args[0])
    rhs, rhs_views = view_chain(bmm.args[1])
    if not (is_call(lhs, {aten.expand.default}) and is_call(rhs, {aten.expand.default})):
        return None
    x, mat = lhs.args[0], rhs.args[0]
    x_val, mat_val = meta_value(x), meta_value(mat)
    if getattr(x_val, "shape", None) is None or list(lhs.args[1]) != list(x_val.shape) or len(x_val.shape) != 3:
        return None
    if len(getattr(mat_val, "shape", ())) != 2 or list(rhs.args[1])[1:] != list(mat_val.shape):
        return None
    ref = _weight_from(mat, graph_holds_transpose=True)
    if ref is None:
        return None
    nodes = tuple(dict.fromkeys((node, bmm, lhs, rhs) + lhs_views + rhs_views + ref[1]))
    return LinearView(node, x, ref[0], None, nodes)


def _read_bias_add(node: fx.Node) -> Optional[LinearView]:
    """``linear(x, W) + b``: a bias-free linear map (any dialect above) plus a bias of shape (o,)
    in the output's dtype, added after it (torchtune's QLoRA and DoRA write
    ``linear_nf4(x, W) + b``; by hand, ``x @ W.T + b``)."""
    operands = as_add(node)
    if operands is None:
        return None
    out_val = meta_value(node)
    for lin_side, bias in (operands, operands[::-1]):
        if not isinstance(lin_side, fx.Node) or not isinstance(bias, fx.Node) or len(lin_side.users) != 1:
            continue
        view = as_linear(lin_side)
        lin_val, bias_val = meta_value(lin_side), meta_value(bias)
        if view is None or view.bias is not None or not is_tensor_value(lin_val) or not is_tensor_value(bias_val):
            continue
        if (tuple(bias_val.shape) == (lin_val.shape[-1],) and bias_val.dtype == lin_val.dtype
                and getattr(out_val, "dtype", None) == lin_val.dtype):
            return dataclasses.replace(view, out=node, bias=bias, nodes=(node,) + tuple(view.nodes))
    return None


def _owning_module(node: fx.Node):
    root = node.graph.owning_module
    try:
        return root.get_submodule(node.target) if root is not None else None
    except AttributeError:
        return None


LINEAR_DIALECTS: tuple[LinearDialect, ...] = (
    LinearDialect("nn.Linear module", "symbolic_trace", _read_module),
    # Before "linear": the same node, read with its weight as the NF4 chain's source.
    LinearDialect("torchao NF4 chain", "torch.export (non-strict)", _read_nf4_chain_linear),
    LinearDialect("linear", "Dynamo, export training IR, F.linear", _read_linear),
    LinearDialect("matmul", "Dynamo, export, symbolic_trace, Conv1D", _read_matmul),
    LinearDialect("addmm / mm + views", "decomposed ATen IR, Conv1D", _read_addmm),
    LinearDialect("broadcast bmm", "decomposed ATen IR (non-contiguous input)", _read_broadcast_bmm),
    LinearDialect("bitsandbytes gemm_4bit", "Dynamo / export, x without grad", quantized.read_bnb_gemm),
    LinearDialect("4-bit autograd region", "Dynamo (MatMul4Bit, linear_nf4), strict torch.export",
                  quantized.read_quantized_region),
    # Last: its reader asks every record above what the add's other operand is.
    LinearDialect("bias added after", "torchtune QLoRA/DoRA with bias, x @ W.T + b", _read_bias_add),
)


def as_linear(node: Any) -> Optional[LinearView]:
    """Reads ``node`` as a linear map by the first dialect that reads it, or returns None."""
    if not isinstance(node, fx.Node):
        return None
    for dialect in LINEAR_DIALECTS:
        view = dialect.read(node)
        if view is not None:
            return view
    return None


def strip_noop(node: Any) -> tuple[Any, tuple]:
    """Follows casts to the dtype a tensor already has, and clones, back to their source.

    Returns (source, the nodes passed). peft's 4-bit path writes ``result.clone()`` and
    ``x.to(compute_dtype)``; when the dtype does not change these are value-preserving.
    """
    chain = []
    while isinstance(node, fx.Node):
        is_clone = is_call(node, {torch.clone, aten.clone.default}, ("clone",))
        dtype = cast_dtype(node)
        src = node.args[0] if (is_clone or dtype is not None) else None
        if src is None or (dtype is not None and getattr(meta_value(src), "dtype", None) != dtype):
            break
        chain.append(node)
        node = src
    return node, tuple(chain)


def strip_casts(node: Any) -> Any:
    """Follows dtype casts back to their source."""
    while cast_dtype(node) is not None:
        node = node.args[0]
    return node


def as_scale(node: Any) -> Optional[tuple[Any, Any]]:
    """Reads ``node`` as ``t * c`` or ``c * t`` with t a tensor and c a scalar: returns (t, c).

    c is a Python number; or a node whose value is a Python scalar (Dynamo lifts peft's
    ``scaling`` dict entry to a 0-d tensor input read with ``.item()`` under dynamic shapes);
    or a node whose value is a 0-d floating tensor (peft's ``prepare_model_for_compiled_hotswap``,
    torchtune, a user's buffer or parameter): a run-time value, never a constant (see
    ``is_tensor_scale``).
    """
    if not is_call(node, MUL_FNS, ("mul", "__mul__")) or len(node.args) != 2:
        return None
    a, b = node.args
    for t, c in ((a, b), (b, a)):
        if not isinstance(t, fx.Node) or not is_tensor_value(meta_value(t)):
            continue
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return t, float(c)
        if isinstance(c, fx.Node) and isinstance(meta_value(c), (torch.SymFloat, torch.SymInt, float, int)):
            return t, c
        if is_tensor_scale(c) and len(meta_value(t).shape) > 0:
            return t, c
    return None


def is_tensor_scale(node: Any) -> bool:
    """A node whose value is a 0-d floating tensor: a scale that multiplies like a number
    (a 0-d tensor does not promote the other operand's dtype) but is read at run time."""
    val = meta_value(node)
    return (isinstance(node, fx.Node) and is_tensor_value(val) and len(val.shape) == 0
            and getattr(val, "dtype", torch.int64).is_floating_point)


def as_add(node: Any) -> Optional[tuple[Any, Any]]:
    """Reads ``node`` as ``a + b`` (alpha 1): returns (a, b)."""
    if not is_call(node, ADD_FNS, ("add", "add_", "__add__", "__iadd__")) or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1]
