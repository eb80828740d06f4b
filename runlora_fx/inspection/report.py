"""RewriteReport: what the pass matched, what it chose and why, and what that saves.

Schema of ``to_dict()`` (version 1, stable; new keys may be added, none removed)::

    {"schema": 1, "graph": str, "criterion": str, "pass_seconds": float,
     "sites": [{"path", "node", "n", "n_hint", "i", "o", "r", "dtype", "adapter_dtype",
                "separate_lora_input", "needs": {"x", "lora_A", "lora_B"},
                "forward_plan", "backward_plan",
                "forward_costs": {plan: {"expr": str, "value": int|null}},
                "backward_costs": {plan: {"expr": str, "value": int|null}},
                "original_flops", "chosen_flops", "flops_saved_pct", "activation_bytes_saved",
                "criterion", "criterion_note", "estimated_s", "measured_s"}],
     "rejected": [{"path", "node", "reason"}],
     "totals": {"sites", "rejected", "original_flops", "chosen_flops", "flops_saved_pct",
                "activation_bytes_saved", "plans": {"forward/backward": count},
                "criteria": {criterion: count}}}

Values at the size hint are null when a size is symbolic and no hint is known.

Keys added after version 1 first shipped (the version is unchanged: readers of the first
keys are unaffected):

- ``sites[].lora_product``: what the lowered chain does with X_l·Aᵀ for dB ("kept: ...",
  "recomputed: ...", or why the plans never read it), and ``sites[].lora_product_bytes``: the
  bytes it keeps from forward to backward (0 when recomputed; the opaque op always
  recomputes, and the backend reports 0 for it); ``totals.lora_product_bytes`` sums them.
  ``activation_bytes_saved`` is net of them: a kept X_l·Aᵀ is saved as eager saves it.

- ``sites[].criterion``: what chose this site's plans: "flops", "roofline", "time" or
  "fixed" (forced plans). It can differ from the graph's ``criterion`` (what was asked):
  with "time", a site that was not measured (time budget spent, measuring failed) reads
  "roofline".
- ``sites[].criterion_note``: why, when the site's criterion is not the one asked for; and, in
  bf16/fp16 where merged plans were legal, the precision policy that decided whether they were
  candidates ("precision: merged plans off in bfloat16 by default ..."); or null.
- ``sites[].estimated_s``: the roofline's estimate, {"forward": {plan: seconds},
  "backward": {plan: seconds}, "device": name, "n": tokens}, when the roofline chose;
  else null.
- ``sites[].measured_s``: {"forward/backward": median seconds of forward + backward} for
  every pair timed, when measured times chose; else null.
- ``totals.criteria``: sites per criterion that chose.
- ``sites[].kind``: "lora" or "dora"; for "dora", ``norm_plan`` (norm_lowrank | norm_merged)
  and ``dora_form`` (peft | torchtune), ``forward_costs`` keyed "forward/norm" and
  ``needs.magnitude``.
- ``sites[].base_format``: the packed format of a 4-bit base ("bnb_nf4", "bnb_fp4",
  "torchao_nf4"; ``ops/quantized.py``), or null for a dense W. The table shows it after the dtype.
- ``sites[].group``: the sibling group computing this site (``passes/group.py``), as
  "g0: path, path, ..." listing its members; null when the site has its own op.
- ``sites[].group_note``: why a site with siblings (same x) was not grouped, or null.
- ``totals.groups``: the number of sibling groups.
- ``fallback``: why the graph was compiled without the rewrite (compiling the rewritten graph
  failed; ``backend.py``'s safety net), or null.
- ``coverage``: from ``explain()``, every LoRA layer of the model as {"path", "status",
  "reason", "region", "graph_breaks"} (``inspection/coverage.py``); null elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Optional

import sympy

__all__ = ["SiteReport", "RewriteReport"]


@dataclasses.dataclass
class SiteReport:
    """One rewritten site."""

    path: str
    node: str
    n: str
    n_hint: Optional[int]
    i: int
    o: int
    r: int
    dtype: str
    adapter_dtype: Optional[str]
    separate_lora_input: bool
    needs: dict
    forward_plan: str
    backward_plan: str
    forward_costs: dict
    backward_costs: dict
    original_flops: Optional[int]
    chosen_flops: Optional[int]
    activation_bytes_saved: Optional[int]
    criterion: str = "flops"
    criterion_note: Optional[str] = None
    estimated_s: Optional[dict] = None
    measured_s: Optional[dict] = None
    group: Optional[str] = None  # "g0: path, path": the sibling group op computing this site
    group_note: Optional[str] = None  # why a site with siblings was not grouped
    kind: str = "lora"  # "dora": a DoRA layer (runlora.dora_linear, passes/dora.py)
    norm_plan: Optional[str] = None  # DoRA: how the row norms are computed (plans/dora.py)
    dora_form: Optional[str] = None  # DoRA: "peft" or "torchtune" (where the bias and dropout go)
    # The lowered chain's X_l·Aᵀ for dB: kept from forward1 or recomputed, and why
    # (choose/lora_product.py); the bytes it keeps from forward to backward (the opaque op keeps 0).
    lora_product: Optional[str] = None
    lora_product_bytes: Optional[int] = None
    base_format: Optional[str] = None  # a 4-bit base's packed format (ops/quantized.py), None when dense

    @property
    def flops_saved_pct(self) -> Optional[float]:
        if not self.original_flops or self.chosen_flops is None:
            return None
        return 100.0 * (self.original_flops - self.chosen_flops) / self.original_flops


@dataclasses.dataclass
class RewriteReport:
    """All sites of one graph (or several, merged with ``extend``)."""

    graph: str = "graph"
    criterion: str = "flops"
    sites: list = dataclasses.field(default_factory=list)
    rejected: list = dataclasses.field(default_factory=list)
    pass_seconds: float = 0.0  # wall time of the pass (match, choose, rewrite) on this graph
    fallback: Optional[str] = None  # why this graph was compiled without the rewrite (backend's safety net)
    coverage: Optional[object] = None  # explain(): the model's LoRA layers and their fates (inspection/coverage.py)

    @property
    def rewritten(self) -> int:
        return len(self.sites)

    def extend(self, other: "RewriteReport") -> None:
        self.sites.extend(other.sites)
        self.rejected.extend(other.rejected)
        self.pass_seconds += other.pass_seconds

    def plan_counts(self) -> dict:
        return dict(collections.Counter(f"{s.forward_plan}/{s.backward_plan}" for s in self.sites))

    def totals(self) -> dict:
        orig = [s.original_flops for s in self.sites]
        chosen = [s.chosen_flops for s in self.sites]
        known = None not in orig and None not in chosen
        o_sum, c_sum = (sum(orig), sum(chosen)) if known else (None, None)
        saved = [s.activation_bytes_saved for s in self.sites]
        return {
            "sites": len(self.sites),
            "rejected": len(self.rejected),
            "original_flops": o_sum,
            "chosen_flops": c_sum,
            "flops_saved_pct": (100.0 * (o_sum - c_sum) / o_sum) if known and o_sum else None,
            "activation_bytes_saved": sum(saved) if None not in saved else None,
            "plans": self.plan_counts(),
            "criteria": dict(collections.Counter(s.criterion for s in self.sites)),
            "groups": len(self.groups()),
            "lora_product_bytes": sum(s.lora_product_bytes or 0 for s in self.sites),
        }

    def groups(self) -> list:
        """The sibling groups' labels ("g0: path, path, ..."), in order."""
        return list(dict.fromkeys(s.group for s in self.sites if s.group))

    def summary(self) -> str:
        """One line, as logged per compiled graph: "rewrote k of m LoRA-shaped sites", where m
        counts every site rewritten and every LoRA-shaped product left alone (``rejected``)."""
        t = self.totals()
        total = t["sites"] + t["rejected"]
        plans = ", ".join(f"{k}: {v}" for k, v in sorted(t["plans"].items()))
        line = f"runlora: rewrote {t['sites']} of {total} LoRA-shaped sites"
        if plans:
            line += f" ({plans})"
        if t["flops_saved_pct"] is not None:
            line += f"; est. {-t['flops_saved_pct'] + 0.0:+.1f}% LoRA-layer FLOPs"
        if t["activation_bytes_saved"]:
            line += f"; -{_bytes(t['activation_bytes_saved'])} saved activations"
        if set(t["criteria"]) - {self.criterion, "fixed"}:
            line += "; chosen by " + ", ".join(f"{k}: {v}" for k, v in sorted(t["criteria"].items()))
        if t["groups"]:
            line += f"; {t['groups']} sibling groups ({sum(1 for s in self.sites if s.group)} sites)"
        kept = sum(1 for s in self.sites if s.lora_product_bytes)
        if kept:
            line += f"; x·Aᵀ kept for dB at {kept} sites when lowered (+{_bytes(t['lora_product_bytes'])})"
        if self.fallback:
            line += f"; NOT APPLIED, compiled without the rewrite: {self.fallback}"
        return line

    def to_dict(self) -> dict:
        sites = []
        for s in self.sites:
            d = dataclasses.asdict(s)
            d["flops_saved_pct"] = s.flops_saved_pct
            sites.append(d)
        return {
            "schema": 1,
            "graph": self.graph,
            "criterion": self.criterion,
            "pass_seconds": self.pass_seconds,
            "sites": sites,
            "rejected": [dataclasses.asdict(r) for r in self.rejected],
            "totals": self.totals(),
            "fallback": self.fallback,
            "coverage": None if self.coverage is None else [dataclasses.asdict(f) for f in self.coverage.layers],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def _rows(self):
        head = ["module", "n", "i", "o", "r", "dtype", "forward costs", "backward costs", "plan", "FLOPs saved", "act. saved"]
        by = any(s.criterion not in ("flops", "fixed") or s.criterion_note for s in self.sites)
        if by:
            head.append("chosen by")
        grouped = any(s.group for s in self.sites)
        if grouped:
            head.append("group")
        kept = any(s.lora_product_bytes for s in self.sites)
        if kept:
            head.append("x·Aᵀ kept (lowered)")
        rows = []
        for s in self.sites:
            rows.append([
                s.path, s.n if s.n_hint is None or s.n == str(s.n_hint) else f"{s.n} (~{s.n_hint})",
                str(s.i), str(s.o), str(s.r),
                s.dtype + (f"->{s.adapter_dtype}" if s.adapter_dtype else "") + (f" [{s.base_format}]" if s.base_format else ""),
                _costs(s.forward_costs), _costs(s.backward_costs),
                f"{s.forward_plan} / {s.backward_plan}" + (f" / {s.norm_plan} (DoRA)" if s.kind == "dora" else ""),
                "-" if s.flops_saved_pct is None else f"{s.flops_saved_pct:.1f}%",
                "-" if s.activation_bytes_saved is None else _bytes(s.activation_bytes_saved),
            ] + ([_chosen_by(s)] if by else []) + ([s.group.split(":")[0] if s.group else "-"] if grouped else [])
              + ([_bytes(s.lora_product_bytes) if s.lora_product_bytes else "-"] if kept else []))
        return head, rows

    def _group_lines(self) -> list:
        """Each sibling group with its members, and why siblings were left out of one."""
        lines = [f"group {label}" for label in self.groups()]
        lines += [f"not grouped: {s.path}: {s.group_note}" for s in self.sites if s.group_note]
        return lines

    def to_markdown(self) -> str:
        head, rows = self._rows()
        out = [f"### {self.graph} (criterion: {self.criterion})", "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        if self.rejected:
            out += ["", "Left alone:", ""] + [f"- `{r.path}` ({r.node}): {r.reason}" for r in self.rejected]
        if self._group_lines():
            out += ["", "Sibling groups:", ""] + [f"- {line}" for line in self._group_lines()]
        out += ["", self.summary()]
        return "\n".join(out)

    def __str__(self) -> str:
        head, rows = self._rows()
        widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h) for k, h in enumerate(head)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        out = [f"{self.graph} (criterion: {self.criterion})", fmt.format(*head)]
        out += [fmt.format(*row) for row in rows]
        if self.rejected:
            out.append("left alone:")
            out += [f"  {r.path} ({r.node}): {r.reason}" for r in self.rejected]
        if self._group_lines():
            out.append("sibling groups:")
            out += [f"  {line}" for line in self._group_lines()]
        out.append(self.summary())
        if self.coverage is not None:
            out.append(str(self.coverage))
        return "\n".join(out)


def _chosen_by(s: SiteReport) -> str:
    """"time (best 1.23 ms of 6)", "roofline (est. 0.41 ms, H200)", plus the note if any."""
    text = s.criterion
    if s.measured_s:
        best = s.measured_s.get(f"{s.forward_plan}/{s.backward_plan}", min(s.measured_s.values()))
        text += f" ({best * 1e3:.3g} ms, {len(s.measured_s)} timed)"
    elif s.estimated_s:
        f = s.estimated_s["forward"].get(s.forward_plan)
        b = s.estimated_s["backward"].get(s.backward_plan)
        if f is not None and b is not None:
            text += f" (est. {(f + b) * 1e3:.3g} ms, {s.estimated_s['device']})"
    if s.criterion_note:
        text += f"; {s.criterion_note}"
    return text


def _costs(costs: dict) -> str:
    return ", ".join(
        f"{name[-1] if name[-1].isdigit() else name}={_flops(c['value']) if c['value'] is not None else c['expr']}"
        for name, c in costs.items()
    )


def _flops(v: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


def _bytes(v: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v} B"


def cost_entry(expr, hint_subs: dict) -> dict:
    """{"expr", "value"} of one sympy cost, valued at the size hint when possible."""
    expr = sympy.sympify(expr)
    value = expr.subs(hint_subs) if hint_subs else expr
    return {"expr": str(expr), "value": int(value) if value.is_number else None}
