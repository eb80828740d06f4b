"""Group sibling LoRA sites (same x: q/k/v, gate/up) into one ``runlora.lora_linear_group``.

Matches (sites of ``match.py`` that read one x and one LoRA input; any dialect)::

    q = linear(x, Wq, bq) + linear(linear(x, Aq), Bq) * 2.0
    k = linear(x, Wk, bk) + linear(linear(x, Ak), Bk) * 0.5
    v = linear(x, Wv, bv) + linear(linear(x, Av), Bv) * 2.0

Rewrite to::

    group = torch.ops.runlora.lora_linear_group.default(
        x, [Wq, Wk, Wv], [bq, bk, bv], [Aq, Ak, Av], [Bq, Bk, Bv], [2.0, 0.5, 2.0], None, None,
        'forward1;forward1;forward1', 'backward1;backward1;backward1')
    q = operator.getitem(group, 0); k = operator.getitem(group, 1); v = operator.getitem(group, 2)

Every member keeps its own W, b, A, B, s, plans and output; only the GEMMs that read x are
shared (``ops/group.py``), so the rewrite is exact. Legality is ``can_group`` (a site) and
``can_join`` (a site and its group's first member), each a reason string when not;
profitability is ``choose.group.should_group`` unless ``group_siblings`` forces it. A site
with siblings that is not grouped keeps its own ``runlora.lora_linear`` and its report's
``group_note`` says why.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import sympy
import torch
import torch.fx as fx

from .._compat import size_hint
from ..choose.group import GroupCost, GroupMember, price_group, should_group
from ..choose.lora_product import keeps_lora_product
from ..choose.roofline import resolve_device_model
from ..ops.group import GROUPABLE_BACKWARD, join_plans
from ..options import RewriteOptions
from ..plans import BACKWARD_PLANS, FORWARD_PLANS, parse_plan
from .build import copy_provenance, erase_dead, value_key, weight_arg
from .match import LoraSite
from .nodes import meta_value, mutates_in_place, requires_grad

__all__ = ["SiteGroup", "can_group", "can_join", "find_groups", "rewrite_groups"]

GROUP_OP = torch.ops.runlora.lora_linear_group.default


@dataclasses.dataclass
class SiteGroup:
    """Sibling sites computed by one group op: indices into the pass's site list, in graph order."""

    label: str
    members: list
    cost: Optional[GroupCost] = None


def can_group(site: LoraSite, choice) -> Optional[str]:
    """Why ``site`` cannot be a group member, or None."""
    if site.base.quant is not None:
        return "4-bit base: grouped sites need a dense W"
    if site.lora_bias is not None:
        return "lora_B has a bias (added outside the op)"
    if site.lora.scale_nodes or getattr(site.lora, "scale_tensors", ()):
        return "its scaling is a run-time value"
    if getattr(site, "autocast", None) is not None:
        return "computed under autocast: its operands are cast per site (match.py)"
    if site.base.weight.node.op == "call_module":
        return "its base is a call_module (symbolic_trace leaf)"
    fused = [name for name in (*parse_plan(str(choice.forward)).names, *parse_plan(str(choice.backward)).names)
             if name not in FORWARD_PLANS and name not in BACKWARD_PLANS]
    if fused:
        return f"plan {fused[0]!r} runs its own kernels per site (ops/fused.py): a group runs the ATen plans"
    shared = [name for name in parse_plan(str(choice.backward)).names if name not in GROUPABLE_BACKWARD]
    if shared:
        return f"backward plan {shared[0]!r} computes dA and dB through T = XᵀdY, per member: nothing to share"
    return None


def can_join(site: LoraSite, first: LoraSite, order: dict) -> Optional[str]:
    """Why ``site`` cannot join the group whose first member is ``first``, or None."""
    if site.x_lora is not first.x_lora:
        return f"its LoRA input differs from {first.path}'s (its own dropout(x)?)"
    if site.i != first.i or site.dtype != first.dtype:
        return f"x/W dtype or in features differ from {first.path}'s ({site.dtype}, {site.i} vs {first.dtype}, {first.i})"
    if site.adapter_dtype != first.adapter_dtype or _a_dtype(site) != _a_dtype(first):
        return f"adapter dtype {_a_dtype(site)} differs from {first.path}'s {_a_dtype(first)}"
    late = [n for n in _inputs(site) if order.get(n, -1) > order[first.add]]
    if late:
        return f"input {late[0].name} is defined after {first.path}'s output"
    return None


