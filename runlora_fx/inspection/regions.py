"""Which RunLoRA plan pair wins where: the (tokens × rank) map of the FLOPs selector.

    runlora-fx regions --in 4096 --out 11008 -o regions.png

``region_grid`` asks ``choose_plan`` for every (n, r) of a grid, for one layer shape
(i in, o out features, every gradient needed), and returns the winning
``forward/backward`` pair of each cell and the FLOPs it saves against forward1/backward1
(the chain an unrewritten LoRA layer runs). ``plot_regions`` draws that grid as a
categorical image, like Figure 2 of RunLoRA (arXiv 2312.03415), next to a heat map of the
savings, with the thresholds of ``choose/flops.py`` drawn over it:

    n = i·o/(i+o)     forward2 beats forward1 (independent of r)
    n = o             backward5 beats backward1 (independent of r)
    r(i+o) = i·o      the parameter-reduction limit: above it a LoRA adapter has more
                      parameters than W itself. It sits at r = i·o/(i+o), the same number
                      as the forward2 threshold in n.

matplotlib is imported only by ``plot_regions`` (``pip install matplotlib``); the grid
itself needs none.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import sympy

from ..choose.flops import applicable_plans, choose_plan
from ..plans import BACKWARD_PLANS

__all__ = [
    "DEFAULT_RANKS",
    "DEFAULT_TOKENS",
    "DPI",
    "FIGSIZE",
    "plot_regions",
    "region_grid",
]

DEFAULT_TOKENS = tuple(2**k for k in range(6, 18))  # 64 .. 131072
DEFAULT_RANKS = tuple(2**k for k in range(0, 10))  # 1 .. 512
FIGSIZE = (14.0, 6.5)  # inches; the PNG is FIGSIZE × DPI pixels (no tight bbox)
DPI = 100

# One color per pair, fixed so that the same pair looks the same in every plot.
_PAIR_COLORS = {
    "forward1/backward1": "#d4d4d4",  # what the unrewritten layer runs
    "forward2/backward1": "#9ecae1",
    "forward2/backward5": "#2171b5",
    "forward1/backward5": "#fdae6b",
    "forward2/backward4": "#41ab5d",
    "forward1/backward4": "#c7e9c0",
}
_SPARE_COLORS = ["#e6550d", "#756bb1", "#dd3497", "#8c6d31", "#636363", "#fec44f"]


def region_grid(in_features: int, out_features: int, tokens: Sequence[int] = DEFAULT_TOKENS,
                ranks: Sequence[int] = DEFAULT_RANKS, allow_merged: bool = True) -> dict:
    """The FLOPs winner of every (tokens, rank) cell for one layer shape.

    Args:
        in_features, out_features: the base layer's i and o.
        tokens: token counts n (batch × sequence), the grid's columns.
        ranks: LoRA ranks r, the grid's rows.
        allow_merged: let the selector use the merged plans (forward2, backward4/5).

    Returns:
        A JSON-ready dict::

            {"in_features", "out_features", "allow_merged", "tokens": [n...], "ranks": [r...],
             "winners": [[ "forward2/backward5", ...] per rank],     # winners[k][j]: ranks[k], tokens[j]
             "flops_saved_pct": [[float, ...] per rank],             # vs forward1/backward1
             "plans": {pair: cells},
             "thresholds": {"forward2_tokens", "backward5_tokens", "parameter_limit_rank"}}

    Raises:
        ValueError: a size is not a positive integer.
    """
    i, o = _positive("in_features", in_features), _positive("out_features", out_features)
    tokens = [_positive("tokens", n) for n in tokens]
    ranks = [_positive("ranks", r) for r in ranks]
    if not tokens or not ranks:
        raise ValueError("runlora: regions need at least one token count and one rank")
    winners, saved = [], []
    for r in ranks:
        row_w, row_s = [], []
        for n in tokens:
            choice = choose_plan(n, i, o, r, allow_merged=allow_merged)
            f_name, b_name = str(choice.forward), str(choice.backward)
            original = int(choice.original_flops)
            chosen = int(choice.forward_costs[f_name] + choice.backward_costs[b_name])
            row_w.append(f"{f_name}/{b_name}")
            row_s.append(round(100.0 * (original - chosen) / original, 3))
        winners.append(row_w)
        saved.append(row_s)
    return {
        "in_features": i,
        "out_features": o,
        "allow_merged": bool(allow_merged),
        "tokens": tokens,
        "ranks": ranks,
        "winners": winners,
        "flops_saved_pct": saved,
        "plans": dict(collections.Counter(w for row in winners for w in row)),
        "thresholds": {
            "forward2_tokens": i * o / (i + o),
            "backward5_tokens": o,
            "parameter_limit_rank": i * o / (i + o),
        },
    }


def plot_regions(in_features: int, out_features: int, tokens: Sequence[int], ranks: Sequence[int], path,
                 allow_merged: bool = True) -> dict:
    """Plots ``region_grid`` to ``path`` (PNG, FIGSIZE × DPI pixels) and returns the grid.

    Left: the winning forward/backward pair of each cell, with the thresholds of the
    module docstring. Right: the FLOPs (forward + backward) the winner saves against
    forward1/backward1, per cell.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: as ``region_grid``.
    """
    Figure, FigureCanvasAgg, ListedColormap, BoundaryNorm, Patch, Line2D = _matplotlib()  # fail before the grid
    grid = region_grid(in_features, out_features, tokens, ranks, allow_merged=allow_merged)
    i, o = grid["in_features"], grid["out_features"]
    tokens, ranks = grid["tokens"], grid["ranks"]
    x_edges, y_edges = _edges(tokens), _edges(ranks)

    pairs = [p for p in _PAIR_COLORS if p in grid["plans"]]
    pairs += sorted(p for p in grid["plans"] if p not in _PAIR_COLORS)
    spare = iter(_SPARE_COLORS * 4)
    colors = [_PAIR_COLORS.get(p) or next(spare) for p in pairs]
    code = {p: k for k, p in enumerate(pairs)}
    codes = [[code[w] for w in row] for row in grid["winners"]]

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: renders to a file, never opens a window
    ax_win, ax_save = fig.subplots(1, 2)
    ax_win.pcolormesh(x_edges, y_edges, codes, cmap=ListedColormap(colors),
                      norm=BoundaryNorm(range(len(pairs) + 1), len(pairs)), edgecolors="white", linewidth=0.3)
    mesh = ax_save.pcolormesh(x_edges, y_edges, grid["flops_saved_pct"], cmap="viridis",
                              vmin=0.0, vmax=max(1.0, max(max(row) for row in grid["flops_saved_pct"])),
                              edgecolors="white", linewidth=0.3)
    cbar = fig.colorbar(mesh, ax=ax_save, pad=0.01)
    cbar.set_label("FLOPs saved vs forward1/backward1 (%)")
    if len(tokens) * len(ranks) <= 400:
        _annotate(ax_save, tokens, ranks, grid["flops_saved_pct"], mesh)

    line_handles = _draw_thresholds(ax_win, grid, x_edges, y_edges, Line2D, legend=True)
    _draw_thresholds(ax_save, grid, x_edges, y_edges, Line2D, legend=False)
    for ax in (ax_win, ax_save):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlim(x_edges[0], x_edges[-1])
        ax.set_ylim(y_edges[0], y_edges[-1])
        _ticks(ax.xaxis, tokens)
        _ticks(ax.yaxis, ranks)
        ax.set_xlabel("tokens n (batch × sequence)")
        ax.set_ylabel("LoRA rank r")
    ax_win.set_title("cheapest forward/backward plan pair")
    ax_save.set_title("FLOPs saved by that pair (forward + backward)")
    merged = "" if allow_merged else ", merged plans off"
    fig.suptitle(f"RunLoRA plans by FLOPs for a LoRA layer with in={i}, out={o}{merged}", fontsize=14)
    handles = [Patch(facecolor=c, edgecolor="0.4", label=p) for p, c in zip(pairs, colors)] + line_handles
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    fig.savefig(path, dpi=DPI)
    return grid


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(
            "runlora: plotting regions needs matplotlib, which is not installed: pip install matplotlib "
            "(or print the grid without it: runlora-fx regions ... --json)"
        ) from None
    return Figure, FigureCanvasAgg, ListedColormap, BoundaryNorm, Patch, Line2D


def _positive(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"runlora: regions: {what} must be positive integers, got {value!r}")
    return value


def _edges(values: Sequence[int]) -> list[float]:
    """Cell edges on a log axis: geometric midpoints, half a step beyond the ends."""
    vals = sorted(values)
    if vals != list(values) or len(set(vals)) != len(vals):
        raise ValueError(f"runlora: regions: grid values must increase strictly, got {list(values)}")
    if len(vals) == 1:
        return [vals[0] / math.sqrt(2), vals[0] * math.sqrt(2)]
    mids = [math.sqrt(a * b) for a, b in zip(vals, vals[1:])]
    return [vals[0] ** 2 / mids[0], *mids, vals[-1] ** 2 / mids[-1]]


def _ticks(axis, values: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    shown = list(values) if len(values) <= 20 else list(values)[:: math.ceil(len(values) / 20)]
    axis.set_major_locator(FixedLocator(shown))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v)))


def _tick_label(v: float) -> str:
    k = round(math.log2(v)) if v >= 1 else -1
    return f"$2^{{{k}}}$" if k >= 0 and 2**k == round(v) else f"{v:g}"


def _annotate(ax, tokens, ranks, values, mesh) -> None:
    fontsize = 7 if len(tokens) <= 14 else 5
    for k, r in enumerate(ranks):
        for j, n in enumerate(tokens):
            v = values[k][j]
            if v == 0:
                continue  # forward1/backward1 won: nothing saved, nothing to print
            rgb = mesh.cmap(mesh.norm(v))[:3]
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
            ax.text(n, r, f"{v:.1f}" if v < 9.95 else f"{v:.0f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")


def _draw_thresholds(ax, grid: dict, x_edges, y_edges, Line2D, legend: bool) -> list:
    """Draws the thresholds of the module docstring; returns legend handles."""
    i, o = grid["in_features"], grid["out_features"]
    t = grid["thresholds"]
    x_lo, x_hi, y_lo, y_hi = x_edges[0], x_edges[-1], y_edges[0], y_edges[-1]
    handles = []
    if grid["allow_merged"]:
        for x, style, color, label in [
            (t["forward2_tokens"], "--", "black",
             f"n = in·out/(in+out) ≈ {t['forward2_tokens']:.0f}: forward2 wins right of it"),
            (t["backward5_tokens"], ":", "black", f"n = out = {o}: backward5 beats backward1 right of it"),
        ]:
            if x_lo <= x <= x_hi:
                ax.axvline(x, linestyle=style, color=color, linewidth=1.6)
                handles.append(Line2D([], [], linestyle=style, color=color, linewidth=1.6, label=label))
        curve = _backward4_boundary(i, o, x_lo, x_hi)
        if curve and any(y_lo <= y <= y_hi for _, y in curve):
            ax.plot([x for x, _ in curve], [y for _, y in curve], "-.", color="#006d2c", linewidth=1.6)
            handles.append(Line2D([], [], linestyle="-.", color="#006d2c", linewidth=1.6,
                                  label="backward4 wins above it"))
    limit = t["parameter_limit_rank"]
    label = f"r(in+out) = in·out, r ≈ {limit:.0f}: no parameter saving above it"
    if y_lo <= limit <= y_hi:
        ax.axhline(limit, color="#cb181d", linewidth=2.0)
        if legend:
            ax.text(x_edges[0] * 1.1, limit * 1.08, "r(in+out) = in·out", color="#cb181d", fontsize=9, va="bottom")
    elif legend:
        where = "above" if limit > y_hi else "below"
        ax.annotate(f"r(in+out) = in·out at r ≈ {limit:.0f}, {where} this chart",
                    xy=(0.01, 0.99 if limit > y_hi else 0.01), xycoords="axes fraction",
                    va="top" if limit > y_hi else "bottom", fontsize=9, color="#cb181d",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5})
    if legend:
        handles.append(Line2D([], [], color="#cb181d", linewidth=2.0, label=label))
    return handles


def _backward4_boundary(i: int, o: int, x_lo: float, x_hi: float, points: int = 256) -> list:
    """(n, r) on the lower edge of the region where backward4 is the cheapest backward.

    Every backward cost is linear in r at fixed n: backward4 beats a rival p iff
    (c4 - cp)(n, r) = α(n) + β(n)·r < 0, i.e. r > -α/β where β < 0. The edge is the largest
    such bound over the rivals; α and β come from the catalogue's sympy FLOPs.
    """
    _, names = applicable_plans(allow_merged=True)
    rivals = [b for b in names if b != "backward4" and not BACKWARD_PLANS[b].dominated]
    if "backward4" not in names or not rivals:
        return []
    n_s, r_s = sympy.symbols("n r", positive=True)
    c4 = BACKWARD_PLANS["backward4"].flops(n_s, i, o, r_s)
    terms = []
    for p in rivals:
        diff = sympy.expand(c4 - BACKWARD_PLANS[p].flops(n_s, i, o, r_s))
        terms.append((sympy.lambdify(n_s, diff.subs(r_s, 0)), sympy.lambdify(n_s, diff.diff(r_s))))
    curve = []
    for k in range(points):
        n = x_lo * (x_hi / x_lo) ** (k / (points - 1))
        bounds = []
        for alpha, beta in terms:
            a, b = float(alpha(n)), float(beta(n))
            if b >= 0:
                bounds = None  # backward4 never beats this rival at this n
                break
            bounds.append(-a / b)
        if bounds:
            curve.append((n, max(bounds)))
    return curve
