"""The bodies of the higher-order ops Dynamo emits, so the pass reaches the sites inside them.

Dynamo traces an activation-checkpointed region (HF ``gradient_checkpointing_enable`` with
``use_reentrant=False``, ``torch.utils.checkpoint(..., use_reentrant=False)``), a
``torch._higher_order_ops.wrap.wrap`` call or a ``torch.compiler.nested_compile_region``
function into one higher-order op whose first argument is a ``get_attr``'d GraphModule.
Each body is an ordinary Dynamo graph: its placeholders carry ``example_value`` (frozen W
with ``requires_grad=False``, the adapters with True) and its nodes the user's
``nn_module_stack``, so matching, rewriting and lowering work on it as on the outer graph.

Matches::

    wrap_body_0 = self.wrap_body_0
    out = torch.ops.higher_order.tag_activation_checkpoint(wrap_body_0, x, W, A, B)

and enters ``wrap_body_0``, whose ``base + s * linear(linear(x, A), B)`` the pass rewrites in
place to::

    lora_linear = torch.ops.runlora.lora_linear.default(x, W, None, A, B, 2.0, None, None, 'forward2', 'backward5')

The op node outside is unchanged: its operands and outputs are the same tensors. Under
AOTAutograd the checkpoint's body is traced again with every node tagged for recomputation,
so the backward recomputes the op (or its lowered chain), never a saved ``x@A``.

Reentrant checkpointing (``use_reentrant=True``): torch 2.13's Dynamo traces it into the same
``tag_activation_checkpoint`` op (``use_reentrant=True`` kept as a kwarg; AOTAutograd and the
op's eager implementation run it non-reentrant), with no graph break, so it is handled alike.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.fx as fx

__all__ = ["HIGHER_ORDER_REGIONS", "RegionRule", "region_bodies", "region_rule"]


@dataclasses.dataclass(frozen=True)
class RegionRule:
    """A higher-order op whose body (a GraphModule, ``args[body_index]``) runs its
    operands as an ordinary graph, so rewriting inside it keeps the op's contract."""

    name: str
    target: object
    body_index: int = 0
    source: str = ""


def _hop(name: str):
    return getattr(torch.ops.higher_order, name, None)


HIGHER_ORDER_REGIONS = tuple(rule for rule in (
    RegionRule("tag_activation_checkpoint", _hop("tag_activation_checkpoint"),
               source="torch.utils.checkpoint(use_reentrant=False), HF gradient checkpointing"),
    RegionRule("wrap", _hop("wrap"), source="torch._higher_order_ops.wrap.wrap"),
    RegionRule("invoke_subgraph", _hop("invoke_subgraph"), source="torch.compiler.nested_compile_region"),
    # wrap_with_autocast(device_type, dtype, enabled, cache_enabled, body, *operands): torch.export of
    # a model that enters torch.autocast; the body's fake values carry autocast's dtypes (autocast.py).
    RegionRule("wrap_with_autocast", _hop("wrap_with_autocast"), body_index=4,
               source="torch.export of a `with torch.autocast(...)` inside the model"),
) if rule.target is not None)


def region_rule(node: fx.Node):
    """The RegionRule of a higher-order op node whose body the pass may enter, or None."""
    if node.op != "call_function":
        return None
    return next((rule for rule in HIGHER_ORDER_REGIONS if node.target is rule.target), None)


def _body(gm: fx.GraphModule, node: fx.Node, rule: RegionRule):
    body = node.args[rule.body_index] if len(node.args) > rule.body_index else None
    if not isinstance(body, fx.Node) or body.op != "get_attr":
        return None
    module = getattr(gm, body.target, None)
    return module if isinstance(module, fx.GraphModule) else None


def region_bodies(gm: fx.GraphModule) -> list:
    """Every body GraphModule reachable from ``gm`` through the ops of
    ``HIGHER_ORDER_REGIONS``, nested ones included, each once (an ``invoke_subgraph`` body
    called from several places is one module), outermost first; ``gm`` itself excluded."""
    seen: dict = {}

    def visit(module: fx.GraphModule) -> Iterator:
        for node in module.graph.nodes:
            rule = region_rule(node)
            body = None if rule is None else _body(module, node, rule)
            if body is not None and id(body) not in seen and body is not gm:
                seen[id(body)] = body
                yield body
                yield from visit(body)

    return list(visit(gm))
