"""Linear maps on 4-bit base weights, as the matcher sees them (``LinearView.quant``).

Four spellings, all read as ``x @ dequant(W).T (+ bias)``:

    bitsandbytes, x needs no grad       gemm_4bit(x, packed, [o, i], absmax, 64, 'nf4', bias, ...)
    bitsandbytes, Dynamo                autograd_function_apply(fwd_body, bwd_body, packed, x, ...)[0]
                                        # fwd_body calls gemm_4bit (MatMul4Bit)
    bitsandbytes, torch.export strict   wrap_with_set_grad_enabled(False, body, packed, x, ...)[0]
                                        # body calls gemm_4bit (MatMul4Bit.forward, traced under no_grad)
    torchao NF4, Dynamo                 autograd_function_apply(fwd_body, bwd_body, nf4_weight, x)[0]
                                        # fwd_body: linear(x, nf4_weight.to(dtype))
    torchao NF4, torch.export           linear(x, <aten chain over access_subclass_inner_tensor(nf4_weight, name)>)
    torchao NF4, torch.export strict    wrap_with_set_grad_enabled(False, body, <the five reads>, x)[0]
                                        # body: linear(x, <the same chain>) (LinearNF4.forward)

``quant`` holds what ``runlora.lora_linear_4bit`` takes: ``quant_type`` (a key of
``ops/quantized.py``: ``QUANT_FORMATS``), ``qtensors`` (nodes), ``quant_args`` and ``shape``; the torchao
Dynamo form keeps the NF4Tensor node itself (``quant_type`` "torchao_nf4_tensor"), which
only the lowered autograd.Function can take.

A 4-bit W dequantized in the graph (DoRA's norm reads it) is read by ``read_dequantized_weight``
in four spellings, each compared with the base layer's ``quant`` by ``same_packed_weight``::

    runlora.dequantize_4bit([packed, absmax, ...], 'bnb_nf4', [64], [o, i], dtype, phase)
                                        # peft's dequantize_module_weight under Dynamo (passes/dora.py)
    bitsandbytes.dequantize_4bit(packed, absmax', 64, 'nf4', [o, i], dtype)
                                        # absmax' = dequantize_blockwise(absmax_8bit, absmax, code, 256) + offset
    nf4_weight.to(dtype)                # torchao's NF4Tensor, Dynamo
    <aten chain over the five inner tensors>   # torchao's NF4Tensor, torch.export

An exported NF4 dequantization chain is accepted only after it is checked: it is run on
random inner tensors and must equal ``ops.quantized.dequantize_4bit`` bit for bit (once per distinct
chain). A chain that computes anything else is not read as a 4-bit base.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..ops.quantized import dequantize_4bit
from .nodes import LINEAR_FNS, LinearView, WeightRef, arg, aten, cast_dtype, is_call, meta_value, strip_flatten

__all__ = ["as_nf4_chain_weight", "base_format", "left_to_library", "read_bnb_gemm", "read_dequantized_weight", "read_quantized_region", "restores_dx",
           "same_packed_weight"]

_BNB_GEMM = "bitsandbytes::gemm_4bit"
_BNB_DEQUANTIZE = "bitsandbytes::dequantize_4bit"
_BNB_DEQUANTIZE_BLOCKWISE = "bitsandbytes::dequantize_blockwise"
_RUNLORA_DEQUANTIZE = "runlora::dequantize_4bit"
_BNB_ARGS = ("x", "qweight", "shape", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
             "absmax_offset")
_NF4_INNER = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
_MAX_CHAIN = 64  # an NF4 dequantization is ~30 ATen nodes


def _op_name(target) -> str:
    """"ns::op" of an OpOverload or of an OpOverloadPacket (Dynamo records either)."""
    name = getattr(target, "name", None)
    if callable(name):
        return name()
    return getattr(target, "_qualified_op_name", "")


def is_bnb_gemm(node: fx.Node) -> bool:
    return node.op == "call_function" and _op_name(node.target) == _BNB_GEMM


def restores_dx(view: LinearView) -> bool:
    """True where the graph computes the 4-bit base under no_grad (torch.export's strict trace
    of bitsandbytes' MatMul4Bit or torchao's LinearNF4) although eager autograd flows through
    it: the rewrite gives the exported program the base layer's dX back."""
    return bool(view.quant and view.quant.get("restores_dx"))


