"""Rewrite matched LoRA sites into ``runlora.lora_linear``.

Matches (any dialect; see ``match.py``)::

    base = torch._C._nn.linear(x, W, b)
    xa   = torch._C._nn.linear(x_lora, A)
    lora = torch._C._nn.linear(xa, B) * 2.0
    y    = base + lora

Rewrite to::

    y = torch.ops.runlora.lora_linear.default(x, W, b, A, B, 2.0, x_lora, None, 'forward2', 'backward5')

An autocast site (``match.py``) gets explicit casts of x, W, b, A, B (and x_lora) to its
autocast dtype before the op; a 0-d tensor scale s is folded into lora_B as ``B' = s * B``
(``_times_tensor_scales``), the op's ``scaling`` staying a float::

    y = torch.ops.runlora.lora_linear.default(to(x, bf16), to(W, bf16), None, to(A, bf16),
                                              mul(to(B, bf16), s), 1.0, None, None, 'forward1', 'backward1')

The new node takes the add's metadata (``val``/``example_value``, ``stack_trace``,
``nn_module_stack``). On any internal error the graph is restored, a warning names the
reason, and the report lists no site: the user's compile goes on unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
import math
import warnings
from typing import Optional

import sympy
import torch
import torch.fx as fx

from .._compat import size_hint
from ..choose import SiteFacts, choose_for, time_request
from ..choose.lora_product import keeps_lora_product
from ..choose.measure import tuner_for
from ..inspection.report import RewriteReport, SiteReport, cost_entry
from ..ops import fused
from ..options import RewriteOptions
from ..plans import BACKWARD_PLANS, FORWARD_PLANS, parse_plan, resolve_plan
from .group import find_groups, rewrite_groups
from .build import erase_dead, new_call, set_value, value_key, weight_arg
from .lower import lora_linear_nf4
from .dora import rewrite_dora
from .match import LoraSite, Rejection, find_sites
from .nodes import meta_value
from .quantized import base_format, left_to_library, restores_dx
from .subgraphs import region_bodies

__all__ = ["rewrite", "rewrite_sites", "plan_site", "site_facts"]

log = logging.getLogger("runlora_fx.passes")


def _skips_4bit(site: LoraSite, options: RewriteOptions, rejected: list) -> bool:
    """A 4-bit site left to its library (the report says why)."""
    why = left_to_library(site.base, site.x, options)
    if why is not None:
        rejected.append(Rejection(site.path, site.add.name, why))
    return why is not None


def plan_site(site: LoraSite, options: RewriteOptions = RewriteOptions()):
    """Chooses (PlanChoice) for a site by ``options.criterion``, honouring forced plans."""
    if options.fully_forced:
        options = dataclasses.replace(options, criterion="flops")  # nothing to estimate or measure
    choice = choose_for(site_facts(site, options), options)
    if options.forward_plan is not None or options.backward_plan is not None:
        choice = dataclasses.replace(
            choice,
            forward=parse_plan(options.forward_plan) if options.forward_plan else choice.forward,
            backward=parse_plan(options.backward_plan) if options.backward_plan else choice.backward,
            criterion="fixed",
        )
    return choice


def site_facts(site: LoraSite, options: RewriteOptions, **overrides) -> SiteFacts:
    """What the criteria need to know about a matched site (``choose.SiteFacts``)."""
    val = meta_value(site.x)
    facts = dict(
        needs=site.needs, separate_lora_input=site.separate_lora_input, mixed_dtype=site.mixed_dtype,
        allow_merged=options.merged_allowed(site.dtype), n_hint=site_n_hint(site), dtype=site.dtype,
        adapter_dtype=site.adapter_dtype, bias=_has_bias(site), device=getattr(val, "device", "cpu"),
        dequant_flops=site.o * site.i if site.base.quant is not None else 0,
    )
    facts.update(overrides)
    return SiteFacts(site.n, site.i, site.o, site.r, **facts)


def _has_bias(site: LoraSite) -> bool:
    node = site.base.weight.node
    if node.op == "call_module":
        return getattr(node.graph.owning_module.get_submodule(node.target), "bias", None) is not None
    return site.base.bias is not None


def site_n_hint(site: LoraSite) -> Optional[int]:
    val = meta_value(site.x)
    try:
        return int(math.prod(size_hint(s) for s in val.shape[:-1]))
    except Exception:  # noqa: BLE001 - a hint is optional
        return None


def _lora_product_entry(site: LoraSite, choice, hint: Optional[int], options: RewriteOptions):
    """(what the lowered chain does with X_l·Aᵀ, the bytes it keeps) for the report. FLOPs stay the
    plans' own: the original chain they are compared with is forward1 + backward1 as the paper
    counts it (recomputing X·Aᵀ), while eager peft keeps X·Aᵀ as the kept chain does."""
    if hint is None:
        return None, None
    kept = keeps_lora_product(choice.forward.at(hint), choice.backward.at(hint), site.needs, hint, site.i, site.r,
                              dtype=site.dtype, adapter_dtype=site.adapter_dtype, policy=options.save_lora_product)
    return kept.reason, kept.memory_bytes if kept.keep else 0


def _site_report(site: LoraSite, choice, options: RewriteOptions) -> SiteReport:
    hint = site_n_hint(site)
    n_expr = sympy.sympify(site.n)
    hint_subs = {}
    if n_expr.free_symbols and hint is not None:
        val = meta_value(site.x)
        for size in val.shape[:-1]:
            if isinstance(size, torch.SymInt):
                expr = sympy.sympify(size.node.expr)
                if expr.is_Symbol:
                    hint_subs[expr] = size_hint(size)
    f_name = choice.forward.at(hint) if hint is not None else choice.forward.pieces[0][1]
    b_name = choice.backward.at(hint) if hint is not None else choice.backward.pieces[0][1]
    f_costs = {k: cost_entry(v, hint_subs) for k, v in choice.forward_costs.items()}
    b_costs = {k: cost_entry(v, hint_subs) for k, v in choice.backward_costs.items()}
    original = chosen = None
    if f_costs["forward1"]["value"] is not None and b_costs.get("backward1", {}).get("value") is not None:
        original = f_costs["forward1"]["value"] + b_costs["backward1"]["value"]
        chosen = (_chosen_flops(site, f_costs, "forward", f_name, hint)
                  + _chosen_flops(site, b_costs, "backward", b_name, hint))
    act = None
    if hint is not None:
        a_bytes = torch.empty((), dtype=site.adapter_dtype or site.dtype).element_size()
        x_bytes = torch.empty((), dtype=site.dtype).element_size()
        act = hint * site.r * a_bytes  # x@A not saved by the op...
        if site.mixed_dtype and not site.separate_lora_input:
            act += hint * site.i * (a_bytes - x_bytes)  # x saved instead of its cast copy
    product = _lora_product_entry(site, choice, hint, options)
    if act is not None and product[1]:
        act -= product[1]  # ...but kept by the lowered chain, as eager keeps it
    return SiteReport(
        path=site.path, node=site.add.name, n=str(site.n), n_hint=hint, i=site.i, o=site.o, r=site.r,
        dtype=str(site.dtype).replace("torch.", ""),
        adapter_dtype=None if site.adapter_dtype is None else str(site.adapter_dtype).replace("torch.", ""),
        separate_lora_input=site.separate_lora_input,
        needs={"x": site.needs.x, "lora_A": site.needs.lora_A, "lora_B": site.needs.lora_B},
        forward_plan=str(choice.forward), backward_plan=str(choice.backward),
        forward_costs=f_costs, backward_costs=b_costs,
        original_flops=original, chosen_flops=chosen, activation_bytes_saved=act,
        criterion=choice.criterion, criterion_note=choice.note,
        estimated_s=_estimates(choice.estimated), measured_s=None if choice.measured is None else dict(choice.measured),
        lora_product=product[0], lora_product_bytes=product[1], base_format=base_format(site.base.quant),
    )


def _estimates(estimated: Optional[dict]) -> Optional[dict]:
    """The roofline's estimates as the report keeps them."""
    if estimated is None:
        return None
    return {"forward": dict(estimated["forward"]), "backward": dict(estimated["backward"]),
            "device": estimated["device"], "n": estimated["n"]}


