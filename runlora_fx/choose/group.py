"""What computing sibling sites together saves: bytes and launches (FLOPs are equal).

k sites that read the same x (q/k/v, gate/up) each re-read x in their thin GEMMs. Grouped
(``ops/group.py``), each x-reading GEMM runs once on the concatenated adapters::

    forward   X_l·A_jᵀ (k_f GEMMs)   -> X_l·[A_1;…]ᵀ          + one cat of the A's
    backward  (s_jZ_j)ᵀ·X_l (k_A)     -> [s_1Z_1|…]ᵀ·X_l        + one cat of the Z's
              X_l·A_jᵀ recomputed (k_B) -> X_l·[A_1;…]ᵀ          + one cat of the A's
                (members whose lowered chain keeps X_l·A_jᵀ keep their columns of the forward's
                XA_cat instead: nothing to share there)
              s_jZ_j·A_j, dX += (k_s)   -> [s_1Z_1|…]·[A_1;…], one += + cats of Z's and A's
              dX = Σ_j dY_j·W_j          accumulated by addmm, not k - 1 separate adds
              cast(X) to the adapter dtype once per pass, not once per member

Each line saves (k - 1) reads of an n × i operand and some launches, and pays for the cats
(Σr × i or n × Σr copies). ``price_group`` counts them per kernel as the roofline does
(read + write bytes, one launch each); ``GroupCost.seconds_saved`` turns them into time on a
``DeviceModel``. FLOPs are exactly the members' own plans', so under ``criterion="flops"``
(a tie) the bytes and launches decide: a group is chosen where it is estimated to save time.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..plans import BACKWARD_PLANS, FORWARD_PLANS
from .roofline import DeviceModel

__all__ = ["GroupCost", "GroupMember", "price_group", "should_group"]


@dataclasses.dataclass(frozen=True)
class GroupMember:
    """One member as the price needs it: sizes, plan names at n, and its adapter gradients."""

    o: int
    r: int
    forward_plan: str
    backward_plan: str
    needs_a: bool = True
    needs_b: bool = True
    keeps_product: bool = False  # the lowered chain keeps its X_l·Aᵀ (choose/lora_product.py): no recompute to share


@dataclasses.dataclass(frozen=True)
class GroupCost:
    """Bytes moved and kernel launches a group saves against its members run one by one.

    Attributes:
        members: k.
        bytes_saved: net bytes (x re-reads saved, cats paid), read + write.
        launches_saved: net kernels.
        flops_delta: grouped FLOPs minus the members' own: 0 by construction.
        terms: {term: (bytes, launches)} per line of the module docstring, for reports.
    """

    members: int
    bytes_saved: int
    launches_saved: int
    flops_delta: int = 0
    terms: dict = dataclasses.field(default_factory=dict)

    def seconds_saved(self, model: DeviceModel) -> float:
        return self.bytes_saved / model.bandwidth + self.launches_saved * model.launch_s

    def describe(self, model: DeviceModel) -> str:
        return (f"saves {self.bytes_saved / 2**20:.2f} MiB and {self.launches_saved} launches "
                f"(est. {self.seconds_saved(model) * 1e6:.1f} us on {model.name}), same FLOPs")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def price_group(n: int, i: int, members: Sequence[GroupMember], *, dtype: torch.dtype,
                adapter_dtype=None, needs_x: bool = True, separate_lora_input: bool = False) -> GroupCost:
    """What grouping ``members`` (all reading one n × i input) saves; see the module docstring.

    Args:
        n, i: tokens and in features (concrete).
        members: the sites, in order.
        dtype: x's and W's dtype; adapter_dtype: the LoRA branch's (None: ``dtype``).
        needs_x: dX is computed.
        separate_lora_input: the LoRA branch reads its own tensor (dropout): dX_l is returned apart.
    """
    e_x = _size(dtype)
    e_a = _size(adapter_dtype or dtype)
    terms = {}

    def shared_read(name, users, copy_bytes, copies):
        k = len(users)
        if k >= 2:  # k GEMMs each reading X_l -> one, plus the cats
            terms[name] = ((k - 1) * n * i * e_a - copy_bytes, (k - 1) - copies)

    live = list(members)
    f_split = [m for m in live if not FORWARD_PLANS[m.forward_plan].merged]
    shared_read("forward X_l·Aᵀ", f_split, 2 * sum(m.r for m in f_split) * i * e_a, 1)
    plans = [BACKWARD_PLANS[m.backward_plan] for m in live]
    a_users = [m for m in live if m.needs_a]
    shared_read("backward dA = Zᵀ·X_l", a_users, 2 * n * sum(m.r for m in a_users) * e_a, 1)
    b_users = [m for m in live if m.needs_b]
    recomputing = [m for m in b_users if not m.keeps_product]  # the others keep their columns of XA_cat
    shared_read("backward X_l·Aᵀ (recomputed)", recomputing, 2 * sum(m.r for m in recomputing) * i * e_a, 1)
    if needs_x:
        split = [m for m, p in zip(live, plans) if p.dx == "split"]
        if len(split) >= 2:
            r_s = sum(m.r for m in split)
            if e_a == e_x and not separate_lora_input:
                # each member accumulated s·Z·A into its dX by addmm (reads and writes n×i);
                # grouped: one addmm, two cats
                saved = (len(split) - 1) * 2 * n * i * e_x
            else:  # each member wrote its n×i dX_l and added it; grouped: one write, one add, two cats
                saved = (len(split) - 1) * n * i * (e_a + 3 * e_x)
            terms["backward dX_l = Z·A"] = (saved - 2 * (n * r_s + r_s * i) * e_a, 2 * (len(split) - 1) - 2)
        if len(live) >= 2:  # k - 1 separate dX adds (3 n·i each) -> addmm reads dX once more
            terms["backward dX = Σ dY·W"] = ((len(live) - 1) * 2 * n * i * e_x, len(live) - 1)
    if e_a != e_x and not separate_lora_input:
        casts = (len(f_split) - 1 if f_split else 0) + (len(live) - 1)
        if casts > 0:
            terms["cast(X)"] = (casts * n * i * (e_x + e_a), casts)
    return GroupCost(members=len(live), bytes_saved=int(sum(b for b, _ in terms.values())),
                     launches_saved=int(sum(c for _, c in terms.values())), terms=terms)


def should_group(cost: GroupCost, model: DeviceModel) -> bool:
    """Profitability: group where it is estimated to save time (FLOPs are equal)."""
    return cost.seconds_saved(model) > 0
