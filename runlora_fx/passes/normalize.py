"""Canonical views of FX nodes across the IR dialects a user meets.

The matcher never looks at targets directly: it asks these functions what a node *is*
(a linear map, a scale by a constant, a cast, a transpose, a flattening view), whichever
dialect produced it. The dialect tables below are data; adding a spelling never touches
the matcher.

    Dynamo torch IR      torch._C._nn.linear, operator.matmul, x.T, .transpose(0, 1), .to(dtype)
    export training IR   aten.linear, aten.matmul, aten.t / numpy_T / transpose.int, aten._to_copy
    decomposed ATen IR   aten.view(x, [-1, i]) -> aten.mm / aten.addmm(b, ., W.permute(1, 0)) -> aten.view
    symbolic_trace       call_module nn.Linear, F.linear, torch.matmul
    4-bit bases          bitsandbytes gemm_4bit / MatMul4Bit, torchao NF4 (``quantized.py``)
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "LinearView",
    "WeightRef",
    "as_linear",
    "as_scale",
    "as_add",
    "strip_casts",
    "strip_noop",
    "cast_dtype",
    "meta_value",
    "is_tensor_value",
    "is_metadata_assert",
    "aten",
]

aten = torch.ops.aten

_LINEAR = {torch._C._nn.linear, F.linear, aten.linear.default}
_MATMUL = {operator.matmul, torch.matmul, aten.matmul.default}
_ADDMM = {torch.addmm, aten.addmm.default}
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_TRANSPOSE_FN = {torch.t, aten.t.default, aten.numpy_T.default}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_VIEW_FN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape"}
_CAST_FN = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
_CAST_METHODS = {"to", "type", "float", "bfloat16", "half", "double"}
_METHOD_DTYPES = {"float": torch.float32, "bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}


def meta_value(node: Any):
    """The FakeTensor (or value) a node carries: ``val`` (export/AOT), ``example_value``
    (Dynamo) or a ``tensor_meta`` (ShapeProp after symbolic_trace)."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    return node.meta.get("tensor_meta")


def is_tensor_value(value: Any) -> bool:
    """A FakeTensor / Tensor, or ShapeProp's TensorMetadata."""
    return isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def is_metadata_assert(node: Any) -> bool:
    """torch.export's ``_assert_tensor_metadata(t, dtype=...)``: a check, not a use of t's value."""
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        node.target is aten._assert_tensor_metadata.default)


