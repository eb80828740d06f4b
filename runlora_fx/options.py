"""``RewriteOptions``: every setting of the pass in one frozen record, and every default.

A front door (``make_backend``, ``rewrite``, ``rewrite_exported_program``, ``explain``,
``tune``, ``install``) builds one record from its keywords, validated once, and hands it down
whole: the pass, the selector and the criteria read fields from it. Adding an option is one
field here and the code that reads it.

Defaults that depend on the site (merged plans by dtype, 4-bit rewrites by device) and on the
inputs (the lowering) are functions of this module, so each default lives in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .plans import parse_plan, resolve_plan

__all__ = [
    "CRITERIA",
    "INNER_COMPILERS",
    "LOWERINGS",
    "RewriteOptions",
    "check_criterion",
    "default_allow_merged",
    "default_criterion",
    "default_lowering",
    "default_rewrite_4bit",
    "precision_policy",
]

CRITERIA = ("flops", "roofline", "time")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
LOWERINGS = ("aten", "opaque")

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_criterion(criterion: str) -> None:
    """Raises ValueError naming the known criteria."""
    if criterion not in CRITERIA:
        raise ValueError(f"runlora: criterion {criterion!r} is not available; expected one of {CRITERIA}")


def default_allow_merged(dtype: torch.dtype) -> bool:
    """Merged plans (W + sBA) are the default only where W's dtype keeps small deltas.

    In bf16/fp16 an update sBA under half an ulp of W's element rounds away entirely; see
    docs/numerics.md. The precision rule (docs/numerics.md, "Precision rule";
    ``examples/bf16_text_study.py`` on Python source, 3 learning rates x 3 seeds x bf16/fp16,
    docs/precision_rule.json) would turn them on if merged stayed within the farther unmerged
    path's distance from fp32 on every run; it held on 13 of 18 runs, worst 1.28x (fp16, lr 3e-4,
    seed 1; bf16 0.96-1.02x), so they stay off. Pass ``allow_merged=True`` to use them.
    """
    return dtype not in _LOW_PRECISION


def precision_policy(dtype: torch.dtype, allow_merged: Optional[bool]) -> Optional[str]:
    """What decided whether merged plans are candidates for a site in ``dtype``, in words (reports
    show it); None outside bf16/fp16, where merged plans are always allowed by default."""
    if dtype not in _LOW_PRECISION:
        return None
    name = str(dtype).replace("torch.", "")
    if allow_merged is not None:
        state = "allowed" if allow_merged else "off"
        return f"precision: merged plans {state} in {name} by allow_merged={allow_merged}"
    state = "allowed" if default_allow_merged(dtype) else "off"
    return (f"precision: merged plans {state} in {name} by default (options.default_allow_merged; "
            f"docs/numerics.md, Precision rule)")


def default_criterion(device) -> str:
    """The criterion ``criterion=None`` resolves to on ``device``: "flops" everywhere.

    The roofline would become the CUDA default only together with merged plans in bf16/fp16
    (it ranks bytes, and merged plans are where it parts from FLOPs on the H200 TinyLlama
    step); the precision rule that would allow those was not met (docs/numerics.md, "Precision
    rule"), so the CUDA default stays "flops". ``benchmarks/bench_traffic.py``'s cuda_default
    mode counts whatever this returns.
    """
    return "flops"


def default_rewrite_4bit(device) -> bool:
    """4-bit bases are rewritten by default except on CUDA, where bitsandbytes' own path under
    inductor measured faster (H200 TinyLlama step: runlora 76.7 ms vs peft + inductor 63.5 ms,
    BENCHMARKS.md). On the CPU the two are at parity and the rewrite saves x @ A activations.
    ``rewrite_4bit=True`` forces it."""
    return torch.device(device).type != "cuda"


def default_lowering(example_inputs) -> str:
    """The lowering the benchmarks favour on the inputs' device (BENCHMARKS.md).

    GPU (H200, TinyLlama shape): "aten" 58.0 ms/step vs "opaque" 63.5 — the opaque op blocks
    fusion. CPU (one layer, 4096x1024->2752, r=64): "aten" 232 ms vs "opaque" 243, within
    noise over four runs. So "aten" on both; ``example_inputs`` is kept for a per-device split.
    """
    return "aten"


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """How the pass chooses and what it may rewrite.

    Attributes:
        criterion: "flops" (sympy FLOPs, the default), "roofline" (FLOPs, bytes moved and
            launches on a device model) or "time" (each candidate pair measured on the device,
            cached on disk; see ``runlora_fx.tune``).
        allow_merged: allow plans that form W + sBA; None: ``default_allow_merged(dtype)``.
        forward_plan, backward_plan: force a plan (a string as the op takes) for every site.
        device_model: for "roofline" (and "time"'s fallback): a ``choose.roofline.DeviceModel``
            or a table name ("H200"); None: looked up from the inputs' device.
        time_budget_s: for "time": stop measuring after this many seconds (all graphs of one
            front door together); sites not measured or cached by then use the roofline.
        tuner: for "time": a ``choose.measure.Autotuner`` (cache directory, timer, budget),
            shared to share its budget; None: the front door makes one.
        rewrite_4bit: rewrite sites on 4-bit bases; None: ``default_rewrite_4bit(device)``.
            Sites whose exported graph dropped dX are always rewritten.
        group_siblings: compute sites that read the same x (q/k/v, gate/up) as one
            ``runlora.lora_linear_group`` (``passes/group.py``); None: where the cost model
            (``choose/group.py``: bytes and launches saved, FLOPs equal) says it saves time.
        save_lora_product: in the lowered chain, keep forward1's n×r X_l·Aᵀ for dB instead of
            recomputing it from X_l (``choose/lora_product.py``); None: where it holds at most
            1/8 of the bytes of x the site saves anyway; False: never (the op's contract). The
            opaque op always recomputes.
    """

    criterion: str = "flops"
    allow_merged: Optional[bool] = None
    forward_plan: Optional[str] = None
    backward_plan: Optional[str] = None
    device_model: Any = None
    time_budget_s: Optional[float] = None
    tuner: Any = None
    rewrite_4bit: Optional[bool] = None
    group_siblings: Optional[bool] = None
    save_lora_product: Optional[bool] = None

    def __post_init__(self):
        check_criterion(self.criterion)
        for spec, kind in self.forced_plans:
            try:
                for name in parse_plan(spec).names:
                    resolve_plan(name, 0, kind)
            except ValueError as exc:
                raise ValueError(f"runlora: {kind}_plan={spec!r}: {exc}") from None
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ValueError(f"runlora: time_budget_s={self.time_budget_s!r}, expected a number >= 0 or None")

    @classmethod
    def build(cls, options: Optional["RewriteOptions"] = None, **fields) -> "RewriteOptions":
        """``options`` (or the defaults) with ``fields`` replaced; TypeError naming an unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"runlora: unknown option(s) {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(options or cls(), **fields)

    @property
    def forced_plans(self) -> list:
        """[(spec, kind)] of the forced plans."""
        return [(spec, kind) for spec, kind in ((self.forward_plan, "forward"), (self.backward_plan, "backward"))
                if spec]

    @property
    def fully_forced(self) -> bool:
        """Both plans forced: nothing to estimate or measure."""
        return self.forward_plan is not None and self.backward_plan is not None

    def merged_allowed(self, dtype: torch.dtype) -> bool:
        return default_allow_merged(dtype) if self.allow_merged is None else bool(self.allow_merged)

    def rewrites_4bit(self, device) -> bool:
        return default_rewrite_4bit(device) if self.rewrite_4bit is None else bool(self.rewrite_4bit)

    def key(self) -> str:
        """A stable string of the settings that change what the pass writes (cache keys)."""
        model = self.device_model
        model = getattr(model, "name", model)
        return (f"criterion={self.criterion};allow_merged={self.allow_merged};forward={self.forward_plan};"
                f"backward={self.backward_plan};device_model={model};rewrite_4bit={self.rewrite_4bit};"
                f"group_siblings={self.group_siblings};save_lora_product={self.save_lora_product}")