def _a_dtype(site: LoraSite):
    return getattr(meta_value(site.lora.a.out), "dtype", None)


def _inputs(site: LoraSite) -> list:
    nodes = [site.base.weight.node, site.base.bias, site.lora.a.weight.node, site.lora.b.weight.node]
    return [n for n in nodes if isinstance(n, fx.Node)]


def _member(site: LoraSite, choice, n_value: int, options: RewriteOptions) -> GroupMember:
    forward, backward = choice.forward.at(n_value), choice.backward.at(n_value)
    keeps = keeps_lora_product(forward, backward, site.needs, n_value, site.i, site.r, dtype=site.dtype,
                               adapter_dtype=site.adapter_dtype, policy=options.save_lora_product).keep
    return GroupMember(o=site.o, r=site.r, forward_plan=forward, backward_plan=backward, needs_a=site.needs.lora_A,
                       needs_b=site.needs.lora_B, keeps_product=keeps)


def _n_value(site: LoraSite) -> Optional[int]:
    n = sympy.sympify(site.n)
    if not n.free_symbols:
        return int(n)
    val = meta_value(site.x)
    try:
        total = 1
        for s in val.shape[:-1]:
            total *= size_hint(s)
        return int(total)
    except Exception:  # noqa: BLE001 - a hint is optional
        return None


def find_groups(sites: list, choices: list, options: RewriteOptions, reports: Optional[list] = None) -> list:
    """The groups to form among ``sites`` (graph order), as ``SiteGroup`` records.

    Sets ``group`` (the label) on each grouped member's SiteReport in ``reports`` and
    ``group_note`` on a site with siblings (same x) left out, saying why.
    """
    notes: dict = {}
    groups: list = []
    if options.group_siblings is False or len(sites) < 2:
        return groups
    graphs = list(dict.fromkeys(s.add.graph for s in sites))
    order = {node: k for graph in graphs for k, node in enumerate(graph.nodes)}
    # export's values say requires_grad=False after the parameters: only Dynamo's can be read
    gradient_reaches = {graph: gradient_reaches_outputs(graph) for graph in graphs if _tracks_requires_grad(graph)}
    by_x: dict = {}
    for j, site in enumerate(sites):
        by_x.setdefault(site.x, []).append(j)
    for members in by_x.values():
        if len(members) < 2:
            continue
        pending = []
        for j in members:
            why = can_group(sites[j], choices[j])
            if why is None and sites[j].add.graph in gradient_reaches:
                why = _gets_no_gradient(sites[j], gradient_reaches[sites[j].add.graph])
            if why is None:
                pending.append(j)
            else:
                notes[j] = why
        while pending:
            first, rest = pending[0], []
            chosen = [first]
            for j in pending[1:]:
                why = can_join(sites[j], sites[first], order)
                (rest if why else chosen).append(j)
                if why:
                    notes[j] = why
            pending = rest
            if len(chosen) < 2:
                notes.setdefault(first, "no sibling it can be grouped with")
                continue
            group = _priced(sites, choices, chosen, options, notes)
            if group is not None:
                groups.append(group)
    for k, group in enumerate(groups):
        group.label = f"g{k}: " + ", ".join(sites[j].path for j in group.members)
        for j in group.members:
            notes.pop(j, None)
    if reports is not None:
        for group in groups:
            for j in group.members:
                reports[j].group = group.label
        for j, why in notes.items():
            reports[j].group_note = why
    return groups


def _gets_no_gradient(site: LoraSite, gradient_reaches: set) -> Optional[str]:
    """Why a site's LoRA grads stay None when run eagerly, or None. A group's backward runs for
    its siblings and would hand it zeros, which an optimizer steps on (weight decay, momentum)."""
    trains = any(requires_grad(w.weight.node) for w in (site.lora.a, site.lora.b))
    out = requires_grad(site.add)
    if trains and out is False:
        return "computed with grad disabled (a no_grad region): its LoRA grads stay None, a group would give zeros"
    if out is True and site.add not in gradient_reaches:
        return ("its output carries no gradient to the graph's outputs (topk indices, a comparison, a detach): "
                "its LoRA grads stay None, a group would give zeros")
    return None


