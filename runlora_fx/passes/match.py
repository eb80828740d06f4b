"""Find LoRA sites in an FX graph and decide whether rewriting each is exact.

Matches (any dialect, see ``dialects.py``; scale on either side, between A and B or after B)::

    base = linear(x, W, b)                 # W, b frozen
    xa   = linear(x_lora, A)               # x_lora = x, x.to(dtype), dropout(x), ...
    lora = linear(xa, B) * s               # s a number, a SymFloat or a 0-d tensor; B may carry a bias
    y    = base + lora

Legality lives in ``_build_site`` and the ``_can_*`` checks (a reason string when not);
profitability is ``choose/``.

Autocast: inside an autocast region (``autocast.py``) the three linears compute in the
autocast dtype D from fp32 operands; such a site is legal when the fake values say exactly
that (base, lora_A's and lora_B's linears and the sum all in D, every operand autocast-
eligible, no region disagreeing) and becomes a site whose ``dtype`` is D and whose
``autocast`` is D: the rewrite casts x, W, b, A, B (and x_lora) to D explicitly, so the op
computes as ``aten.linear`` under autocast would and fp32 parameters get fp32 grads through
the casts. D, not the parameters' dtype, drives the precision policy for merged plans.

Tensor scales (``LoraProduct.scale_tensors``): a 0-d tensor factor is read at run time and
folded into lora_B by the rewrite (``rewrite.py``), never baked in.

No silent misses: ``find_sites`` also lists every LoRA-shaped product
``linear(linear(x, A), B)`` (inner dim r < min(i, o) / 2, r <= 1024) that no site covers,
with the reason, so ``report.rejected`` holds every product the pass saw and left alone.
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
from .autocast import LOW_PRECISION, autocast_regions, is_autocast_eligible
from .dialects import as_add, as_linear, as_scale, is_tensor_scale, strip_noop
from .nodes import LinearView, cast_dtype, is_identity_matrix, is_metadata_assert, meta_value

__all__ = [
    "LoraProduct", "LoraSite", "Rejection", "match_lora", "find_sites", "find_unmatched_products", "lora_shaped",
    "module_path", "to_sympy",
]


@dataclasses.dataclass
class LoraProduct:
    """``s * linear(linear(x_lora, A), B)`` read off the graph."""

    a: LinearView
    b: LinearView
    scaling: float  # the constant factors
    scale_nodes: tuple  # factors only known at run time (symbolic scalars), multiplied in
    nodes: tuple  # every node from the A-linear to the product, inclusive
    scale_tensors: tuple = ()  # 0-d tensor factors (run-time values): folded into lora_B by the rewrite


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
    dtype: torch.dtype  # the compute dtype: x's, or the autocast dtype
    needs: Needs
    autocast: Optional[torch.dtype] = None  # computed under autocast in this dtype: the rewrite casts to it

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
    scaling, scale_nodes, scale_tensors, nodes = 1.0, [], [], []

    def take(c):
        nonlocal scaling
        if is_tensor_scale(c):
            scale_tensors.append(c)
        elif isinstance(c, fx.Node):
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
    return LoraProduct(a, b, scaling, tuple(scale_nodes), tuple(dict.fromkeys(nodes + list(b.nodes) + list(a.nodes))),
                       tuple(scale_tensors))


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


def _weight_dtype(view: LinearView, which: str = "weight") -> Optional[torch.dtype]:
    """The dtype of a linear map's weight or bias as stored; None if absent or packed 4-bit."""
    if view.weight.node.op == "call_module":
        t = getattr(view.weight.node.graph.owning_module.get_submodule(view.weight.node.target), which)
        return None if t is None else t.dtype
    if view.quant is not None and which == "weight":
        return None
    src = view.weight.node if which == "weight" else view.bias
    return getattr(meta_value(src), "dtype", None) if src is not None else None


