"""Choosing by FLOPs: the sympy cost model (``criterion="flops"``, the default).

``choose_plan`` prices every applicable plan of the catalogue (``plans/catalogue.py``) with its sympy
FLOPs expression and returns the cheapest forward and backward. Sizes may be ints or sympy
expressions. When the token count n is symbolic (dynamic shapes) and i, o, r are known, each
plan's cost is linear in n, so the cheapest plan is a piecewise function of n with
breakpoints solved by sympy; it is returned as a ``plans.PiecewisePlan`` whose string form,
e.g. ``"forward1|741:forward2"`` (forward2 for n >= 741), is what the op receives and
evaluates on the concrete n at run time — no guard, no recompile.

Facts this model yields (checked in tests): forward2 beats forward1 iff n > i·o/(i+o);
backward5 beats backward1 iff n > o (all grads needed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Union

import sympy

from ..plans import BACKWARD_PLANS, FORWARD_PLANS, Needs, PiecewisePlan

__all__ = ["PlanChoice", "choose_plan", "applicable_plans"]

Size = Union[int, sympy.Expr]


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    """The selector's answer for one site.

    Attributes:
        forward, backward: the chosen plans, piecewise in n when n is symbolic.
        forward_costs, backward_costs: each applicable plan's FLOPs (sympy, at the given sizes).
        criterion: what chose: "flops", "roofline", "time" or "fixed" (see ``choose.choose``).
        estimated: the roofline's seconds per plan, {"forward": {plan: s}, "backward": {...},
            "device": name, "n": tokens}, when the roofline chose.
        measured: {"forward/backward": median seconds} when measured times chose.
        note: why a criterion other than the one asked for chose (e.g. a spent time budget).
        original_flops: FLOPs of the chain the site had (forward1 + backward1).
    """

    forward: PiecewisePlan
    backward: PiecewisePlan
    forward_costs: dict
    backward_costs: dict
    criterion: str = "flops"
    estimated: Optional[dict] = None
    measured: Optional[dict] = None
    note: Optional[str] = None

    @property
    def original_flops(self) -> sympy.Expr:
        return self.forward_costs["forward1"] + self.backward_costs["backward1"]


def applicable_plans(*, separate_lora_input: bool = False, mixed_dtype: bool = False, allow_merged: bool = True):
    """Names of (forward, backward) plans that are legal for a site.

    Merged plans form W + sBA, so they need X_l = X (no dropout between) and one dtype for
    X, W, A and B; ``allow_merged=False`` drops them by policy (low precision, see docs/numerics.md).
    """
    merged_ok = allow_merged and not separate_lora_input and not mixed_dtype
    fwd = [p.name for p in FORWARD_PLANS.values() if merged_ok or not p.merged]
    bwd = [p.name for p in BACKWARD_PLANS.values() if merged_ok or not p.merged]
    return fwd, bwd


def choose_plan(
    n: Size,
    i: Size,
    o: Size,
    r: Size,
    *,
    needs: Needs = Needs(),
    separate_lora_input: bool = False,
    mixed_dtype: bool = False,
    allow_merged: bool = True,
    include_dominated: bool = False,
    n_hint: Optional[int] = None,
    dequant_flops: Size = 0,
) -> PlanChoice:
    """Chooses the forward and backward plans with the fewest FLOPs.

    Args:
        n, i, o, r: tokens, in features, out features, rank (ints or sympy expressions).
        needs: which gradients the backward produces.
        separate_lora_input: the LoRA branch reads its own input (dropout): no merged plans.
        mixed_dtype: the adapters compute in another dtype than the base: no merged plans.
        allow_merged: policy switch for merged plans (see ``applicable_plans``).
        include_dominated: also price the five dominated backward plans.
        n_hint: a concrete n used only when i, o or r are symbolic too.
        dequant_flops: cost of dequantizing a quantized W once (QLoRA: about o·i); every
            forward pays it, and a backward pays it again when dX is needed.

    Returns:
        PlanChoice; ties go to the earlier plan in the catalogue (forward1, backward1 first).
    """
    fwd_names, bwd_names = applicable_plans(
        separate_lora_input=separate_lora_input, mixed_dtype=mixed_dtype, allow_merged=allow_merged
    )
    if not include_dominated:
        bwd_names = [b for b in bwd_names if not BACKWARD_PLANS[b].dominated]
    b_dequant = dequant_flops if needs.x else 0
    f_cost = {name: _plus(functools.partial(FORWARD_PLANS[name].flops, i_=i, o_=o, r_=r), dequant_flops)
              for name in fwd_names}
    b_cost = {name: _plus(functools.partial(BACKWARD_PLANS[name].flops, i_=i, o_=o, r_=r, needs=needs), b_dequant)
              for name in bwd_names}
    return PlanChoice(
        forward=_cheapest(f_cost, n, n_hint),
        backward=_cheapest(b_cost, n, n_hint),
        forward_costs={name: cost(n) for name, cost in f_cost.items()},
        backward_costs={name: cost(n) for name, cost in b_cost.items()},
    )


def _plus(cost, extra):
    return cost if not extra else (lambda n_: cost(n_) + extra)


_TOKENS = sympy.Symbol("N", positive=True)


def _cheapest(cost_of: dict, n: Size, n_hint: Optional[int]) -> PiecewisePlan:
    """The cheapest plan, piecewise in n when n is symbolic.

    Every cost is linear in the token count N, so the winner changes only where two cost
    lines cross; sympy solves those crossings and the winner is re-evaluated at the integers
    on both sides of each, which makes the pieces exact for every integer n.
    """
    names = list(cost_of)
    n_expr = sympy.sympify(n)
    in_tokens = [sympy.sympify(cost_of[name](_TOKENS)) for name in names]
    other = set().union(*(e.free_symbols for e in in_tokens)) - {_TOKENS}
    if other:
        # i, o or r symbolic too: no exact piecewise in n alone; price at the hint.
        if n_hint is None:
            raise ValueError(f"cannot choose a plan: sizes {sorted(map(str, other))} are symbolic and no n_hint given")
        return PiecewisePlan(((0, _argmin(names, [e.subs(_TOKENS, n_hint) for e in in_tokens])),))
    if not n_expr.free_symbols:
        return PiecewisePlan(((0, _argmin(names, [e.subs(_TOKENS, n_expr) for e in in_tokens])),))
    crossings = set()
    for a in range(len(in_tokens)):
        for b in range(a + 1, len(in_tokens)):
            for root in sympy.solve(sympy.Eq(in_tokens[a], in_tokens[b]), _TOKENS):
                if root.is_real and root > 0:
                    crossings.update({math.floor(root), math.floor(root) + 1})
    pieces: list[tuple[int, str]] = []
    for p in sorted({1} | {c for c in crossings if c >= 1}):
        name = _argmin(names, [e.subs(_TOKENS, p) for e in in_tokens])
        if not pieces or pieces[-1][1] != name:
            pieces.append((0 if not pieces else p, name))
    return PiecewisePlan(tuple(pieces))


def _argmin(names: Sequence[str], values: Sequence) -> str:
    best = 0
    for k in range(1, len(names)):
        if bool(sympy.sympify(values[k]) < sympy.sympify(values[best])):
            best = k
    return names[best]
