"""``choose``: one entry point for the three ways of choosing a site's plans.

    criterion="flops"     fewest sympy FLOPs (``cost.choose_plan``; the default)
    criterion="roofline"  least estimated time: FLOPs, bytes and launches (``roofline.py``)
    criterion="time"      fastest measured pair on the device (``autotune.py``), cached;
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

from .autotune import Autotuner, TuneKey, pair_name
from .cost import PiecewisePlan, PlanChoice, Size, applicable_plans, choose_plan
from .plans import BACKWARD_PLANS, Needs
from .roofline import Layout, choose_roofline, resolve_device_model

__all__ = ["CRITERIA", "choose", "check_criterion", "time_request"]

CRITERIA = ("flops", "roofline", "time")


def check_criterion(criterion: str) -> None:
    """Raises ValueError naming the known criteria."""
    if criterion not in CRITERIA:
        raise ValueError(f"runlora: criterion {criterion!r} is not available; expected one of {CRITERIA}")


def choose(
    n: Size,
    i: Size,
    o: Size,
    r: Size,
    *,
    criterion: str = "flops",
    needs: Needs = Needs(),
    separate_lora_input: bool = False,
    mixed_dtype: bool = False,
    allow_merged: bool = True,
    include_dominated: bool = False,
    n_hint: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    adapter_dtype: Optional[torch.dtype] = None,
    bias: bool = False,
    device: Union[str, torch.device] = "cpu",
    device_model=None,
    tuner=None,
    dequant_flops: Size = 0,
) -> PlanChoice:
    """Chooses a site's forward and backward plans by ``criterion``.

    Args:
        n, i, o, r, needs, separate_lora_input, mixed_dtype, allow_merged, include_dominated,
            n_hint: as for ``cost.choose_plan``.
        criterion: "flops", "roofline" or "time".
        dtype, adapter_dtype, bias: the site's x/W dtype, the op's adapter dtype, whether the
            base has a bias (bytes moved; the timing key).
        device: where the site runs (the roofline's device model, where to measure).
        device_model: roofline figures: a ``roofline.DeviceModel``, a table name ("H200"), or
            None to look the device up.
        tuner: an ``autotune.Autotuner`` for "time" (default: a new one, default cache).
        dequant_flops: as for ``cost.choose_plan`` (a quantized base). Every plan dequantizes W
            once in forward and once in backward when dX is needed, so dequantization adds
            the same time to every pair: "roofline" and "time" rank the pairs on the dense
            layer, and ``note`` says so.

    Returns:
        PlanChoice (see the module docstring). For "time" with a symbolic n, the pair measured
        at the size hint, as one constant plan.
    """
    check_criterion(criterion)
    flops = choose_plan(n, i, o, r, needs=needs, separate_lora_input=separate_lora_input, mixed_dtype=mixed_dtype,
                        allow_merged=allow_merged, include_dominated=include_dominated, n_hint=n_hint,
                        dequant_flops=dequant_flops)
    if criterion == "flops":
        return flops
    dequant_note = "4-bit base: ranked on the dense layer (dequantization costs every pair the same)"
    if criterion == "time":
        measured = _choose_by_time(flops, n, i, o, r, needs=needs, separate_lora_input=separate_lora_input,
                                   mixed_dtype=mixed_dtype, allow_merged=allow_merged,
                                   include_dominated=include_dominated, n_hint=n_hint, dtype=dtype,
                                   adapter_dtype=adapter_dtype, bias=bias, device=device, tuner=tuner)
        if measured.criterion == "time":
            return dataclasses.replace(measured, note=dequant_note) if dequant_flops else measured
        note = measured.note
    else:
        note = dequant_note if dequant_flops else None
    return dataclasses.replace(
        _choose_by_roofline(flops, n, i, o, r, needs=needs, separate_lora_input=separate_lora_input,
                            mixed_dtype=mixed_dtype, allow_merged=allow_merged, include_dominated=include_dominated,
                            n_hint=n_hint, dtype=dtype, adapter_dtype=adapter_dtype, bias=bias, device=device,
                            device_model=device_model),
        note=note,
    )


def _choose_by_roofline(flops: PlanChoice, n, i, o, r, *, needs, separate_lora_input, mixed_dtype, allow_merged,
                        include_dominated, n_hint, dtype, adapter_dtype, bias, device, device_model) -> PlanChoice:
    model = resolve_device_model(device_model, device)
    layout = Layout(dtype=dtype, adapter_dtype=adapter_dtype, separate_lora_input=separate_lora_input, bias=bias)
    forward, backward, estimates = choose_roofline(
        n, i, o, r, model=model, layout=layout, needs=needs, separate_lora_input=separate_lora_input,
        mixed_dtype=mixed_dtype, allow_merged=allow_merged, include_dominated=include_dominated, n_hint=n_hint)
    return dataclasses.replace(flops, forward=forward, backward=backward, criterion="roofline", estimated=estimates)


def _choose_by_time(flops: PlanChoice, n, i, o, r, *, needs, separate_lora_input, mixed_dtype, allow_merged,
                    include_dominated, n_hint, dtype, adapter_dtype, bias, device, tuner) -> PlanChoice:
    request = time_request(n, i, o, r, needs=needs, separate_lora_input=separate_lora_input, mixed_dtype=mixed_dtype,
                           allow_merged=allow_merged, include_dominated=include_dominated, n_hint=n_hint, dtype=dtype,
                           adapter_dtype=adapter_dtype, bias=bias, device=device)
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


def time_request(n, i, o, r, *, needs, separate_lora_input, mixed_dtype, allow_merged, include_dominated, n_hint,
                 dtype, adapter_dtype, bias, device):
    """(TuneKey, [pair, ...]) to measure for a site, or a string saying why it cannot be timed."""
    n_expr = sympy.sympify(n)
    n_value = n_hint if n_expr.free_symbols else int(n_expr)
    if n_value is None:
        return "time: n is symbolic and has no size hint"
    if any(sympy.sympify(v).free_symbols for v in (i, o, r)):
        return "time: i, o or r is symbolic"
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        return f"time: cannot measure on device {dev}"
    fwd, bwd = applicable_plans(separate_lora_input=separate_lora_input, mixed_dtype=mixed_dtype,
                                allow_merged=allow_merged)
    if not include_dominated:
        bwd = [b for b in bwd if not BACKWARD_PLANS[b].dominated]
    if not (needs.x or needs.lora_A or needs.lora_B):
        bwd = bwd[:1]  # no backward runs: only the forward plan matters
    pairs = [pair_name(f, b) for f in fwd for b in bwd]
    key = TuneKey.for_site(device=dev, dtype=dtype, adapter_dtype=adapter_dtype, n=n_value, i=int(i), o=int(o),
                           r=int(r), needs=needs, separate_lora_input=separate_lora_input, bias=bias)
    return key, pairs
