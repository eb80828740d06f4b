"""``choose``: one entry point for the three ways of choosing a site's plans.

    criterion="flops"     fewest sympy FLOPs (``flops.py``: ``choose_plan``; the default)
    criterion="roofline"  least estimated time: FLOPs, bytes and launches (``roofline.py`` here)
    criterion="time"      fastest measured pair on the device (``measure.py`` here), cached;
                          the roofline where nothing is measured (time budget spent,
                          measuring failed, no real device)

Every criterion returns the same ``PlanChoice``, with ``criterion`` set to what actually
chose (so a fallback reads "roofline" and ``note`` says why), ``forward_costs`` /
``backward_costs`` always the FLOPs (reports compare FLOPs whatever chose), ``estimated``
the roofline's seconds per plan, and ``measured`` the timed table {pair: seconds}.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import sympy
import torch

from ..options import CRITERIA, RewriteOptions, check_criterion
from ..plans import BACKWARD_PLANS, Needs, PiecewisePlan
from .flops import PlanChoice, Size, applicable_plans, choose_plan
from .measure import Autotuner, TuneKey, pair_name
from .roofline import Layout, choose_roofline, resolve_device_model

__all__ = ["CRITERIA", "SiteFacts", "choose", "choose_for", "check_criterion", "time_request"]


@dataclasses.dataclass(frozen=True)
class SiteFacts:
    """What the criteria need to know about one site.

    Attributes:
        n, i, o, r: tokens (int or sympy expression), in and out features, rank.
        needs: which gradients the backward produces.
        separate_lora_input: the LoRA branch reads its own input (dropout): no merged plans.
        mixed_dtype: the adapters compute in another dtype than the base: no merged plans.
        allow_merged: merged plans allowed for this site (the options' policy, resolved).
        include_dominated: also price the five dominated backward plans.
        n_hint: a concrete n for a symbolic one (the size hint).
        dtype, adapter_dtype, bias: the site's x/W dtype, the op's adapter dtype, whether the
            base has a bias (bytes moved; the timing key).
        device: where the site runs (the roofline's device model, where to measure).
        dequant_flops: cost of dequantizing a 4-bit W once (about o·i), else 0. Every plan
            dequantizes W once in forward and once in backward when dX is needed, so
            dequantization adds the same time to every pair: "roofline" and "time" rank the
            pairs on the dense layer, and the choice's ``note`` says so.
    """

    n: Size
    i: Size
    o: Size
    r: Size
    needs: Needs = Needs()
    separate_lora_input: bool = False
    mixed_dtype: bool = False
    allow_merged: bool = True
    include_dominated: bool = False
    n_hint: Optional[int] = None
    dtype: torch.dtype = torch.float32
    adapter_dtype: Optional[torch.dtype] = None
    bias: bool = False
    device: Union[str, torch.device] = "cpu"
    dequant_flops: Size = 0

    @property
    def layout(self) -> Layout:
        return Layout(dtype=self.dtype, adapter_dtype=self.adapter_dtype,
                      separate_lora_input=self.separate_lora_input, bias=self.bias)


def choose(n: Size, i: Size, o: Size, r: Size, *, criterion: str = "flops", device_model=None, tuner=None,
           **facts) -> PlanChoice:
    """Chooses a site's forward and backward plans by ``criterion``.

    Args:
        n, i, o, r, **facts: the site (``SiteFacts``' fields).
        criterion, device_model, tuner: as in ``RewriteOptions``.

    Returns:
        PlanChoice (see the module docstring). For "time" with a symbolic n, the pair measured
        at the size hint, as one constant plan.
    """
    return choose_for(SiteFacts(n, i, o, r, **facts),
                      RewriteOptions(criterion=criterion, device_model=device_model, tuner=tuner))


def choose_for(site: SiteFacts, options: RewriteOptions) -> PlanChoice:
    """``choose`` on a ``SiteFacts`` record with the pass's options."""
    flops = choose_plan(site.n, site.i, site.o, site.r, needs=site.needs, separate_lora_input=site.separate_lora_input,
                        mixed_dtype=site.mixed_dtype, allow_merged=site.allow_merged,
                        include_dominated=site.include_dominated, n_hint=site.n_hint, dequant_flops=site.dequant_flops)
    if options.criterion == "flops":
        return flops
    dequant_note = "4-bit base: ranked on the dense layer (dequantization costs every pair the same)"
    if options.criterion == "time":
        measured = _choose_by_time(flops, site, options.tuner)
        if measured.criterion == "time":
            return dataclasses.replace(measured, note=dequant_note) if site.dequant_flops else measured
        note = measured.note
    else:
        note = dequant_note if site.dequant_flops else None
    return dataclasses.replace(_choose_by_roofline(flops, site, options.device_model), note=note)


def _choose_by_roofline(flops: PlanChoice, site: SiteFacts, device_model) -> PlanChoice:
    model = resolve_device_model(device_model, site.device)
    forward, backward, estimates = choose_roofline(
        site.n, site.i, site.o, site.r, model=model, layout=site.layout, needs=site.needs,
        separate_lora_input=site.separate_lora_input, mixed_dtype=site.mixed_dtype, allow_merged=site.allow_merged,
        include_dominated=site.include_dominated, n_hint=site.n_hint)
    return dataclasses.replace(flops, forward=forward, backward=backward, criterion="roofline", estimated=estimates)


def _choose_by_time(flops: PlanChoice, site: SiteFacts, tuner) -> PlanChoice:
    request = time_request(site)
    if isinstance(request, str):
        return dataclasses.replace(flops, criterion="roofline", note=request)
    key, pairs = request
    if len(pairs) == 1:
        forward, backward = pairs[0].split("/")
        return dataclasses.replace(flops, forward=PiecewisePlan(((0, forward),)),
                                   backward=PiecewisePlan(((0, backward),)), criterion="time",
                                   note="one applicable pair: nothing to measure")
    if tuner is None:
        tuner = Autotuner()
    table = tuner.measure(key, pairs)
    if table is None:
        reason = tuner.results.get(str(key), {}).get("skipped", "not measured")
        return dataclasses.replace(flops, criterion="roofline", note=f"time: {reason}")
    best = min(pairs, key=lambda p: table[p])  # ties: the earlier pair (forward1/backward1 first)
    forward, backward = best.split("/")
    return dataclasses.replace(flops, forward=PiecewisePlan(((0, forward),)), backward=PiecewisePlan(((0, backward),)),
                               criterion="time", measured=dict(table))


def time_request(site: Optional[SiteFacts] = None, *sizes, **facts):
    """(TuneKey, [pair, ...]) to measure for a site, or a string saying why it cannot be timed.

    Takes a ``SiteFacts``, or its fields (``time_request(n, i, o, r, needs=..., ...)``).
    """
    if not isinstance(site, SiteFacts):
        site = SiteFacts(*((site,) + sizes), **facts)
    n_expr = sympy.sympify(site.n)
    n_value = site.n_hint if n_expr.free_symbols else int(n_expr)
    if n_value is None:
        return "time: n is symbolic and has no size hint"
    if any(sympy.sympify(v).free_symbols for v in (site.i, site.o, site.r)):
        return "time: i, o or r is symbolic"
    dev = torch.device(site.device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        return f"time: cannot measure on device {dev}"
    fwd, bwd = applicable_plans(separate_lora_input=site.separate_lora_input, mixed_dtype=site.mixed_dtype,
                                allow_merged=site.allow_merged)
    if not site.include_dominated:
        bwd = [b for b in bwd if not BACKWARD_PLANS[b].dominated]
    needs = site.needs
    if not (needs.x or needs.lora_A or needs.lora_B):
        bwd = bwd[:1]  # no backward runs: only the forward plan matters
    pairs = [pair_name(f, b) for f in fwd for b in bwd]
    key = TuneKey.for_site(device=dev, dtype=site.dtype, adapter_dtype=site.adapter_dtype, n=n_value, i=int(site.i),
                           o=int(site.o), r=int(site.r), needs=needs, separate_lora_input=site.separate_lora_input,
                           bias=site.bias)
    return key, pairs