def base_format(quant: Optional[dict]) -> Optional[str]:
    """The packed format a report names for a base (``ops/quantized.py``: ``QUANT_FORMATS``), None when dense."""
    if quant is None:
        return None
    return "torchao_nf4" if quant["quant_type"] == "torchao_nf4_tensor" else quant["quant_type"]


def left_to_library(view: LinearView, x, options) -> Optional[str]:
    """Why a site on this 4-bit base is left to its library (``options.rewrites_4bit`` says so
    for x's device), or None to rewrite it; never a base whose exported graph dropped dX,
    which only the rewrite gives back."""
    if view.quant is None or restores_dx(view):
        return None
    device = getattr(meta_value(x), "device", "cpu")
    if options.rewrites_4bit(device):
        return None
    if options.rewrite_4bit is False:
        return "rewrite_4bit=False"
    return (f"4-bit base on {torch.device(device).type}: left to the library's kernels, measured faster there "
            "(pass rewrite_4bit=True to rewrite)")


def as_bnb_gemm(node: fx.Node) -> LinearView:
    """``gemm_4bit(x, packed, shape, absmax, blocksize, quant_type, bias=, absmax_8bit=, ...)``."""
    args = dict(zip(_BNB_ARGS, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in _BNB_ARGS})
    quant = {
        "quant_type": f"bnb_{args['quant_type']}",
        "qtensors": [args["qweight"], args["absmax"], args.get("absmax_8bit"), args.get("absmax_code"),
                     args.get("absmax_offset")],
        "quant_args": [int(args["blocksize"])],
        "shape": [int(d) for d in args["shape"]],
    }
    return LinearView(node, args["x"], WeightRef(args["qweight"], transposed=False), args.get("bias"), (node,),
                      quant=quant)


def _hop_body(getitem: fx.Node):
    """(hop, body GraphModule, {body placeholder: outer operand}, grad_enabled) for
    ``hop(...)[0]`` with hop an autograd_function_apply or wrap_with_set_grad_enabled."""
    hop, index = getitem.args
    if index != 0 or not isinstance(hop, fx.Node) or hop.op != "call_function" or len(hop.users) != 1:
        return None
    higher = torch.ops.higher_order
    if hop.target is getattr(higher, "autograd_function_apply", None):
        body_ref, operands, grad_enabled = hop.args[0], hop.args[2:], True
    elif hop.target is getattr(higher, "wrap_with_set_grad_enabled", None):
        body_ref, operands, grad_enabled = hop.args[1], hop.args[2:], bool(hop.args[0])
    else:
        return None
    if not isinstance(body_ref, fx.Node) or body_ref.op != "get_attr":
        return None
    body = getattr(getitem.graph.owning_module, body_ref.target, None)
    if not isinstance(body, fx.GraphModule):
        return None
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    return hop, body, dict(zip(placeholders, operands)), grad_enabled


def read_bnb_gemm(node: fx.Node) -> Optional[LinearView]:
    """The dialect-table reader for a bare ``gemm_4bit`` call."""
    return as_bnb_gemm(node) if is_bnb_gemm(node) else None


