"""What an FX node is, whatever the IR: the vocabulary the dialect readers share.

The target sets name each operation's spellings across the IRs (Dynamo's torch IR, the
export training IR, the decomposed ATen IR, symbolic_trace). ``LinearView`` and
``WeightRef`` are what every dialect reader returns (``dialects.py``, ``quantized.py``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "ADD_FNS",
    "ADDMM_FNS",
    "CAST_FNS",
    "EYE_FNS",
    "is_identity_matrix",
    "LINEAR_FNS",
    "LinearView",
    "MATMUL_FNS",
    "MUL_FNS",
    "VIEW_FNS",
    "WeightRef",
    "arg",
    "aten",
    "cast_dtype",
    "is_call",
    "is_metadata_assert",
    "is_tensor_value",
    "is_view",
    "meta_value",
    "mutates_in_place",
    "requires_grad",
    "rows_chain",
    "strip_flatten",
    "view_chain",
]

aten = torch.ops.aten

LINEAR_FNS = {torch._C._nn.linear, F.linear, aten.linear.default}
MATMUL_FNS = {operator.matmul, torch.matmul, aten.matmul.default}
ADDMM_FNS = {torch.addmm, aten.addmm.default}
ADD_FNS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
MUL_FNS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
VIEW_FNS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape"}
CAST_FNS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
EYE_FNS = {torch.eye, aten.eye.default}
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


def requires_grad(node: fx.Node) -> Optional[bool]:
    """Whether a node's value (any tensor of a tuple) requires grad; None without metadata.
    A front door's mark (``runlora_requires_grad`` on export's lifted parameters) comes first."""
    if isinstance(node, fx.Node) and "runlora_requires_grad" in node.meta:
        return bool(node.meta["runlora_requires_grad"])
    val = meta_value(node)
    if val is None:
        return None
    values = val if isinstance(val, (list, tuple)) else (val,)
    return any(bool(getattr(v, "requires_grad", False)) for v in values if is_tensor_value(v))


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.ipow, operator.imatmul, operator.iand, operator.ior}


def mutates_in_place(node: fx.Node) -> bool:
    """``t.copy_(v)``, ``t[i] = v``, ``t += v``, ``torch.relu_(t)``, a mutable ATen overload."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def is_metadata_assert(node: Any) -> bool:
    """torch.export's ``_assert_tensor_metadata(t, dtype=...)``: a check, not a use of t's value."""
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        node.target is aten._assert_tensor_metadata.default)


def is_call(node: Any, fns=(), methods=()) -> bool:
    """A call_function of one of ``fns`` or a call_method named in ``methods``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in methods


_ARANGE_FNS = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def _arange_range(node: Any) -> Optional[tuple]:
    """(start, end, step) of an ``arange`` node, else None."""
    if not is_call(node, _ARANGE_FNS):
        return None
    if node.target is aten.arange.default:
        return 0, node.args[0], 1
    return node.args[0], node.args[1], arg(node, 2, "step", 1)


def is_identity_matrix(node: Any) -> bool:
    """``torch.eye(n)``, or the decomposed IR's spelling of it::

        _to_copy(eq(unsqueeze(arange(0, n), -1), arange(0, n)), dtype=...)
    """
    if is_call(node, EYE_FNS):
        return True
    if not is_call(node, CAST_FNS) or not node.args:
        return False
    eq = node.args[0]
    if not is_call(eq, {aten.eq.Tensor}) or len(eq.args) != 2:
        return False
    rows, cols = eq.args
    if not is_call(rows, {aten.unsqueeze.default}) or rows.args[1] not in (-1, 1):
        return False
    r, c = _arange_range(rows.args[0]), _arange_range(cols)
    return r is not None and r == c and r[0] == 0 and r[2] == 1


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position, else by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_view(node: Any) -> bool:
    """aten.view / reshape / _unsafe_view, or the ``view``/``reshape`` methods."""
    return is_call(node, VIEW_FNS, _VIEW_METHODS)


def view_chain(node: Any) -> tuple[Any, tuple]:
    """Follows views back: (source, the view nodes passed)."""
    chain = []
    while is_view(node):
        chain.append(node)
        node = node.args[0]
    return node, tuple(chain)


def rows_chain(node: Any) -> tuple[Any, tuple]:
    """Follows back the views that only regroup rows: (source, the view nodes passed).

    A linear's input is flattened to rows, ``view(x, [-1, i])``, and may be a view of a tensor
    that was itself viewed to merge attention heads, ``view(permute(q), [b, s, h * d])``. The
    walk stops where the last dimension changes: that tensor is not x, its rows are not x's rows.
    """
    chain = []
    while is_view(node) and _same_size(_last_dim(node.args[0]), _last_dim(node)):
        chain.append(node)
        node = node.args[0]
    return node, tuple(chain)


def _last_dim(node: Any):
    shape = getattr(meta_value(node), "shape", None)
    return shape[-1] if shape is not None and len(shape) else None


def _same_size(a, b) -> bool:
    """True when two sizes are known equal without adding a guard."""
    if a is None or b is None:
        return False
    return bool(statically_known_true(a == b))


def strip_flatten(node: Any) -> Any:
    """Follows views back to the tensor they flatten or restore."""
    return view_chain(node)[0]


def cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype a cast node converts to, or None if the node is not a pure dtype cast."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in _METHOD_DTYPES:
        return _METHOD_DTYPES[node.target]
    if is_call(node, CAST_FNS, ("to", "type")):
        val = meta_value(node)
        src = meta_value(node.args[0])
        dtype = getattr(val, "dtype", None)
        if dtype is None or getattr(src, "device", None) != getattr(val, "device", None):
            return None
        return dtype
    return None


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
        quant: a 4-bit base: what runlora.lora_linear_4bit takes (``quantized.py``), else None.
    """

    out: fx.Node
    x: Any
    weight: WeightRef
    bias: Optional[fx.Node]
    nodes: tuple
    quant: Optional[dict] = None