def _is_call(node: Any, fns=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    if _is_call(node, _TRANSPOSE_FN, ("t",)):
        return True
    if _is_call(node, {aten.transpose.int, torch.transpose}, ("transpose",)):
        dims = sorted(d % 2 for d in node.args[1:3])
        return dims == [0, 1]
    if _is_call(node, {aten.permute.default, torch.permute}, ("permute",)):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return list(dims) == [1, 0]
    return False


def strip_transposes(node: Any) -> tuple[Any, int]:
    """Follows 2-D transposes back: returns (source node, number of transposes mod 2)."""
    parity = 0
    while isinstance(node, fx.Node) and _is_2d_transpose(node):
        node, parity = node.args[0], parity ^ 1
    return node, parity


def cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype a cast node converts to, or None if the node is not a pure dtype cast."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in _METHOD_DTYPES:
        return _METHOD_DTYPES[node.target]
    if _is_call(node, _CAST_FN, ("to", "type")):
        val = meta_value(node)
        src = meta_value(node.args[0])
        dtype = getattr(val, "dtype", None)
        if dtype is None or getattr(src, "device", None) != getattr(val, "device", None):
            return None
        return dtype
    return None


def strip_noop(node: Any) -> tuple[Any, tuple]:
    """Follows casts to the dtype a tensor already has, and clones, back to their source.

    Returns (source, the nodes passed). peft's 4-bit path writes ``result.clone()`` and
    ``x.to(compute_dtype)``; when the dtype does not change these are value-preserving.
    """
    chain = []
    while isinstance(node, fx.Node):
        is_clone = _is_call(node, {torch.clone, aten.clone.default}, ("clone",))
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


def _strip_flatten(node: Any) -> Any:
    """Follows aten.view/reshape back to the tensor they flatten or restore."""
    while _is_call(node, _VIEW_FN, _VIEW_METHODS):
        node = node.args[0]
    return node


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """Where a linear map's weight comes from, in nn.Linear layout (out×in).

    ``node`` holds the weight as stored; ``transposed`` means the graph holds W.T (in×out,
    as in ``x @ M`` or GPT-2's Conv1D), so the rewrite passes a transposed view (no copy).
    """

    node: fx.Node
    transposed: bool


@dataclasses.dataclass(frozen=True)
class LinearView:
    """A node that computes ``x @ W.T (+ bias)``.

    Attributes:
        out: the node whose value is the result, with x's leading dims.
        x: the input, before any flattening view.
        weight: where W comes from.
        bias: bias node or None.
        nodes: every node of this linear map except x and the weight/bias sources.
    """

    out: fx.Node
    x: Any
    weight: WeightRef
    bias: Optional[fx.Node]
    nodes: tuple
    quant: Optional[dict] = None  # a 4-bit base: what runlora.lora_linear_4bit takes (quantized.py)


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


def as_linear(node: Any) -> Optional[LinearView]:
    """Reads ``node`` as a linear map, or returns None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = _owning_module(node)
        if isinstance(mod, torch.nn.Linear):
            return LinearView(node, node.args[0], WeightRef(node, transposed=False), None, (node,))
        return None
    from .quantized import as_nf4_chain_weight, as_quantized_linear, is_bnb_gemm  # imports this module

    if node.op == "call_function" and (node.target is operator.getitem or is_bnb_gemm(node)):
        return as_quantized_linear(node)
    if _is_call(node, _LINEAR):
        ref = _weight_from(_arg(node, 1, "weight"), graph_holds_transpose=False)
        if ref is None:
            return None
        bias = _arg(node, 2, "bias")
        if not ref[0].transposed and ref[0].node.op == "call_function":
            nf4 = as_nf4_chain_weight(ref[0].node)
            if nf4 is not None:
                quant, chain = nf4
                return LinearView(node, node.args[0], WeightRef(quant["source"], transposed=False), bias,
                                  (node,) + chain, quant=quant)
        return LinearView(node, node.args[0], ref[0], bias, (node,) + ref[1])
    if _is_call(node, _MATMUL, ("matmul", "__matmul__")):
        ref = _weight_from(node.args[1], graph_holds_transpose=True)
        val = meta_value(node.args[1])
        if ref is None or len(getattr(val, "shape", ())) != 2:  # TensorMetadata has no ndim
            return None
        return LinearView(node, node.args[0], ref[0], None, (node,) + ref[1])
    # Decomposed / Conv1D form: view(addmm(b, view(x), Wt)) or view(mm(view(x), Wt)).
    inner = node.args[0] if _is_call(node, _VIEW_FN, _VIEW_METHODS) else node
    if _is_call(inner, {aten.bmm.default}):
        return _as_broadcast_bmm(node, inner)
    if not _is_call(inner, _ADDMM | {aten.mm.default, torch.mm}):
        return None
    is_addmm = _is_call(inner, _ADDMM)
    if is_addmm and (inner.kwargs.get("beta", 1) != 1 or inner.kwargs.get("alpha", 1) != 1):
        return None
    x2, mat = (inner.args[1], inner.args[2]) if is_addmm else (inner.args[0], inner.args[1])
    ref = _weight_from(mat, graph_holds_transpose=True)
    if ref is None:
        return None
    x = _strip_flatten(x2)
    views = tuple(n for n in (x2, node) if isinstance(n, fx.Node) and _is_call(n, _VIEW_FN, _VIEW_METHODS))
    flatten_chain = []
    cur = x2
    while cur is not x:
        flatten_chain.append(cur)
        cur = cur.args[0]
    nodes = (node, inner) if node is not inner else (node,)
    return LinearView(node, x, ref[0], inner.args[0] if is_addmm else None,
                      tuple(dict.fromkeys(nodes + tuple(flatten_chain) + ref[1] + views)))


def _view_chain(node: Any) -> tuple[Any, tuple]:
    """Follows aten.view/reshape back: (source, the view nodes passed)."""
    chain = []
    while _is_call(node, _VIEW_FN, _VIEW_METHODS):
        chain.append(node)
        node = node.args[0]
    return node, tuple(chain)


def _as_broadcast_bmm(node: fx.Node, bmm: fx.Node) -> Optional[LinearView]:
    """The decomposed ATen IR's linear on an input that is not contiguous (Llama's o_proj)::

        view(bmm(view(expand(x, x.shape)), view(expand(W.permute(1, 0), [b, i, o]))), [..., o])

    x is 3-D and expanded to its own shape; the 2-D weight is broadcast over the batch.
    """
    lhs, lhs_views = _view_chain(bmm.args[0])
    rhs, rhs_views = _view_chain(bmm.args[1])
    if not (_is_call(lhs, {aten.expand.default}) and _is_call(rhs, {aten.expand.default})):
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


def _owning_module(node: fx.Node):
    root = node.graph.owning_module
    try:
        return root.get_submodule(node.target) if root is not None else None
    except AttributeError:
        return None


def as_scale(node: Any) -> Optional[tuple[Any, Any]]:
    """Reads ``node`` as ``t * c`` or ``c * t`` with t a tensor and c a scalar: returns (t, c).

    c is a Python number, or a node whose value is a Python scalar: Dynamo lifts peft's
    ``scaling`` dict entry to a 0-d tensor input read with ``.item()`` under dynamic shapes.
    """
    if not _is_call(node, _MUL, ("mul", "__mul__")) or len(node.args) != 2:
        return None
    a, b = node.args
    for t, c in ((a, b), (b, a)):
        if not isinstance(t, fx.Node) or not is_tensor_value(meta_value(t)):
            continue
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return t, float(c)
        if isinstance(c, fx.Node) and isinstance(meta_value(c), (torch.SymFloat, torch.SymInt, float, int)):
            return t, c
    return None


def as_add(node: Any) -> Optional[tuple[Any, Any]]:
    """Reads ``node`` as ``a + b`` (alpha 1): returns (a, b)."""
    if not _is_call(node, _ADD, ("add", "add_", "__add__", "__iadd__")) or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1]