def read_quantized_region(node: fx.Node) -> Optional[LinearView]:
    """The dialect-table reader for ``hop(...)[0]``: a 4-bit base inside an autograd_function_apply
    or wrap_with_set_grad_enabled body (the forms in the module docstring), or None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    found = _hop_body(node)
    if found is None:
        return None
    hop, body, outer, grad_enabled = found
    extra = tuple(a for a in hop.args[:2] if isinstance(a, fx.Node))
    gemms = [n for n in body.graph.nodes if is_bnb_gemm(n)]
    if len(gemms) != 1:
        if grad_enabled:
            return _as_nf4_tensor_linear(node, hop, body, outer, extra)
        return _as_nf4_region_linear(node, hop, body, outer, extra)
    if not grad_enabled and "bitsandbytes" not in (gemms[0].meta.get("stack_trace") or ""):
        return None  # a user's own no_grad region: its semantics (no dX) are kept

    def to_outer(arg):
        return outer.get(strip_flatten(arg)) if isinstance(arg, fx.Node) else arg

    inner = as_bnb_gemm(gemms[0])
    qtensors = [to_outer(t) for t in inner.quant["qtensors"]]
    if qtensors[0] is None or qtensors[1] is None or to_outer(inner.x) is None:
        return None
    quant = dict(inner.quant, qtensors=qtensors, restores_dx=not grad_enabled)
    bias = to_outer(inner.bias) if inner.bias is not None else None
    return LinearView(node, to_outer(inner.x), WeightRef(qtensors[0], transposed=False), bias,
                      (node, hop) + extra, quant=quant)


def _is_nf4(value) -> bool:
    return "NF4" in type(value).__name__


def _as_nf4_tensor_linear(getitem: fx.Node, hop: fx.Node, body: fx.GraphModule, outer: dict,
                          extra: tuple) -> Optional[LinearView]:
    """torchao's ``linear_nf4(x, weight)`` as Dynamo traces it (the NF4Tensor stays whole)::

        out = torch.ops.higher_order.autograd_function_apply(fwd_body, bwd_body, nf4_weight, x)[0]
        # fwd_body: w = nf4_weight.to(dtype); out = linear(x, w)
    """
    linears = [n for n in body.graph.nodes if is_call(n, LINEAR_FNS)]
    if len(linears) != 1:
        return None
    (linear,) = linears
    deq, x_inner = arg(linear, 1, "weight"), linear.args[0]
    if cast_dtype(deq) is None or arg(linear, 2, "bias") is not None:
        return None
    weight, x = outer.get(deq.args[0]), outer.get(x_inner)
    if weight is None or x is None or not _is_nf4(meta_value(weight)):
        return None
    quant = {"quant_type": "torchao_nf4_tensor", "weight": weight, "shape": [int(d) for d in meta_value(weight).shape]}
    return LinearView(getitem, x, WeightRef(weight, transposed=False), None, (getitem, hop) + extra, quant=quant)


# --- torchao NF4 in torch.export: an ATen chain over the NF4Tensor's inner tensors ---------

_ACCESS_INNER = "export::access_subclass_inner_tensor"
_verified: dict = {}  # chain signature -> bool


def as_nf4_chain_weight(weight: fx.Node, outer: Optional[dict] = None) -> Optional[tuple[dict, tuple]]:
    """(quant, chain nodes) when ``weight`` is torchao's NF4 dequantization as torch.export
    unwraps it: a chain of ATen calls whose only leaves are the five
    ``access_subclass_inner_tensor(nf4_weight, name)`` reads of one contiguous NF4Tensor.

    ``outer`` maps a region body's placeholders to the outer graph's operands (a chain traced
    inside ``wrap_with_set_grad_enabled``): a placeholder bound to such a read counts as it.
    """
    if not isinstance(weight, fx.Node) or weight.op != "call_function":
        return None
    outer = outer or {}
    chain, leaves, reads, stack = [], {}, {}, [weight]  # leaves: name -> node in the chain's graph
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        read = outer.get(node, node)
        if isinstance(read, fx.Node) and read.op == "call_function" and _op_name(read.target) == _ACCESS_INNER:
            leaves[read.args[1]], reads[read.args[1]] = node, read
            continue
        if node.op != "call_function" or len(chain) >= _MAX_CHAIN:
            return None
        chain.append(node)
        stack.extend(node.all_input_nodes)
    sources = {n.args[0] for n in reads.values()}
    if set(reads) != set(_NF4_INNER) or len(sources) != 1:
        return None
    (source,) = sources
    nf4 = meta_value(source)
    out = meta_value(weight)
    if not _is_nf4(nf4) or not nf4.is_contiguous() or getattr(out, "shape", None) != nf4.shape:
        return None
    quant = {
        "quant_type": "torchao_nf4",
        "qtensors": [reads[name] for name in _NF4_INNER],
        "quant_args": [int(nf4.block_size), int(nf4.scaler_block_size)],
        "shape": [int(d) for d in nf4.shape],
        "source": source,
    }
    order = {n: k for k, n in enumerate(weight.graph.nodes)}
    chain.sort(key=order.__getitem__)
    if not _chain_is_dequantization(chain, weight, leaves, quant, out.dtype):
        return None
    return quant, tuple(chain)


def _as_nf4_region_linear(getitem: fx.Node, hop: fx.Node, body: fx.GraphModule, outer: dict,
                          extra: tuple) -> Optional[LinearView]:
    """torchao's ``linear_nf4`` under strict torch.export: LinearNF4.forward traced under
    no_grad as ``wrap_with_set_grad_enabled(False, body, <the five inner tensors>, x)[0]``,
    the body holding ``linear(x, <NF4 dequantization chain>)``."""
    linears = [n for n in body.graph.nodes if is_call(n, LINEAR_FNS)]
    if len(linears) != 1 or arg(linears[0], 2, "bias") is not None:
        return None
    (linear,) = linears
    if "torchao" not in (linear.meta.get("stack_trace") or ""):
        return None  # a user's own no_grad region: its semantics (no dX) are kept
    found = as_nf4_chain_weight(arg(linear, 1, "weight"), outer)
    x = outer.get(linear.args[0])
    if found is None or x is None:
        return None
    quant = dict(found[0], restores_dx=True)
    return LinearView(getitem, x, WeightRef(quant["source"], transposed=False), None, (getitem, hop) + extra,
                      quant=quant)


def _chain_signature(chain: list, access: dict, quant: dict, dtype) -> tuple:
    index = {node: f"%{k}" for k, node in enumerate(chain)}
    index.update({node: name for name, node in access.items()})
    steps = tuple((str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), index.__getitem__))) for n in chain)
    inner = tuple((name, tuple(meta_value(node).shape), meta_value(node).dtype) for name, node in access.items())
    return steps, inner, tuple(quant["quant_args"]), str(dtype)


def _random_like(value) -> torch.Tensor:
    if value.dtype == torch.uint8:
        return torch.randint(0, 256, tuple(value.shape), dtype=torch.uint8)
    if value.dtype == torch.int8:
        return torch.randint(-128, 128, tuple(value.shape), dtype=torch.int8)
    return torch.rand(tuple(value.shape), dtype=torch.float32).add_(0.5).to(value.dtype)


def _chain_is_dequantization(chain: list, weight: fx.Node, access: dict, quant: dict, dtype) -> bool:
    """Runs the chain (on CPU) and ``ops.quantized.dequantize_4bit`` on the same random inner tensors."""
    key = _chain_signature(chain, access, quant, dtype)
    if key not in _verified:
        inner = {name: _random_like(meta_value(node)) for name, node in access.items()}
        try:
            with torch.no_grad(), torch._subclasses.fake_tensor.unset_fake_temporarily():
                env = {node: inner[name] for name, node in access.items()}
                for node in chain:
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                    kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
                    env[node] = node.target(*args, **kwargs)
                ours = dequantize_4bit([inner[name] for name in _NF4_INNER], "torchao_nf4", quant["quant_args"],
                                       quant["shape"], dtype)
                _verified[key] = bool(torch.equal(env[weight], ours))
        except Exception:  # noqa: BLE001 - a chain we cannot run is not read as NF4
            _verified[key] = False
    return _verified[key]


# --- a 4-bit W dequantized in the graph ----------------------------------------------------
def _calls(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and _op_name(node.target) == name


def _device_moves(node) -> tuple:
    """Follows ``t.to(device)`` calls that keep the dtype back to t (bitsandbytes moves its code
    table): (t, the calls passed)."""
    passed = []
    while is_call(node, (), ("to",)) and getattr(meta_value(node), "dtype", None) == getattr(
            meta_value(node.args[0]), "dtype", None):
        passed.append(node)
        node = node.args[0]
    return node, tuple(passed)


def _bnb_absmax(absmax) -> tuple[list, tuple]:
    """([absmax, absmax_8bit, absmax_code, absmax_offset], nodes) of bitsandbytes' absmax, undone
    from its double quantization when it is one."""
    if is_call(absmax, {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}, ("add", "add_")):
        blockwise, offset = absmax.args[:2]
        if _calls(blockwise, _BNB_DEQUANTIZE_BLOCKWISE):
            absmax_8bit, nested_absmax, code = blockwise.args[:3]
            code, moves = _device_moves(code)
            return [nested_absmax, absmax_8bit, code, offset], (absmax, blockwise, *moves)
    return [absmax, None, None, None], ()


def read_dequantized_weight(node) -> Optional[tuple[dict, tuple]]:
    """(quant, nodes): the 4-bit format of a W dequantized in the graph (the module docstring's
    spellings) as ``LinearView.quant`` holds it, and the nodes that dequantize it; or None.
    An NF4Tensor read where a dense W is expected counts as its dequantization (``.to`` to its
    own nominal dtype is stripped as a no-op cast before this reads it)."""
    if _calls(node, _RUNLORA_DEQUANTIZE):
        qtensors, quant_type, quant_args, shape = node.args[:4]
        return {"quant_type": quant_type, "qtensors": list(qtensors), "quant_args": [int(a) for a in quant_args],
                "shape": [int(d) for d in shape]}, (node,)
    if _calls(node, _BNB_DEQUANTIZE):
        packed, absmax, blocksize, quant_type, shape = node.args[:5]
        absmax_parts, absmax_nodes = _bnb_absmax(absmax)
        return {"quant_type": f"bnb_{quant_type}", "qtensors": [packed, *absmax_parts], "quant_args": [int(blocksize)],
                "shape": [int(d) for d in shape]}, (node, *absmax_nodes)
    nf4, nodes = node, ()
    if cast_dtype(node) is not None:
        nf4, nodes = node.args[0], (node,)
    if isinstance(nf4, fx.Node) and _is_nf4(meta_value(nf4)):
        return {"quant_type": "torchao_nf4_tensor", "weight": nf4, "shape": [int(d) for d in meta_value(nf4).shape]}, nodes
    return as_nf4_chain_weight(node)


def _root(node):
    """A tensor's storage owner: views and detaches followed back."""
    while True:
        src = strip_flatten(node)
        if src is node and is_call(node, {aten.detach.default, aten.alias.default, torch.detach}, ("detach",)):
            src = node.args[0]
        if src is node:
            return node
        node = src


def same_packed_weight(base: dict, dequantized: dict) -> bool:
    """True when two ``quant`` readings name one packed W: the same format, arguments, shape and
    tensors (views of the packed data count as it)."""
    if base["quant_type"] != dequantized["quant_type"] or list(base["shape"]) != list(dequantized["shape"]):
        return False
    if base["quant_type"] == "torchao_nf4_tensor":
        return _root(base["weight"]) is _root(dequantized["weight"])
    if list(base["quant_args"]) != list(dequantized["quant_args"]):
        return False
    if "source" in base or "source" in dequantized:
        return base.get("source") is not None and base.get("source") is dequantized.get("source")
    pairs = list(zip(base["qtensors"], dequantized["qtensors"]))
    return len(pairs) == len(base["qtensors"]) == len(dequantized["qtensors"]) and all(
        (p is None and q is None) or (p is not None and q is not None and _root(p) is _root(q)) for p, q in pairs)