def _can_autocast(base: LinearView, lora: LoraProduct, add: fx.Node, x_val, regions: Optional[dict]):
    """Legality of an autocast site: (D, None) when autocast computes the site in D, as its
    fake values say and no region contradicts; (None, None) when no dtype changes (no
    autocast); (None, reason) otherwise."""
    compute = meta_value(base.out).dtype
    inputs = {"x": x_val.dtype, "weight": _weight_dtype(base), "bias": _weight_dtype(base, "bias"),
              "LoRA input": getattr(meta_value(lora.a.x), "dtype", None), "lora_A": _weight_dtype(lora.a),
              "lora_B": _weight_dtype(lora.b)}
    # Autocast shows as a linear whose output dtype is not its operands': without it every
    # linear keeps its operands' dtype (peft's fp32 branch on a bf16 base included).
    operands = ((base.out, ("x", "weight", "bias")), (lora.a.out, ("LoRA input", "lora_A")), (lora.b.out, ("lora_B",)))
    if all(inputs[k] in (None, getattr(meta_value(out), "dtype", None)) for out, keys in operands for k in keys):
        return None, None
    got = ", ".join(f"{k} {d}" for k, d in inputs.items() if d is not None)
    if base.quant is not None:
        return None, f"4-bit base computes in {compute} from x {x_val.dtype} (autocast): not rewritten"
    if compute not in LOW_PRECISION or not all(is_autocast_eligible(d) for d in inputs.values() if d is not None):
        return None, f"base linear computes in {compute} from {got}: not autocast's casts"
    device_type = torch.device(getattr(x_val, "device", "cpu")).type
    region = (regions or {}).get(base.out, {}).get(device_type)
    if region is not None and region.dtype != compute:
        return None, (f"base linear computes in {compute} from {got}, but the autocast region here "
                      f"({region.source}) is {region.dtype}")
    for name, view in (("lora_A", lora.a), ("lora_B", lora.b)):
        out_dtype, w_dtype = meta_value(view.out).dtype, _weight_dtype(view)
        if out_dtype != compute or w_dtype is None or not is_autocast_eligible(w_dtype):
            return None, f"under autocast the base computes in {compute} but {name}'s linear in {out_dtype}"
    if meta_value(add).dtype != compute:
        return None, f"under autocast the base computes in {compute} but the sum is {meta_value(add).dtype}"
    return compute, None


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """A cast src -> dst that keeps every value (bf16/fp16 -> fp32/fp64, fp32 -> fp64)."""
    return src == dst or (src in LOW_PRECISION and dst in (torch.float32, torch.float64)) or (
        src == torch.float32 and dst == torch.float64)


def match_lora(add: fx.Node, regions: Optional[dict] = None) -> tuple[Optional[LoraSite], Optional[Rejection]]:
    """Matches one add node: (site, None), (None, rejection) or (None, None) if no LoRA.

    ``regions`` is ``autocast.autocast_regions(add.graph)`` (computed by ``find_sites``)."""
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
        reason_or_site = _build_site(add, base, lora, regions)
        if isinstance(reason_or_site, str):
            return None, Rejection(module_path(add), add.name, reason_or_site)
        return reason_or_site, None
    return None, None


def _build_site(add: fx.Node, base: LinearView, lora: LoraProduct, regions: Optional[dict] = None):
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
    autocast, why = _can_autocast(base, lora, add, x_val, regions)
    if why is not None:
        return why
    # The LoRA input: x itself (maybe cast), or a separate tensor such as dropout(x).
    x_node = strip_noop(base.x)[0]
    xl = lora.a.x
    xl_val = meta_value(xl)
    a_dtype = meta_value(lora.a.out).dtype
    adapter_dtype = None
    x_lora = None
    # x itself or one cast of x; a chain such as x.to(bf16).to(fp32) rounds: a separate input.
    # Under autocast the A-linear casts its input to D again: x.to(fp32) of a bf16 x is x.
    is_cast_of_x = cast_dtype(xl) is not None and strip_noop(xl.args[0])[0] is x_node
    if xl is x_node or (is_cast_of_x and (autocast is None or _widens(x_val.dtype, cast_dtype(xl))
                                          or cast_dtype(xl) == autocast)):
        if xl is not x_node and autocast is None:
            adapter_dtype = cast_dtype(xl)
    else:
        if tuple(getattr(xl_val, "shape", ())) != tuple(x_val.shape):
            return f"LoRA input shape {tuple(getattr(xl_val, 'shape', ()))} differs from x {tuple(x_val.shape)}"
        x_lora = xl
    lora_in_dtype = adapter_dtype or (xl_val.dtype if x_lora is not None else x_val.dtype)
    if autocast is None and (lora_in_dtype != a_dtype or meta_value(lora.b.out).dtype != a_dtype):
        return f"LoRA branch dtypes are mixed inside the branch ({lora_in_dtype} input, {a_dtype} A output)"
    x_grad = bool(getattr(x_val, "requires_grad", True)) or (
        x_lora is not None and bool(getattr(xl_val, "requires_grad", True))
    )
    needs = Needs(x=x_grad, lora_A=a_grad or not _grad_known(lora.a), lora_B=b_grad or not _grad_known(lora.b))
    n = to_sympy(math.prod(x_val.shape[:-1])) if len(x_val.shape) > 1 else sympy.Integer(1)
    return LoraSite(
        add=add, base=base, lora=lora, path=path, x=x_node, x_lora=x_lora,
        adapter_dtype=adapter_dtype if adapter_dtype != x_val.dtype else None,
        n=n, i=int(i), o=int(o), r=int(r), dtype=autocast or x_val.dtype, needs=needs, autocast=autocast,
    )


def _grad_known(view: LinearView) -> bool:
    # Export graphs lift parameters as placeholders whose fake values may not carry
    # requires_grad; when unknown, assume the adapter trains.
    src = view.weight.node
    return src.op in ("get_attr", "call_module") or "example_value" in src.meta or "runlora_requires_grad" in src.meta


def find_sites(graph: fx.Graph) -> tuple[list[LoraSite], list[Rejection]]:
    """All matched sites and all rejected LoRA-like products, in graph order, then every
    LoRA-shaped product no site or rejection covers (``find_unmatched_products``)."""
    regions = autocast_regions(graph)
    sites, rejections = [], []
    for node in list(graph.nodes):
        site, rejection = match_lora(node, regions)
        if site is not None:
            sites.append(site)
        elif rejection is not None:
            rejections.append(rejection)
    return sites, rejections + find_unmatched_products(graph, sites, rejections)


