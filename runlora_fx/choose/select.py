"""``choose``: one entry point for the three ways of choosing a site's plans.

    criterion="flops"     fewest sympy FLOPs (``flops.py``: ``choose_plan``; the default)
    criterion="roofline"  least estimated time: FLOPs, bytes and launches (``roofline.py`` here)
    criterion="time"      fastest measured pair on the device (``measure.py`` here), cached;
                          the roofline where nothing is measured (time budget spent,
                          measuring failed, no real device)

The ``fused`` pair (Triton kernels, ``ops/fused.py``) is ranked by "time" only: on CUDA, where
the kernels run, it is measured beside the ATen pairs and chosen when it beats the fastest of
them by ``FUSED_MIN_GAIN`` (3%); unmeasured it is never chosen, and the other criteria never
rank it (its FLOPs are forward1/backward1's; what it saves, bytes and launches, is what a
measurement sees and a datasheet model guesses).

Every criterion returns the same ``PlanChoice``, with ``criterion`` set to what actually
chose (so a fallback reads "roofline" and ``note`` says why), ``forward_costs`` /
``backward_costs`` always the FLOPs (reports compare FLOPs whatever chose), ``estimated``
the roofline's seconds per plan, and ``measured`` the timed table {pair: seconds}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import sympy
import torch

from ..ops import fused
from ..options import CRITERIA, RewriteOptions, check_criterion, default_allow_merged, precision_policy
from ..plans import BACKWARD_PLANS, Needs, PiecewisePlan, parse_plan
from ..plans.catalogue import FUSED_BACKWARD_PLANS, FUSED_FORWARD_PLANS
from .flops import PlanChoice, Size, applicable_plans, choose_plan
from .measure import Autotuner, TuneKey, pair_name
from .roofline import Layout, choose_roofline, resolve_device_model

__all__ = ["CRITERIA", "FUSED_MIN_GAIN", "FUSED_PAIR", "SiteFacts", "choose", "choose_for", "check_criterion",
           "fused_unavailable", "should_choose_fused", "time_request"]

FUSED_PAIR = "fused/fused"
FUSED_MIN_GAIN = 0.03  # the fused pair must measure at least 3% faster than the best ATen pair


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
        allow_fused: the fused pair may be measured for this site (False for DoRA sites,
            whose ops run ATen chains only).
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
    allow_fused: bool = True

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
    """``choose`` on a ``SiteFacts`` record with the pass's options.

    In bf16/fp16, where merged plans were legal, the choice's ``note`` also says which precision
    policy decided whether they were candidates (``options.precision_policy``), so a report
    reads which criterion and which precision policy chose the site.
    """
    choice = _choose_for(site, options)
    policy = None
    if not (site.separate_lora_input or site.mixed_dtype):  # else merged plans are illegal, not a policy
        explicit = options.allow_merged
        if explicit is None and site.allow_merged != default_allow_merged(site.dtype):
            explicit = site.allow_merged  # set on the site by the caller (``choose(..., allow_merged=)``)
        policy = precision_policy(site.dtype, explicit)
    if policy is None:
        return choice
    return dataclasses.replace(choice, note=f"{choice.note}; {policy}" if choice.note else policy)


def _choose_for(site: SiteFacts, options: RewriteOptions) -> PlanChoice:
    flops = choose_plan(site.n, site.i, site.o, site.r, needs=site.needs, separate_lora_input=site.separate_lora_input,
                        mixed_dtype=site.mixed_dtype, allow_merged=site.allow_merged,
                        include_dominated=site.include_dominated, n_hint=site.n_hint, dequant_flops=site.dequant_flops)
    if _forces_fused(options):
        flops = _with_fused_costs(flops, site)  # priced as the others, so reports can show it
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
    aten = [p for p in pairs if p != FUSED_PAIR]
    best = min(aten, key=lambda p: table[p])  # ties: the earlier pair (forward1/backward1 first)
    note = None
    if FUSED_PAIR in table:
        take, note = should_choose_fused(table[FUSED_PAIR], best, table[best])
        best = FUSED_PAIR if take else best
        flops = _with_fused_costs(flops, site)
    elif torch.device(site.device).type == "cuda" and site.allow_fused:
        note = f"fused not measured: {fused_unavailable(site)}"  # e.g. no Triton on this GPU machine
    forward, backward = best.split("/")
    return dataclasses.replace(flops, forward=PiecewisePlan(((0, forward),)), backward=PiecewisePlan(((0, backward),)),
                               criterion="time", measured=dict(table), note=note)


def should_choose_fused(fused_s: float, best_aten: str, best_aten_s: float) -> tuple[bool, str]:
    """(take it, why): the fused pair wins where it measured ``FUSED_MIN_GAIN`` faster than the best ATen pair."""
    if not math.isfinite(fused_s):
        return False, "fused failed to run here (see the warning): not chosen"
    ratio = fused_s / best_aten_s if best_aten_s > 0 else math.inf
    take = ratio <= 1 - FUSED_MIN_GAIN
    verdict = "chosen" if take else f"not chosen (needs <= {1 - FUSED_MIN_GAIN:.2f}x)"
    return take, f"fused measured {ratio:.3f}x the best ATen pair {best_aten}: {verdict}"


def _forces_fused(options: RewriteOptions) -> bool:
    forced = [(spec, plans) for spec, plans in ((options.forward_plan, FUSED_FORWARD_PLANS),
                                                (options.backward_plan, FUSED_BACKWARD_PLANS)) if spec]
    return any(name in plans for spec, plans in forced for name in parse_plan(spec).names)


def _with_fused_costs(flops: PlanChoice, site: SiteFacts) -> PlanChoice:
    """The fused plans' FLOPs beside the ATen ones (reports price the chosen plan from these)."""
    f_plan, b_plan = FUSED_FORWARD_PLANS["fused"], FUSED_BACKWARD_PLANS["fused"]
    return dataclasses.replace(
        flops, forward_costs={**flops.forward_costs, "fused": f_plan.flops(site.n, site.i, site.o, site.r)},
        backward_costs={**flops.backward_costs, "fused": b_plan.flops(site.n, site.i, site.o, site.r, site.needs)})


def fused_unavailable(site: SiteFacts) -> Optional[str]:
    """Why the fused pair is not a candidate for ``site``, or None.

    Only CUDA: the kernels' interpreter (``TRITON_INTERPRET=1``) runs them on CPU tensors for
    tests, but a CPU site never measures or chooses them.
    """
    if not site.allow_fused:
        return "not for this kind of site (its op runs ATen chains only)"
    dev = torch.device(site.device)
    if dev.type != "cuda":
        return f"the fused plan runs on CUDA only; the site is on {dev.type}"
    if sympy.sympify(site.dequant_flops) != 0:
        return "a 4-bit base: the fused kernels take a dense W"
    return fused.unavailable_reason(dev, site.dtype, site.adapter_dtype, int(site.r))


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
    if fused_unavailable(site) is None:
        pairs.append(FUSED_PAIR)
    # The key names the kernels' source wherever they could run, whether or not this site asks for
    # them: a 4-bit site's dense timings (measured ahead with the fused pair) stay one entry.
    kernels = None if fused_unavailable(dataclasses.replace(site, dequant_flops=0, allow_fused=True)) else (
        f"fused {fused.SOURCE_HASH}")
    key = TuneKey.for_site(device=dev, dtype=site.dtype, adapter_dtype=site.adapter_dtype, n=n_value, i=int(site.i),
                           o=int(site.o), r=int(site.r), needs=needs, separate_lora_input=site.separate_lora_input,
                           bias=site.bias, kernels=kernels)
    return key, pairs
