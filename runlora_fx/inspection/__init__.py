"""Reading what the pass did: reports, graph dumps and the regions picture.

    coverage.py  every LoRA layer of a model against what the pass did; eager runs named, with the graph break
    report.py    ``RewriteReport`` / ``SiteReport``: sites, choices, costs, rejections (JSON schema 1)
    dump.py      per-graph files: before/after, forward/backward ATen graphs, report, SVG
    regions.py   which plan wins over (tokens, rank) for one layer shape, as a grid or a PNG
"""

from .report import RewriteReport, SiteReport, cost_entry

__all__ = ["RewriteReport", "SiteReport", "cost_entry"]