def _chosen_flops(site: LoraSite, costs: dict, kind: str, name: str, n_value: int) -> int:
    """The chosen plan's cost as priced (dequantization included); a plan forced from
    outside the priced set is priced here."""
    entry = costs.get(name)
    if entry is not None and entry["value"] is not None:
        return entry["value"]
    dequant = site.o * site.i if site.base.quant is not None and (kind == "forward" or site.needs.x) else 0
    if kind == "forward":
        return int(FORWARD_PLANS[name].flops(n_value, site.i, site.o, site.r)) + dequant
    return int(BACKWARD_PLANS[name].flops(n_value, site.i, site.o, site.r, site.needs)) + dequant


def rewrite_sites(gm: fx.GraphModule, sites: list, choices: list) -> None:
    """Replaces each site's add by one ``runlora.lora_linear`` node (mutates ``gm``)."""
    graph = gm.graph
    replaced: dict = {}  # a site's add -> its new node: a later site may read it as x
    for site, choice in zip(sites, choices):
        add = site.add
        with graph.inserting_before(add):
            weight = weight_arg(graph, site.base.weight, add)
            bias = site.base.bias
            if site.base.weight.node.op == "call_module":
                mod = gm.get_submodule(site.base.weight.node.target)
                bias = None if mod.bias is None else graph.get_attr(f"{site.base.weight.node.target}.bias")
            cast = site.autocast  # under autocast: every operand cast to its dtype, as aten.linear would
            lora_b = _cast_arg(graph, weight_arg(graph, site.lora.b.weight, add), cast, add)
            args = (
                _cast_arg(graph, replaced.get(site.x, site.x), cast, add), _cast_arg(graph, weight, cast, add),
                _cast_arg(graph, bias, cast, add), _cast_arg(graph, weight_arg(graph, site.lora.a.weight, add), cast, add),
                _times_tensor_scales(graph, lora_b, site, add),
                _scaling_arg(graph, site, add), _cast_arg(graph, replaced.get(site.x_lora, site.x_lora), cast, add),
                site.adapter_dtype, str(choice.forward), str(choice.backward),
            )
            op, args = _quantized_call(site.base.quant, args)
            new = graph.call_function(op, args)
            new.meta.update(add.meta)
            out = new
            if site.lora_bias is not None:
                scaled = new_call(graph, torch.ops.aten.mul.Tensor, (_cast_arg(graph, site.lora_bias, cast, add), args[5]),
                               add)
                scaled = _times_tensor_scales(graph, scaled, site, add)
                out = new_call(graph, torch.ops.aten.add.Tensor, (new, scaled), add)
                out.meta.update({k: v for k, v in add.meta.items() if k not in ("val", "example_value")})
                set_value(out, meta_value(add), add)
        add.replace_all_uses_with(out)
        replaced[add] = out
        x_chain = [] if site.base.x in replaced else [site.base.x]  # an earlier site's add is gone already
        erase_dead(graph, [add, *site.base.nodes, *site.lora.nodes, *x_chain])
    graph.lint()
    gm.recompile()