MAX_LORA_RANK = 1024


def lora_shaped(node: Any) -> Optional[tuple]:
    """Reads ``node`` as a LoRA-shaped product ``linear(s * linear(x, A), B)``: (a, b, r, i, o)
    when the inner dimension r is small (r < min(i, o) / 2 and r <= ``MAX_LORA_RANK``), else None."""
    b = as_linear(node)
    if b is None or b.quant is not None:
        return None
    inner = b.x
    while (scaled := as_scale(inner)) is not None:
        inner = scaled[0]
    a = as_linear(strip_noop(inner)[0])
    if a is None:
        return None
    shapes = [getattr(meta_value(n), "shape", None) for n in (a.x, a.out, b.out)]
    if any(shape is None or len(shape) == 0 for shape in shapes):
        return None
    try:
        i, r, o = (int(shape[-1]) for shape in shapes)
    except (TypeError, ValueError):  # a symbolic feature size: not a LoRA layer we price
        return None
    if r < min(i, o) / 2 and r <= MAX_LORA_RANK:
        return a, b, r, i, o
    return None


def _covered(site) -> set:
    """The nodes a site (ours, or another matcher's record with ``lora.nodes`` / ``nodes``) consumes."""
    lora = getattr(site, "lora", None)
    return set(getattr(lora, "nodes", ()) or getattr(site, "nodes", ()))


def _passes_through(user: fx.Node, node: fx.Node) -> bool:
    """``user`` is ``node`` scaled, cast or cloned: the same product, carried on."""
    scaled = as_scale(user)
    return ((scaled is not None and scaled[0] is node) or (cast_dtype(user) is not None and user.args[0] is node)
            or strip_noop(user)[0] is node)


def _single_use_end(node: fx.Node) -> tuple[fx.Node, list]:
    """Follows ``node`` through single-use scales, casts and clones: (last node, its users)."""
    while True:
        users = [u for u in node.users if not is_metadata_assert(u)]
        if len(users) != 1 or not _passes_through(users[0], node):
            return node, users
        node = users[0]


def _reaches(node: fx.Node, names: set, depth: int = 8) -> bool:
    """Whether a node named in ``names`` uses ``node`` directly or through scales, casts and clones."""
    frontier = [node]
    for _ in range(depth):
        step = []
        for cur in frontier:
            for user in cur.users:
                if user.name in names:
                    return True
                if _passes_through(user, cur):
                    step.append(user)
        if not step:
            return False
        frontier = step
    return False


def _why_unmatched(node: fx.Node) -> str:
    end, users = _single_use_end(node)
    if not users:
        return "its value is unused"
    if len(users) > 1:
        return (f"{end.name} has {len(users)} users ({', '.join(u.name for u in users[:4])}); a rewrite needs one, "
                "an add to a base linear's output")
    user = users[0]
    if user.op == "output":
        return "it is returned as is, not added to a base linear's output"
    others = [a for a in user.args if a is not end]
    if as_add(user) is not None:
        return f"it is added to {getattr(others[0], 'name', others[0]) if others else 'itself'}, not read as base + LoRA"
    if user.op in ("call_function", "call_method") and "mul" in str(getattr(user.target, "__name__", user.target)):
        shape = tuple(getattr(meta_value(others[0]), "shape", ())) if others else ()
        return (f"it is multiplied by {getattr(others[0], 'name', others[0]) if others else '?'} of shape {shape}, "
                "not a scalar (DoRA's magnitude?)")
    return f"it feeds {getattr(user.target, '__name__', user.target)} ({user.name}), not an add to a base linear's output"


def find_unmatched_products(graph: fx.Graph, sites: list, rejections: list) -> list[Rejection]:
    """A Rejection for every LoRA-shaped product (``lora_shaped``) of ``graph`` that no site
    consumes and no rejection already explains (by the add it feeds), with the reason.

    A product of an identity matrix, ``linear(linear(eye(i), A), B)``, is B·A itself (peft's
    DoRA weight norm), not a layer on activations: the DoRA layer is reported by its own product.
    """
    covered = set().union(*(_covered(site) for site in sites)) if sites else set()
    explained = {r.node for r in rejections}
    found = []
    for node in graph.nodes:
        if node in covered or node.name in explained:
            continue
        shaped = lora_shaped(node)
        if shaped is None or is_identity_matrix(strip_noop(shaped[0].x)[0]):
            continue
        if any((view := as_linear(u)) is not None and node in view.nodes for u in node.users):
            continue  # the mm inside view(mm(...)) of the decomposed IR: its view is the product
        if _reaches(node, explained):  # its add was rejected already (e.g. "intermediate ... has a user outside")
            continue
        _, _, r, i, o = shaped
        found.append(Rejection(module_path(node), node.name,
                               f"LoRA-shaped product linear(linear(x, A), B) (r={r}, {i} -> {o}) not rewritten: "
                               f"{_why_unmatched(node)}"))
    return found
