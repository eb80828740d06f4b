"""Choosing a DoRA site's plans: the LoRA layer's forward and backward, and the row norms.

The backward is the LoRA layer's (``choose_for`` on the site's facts): DoRA only scales its
input by g and adds dm's reduction, the same for every plan. The forward and the norm are
chosen together, because forward2 forms W + sBA anyway and ``norm_merged`` then costs only
its o×i reduction::

    cost(forward, norm) = FLOPs(forward) + FLOPs(norm | forward merges)

``norm_lowrank`` never forms W + sBA (``plans/dora.py``); its ‖W‖²_row is cached per frozen
W, so it is not counted per step. Costs are priced at the size hint when n is symbolic.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import sympy

from ..options import RewriteOptions
from ..plans import FORWARD_PLANS, PiecewisePlan, parse_plan
from ..plans.catalogue import i, o, r
from ..plans.dora import NORM_PLANS
from .flops import PlanChoice
from .select import SiteFacts, choose_for

__all__ = ["DoraChoice", "choose_dora"]


@dataclasses.dataclass(frozen=True)
class DoraChoice:
    """A DoRA site's choice: the LoRA layer's ``PlanChoice`` (forward replaced by the joint
    choice) plus the norm plan and every (forward, norm) pair's cost."""

    plans: PlanChoice
    norm: str
    pair_costs: dict  # "forward/norm" -> sympy FLOPs

    @property
    def forward(self) -> PiecewisePlan:
        return self.plans.forward

    @property
    def backward(self) -> PiecewisePlan:
        return self.plans.backward


def _value(expr, n_value: Optional[int]):
    expr = sympy.sympify(expr)
    if expr.free_symbols and n_value is not None:
        expr = expr.subs({s: n_value for s in expr.free_symbols})
    return expr


def choose_dora(facts: SiteFacts, options: RewriteOptions, *, forced_norm: Optional[str] = None) -> DoraChoice:
    """Chooses (forward, norm) jointly by FLOPs and the backward by ``options.criterion``.

    Args:
        facts: the site, as for the LoRA layer (``separate_lora_input`` is v's own: True only
            for torchtune's dropout form, where merged plans are illegal).
        options: the pass's options; forced forward/backward plans are honoured.
        forced_norm: a norm plan to use whatever it costs.

    Returns:
        DoraChoice. Ties go to the earlier forward plan and to ``norm_lowrank`` (listed
        first), which keeps no o×i temporary.
    """
    base = choose_for(dataclasses.replace(facts, allow_fused=False), options)  # DoRA's ops run ATen chains only
    sizes = {i: facts.i, o: facts.o, r: facts.r}
    n_value = (facts.n_hint or 1) if sympy.sympify(facts.n).free_symbols else int(facts.n)
    forwards = [options.forward_plan] if options.forward_plan else list(base.forward_costs)
    norms = [forced_norm] if forced_norm else ["norm_lowrank", "norm_merged"]
    pair_costs, best, best_cost = {}, None, None
    for f in forwards:
        f_name = parse_plan(f).at(n_value)
        merged = FORWARD_PLANS[f_name].merged
        f_cost = base.forward_costs.get(f_name, FORWARD_PLANS[f_name].flops(facts.n, facts.i, facts.o, facts.r))
        for norm in norms:
            cost = sympy.sympify(f_cost) + NORM_PLANS[norm].flops(merged).xreplace(sizes)
            pair_costs[f"{f_name}/{norm}"] = cost
            value = _value(cost, n_value)
            if best is None or bool(value < best_cost):
                best, best_cost = (f_name, norm), value
    forward = PiecewisePlan(((0, best[0]),))
    plans = dataclasses.replace(base, forward=forward)
    return DoraChoice(plans=plans, norm=best[1], pair_costs=pair_costs)