def _quantized_call(quant: Optional[dict], args: tuple) -> tuple:
    """The target and arguments for a site's base: dense, a packed 4-bit weight, or an NF4Tensor."""
    if quant is None:
        return torch.ops.runlora.lora_linear.default, args
    x, _, bias, lora_a, lora_b, scaling, x_lora, adapter_dtype, fwd, bwd = args
    if quant["quant_type"] == "torchao_nf4_tensor":
        return lora_linear_nf4, (x, quant["weight"], bias, lora_a, lora_b, scaling, x_lora, adapter_dtype, fwd, bwd)
    return torch.ops.runlora.lora_linear_4bit.default, (
        x, list(quant["qtensors"]), quant["quant_type"], list(quant["quant_args"]), list(quant["shape"]), bias,
        lora_a, lora_b, scaling, x_lora, adapter_dtype, fwd, bwd)


def _scaling_arg(graph: fx.Graph, site: LoraSite, like: fx.Node):
    """The op's scaling: a float, or a node multiplying the run-time scalar factors."""
    const = float(site.lora.scaling)
    if not site.lora.scale_nodes:
        return const
    scale = site.lora.scale_nodes[0]
    for factor in list(site.lora.scale_nodes[1:]) + ([const] if const != 1.0 else []):
        product = graph.call_function(operator.mul, (scale, factor))
        product.meta[value_key(like)] = meta_value(scale) * meta_value(factor)
        scale = product
    return scale


