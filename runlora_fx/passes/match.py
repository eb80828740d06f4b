"""Find LoRA sites in an FX graph and decide whether rewriting each is exact.

Matches (any dialect, see ``dialects.py``; scale on either side, between A and B or after B)::

    base = linear(x, W, b)                 # W, b frozen
    xa   = linear(x_lora, A)               # x_lora = x, x.to(dtype), dropout(x), ...
    lora = linear(xa, B) * s               # s a Python number; B may carry a bias
    y    = base + lora

Legality lives in ``can_rewrite`` (a reason string when not); profitability is ``choose/``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from ..plans import Needs
from .dialects import as_add, as_linear, as_scale, strip_noop
from .nodes import LinearView, cast_dtype, is_metadata_assert, meta_value

__all__ = ["LoraProduct", "LoraSite", "Rejection", "match_lora", "find_sites", "module_path", "to_sympy"]


@dataclasses.dataclass
class LoraProduct:
    """``s * linear(linear(x_lora, A), B)`` read off the graph."""

    a: LinearView
    b: LinearView
    scaling: float  # the constant factors
    scale_nodes: tuple  # factors only known at run time (symbolic scalars), multiplied in
    nodes: tuple  # every node from the A-linear to the product, inclusive


@dataclasses.dataclass
class LoraSite:
    """One matched ``base + lora`` and everything the rewrite needs."""

    add: fx.Node
    base: LinearView
    lora: LoraProduct
    path: str
    x: Any
    x_lora: Any  # None when the LoRA branch reads x (possibly cast)
    adapter_dtype: Optional[torch.dtype]
    n: sympy.Expr
    i: int
    o: int
    r: int
    dtype: torch.dtype
    needs: Needs

    @property
    def lora_bias(self):
        """lora_B's bias node (peft ``lora_bias=True``), added outside the op as ``s * bias``."""
        return self.lora.b.bias

    @property
    def mixed_dtype(self) -> bool:
        return self.adapter_dtype is not None and self.adapter_dtype != self.dtype

    @property
    def separate_lora_input(self) -> bool:
        return self.x_lora is not None


@dataclasses.dataclass
class Rejection:
    """A LoRA-like product left alone, and why."""

    path: str
    node: str
    reason: str


