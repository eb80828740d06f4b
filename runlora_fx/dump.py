"""Graph dumps: before/after code with shapes and dtypes, and the report, per compiled graph."""

from __future__ import annotations

import os

import torch.fx as fx

from .report import RewriteReport

__all__ = ["dump_graph"]


def dump_graph(directory: str, name: str, before: str, gm: fx.GraphModule, report: RewriteReport) -> list:
    """Writes ``{name}.before.py``, ``{name}.after.py``, ``{name}.report.md/.json``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    after = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    files = {
        f"{name}.before.py": before,
        f"{name}.after.py": after,
        f"{name}.report.md": report.to_markdown() + "\n",
        f"{name}.report.json": report.to_json() + "\n",
    }
    paths = []
    for fname, text in files.items():
        path = os.path.join(directory, fname)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths
