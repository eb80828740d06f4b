"""Building nodes the way every rewrite must: provenance copied, fake value computed.

The IR contract (STYLE.md): every node a pass creates carries ``val`` (export/AOT) or
``example_value`` (Dynamo), whichever the node it replaces carries, and that node's
``stack_trace``, ``nn_module_stack``, ``source_fn_stack`` and ``from_node``. The rewrites of
``rewrite.py``, ``group.py`` and ``dora.py`` create their nodes through these helpers.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .._compat import detect_fake_mode
from .nodes import WeightRef, is_metadata_assert, meta_value

__all__ = ["copy_provenance", "erase_dead", "new_call", "set_value", "value_key", "weight_arg"]

_PROVENANCE = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node")


def value_key(like: fx.Node) -> str:
    """``"example_value"`` in a Dynamo graph, ``"val"`` elsewhere."""
    return "example_value" if "example_value" in like.meta else "val"


def set_value(node: fx.Node, value, like: fx.Node) -> None:
    if value is not None:
        node.meta[value_key(like)] = value


def copy_provenance(node: fx.Node, like: fx.Node) -> None:
    for key in _PROVENANCE:
        if key in like.meta:
            node.meta[key] = like.meta[key]


def new_call(graph: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    """A new ``call_function`` node with ``like``'s provenance and its fake value computed from its inputs."""
    node = graph.call_function(target, args)
    copy_provenance(node, like)
    vals = list(fx.node.map_arg(tuple(args), meta_value))  # nodes inside lists too (a 4-bit op's qtensors)
    tensors = [v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    mode = next((v.fake_mode for v in tensors if hasattr(v, "fake_mode")), None) or detect_fake_mode(tensors)
    if target is operator.getitem and isinstance(vals[0], (tuple, list)):
        set_value(node, vals[0][vals[1]], like)
    elif mode is not None:
        with mode:
            set_value(node, target(*vals), like)
    return node


def weight_arg(graph: fx.Graph, ref: WeightRef, like: fx.Node) -> fx.Node:
    """The weight in nn.Linear layout (out×in): a get_attr for an nn.Linear module, a permute
    of the source where the dialect read it transposed (a view, no copy)."""
    node = ref.node
    if node.op == "call_module":
        node = graph.get_attr(f"{node.target}.weight")
    if ref.transposed:
        return new_call(graph, torch.ops.aten.permute.default, (node, [1, 0]), like)
    return node


def erase_dead(graph: fx.Graph, nodes) -> None:
    """Erases each of ``nodes`` (of ``graph``, not a placeholder) left without users."""
    for node in nodes:
        if isinstance(node, fx.Node) and node.graph is graph and node.op != "placeholder":
            for check in [u for u in node.users if is_metadata_assert(u)]:
                graph.erase_node(check)  # torch.export's dtype asserts on a value that is gone
            if not node.users:
                graph.erase_node(node)