def module_path(node: fx.Node) -> str:
    """The user's module path of a node, e.g. ``model.layers.0.self_attn.q_proj``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?|^L__self__\.?", "", str(path))
    path = re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.)", "", path)
    return path.strip(".") or node.name


def to_sympy(size) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _users_within(node: fx.Node, allowed: set) -> bool:
    return all(u in allowed or is_metadata_assert(u) for u in node.users)


def as_lora_product(node: Any) -> Optional[LoraProduct]:
    """Reads ``node`` as ``s * linear(s' * linear(x_lora, A), B)``, or None."""
    scaling, scale_nodes, nodes = 1.0, [], []

    def take(c):
        nonlocal scaling
        if isinstance(c, fx.Node):
            scale_nodes.append(c)
        else:
            scaling *= c

    while (scaled := as_scale(node)) is not None:
        nodes.append(node)
        node, c = scaled
        take(c)
    b = as_linear(node)
    if b is None:
        return None
    inner = b.x
    while (scaled := as_scale(inner)) is not None:
        nodes.append(inner)
        inner, c = scaled
        take(c)
    a = as_linear(inner)
    if a is None:
        return None
    a_val, b_val = meta_value(a.out), meta_value(b.out)
    if getattr(a_val, "shape", None) is None or getattr(b_val, "shape", None) is None:
        return None
    return LoraProduct(a, b, scaling, tuple(scale_nodes), tuple(dict.fromkeys(nodes + list(b.nodes) + list(a.nodes))))


def _weight_value(view: LinearView, which: str = "weight"):
    """(shape out×in, requires_grad) of a linear map's weight or bias."""
    if view.weight.node.op == "call_module":
        mod = view.weight.node.graph.owning_module.get_submodule(view.weight.node.target)
        t = getattr(mod, which)
        return (None if t is None else tuple(t.shape)), (t is not None and t.requires_grad)
    if view.quant is not None and which == "weight":
        return tuple(view.quant["shape"]), False  # packed 4-bit weights cannot require grad
    src = view.weight.node if which == "weight" else view.bias
    val = meta_value(src)
    if val is None or not hasattr(val, "shape"):
        return None, False
    shape = tuple(val.shape)
    if which == "weight" and view.weight.transposed:
        shape = shape[::-1]
    requires_grad = src.meta.get("runlora_requires_grad", getattr(val, "requires_grad", False))
    return shape, bool(requires_grad)


def match_lora(add: fx.Node) -> tuple[Optional[LoraSite], Optional[Rejection]]:
    """Matches one add node: (site, None), (None, rejection) or (None, None) if no LoRA."""
    operands = as_add(add)
    if operands is None:
        return None, None
    for base_node, lora_node in (operands, operands[::-1]):
        lora_core, lora_chain = strip_noop(lora_node)
        lora = as_lora_product(lora_core)
        if lora is None:
            continue
        lora.nodes = tuple(lora_chain) + lora.nodes
        base_core, base_chain = strip_noop(base_node)
        base = as_linear(base_core)
        if base is not None:
            base = dataclasses.replace(base, nodes=tuple(base_chain) + base.nodes)
        if base is None or as_lora_product(base_core) is not None:
            return None, Rejection(module_path(add), add.name, "the LoRA product is not added to a linear base output")
        reason_or_site = _build_site(add, base, lora)
        if isinstance(reason_or_site, str):
            return None, Rejection(module_path(add), add.name, reason_or_site)
        return reason_or_site, None
    return None, None


def _build_site(add: fx.Node, base: LinearView, lora: LoraProduct):
    """Legality: returns a LoraSite when the rewrite is exact, else the reason it is not."""
    path = module_path(add)
    x_val = meta_value(base.x)
    if not hasattr(x_val, "shape") or not hasattr(meta_value(add), "shape"):
        return "no shape metadata (run ShapeProp or trace with torch.export / torch.compile)"
    w_shape, w_grad = _weight_value(base)
    if w_shape is None or len(w_shape) != 2:
        return "base weight has no 2-D shape metadata"
    if w_grad:
        return "base weight requires grad (trainable W): RunLoRA plans assume a frozen base"
    if base.bias is not None or base.weight.node.op == "call_module":
        b_shape, b_grad = _weight_value(base, "bias")
        if b_grad:
            return "base bias requires grad: RunLoRA plans assume a frozen base"
    if lora.a.bias is not None:
        return "lora_A has a bias"
    o, i = w_shape
    a_shape, a_grad = _weight_value(lora.a)
    b_shape, b_grad = _weight_value(lora.b)
    if a_shape is None or b_shape is None:
        return "adapter weights have no shape metadata"
    r = a_shape[0]
    if a_shape != (r, i) or b_shape != (o, r):
        return f"adapter shapes do not agree: lora_A {a_shape}, lora_B {b_shape}, base weight ({o}, {i})"
    if x_val.shape[-1] != i or tuple(meta_value(add).shape) != (*x_val.shape[:-1], o):
        return f"shapes do not agree: x {tuple(x_val.shape)}, weight ({o}, {i}), output {tuple(meta_value(add).shape)}"
    matched = set(base.nodes) | set(lora.nodes)
    for node in matched:
        if not _users_within(node, matched | {add}):
            return f"intermediate {node.name} has a user outside the LoRA subgraph"
    for src in (base.weight.node, lora.a.weight.node, lora.b.weight.node):
        if src in matched and src.op != "call_module":
            return "weight is computed inside the matched subgraph"
    # The LoRA input: x itself (maybe cast), or a separate tensor such as dropout(x).
    x_node = strip_noop(base.x)[0]
    xl = lora.a.x
    xl_val = meta_value(xl)
    a_dtype = meta_value(lora.a.out).dtype
    adapter_dtype = None
    x_lora = None
    # x itself or one cast of x; a chain such as x.to(bf16).to(fp32) rounds: a separate input.
    if xl is x_node or (cast_dtype(xl) is not None and strip_noop(xl.args[0])[0] is x_node):
        if xl is not x_node:
            adapter_dtype = cast_dtype(xl)
    else:
        if tuple(getattr(xl_val, "shape", ())) != tuple(x_val.shape):
            return f"LoRA input shape {tuple(getattr(xl_val, 'shape', ()))} differs from x {tuple(x_val.shape)}"
        x_lora = xl
    lora_in_dtype = adapter_dtype or (xl_val.dtype if x_lora is not None else x_val.dtype)
    if meta_value(base.out).dtype != x_val.dtype:
        return "base output dtype differs from x (autocast?): not rewritten"
    if lora_in_dtype != a_dtype or meta_value(lora.b.out).dtype != a_dtype:
        return f"LoRA branch dtypes are mixed inside the branch ({lora_in_dtype} input, {a_dtype} A output)"
    x_grad = bool(getattr(x_val, "requires_grad", True)) or (
        x_lora is not None and bool(getattr(xl_val, "requires_grad", True))
    )
    needs = Needs(x=x_grad, lora_A=a_grad or not _grad_known(lora.a), lora_B=b_grad or not _grad_known(lora.b))
    n = to_sympy(math.prod(x_val.shape[:-1])) if len(x_val.shape) > 1 else sympy.Integer(1)
    return LoraSite(
        add=add, base=base, lora=lora, path=path, x=x_node, x_lora=x_lora,
        adapter_dtype=adapter_dtype if adapter_dtype != x_val.dtype else None,
        n=n, i=int(i), o=int(o), r=int(r), dtype=x_val.dtype, needs=needs,
    )


def _grad_known(view: LinearView) -> bool:
    # Export graphs lift parameters as placeholders whose fake values may not carry
    # requires_grad; when unknown, assume the adapter trains.
    src = view.weight.node
    return src.op in ("get_attr", "call_module") or "example_value" in src.meta or "runlora_requires_grad" in src.meta


def find_sites(graph: fx.Graph) -> tuple[list[LoraSite], list[Rejection]]:
    """All matched sites and all rejected LoRA-like products, in graph order."""
    sites, rejections = [], []
    for node in list(graph.nodes):
        site, rejection = match_lora(node)
        if site is not None:
            sites.append(site)
        elif rejection is not None:
            rejections.append(rejection)
    return sites, rejections
