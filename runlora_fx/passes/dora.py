"""Find DoRA layers (peft ``use_dora=True``, torchtune ``DoRALinear``) and rewrite each into
``runlora.dora_linear``.

Matches (Dynamo's torch IR, torch.export's training IR and its decomposed ATen IR, where the
identity matrix is ``_to_copy(eq(unsqueeze(arange(i), -1), arange(i)))`` and detach an alias;
peft shown, dropout 0, bias)::

    result = linear(x, W, b)
    eye = torch.eye(i)
    lora_weight = linear(linear(eye, A), B).T              # BA through an identity matrix
    weight_norm = linalg_norm(W + 2.0 * lora_weight.detach(), dim=1).detach()
    g = (magnitude / weight_norm).view(1, -1)
    dora = (g - 1) * (result - b) + g * linear(linear(x_l, A), B) * 2.0
    y = result + dora

The base term ``(result - b)`` is ``result`` without a bias and in torchtune (which scales
its bias too: form "torchtune"), and ``linear(dropout(x), W)`` for peft with dropout > 0
(its second base GEMM: form "peft" with x_lora). Rewrite to::

    dora_linear = torch.ops.runlora.dora_linear.default(x, W, b, A, B, magnitude, 2.0, x_lora,
                                                        'peft', 'norm_lowrank', 'forward1', 'backward1')
    y = operator.getitem(dora_linear, 0)

The identity-matrix chain, the o×i norm input and the second base GEMM are gone: the op
computes the norms by its norm plan (``plans/dora.py``). Legality is ``can_rewrite_dora``
(a reason string when not); the plans are ``choose/dora.py``'s. DoRA sites are rewritten
before the LoRA matcher runs, so no DoRA subgraph is read as a LoRA site.

On a 4-bit base (QDoRA) the base linear is one of the 4-bit dialects (``quantized.py``) and the
norm reads W dequantized in the graph (``quantized.read_dequantized_weight``), which must be the
same packed weight::

    result = gemm_4bit(x, packed.view(-1, 1), [o, i], absmax, 64, 'nf4', bias=b, ...)   # or its region
    weight = runlora.dequantize_4bit([packed, absmax, ...], 'bnb_nf4', [64], [o, i], float32, 'forward')
    weight_norm = linalg_norm(weight + 2.0 * lora_weight.detach(), dim=1).detach()  # ... as above

Rewrite to ``runlora.dora_linear_4bit(x, [packed, absmax, ...], 'bnb_nf4', [64], [o, i], b, A, B,
magnitude, 2.0, x_lora, 'peft', norm, forward, backward)``, or, on a torchao NF4Tensor under
Dynamo, ``lower.dora_linear_nf4(x, nf4_weight, ...)``. Both dequantize W once per forward for the
base GEMM and the norm together, and save the packed weight, never a dequantized one.
``rewrite_4bit`` (``options.py``) applies as to LoRA sites.

peft's ``dequantize_module_weight`` (on every DoRA forward) graph-breaks Dynamo on torch 2.13
(``str.startswith`` on a class's ``__module__``), which splits each DoRA layer across graphs.
``make_peft_dora_traceable`` registers a Dynamo polyfill for it that returns a plain dense
weight as peft does, spells a bitsandbytes ``Params4bit`` as the ``runlora.dequantize_4bit`` call
above (bitsandbytes' own ops, bit for bit), and defers every other weight to peft's own function
(run eagerly). Two more peft spots break a DoRA layer: ``transpose(W, fan_in_fan_out=True)``
(GPT-2's Conv1D) builds an ``nn.Parameter`` (polyfilled to ``W.T``), and the layer clears its
empty cache on every forward, a mutation Dynamo refuses inside checkpointed regions (peft's
method is replaced by one that clears only a non-empty cache). Under autocast peft's DoRA mixes
bf16 linears with an fp32 norm and scale: such a layer is reported, not rewritten. peft's fp32
adapters on a bf16 base (its LoRA branch reads ``x.to(float32)``, its norm ``W.to(float32)``) are
rewritten with the op's ``adapter_dtype``. All of this is
installed once peft is imported: at import here, by ``make_backend`` and
``explain``, and when Dynamo starts compiling a frame (``backend="runlora"``;
``torch._dynamo.reset()`` drops that hook, the first two remain). A strict ``torch.export`` of
such a model needs it in place before exporting: import runlora_fx after peft, or call
``runlora_fx.make_peft_dora_traceable()``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import sys
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from .._compat import on_compile_start, size_hint
from ..choose.dora import DoraChoice, choose_dora
from ..choose.select import SiteFacts
from ..inspection.report import SiteReport, cost_entry
from ..options import RewriteOptions
from ..plans import FORWARD_PLANS, Needs, parse_plan
from .build import new_call
from .lower import dora_linear_nf4
from .dialects import as_add, as_linear, as_scale, strip_casts, strip_noop, strip_transposes
from .match import Rejection, module_path, to_sympy
from .nodes import LinearView, WeightRef, aten, cast_dtype, is_call, is_identity_matrix, is_metadata_assert, meta_value
from .quantized import base_format, left_to_library, read_dequantized_weight, same_packed_weight

__all__ = ["DoraSite", "can_rewrite_dora", "find_dora_sites", "make_peft_dora_traceable", "match_dora",
           "plan_dora_site", "rewrite_dora"]

log = logging.getLogger("runlora_fx.passes.dora")

_NORM_FNS = {torch.linalg.norm, torch._C._linalg.linalg_norm, aten.linalg_norm.default,
             torch.linalg.vector_norm, torch._C._linalg.linalg_vector_norm, aten.linalg_vector_norm.default}
_DETACH_FNS = {torch.detach, aten.detach.default, aten.alias.default}  # the decomposed IR's detach is an alias
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide, aten.div.Tensor}
_SUB_FNS = {operator.sub, torch.sub, aten.sub.Tensor}
_MUL_FNS = {operator.mul, torch.mul, aten.mul.Tensor}


@dataclasses.dataclass
class DoraSite:
    """One matched DoRA layer and everything the rewrite needs."""

    add: fx.Node  # the final ``base + dora``
    base: LinearView
    a: LinearView  # the LoRA branch's A and B linears
    b: LinearView
    weight: fx.Node
    magnitude: fx.Node
    scaling: float
    form: str
    path: str
    x: Any
    x_lora: Any
    n: sympy.Expr
    i: int
    o: int
    r: int
    dtype: torch.dtype
    needs: Needs
    need_magnitude: bool
    nodes: tuple  # every node the op replaces
    adapter_dtype: Optional[torch.dtype] = None  # A, B, m in another dtype than x and W (peft's fp32 adapters)

    @property
    def separate_lora_input(self) -> bool:
        return self.x_lora is not None

    @property
    def quant(self) -> Optional[dict]:
        """The 4-bit base's format (``LinearView.quant``), or None for a dense W."""
        return self.base.quant