def _cast_arg(graph: fx.Graph, node, dtype: Optional[torch.dtype], like: fx.Node):
    """``node`` cast to ``dtype`` by a new node (an autocast site's explicit cast), or ``node``
    itself when there is nothing to cast. Autograd gives an fp32 parameter an fp32 grad
    through it, as through autocast's own cast."""
    if dtype is None or not isinstance(node, fx.Node) or getattr(meta_value(node), "dtype", dtype) == dtype:
        return node
    return new_call(graph, torch.ops.aten.to.dtype, (node, dtype), like)


def _times_tensor_scales(graph: fx.Graph, node: fx.Node, site: LoraSite, like: fx.Node) -> fx.Node:
    """``node`` times the site's 0-d tensor scales, one ``aten.mul`` each.

    The op's schema keeps ``scaling: float`` (saved programs use it), so a run-time tensor
    scale s cannot be an argument; it is folded into lora_B instead, exactly::

        s * ((x @ A.T) @ B.T) == (x @ A.T) @ (s * B).T      # B' = s * B is o x r: cheap

    and autograd gives dB = s * dB' (and ds, if s requires grad) through the mul. The value
    is read on every call, so filling the scale in place (peft's hotswap) needs no recompile.
    """
    for scale in site.lora.scale_tensors:
        node = new_call(graph, torch.ops.aten.mul.Tensor, (node, scale), like)
    return node


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of gm's graph to restore on failure, keeping attributes callers set on nodes
    (Dynamo's ``_dynamo_source`` on placeholders)."""
    backup = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    val_map: dict = {}
    backup.output(backup.graph_copy(gm.graph, val_map))
    for old, new in val_map.items():
        for key, value in vars(old).items():
            if key not in vars(new):
                setattr(new, key, value)
    return backup


def _rejects_forced_plan(site: LoraSite, forced: list, rejected: list) -> bool:
    """A forced merged plan (W + sBA) is illegal where x_lora is separate or dtypes mix, and a
    forced ``fused`` plan where its kernels cannot run the site (``ops/fused.py``): the site is
    left alone and reported, as for any other legality rule."""
    if any("fused" in parse_plan(spec).names for spec, _ in forced):
        why = fused.unavailable_reason(getattr(meta_value(site.x), "device", "cpu"), site.dtype, site.adapter_dtype,
                                       site.r)
        if why is not None:
            rejected.append(Rejection(site.path, site.add.name, f"forced plan 'fused' cannot run here: {why}"))
            return True
    if not (site.separate_lora_input or site.mixed_dtype):
        return False
    for spec, kind in forced:
        merged = [name for name in parse_plan(spec).names if resolve_plan(name, 0, kind).merged]
        if merged:
            why = "a separate LoRA input (dropout)" if site.separate_lora_input else "mixed adapter dtype"
            rejected.append(Rejection(site.path, site.add.name,
                                      f"forced {kind} plan {merged[0]!r} merges W + sBA, illegal with {why}"))
            return True
    return False


def _measure_sites(sites: list, options: RewriteOptions) -> None:
    """Times every distinct key of the graph up front, so one progress line covers them all."""
    requests = []
    for site in sites:
        # dequantization is the same for every pair: pairs are timed on the dense layer
        request = time_request(site_facts(site, options, dequant_flops=0))
        if not isinstance(request, str):
            requests.append(request)
    options.tuner.measure_all(requests)


def _warn_restored_dx(sites: list) -> None:
    restored = [s.path for s in sites if restores_dx(s.base)]
    if restored:
        warnings.warn(
            f"runlora: {len(restored)} 4-bit base layer(s) (first: {restored[0]}) were traced under no_grad "
            "(torch.export runs the forward of bitsandbytes' MatMul4Bit and torchao's LinearNF4 so), which drops "
            "their dX from the exported program; the rewritten op computes dX through the base as eager "
            "autograd does", stacklevel=3)


def rewrite(gm: fx.GraphModule, options: Optional[RewriteOptions] = None, *, graph_name: str = "graph",
            dry_run: bool = False, **option_fields) -> RewriteReport:
    """Rewrites every legal LoRA site of ``gm`` in place and reports what it did, including
    the sites inside the bodies of its checkpointed, wrapped or nested-compile regions
    (``subgraphs.py``), whose paths are the user's module paths as in the outer graph.

    Args:
        gm: a GraphModule with shape metadata (Dynamo, torch.export, or ShapeProp).
        options: a ``RewriteOptions``; ``option_fields`` (criterion=, allow_merged=,
            forward_plan=, backward_plan=, device_model=, time_budget_s=, tuner=,
            rewrite_4bit=, group_siblings=, save_lora_product=) replace its fields. See
            ``RewriteOptions`` for each.
        graph_name: label for the report.
        dry_run: match and choose only; leave the graph unchanged.

    Returns:
        RewriteReport. On an internal error: a warning, the graph unchanged, an empty report.
    """
    options = tuner_for(RewriteOptions.build(options, **option_fields))
    started = time.perf_counter()
    report = RewriteReport(graph=graph_name, criterion=options.criterion)
    graphs = [gm, *region_bodies(gm)]  # and the bodies of checkpointed/wrapped regions (subgraphs.py)
    backups = [_copy_graph(g) for g in graphs]
    try:
        sites, dora_reports, dora_sites = [], [], []
        for g in graphs:
            dora_found, dora_rejected, dora_nodes, rewritten = rewrite_dora(g, options, dry_run=dry_run)  # first: DoRA is not LoRA
            dora_reports += dora_found
            dora_sites += rewritten
            report.rejected += dora_rejected
            found, rejected = find_sites(g.graph)
            rejected = [r for r in rejected if r.node not in dora_nodes]  # a dry run leaves DoRA's nodes in place
            sites += found
            report.rejected += rejected
        forced = options.forced_plans
        sites = [s for s in sites if not _rejects_forced_plan(s, forced, report.rejected)
                 and not _skips_4bit(s, options, report.rejected)]
        if options.criterion == "time" and not options.fully_forced:
            _measure_sites(sites, options)
        choices = [plan_site(s, options) for s in sites]
        report.sites = [_site_report(s, c, options) for s, c in zip(sites, choices)]
        groups = find_groups(sites, choices, options, report.sites)  # siblings sharing x (group.py)
        report.sites += dora_reports  # after find_groups, which indexes report.sites by site
        if not dry_run and sites:
            for g in graphs:
                own = list(zip(*rewrite_groups(g, sites, choices, groups)))  # the ungrouped sites of g
                if own:
                    rewrite_sites(g, [s for s, _ in own], [c for _, c in own])
        if not dry_run:
            _warn_restored_dx(sites + dora_sites)
    except Exception as exc:  # noqa: BLE001 - the pass must never break a user's compile
        warnings.warn(f"runlora: pass failed, graph left unchanged ({type(exc).__name__}: {exc})", stacklevel=2)
        log.debug("runlora pass failure", exc_info=True)
        for g, backup in zip(graphs, backups):
            g.graph = backup
            g.recompile()
        return RewriteReport(graph=graph_name, criterion=options.criterion)
    report.pass_seconds = time.perf_counter() - started
    log.info("%s", report.summary())
    return report
