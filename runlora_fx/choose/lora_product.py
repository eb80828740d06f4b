"""Keep X_l·Aᵀ from the forward, or recompute it in the backward: a priced choice.

forward1 forms the n×r product X_l·Aᵀ; a backward whose dB goes through it (backward1, 5, 7,
8) can keep it (``CHAIN_RECORDS["keep_lora_product"]``)::

    recompute   dB = dYᵀ·(X_l·(s·A)ᵀ)     reads X_l (n×i) again, 2·n·i·r FLOPs, two kernels
    keep        dB = s·(dYᵀ·(X_l·Aᵀ))     holds n×r from forward to backward

Keeping is less work in every case; what it costs is memory: n·r adapter elements per site,
against the n·i of X_l the site saves anyway (eager autograd of a LoRA layer keeps X_l·Aᵀ too:
it is lora_B's input). ``keeps_lora_product`` keeps it where that memory is at most
``MAX_MEMORY_FRACTION`` of X_l's, i.e. r·e_a <= i·e_x / 8 (r = 16 at i = 512 and up in one
dtype). The lowered chain (``passes/lower.py``) applies this choice; the opaque op
``runlora.lora_linear`` cannot (a custom op's autograd keeps only its inputs and outputs) and
recomputes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch

from ..plans import CHAIN_RECORDS, Needs, e_a, e_x, i, n, r
from ..plans import backward_plan as _backward_plan, forward_plan as _forward_plan

__all__ = ["MAX_MEMORY_FRACTION", "LoraProductChoice", "keeps_lora_product", "price_lora_product"]

MAX_MEMORY_FRACTION = sympy.Rational(1, 8)


@dataclasses.dataclass(frozen=True)
class LoraProductChoice:
    """The choice for one site at a concrete n.

    Attributes:
        keep: X_l·Aᵀ is kept from the forward (else recomputed, or never formed).
        reason: why, in words, for reports.
        memory_bytes: bytes kept from forward to backward when kept (n·r·e_a).
        bytes_saved, flops_saved: what keeping saves in the backward.
    """

    keep: bool
    reason: str
    memory_bytes: int = 0
    bytes_saved: int = 0
    flops_saved: int = 0


def price_lora_product(n_: int, i_: int, r_: int, *, dtype: torch.dtype, adapter_dtype=None) -> dict:
    """{"memory_bytes", "bytes_saved", "flops_saved"} of keeping X_l·Aᵀ at these sizes."""
    rec = CHAIN_RECORDS["keep_lora_product"]
    sizes = {n: n_, i: i_, r: r_, e_x: dtype.itemsize, e_a: (adapter_dtype or dtype).itemsize}
    return {"memory_bytes": int(rec.memory_added.xreplace(sizes)), "bytes_saved": int(rec.bytes_saved.xreplace(sizes)),
            "flops_saved": int(rec.flops_saved.xreplace(sizes))}


def keeps_lora_product(forward_plan: str, backward_plan: str, needs: Needs, n_: int, i_: int, r_: int, *,
                       dtype: torch.dtype, adapter_dtype=None, policy: Optional[bool] = None) -> LoraProductChoice:
    """Whether a lowered site keeps X_l·Aᵀ for dB (see the module docstring).

    Args:
        forward_plan, backward_plan: plan names at this n.
        needs: the gradients the backward produces.
        n_, i_, r_: tokens, in features, rank.
        dtype, adapter_dtype: x's and the LoRA branch's dtypes.
        policy: None (the memory rule), True (keep wherever forward1 forms it), False (never).
    """
    if _forward_plan(forward_plan).merged:  # by name: the fused plans too (they form X·Aᵀ as forward1 does)
        return LoraProductChoice(False, f"{forward_plan} forms W + sBA, not X·Aᵀ")
    if not needs.lora_B or _backward_plan(backward_plan).db != "xa":
        return LoraProductChoice(False, f"{backward_plan} does not read X·Aᵀ for dB")
    if policy is False:
        return LoraProductChoice(False, "recomputed (save_lora_product=False)")
    price = price_lora_product(n_, i_, r_, dtype=dtype, adapter_dtype=adapter_dtype)
    x_bytes = n_ * i_ * dtype.itemsize
    if policy is None and price["memory_bytes"] > MAX_MEMORY_FRACTION * x_bytes:
        return LoraProductChoice(False, f"recomputed: keeping it would hold {price['memory_bytes']} bytes, more than "
                                        f"{MAX_MEMORY_FRACTION} of the {x_bytes} bytes of x saved", **price)
    share = price["memory_bytes"] / x_bytes if x_bytes else 0.0
    why = "kept (save_lora_product=True)" if policy else (
        f"kept: {price['memory_bytes']} bytes held ({share:.1%} of x's), saves reading x again")
    return LoraProductChoice(True, why, **price)