# --- reading the graph -------------------------------------------------------------------
def _strip(node: Any) -> tuple[Any, list]:
    """Follows detach and value-preserving casts back: (source, nodes passed)."""
    passed = []
    while True:
        src, chain = strip_noop(node)
        passed += list(chain)
        if is_call(src, _DETACH_FNS, ("detach",)):
            passed.append(src)
            node = src.args[0]
            continue
        return src, passed


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = [u for u in node.users if not is_metadata_assert(u)]
    return users[0] if len(users) == 1 else None


def _binary(node: Any, fns, methods) -> Optional[tuple]:
    if not is_call(node, fns, methods) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args


def _norm_dim_ok(norm: fx.Node) -> bool:
    """A 2-norm over dim 1 (or -1) of a 2-D tensor, no keepdim."""
    args = list(norm.args[1:])
    kw = dict(norm.kwargs)
    vector = norm.target in (torch.linalg.vector_norm, torch._C._linalg.linalg_vector_norm,
                             aten.linalg_vector_norm.default)
    ord_ = kw.get("ord", args[0] if len(args) > 0 else (2 if vector else None))
    dim = kw.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kw.get("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    return ord_ in (None, 2, 2.0) and dim in (1, -1) and not keepdim


def _eye_product(node: Any) -> Optional[tuple[LinearView, LinearView, list]]:
    """``linear(linear(eye(i), A), B).T`` (= BA, o×i): (A view, B view, nodes)."""
    top, passed = _strip(node)
    src, parity = strip_transposes(top)
    if parity != 1 or not isinstance(src, fx.Node):
        return None
    transposes, walk = [], top
    while walk is not src:
        transposes.append(walk)
        walk = walk.args[0]
    b = as_linear(src)
    if b is None or b.bias is not None:
        return None
    a = as_linear(b.x)
    if a is None or a.bias is not None or not is_identity_matrix(a.x):
        return None
    return a, b, passed + transposes + list(b.nodes) + list(a.nodes) + [a.x]


def _same_source(p: Any, q: Any) -> bool:
    return isinstance(p, fx.Node) and strip_noop(p)[0] is strip_noop(q)[0]


def _is_weight(ref: WeightRef, node: Any) -> bool:
    """True when ``node`` is the W (nn.Linear layout, o×i) of the linear whose weight ``ref``
    names: the same source, transposed when the graph holds it transposed (GPT-2's Conv1D)."""
    src, parity = strip_transposes(strip_noop(node)[0])
    return parity == (1 if ref.transposed else 0) and _same_source(src, ref.node)


@dataclasses.dataclass
class _Norm:
    weight: fx.Node
    a: LinearView
    b: LinearView
    scaling: float
    nodes: list


def _read_norm(norm: fx.Node):
    """``linalg_norm(W + s * BA, dim=1)`` with BA through an identity matrix; else a reason
    string (only once an identity-matrix BA was seen) or None (not DoRA-like)."""
    if not is_call(norm, _NORM_FNS) or not norm.args:
        return None
    inner = norm.args[0]
    operands = as_add(inner)
    if operands is None:
        return None
    for w_side, d_side in (operands, operands[::-1]):
        scaled = as_scale(d_side)
        if scaled is None:
            continue
        delta, s = scaled
        product = _eye_product(delta)
        if product is None:
            stripped = _strip(delta)[0]
            cast = strip_casts(stripped)
            if cast is not stripped and _eye_product(cast) is not None:
                return (f"DoRA's BA is computed in {getattr(meta_value(cast), 'dtype', None)} and cast to "
                        f"{getattr(meta_value(delta), 'dtype', None)} for the norm (autocast, or adapters in "
                        "another dtype than x): mixed-dtype DoRA is not rewritten")
            continue
        if not isinstance(s, float):
            return "DoRA norm: the scaling is known only at run time"
        if not _norm_dim_ok(norm):
            return "DoRA norm is not a 2-norm over each output row"
        a, b, nodes = product
        weight, w_chain = strip_noop(w_side)
        return _Norm(weight, a, b, s, [inner, d_side, *w_chain, *nodes])
    return None


def _requires_grad(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if "runlora_requires_grad" in node.meta:
        return bool(node.meta["runlora_requires_grad"])
    val = meta_value(node)
    if node.op == "placeholder" and "val" in node.meta and "example_value" not in node.meta:
        return True  # an export placeholder not marked by the front door: assume it trains
    return bool(getattr(val, "requires_grad", False))


def match_dora(norm: fx.Node):
    """Matches the DoRA layer around one norm node: (site, None), (None, Rejection) or (None, None)."""
    found = _read_norm(norm)
    if found is None:
        return None, None
    path = module_path(norm)
    if isinstance(found, str):
        return None, Rejection(path, norm.name, found)
    result = _read_layer(norm, found)
    if isinstance(result, str):
        return None, Rejection(path, norm.name, result)
    return result, None


def _read_layer(norm: fx.Node, nrm: _Norm):
    """From the norm to the final add; a DoraSite or the reason it is not one."""
    chain = [norm]
    node = _only_user(norm)
    while node is not None and (is_call(node, _DETACH_FNS, ("detach",)) or strip_noop(node)[0] is chain[-1]):
        chain.append(node)
        node = _only_user(node)
    div = _binary(node, _DIV_FNS, ("div", "__truediv__"))
    if div is None or div[1] is not chain[-1]:
        return "DoRA norm is not divided into a magnitude vector"
    magnitude = div[0]
    chain.append(node)
    g = node
    view = _only_user(node)
    if view is not None and is_call(view, {aten.view.default, aten.reshape.default, torch.reshape},
                                    ("view", "reshape")):
        chain.append(view)
        g = view
    users = [u for u in g.users if not is_metadata_assert(u)]
    sub = next((u for u in users if _binary(u, _SUB_FNS, ("sub", "__sub__")) == (g, 1)), None)
    mul_g = next((u for u in users if u is not sub and _binary(u, _MUL_FNS, ("mul", "__mul__")) is not None), None)
    if sub is None or mul_g is None or len(users) != 2:
        return "the DoRA scale g = m / ‖W + sBA‖ is not used as (g - 1) * base + g * lora * s"
    # g * lora * s, or g * (lora * s)
    other = next(arg for arg in mul_g.args if arg is not g)
    scaled_out = mul_g
    lora_nodes = [mul_g]
    inner = as_scale(other)
    if inner is not None:
        lora_out, s = inner
        lora_nodes.append(other)
    else:
        lora_out, s = other, None
        nxt = _only_user(mul_g)
        sc = as_scale(nxt)
        if sc is None:
            return "the DoRA LoRA term is not scaled by a constant"
        s = sc[1]
        scaled_out = nxt
        lora_nodes.append(nxt)
    if not isinstance(s, float) or not math.isclose(s, nrm.scaling, rel_tol=1e-12):
        return f"the DoRA LoRA term's scaling {s!r} differs from the norm's {nrm.scaling!r}"
    lora_core, lora_chain = strip_noop(lora_out)
    b = as_linear(lora_core)
    a = as_linear(b.x) if b is not None else None
    if a is None or b.bias is not None or a.bias is not None:
        return "the DoRA LoRA term is not linear(linear(x, A), B)"
    if not (_same_source(a.weight.node, nrm.a.weight.node) and _same_source(b.weight.node, nrm.b.weight.node)):
        return "the DoRA LoRA term and the norm use different adapters"
    lora_nodes += list(lora_chain) + list(b.nodes) + list(a.nodes)
    mul_base = _only_user(sub)
    mb = _binary(mul_base, _MUL_FNS, ("mul", "__mul__"))
    if mb is None:
        return "(g - 1) is not multiplied by a base term"
    base_term = mb[1] if mb[0] is sub else mb[0]
    dora = _only_user(mul_base)
    ops_ = as_add(dora)
    if ops_ is None or set(ops_) != {mul_base, scaled_out} or _only_user(scaled_out) is not dora:
        return "the DoRA terms are not summed as (g - 1) * base + g * s * lora"
    final = _only_user(dora)
    fin = as_add(final)
    if fin is None or dora not in fin:
        return "the DoRA term is not added to the base output"
    base_out = fin[1] if fin[0] is dora else fin[0]
    base_core, base_chain = strip_noop(base_out)
    base = as_linear(base_core)
    if base is None:
        return "the DoRA term is not added to a linear base output"
    x = strip_noop(base.x)[0]
    x_l = strip_noop(a.x)[0]
    adapter_dtype = _adapter_dtype(x, x_l)
    if adapter_dtype is not None:
        x_l = x  # peft casts x to the adapters' dtype for the LoRA branch: the op's adapter_dtype
    dequantizing, w_node = (), nrm.weight
    if base.quant is not None:
        dequantizing = _dequantized_base_weight(base, nrm, adapter_dtype)
        if isinstance(dequantizing, str):
            return dequantizing
    else:
        if adapter_dtype is not None and cast_dtype(w_node) == adapter_dtype:
            w_node = w_node.args[0]  # peft's W.to(x.dtype), x in the adapters' dtype
        if strip_casts(w_node) is strip_casts(base.weight.node) and not _same_source(base.weight.node, w_node):
            w_dtype = getattr(meta_value(base.weight.node), "dtype", None)
            to_dtype = getattr(meta_value(nrm.weight), "dtype", None)
            return (f"DoRA dtypes are mixed: the norm casts W ({w_dtype}) to {to_dtype}, but the LoRA branch "
                    "reads x in another dtype: not rewritten")
        if not _is_weight(base.weight, w_node):
            return "the DoRA norm's weight is not the base layer's weight (dequantized or computed in the graph?)"
    x_lora = None if x_l is x else a.x
    # The base term says the form.
    term_nodes = []
    bt, bt_chain = strip_noop(base_term)
    term_nodes += list(bt_chain)
    subtract = _binary(bt, _SUB_FNS, ("sub", "__sub__"))
    if bt is base_core:
        # g ⊙ (XWᵀ + b) + g ⊙ s·lora(X_l): torchtune's; without bias and dropout it is peft's too
        form = "torchtune" if base.bias is not None or x_lora is not None else "peft"
    elif subtract is not None and _same_source(subtract[0], base_core) and base.bias is not None and _same_source(subtract[1], base.bias):
        form = "peft"
        term_nodes.append(bt)
        if x_lora is not None:
            return "peft-form DoRA (base − bias) whose LoRA input is separate"
    else:
        second = as_linear(bt)
        if second is None or second.bias is not None or not (
                _is_weight(second.weight, nrm.weight) if base.quant is None else _same_source(second.weight.node, nrm.weight)):
            return "the DoRA base term is not the base output, base − bias, or linear(x_lora, W)"
        if strip_noop(second.x)[0] is not x_l:
            return "peft's second base GEMM reads another input than the LoRA branch"
        form = "peft"
        term_nodes += list(second.nodes)
    nodes = (list(nrm.nodes) + chain + lora_nodes + [sub, mul_base, dora, *term_nodes, *base_chain, *base.nodes,
                                                      *dequantizing])
    return can_rewrite_dora(final, base, a, b, nrm, magnitude, form, x, x_lora, nodes, adapter_dtype, w_node)


def _adapter_dtype(x: Any, x_l: Any) -> Optional[torch.dtype]:
    """The dtype the LoRA branch casts x to (peft's ``_cast_input_dtype``: fp32 adapters on a
    bf16 base), or None when it reads x as it is (or another tensor)."""
    dtype = cast_dtype(x_l)
    if dtype is None or strip_noop(x_l.args[0])[0] is not x or dtype == getattr(meta_value(x), "dtype", None):
        return None
    return dtype


def _dequantized_base_weight(base: LinearView, nrm: _Norm, adapter_dtype: Optional[torch.dtype]):
    """The nodes that dequantize the 4-bit base's W for the norm (``quantized.read_dequantized_weight``;
    then cast to the adapters' dtype, as peft's ``W.to(x.dtype)``), or the reason the norm reads
    something else."""
    weight, cast = nrm.weight, ()
    if adapter_dtype is not None and cast_dtype(weight) == adapter_dtype:
        weight, cast = weight.args[0], (weight,)
    found = read_dequantized_weight(weight)
    if found is None:
        src = strip_casts(nrm.weight)
        if src is not nrm.weight and read_dequantized_weight(src) is not None:
            return (f"DoRA dtypes are mixed: the norm casts the dequantized 4-bit W "
                    f"({getattr(meta_value(src), 'dtype', None)}) to {getattr(meta_value(nrm.weight), 'dtype', None)}: "
                    "not rewritten")
        return "the DoRA norm's weight is not the 4-bit base layer's W dequantized in the graph"
    quant, nodes = found
    if not same_packed_weight(base.quant, quant):
        return "the DoRA norm dequantizes another 4-bit weight than the base layer's"
    return (*cast, *nodes)


def can_rewrite_dora(final, base, a, b, nrm, magnitude, form, x, x_lora, nodes, adapter_dtype=None, weight=None):
    """Legality: a DoraSite when the rewrite is exact, else the reason it is not.

    Args:
        final: the ``base + dora`` add the op replaces.
        base, a, b: the base linear and the LoRA branch's A and B linears.
        nrm: the norm's reading (W, the identity-matrix BA, s).
        magnitude: the magnitude vector's node.
        form: "peft" or "torchtune" (``plans/dora.py``).
        x, x_lora: the layer input and the LoRA branch's own input (None: x).
        nodes: every matched node; none may have a user outside them.
        adapter_dtype: the dtype the LoRA branch casts x to (A, B and m are in it), or None.
        weight: the W the op takes, in its own dtype (default: the norm's ``nrm.weight``).

    Exact only with a frozen W and bias, agreeing shapes, one dtype for x, W, A, B and m (or x
    and W in one, A, B and m in ``adapter_dtype`` and the output in their promotion), and no
    other user of an intermediate.
    """
    path = module_path(final)
    x_val, out_val = meta_value(x), meta_value(final)
    if not hasattr(x_val, "shape") or not hasattr(out_val, "shape"):
        return "no shape metadata"
    w_val, m_val = meta_value(nrm.weight), meta_value(magnitude)
    a_val, b_val = meta_value(a.weight.node), meta_value(b.weight.node)
    if any(getattr(v, "shape", None) is None for v in (w_val, m_val, a_val, b_val)):
        return "DoRA weights have no shape metadata"
    if _requires_grad(nrm.weight) or (base.bias is not None and _requires_grad(base.bias)):
        return "DoRA base weight or bias requires grad: the plans assume a frozen base"
    o, i = tuple(w_val.shape)
    r = tuple(a_val.shape)[0] if not a.weight.transposed else tuple(a_val.shape)[1]
    if a.weight.transposed or b.weight.transposed:
        return "DoRA adapters are held transposed"
    if tuple(a_val.shape) != (r, i) or tuple(b_val.shape) != (o, r) or tuple(m_val.shape) != (o,):
        return (f"DoRA shapes do not agree: lora_A {tuple(a_val.shape)}, lora_B {tuple(b_val.shape)}, "
                f"magnitude {tuple(m_val.shape)}, base weight ({o}, {i})")
    if x_val.shape[-1] != i or tuple(out_val.shape) != (*x_val.shape[:-1], o):
        return f"shapes do not agree: x {tuple(x_val.shape)}, weight ({o}, {i}), output {tuple(out_val.shape)}"
    dtypes = {"x": x_val.dtype, "weight": w_val.dtype, "lora_A": a_val.dtype, "lora_B": b_val.dtype,
              "magnitude": m_val.dtype, "output": out_val.dtype}
    if x_lora is not None:
        dtypes["x_lora"] = meta_value(x_lora).dtype
    if adapter_dtype is not None:
        base_dtype = (getattr(meta_value(base.weight.node), "dtype", None) if base.quant is None
                      else getattr(meta_value(base.out), "dtype", None))  # a 4-bit base: the dtype it computes in
        expected = {"x": x_val.dtype, "weight": adapter_dtype, "lora_A": adapter_dtype, "lora_B": adapter_dtype,
                    "magnitude": adapter_dtype, "output": torch.promote_types(x_val.dtype, adapter_dtype)}
        if dtypes != expected or base_dtype != x_val.dtype or x_lora is not None or form != "peft":
            return (f"DoRA dtypes are mixed ({', '.join(f'{k} {v}' for k, v in dtypes.items())}; base W {base_dtype}) "
                    f"other than as peft's {adapter_dtype} adapters without dropout: not rewritten")
    elif len(set(dtypes.values())) > 1:
        return f"DoRA dtypes are mixed ({', '.join(f'{k} {v}' for k, v in dtypes.items())}): not rewritten"
    matched = set(nodes)
    for node in matched:
        if isinstance(node, fx.Node) and not all(u in matched or u is final or is_metadata_assert(u)
                                                 for u in node.users):
            return f"intermediate {node.name} has a user outside the DoRA subgraph"
    for src in (magnitude, a.weight.node, b.weight.node) + (() if base.quant is not None else (nrm.weight,)):
        if src in matched:
            return "a DoRA weight is computed inside the matched subgraph"
    x_grad = _requires_grad(x) or (x_lora is not None and _requires_grad(x_lora))
    needs = Needs(x=x_grad, lora_A=_requires_grad(a.weight.node), lora_B=_requires_grad(b.weight.node))
    n = to_sympy(math.prod(x_val.shape[:-1])) if len(x_val.shape) > 1 else sympy.Integer(1)
    return DoraSite(add=final, base=base, a=a, b=b, weight=nrm.weight if weight is None else weight,
                    magnitude=magnitude, scaling=nrm.scaling,
                    form=form, path=path, x=x, x_lora=x_lora, n=n, i=int(i), o=int(o), r=int(r),
                    dtype=x_val.dtype, needs=needs, need_magnitude=_requires_grad(magnitude),
                    nodes=tuple(dict.fromkeys(nodes)), adapter_dtype=adapter_dtype)


def find_dora_sites(graph: fx.Graph) -> tuple[list, list]:
    """All matched DoRA sites and all rejected DoRA-like norms, in graph order."""
    sites, rejected = [], []
    for node in list(graph.nodes):
        site, rejection = match_dora(node)
        if site is not None:
            sites.append(site)
        elif rejection is not None:
            rejected.append(rejection)
    return sites, rejected


# --- choosing and reporting --------------------------------------------------------------
def _n_hint(site: DoraSite) -> Optional[int]:
    try:
        return int(math.prod(size_hint(s) for s in meta_value(site.x).shape[:-1]))
    except Exception:  # noqa: BLE001 - a hint is optional
        return None


def plan_dora_site(site: DoraSite, options: RewriteOptions) -> DoraChoice:
    """The site's (forward, norm, backward), honouring forced plans (an illegal forced merged
    plan falls back to the chosen one: v's own legality decides)."""
    val = meta_value(site.x)
    separate = site.form == "torchtune" and site.x_lora is not None
    mixed = site.adapter_dtype is not None
    facts = SiteFacts(site.n, site.i, site.o, site.r, needs=site.needs, separate_lora_input=separate,
                      mixed_dtype=mixed, allow_merged=options.merged_allowed(site.dtype) and not mixed,
                      n_hint=_n_hint(site), dtype=site.dtype, adapter_dtype=site.adapter_dtype,
                      bias=site.base.bias is not None, device=getattr(val, "device", "cpu"))
    forced = options
    if (separate or mixed) and options.forced_plans:
        forced = dataclasses.replace(options, forward_plan=None, backward_plan=None)
    if forced.forward_plan is not None or forced.backward_plan is not None:
        forced = dataclasses.replace(forced, criterion="flops")
    choice = choose_dora(facts, forced)
    if forced.backward_plan is not None:
        choice = dataclasses.replace(choice, plans=dataclasses.replace(
            choice.plans, backward=parse_plan(forced.backward_plan), criterion="fixed"))
    return choice


def _dora_report(site: DoraSite, choice: DoraChoice) -> SiteReport:
    hint = _n_hint(site)
    subs = {}
    for size in meta_value(site.x).shape[:-1]:
        if isinstance(size, torch.SymInt) and sympy.sympify(size.node.expr).is_Symbol:
            subs[sympy.sympify(size.node.expr)] = size_hint(size)
    f_costs = {k: cost_entry(v, subs) for k, v in choice.pair_costs.items()}
    b_costs = {k: cost_entry(v, subs) for k, v in choice.plans.backward_costs.items()}
    original = chosen = None
    if hint is not None:
        # eager: forward1 + backward1 + BA through eye(i) (2·i·i·r + 2·i·r·o) + W + sBA and its norm (3·o·i)
        n_, i_, o_, r_ = hint, site.i, site.o, site.r
        eager_norm = 2 * i_ * i_ * r_ + 2 * i_ * r_ * o_ + 3 * o_ * i_
        f_name, b_name = choice.forward.at(hint), choice.backward.at(hint)
        b_orig = b_costs.get("backward1", {}).get("value")
        b_chosen = b_costs.get(b_name, {}).get("value")
        pair = f_costs.get(f"{f_name}/{choice.norm}", {}).get("value")
        if None not in (b_orig, b_chosen, pair):
            f1 = int(FORWARD_PLANS["forward1"].flops(n_, i_, o_, r_))
            original = f1 + eager_norm + b_orig
            chosen = pair + b_chosen
    return SiteReport(
        path=site.path, node=site.add.name, n=str(site.n), n_hint=hint, i=site.i, o=site.o, r=site.r,
        dtype=str(site.dtype).replace("torch.", ""),
        adapter_dtype=None if site.adapter_dtype is None else str(site.adapter_dtype).replace("torch.", ""),
        separate_lora_input=site.separate_lora_input,
        needs={"x": site.needs.x, "lora_A": site.needs.lora_A, "lora_B": site.needs.lora_B,
               "magnitude": site.need_magnitude},
        forward_plan=str(choice.forward), backward_plan=str(choice.backward),
        forward_costs=f_costs, backward_costs=b_costs, original_flops=original, chosen_flops=chosen,
        activation_bytes_saved=None, criterion=choice.plans.criterion, criterion_note=choice.plans.note,
        kind="dora", norm_plan=choice.norm, dora_form=site.form, base_format=base_format(site.quant),
    )


# --- rewriting ---------------------------------------------------------------------------
def _rewrite_site(gm: fx.GraphModule, site: DoraSite, choice: DoraChoice) -> None:
    graph = gm.graph
    final = site.add
    with graph.inserting_before(final):
        op = new_call(graph, *_dora_call(site, choice), final)
        out = new_call(graph, operator.getitem, (op, 0), final)
        key = "example_value" if "example_value" in final.meta else "val"
        if key in final.meta:
            out.meta[key] = final.meta[key]
    final.replace_all_uses_with(out)
    cast_x = [site.a.x] if site.adapter_dtype is not None else []  # peft's x.to(adapter dtype), if now unused
    _erase_dead(graph, [final, *site.nodes, *cast_x])


def _dora_call(site: DoraSite, choice: DoraChoice) -> tuple:
    """The target and arguments for a site's base: dense, a packed 4-bit weight, or an NF4Tensor."""
    lora = (site.a.weight.node, site.b.weight.node, site.magnitude, float(site.scaling), site.x_lora, site.form,
            choice.norm, str(choice.forward), str(choice.backward))
    quant = site.quant
    mixed = () if site.adapter_dtype is None else (site.adapter_dtype,)
    if quant is None:
        return torch.ops.runlora.dora_linear.default, (site.x, site.weight, site.base.bias, *lora, *mixed)
    if quant["quant_type"] == "torchao_nf4_tensor":
        return dora_linear_nf4, (site.x, quant["weight"], site.base.bias, *lora, *mixed)
    return torch.ops.runlora.dora_linear_4bit.default, (
        site.x, list(quant["qtensors"]), quant["quant_type"], list(quant["quant_args"]), list(quant["shape"]),
        site.base.bias, *lora, *mixed)


def _erase_dead(graph: fx.Graph, nodes: list) -> None:
    """Erases the replaced nodes that no longer have users, users first."""
    pending = [n for n in nodes if isinstance(n, fx.Node) and n.op not in ("placeholder", "get_attr", "output")]
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            for check in [u for u in node.users if is_metadata_assert(u)]:
                graph.erase_node(check)
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                changed = True


def rewrite_dora(gm: fx.GraphModule, options: RewriteOptions, *, dry_run: bool = False) -> tuple[list, list, set]:
    """Rewrites every legal DoRA site of ``gm`` in place.

    Called by ``rewrite.rewrite`` before the LoRA matcher, inside its restore-on-error guard
    (an internal error here leaves the graph unchanged and warns, as for LoRA sites).

    Args:
        gm: a GraphModule with shape metadata (Dynamo or torch.export).
        options: the pass's options (merged-plan policy, forced plans).
        dry_run: match and choose only.

    Returns:
        (SiteReport per rewritten site, with ``kind="dora"``; Rejection per DoRA-like layer left
        alone; the names of the nodes the matched sites cover, which the LoRA matcher must not
        report; the DoraSites rewritten, or that a dry run would rewrite).
    """
    found, rejected = find_dora_sites(gm.graph)
    sites = []
    for site in found:
        why = left_to_library(site.base, site.x, options)
        if why is None:
            sites.append(site)
        else:
            rejected.append(Rejection(site.path, site.add.name, why))
    choices = [plan_dora_site(s, options) for s in sites]
    reports = [_dora_report(s, c) for s, c in zip(sites, choices)]
    covered = {n.name for s in found for n in (s.add, *s.nodes) if isinstance(n, fx.Node)}
    if not dry_run and sites:
        for site, choice in zip(sites, choices):
            _rewrite_site(gm, site, choice)
        gm.graph.lint()
        gm.recompile()
    return reports, rejected, covered, sites


# --- peft under Dynamo -------------------------------------------------------------------
_POLYFILLED = []


def make_peft_dora_traceable() -> bool:
    """Makes peft's DoRA layers traceable by Dynamo in one graph (the module docstring: the
    ``dequantize_module_weight`` and ``transpose`` polyfills, the cache-clear replacement) once
    peft is imported; True when in place."""
    if _POLYFILLED:
        return True
    integrations = sys.modules.get("peft.utils.integrations")
    if integrations is None or not hasattr(integrations, "dequantize_module_weight"):
        return False
    original = integrations.dequantize_module_weight
    _POLYFILLED.append(original)

    _polyfill_dora_cache_clear()
    _polyfill_transpose()

    @torch.compiler.substitute_in_graph(original)
    def dequantize_module_weight(module):
        weight = module.weight
        if hasattr(module, "W_q"):  # HQQ
            return _peft_dequantize(module)
        if getattr(weight, "quant_state", None) is not None and getattr(weight, "bnb_quantized", False):
            return _bnb_dequantized(weight)  # a 4-bit Params4bit (strict export may report it as a Parameter)
        # peft returns a dense (non-quantized) weight unchanged: Parameter or plain Tensor.
        if type(weight) in (torch.nn.Parameter, torch.Tensor):
            return weight
        return _peft_dequantize(module)

    return True


def _polyfill_dora_cache_clear() -> None:
    """peft's DoRA layer clears its ad hoc cache (empty in training) on every forward; inside a
    checkpointed region Dynamo refuses that mutation ("HOP: Unsafe side effect") and runs the
    whole model eagerly. Clearing an empty dict changes nothing, so peft's method is replaced by
    one that clears only a non-empty dict: the same in eager, and nothing for Dynamo to refuse.
    (A Dynamo polyfill would not reach it: Dynamo inlines methods without consulting them.)"""
    dora = sys.modules.get("peft.tuners.lora.dora")
    layer = getattr(dora, "DoraLinearLayer", None)
    original = getattr(layer, "_cache_clear", None)
    if original is None or getattr(original, "__qualname__", "") != "DoraLinearLayer._cache_clear":
        return

    def _cache_clear(self):
        if self._dora_cache:
            original(self)

    _cache_clear.__qualname__ = "DoraLinearLayer._cache_clear (runlora_fx: clears only a non-empty cache)"
    layer._cache_clear = _cache_clear


def _polyfill_transpose() -> None:
    """peft's ``transpose(weight, fan_in_fan_out=True)`` (GPT-2's Conv1D layout) wraps ``W.T`` in a
    new ``nn.Parameter``, which Dynamo cannot build in a graph: it breaks every such DoRA layer.
    Under Dynamo the polyfill returns ``W.T`` itself: the same values, and the same gradients for
    every parameter (the new Parameter is a throwaway leaf; nothing reads its grad)."""
    other = sys.modules.get("peft.utils.other")
    original = getattr(other, "transpose", None)
    if original is None:
        return

    @torch.compiler.substitute_in_graph(original)
    def transpose(weight, fan_in_fan_out):
        return weight.T if fan_in_fan_out else weight


def _bnb_dequantized(weight):
    """A bitsandbytes ``Params4bit`` dequantized as ``bitsandbytes.functional.dequantize_4bit``
    does (same ops, same dtype), spelled as one ``runlora.dequantize_4bit`` call the DoRA
    matcher reads as the base layer's W."""
    state = weight.quant_state
    if state.nested:
        qtensors = [weight, state.state2.absmax, state.absmax, state.state2.code, state.offset]
    else:
        qtensors = [weight, state.absmax, None, None, None]
    return torch.ops.runlora.dequantize_4bit(qtensors, f"bnb_{state.quant_type}", [int(state.blocksize)],
                                             [int(d) for d in state.shape], state.dtype, "forward")


@torch.compiler.disable
def _peft_dequantize(module):
    """peft's own ``dequantize_module_weight`` for quantized weights, run eagerly."""
    return _POLYFILLED[0](module)


def _on_compile_start() -> None:
    try:
        make_peft_dora_traceable()
    except Exception:  # noqa: BLE001 - never break a compile over a polyfill
        log.debug("runlora: could not register the peft DoRA polyfill", exc_info=True)


on_compile_start(_on_compile_start)
_on_compile_start()  # peft imported before runlora_fx: in place at once