def gradient_reaches_outputs(graph: fx.Graph) -> set:
    """The nodes from which the graph's outputs are reached along values that require grad.

    A site outside this set (it feeds only ``topk``'s indices, a comparison, a ``detach``) gets
    no gradient when run eagerly; alone, its op's backward is never called. Values without metadata count
    as requiring grad, and an in-place op counts as an output: what it writes is read later
    through the tensor it wrote to (``k[..., :d] = k_nope``), whose metadata predates the write.
    """
    reaches: set = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or mutates_in_place(node) or (
                requires_grad(node) is not False and any(u in reaches for u in node.users)):
            reaches.add(node)
    return reaches


def _tracks_requires_grad(graph: fx.Graph) -> bool:
    """Whether the values' metadata follows autograd: some computed value requires grad."""
    return any(node.op in ("call_function", "call_method", "call_module") and requires_grad(node)
               for node in graph.nodes)


def _priced(sites, choices, chosen, options, notes) -> Optional[SiteGroup]:
    first = sites[chosen[0]]
    n_value = _n_value(first)
    cost = None
    if n_value is not None:
        cost = price_group(n_value, first.i, [_member(sites[j], choices[j], n_value, options) for j in chosen],
                           dtype=first.dtype, adapter_dtype=first.adapter_dtype, needs_x=first.needs.x,
                           separate_lora_input=first.separate_lora_input)
    if options.group_siblings:
        return SiteGroup("", chosen, cost)
    if cost is None:
        for j in chosen:
            notes[j] = "n is symbolic with no size hint: the group cannot be priced (group_siblings=True forces it)"
        return None
    model = resolve_device_model(options.device_model, getattr(meta_value(first.x), "device", "cpu"))
    if not should_group(cost, model):
        for j in chosen:
            notes[j] = f"cost model: grouping {cost.describe(model)}, not a saving"
        return None
    return SiteGroup("", chosen, cost)


def rewrite_groups(gm: fx.GraphModule, sites: list, choices: list, groups: list) -> tuple:
    """Replaces each group of ``gm``'s graph by one group op and a getitem per member (mutates ``gm``).

    Args:
        gm: one of the pass's graphs.
        sites, choices: all the pass's sites (any graph) and their choices.
        groups: ``find_groups``' records (indices into ``sites``).

    Returns:
        (sites, choices) of ``gm``'s graph left for ``rewrite_sites``: the ungrouped ones,
        their references to a grouped member's output pointed at its getitem.
    """
    graph = gm.graph
    replaced: dict = {}
    groups = [g for g in groups if sites[g.members[0]].add.graph is graph]
    for group in groups:
        members = [sites[j] for j in group.members]
        first = members[0]
        like = first.add
        with graph.inserting_before(like):
            args = (
                replaced.get(first.x, first.x),
                [weight_arg(graph, s.base.weight, like) for s in members],
                [s.base.bias for s in members],
                [weight_arg(graph, s.lora.a.weight, like) for s in members],
                [weight_arg(graph, s.lora.b.weight, like) for s in members],
                [float(s.lora.scaling) for s in members],
                replaced.get(first.x_lora, first.x_lora), first.adapter_dtype,
                join_plans(choices[j].forward for j in group.members),
                join_plans(choices[j].backward for j in group.members),
            )
            node = graph.call_function(GROUP_OP, args)
            copy_provenance(node, like)
            key = value_key(like)
            node.meta[key] = [meta_value(s.add) for s in members]
            node.meta["runlora_group"] = group.label
            outs = []
            for k, site in enumerate(members):
                item = graph.call_function(operator.getitem, (node, k))
                item.meta.update(site.add.meta)
                outs.append(item)
        for site, item in zip(members, outs):
            site.add.replace_all_uses_with(item)
            replaced[site.add] = item
        for site in members:
            x_chain = [] if site.base.x in replaced else [site.base.x]
            erase_dead(graph, [site.add, *site.base.nodes, *site.lora.nodes, *x_chain])
    grouped = {j for g in groups for j in g.members}
    rest = [(_repointed(s, replaced), c) for j, (s, c) in enumerate(zip(sites, choices))
            if j not in grouped and s.add.graph is graph]
    if groups:
        graph.lint()
        gm.recompile()
    return [s for s, _ in rest], [c for _, c in rest]


def _repointed(site: LoraSite, replaced: dict) -> LoraSite:
    """``site`` with its x, x_lora and base x pointed past outputs that a group replaced."""
    if not replaced:
        return site
    base = dataclasses.replace(site.base, x=replaced.get(site.base.x, site.base.x))
    return dataclasses.replace(site, base=base, x=replaced.get(site.x, site.x),
                               x_lora=replaced.get(site.x_lora, site.x_lora))


