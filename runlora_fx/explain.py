"""``explain(model, *inputs)``: a dry run that reports what the pass would do."""

from __future__ import annotations

import torch

from .passes.rewrite import rewrite
from .report import RewriteReport

__all__ = ["explain"]


def explain(model: torch.nn.Module, *example_args, allow_merged=None, dynamic=None, **example_kwargs) -> RewriteReport:
    """Traces ``model`` with Dynamo, matches and chooses, and reports; compiles nothing.

    The model runs once on the example inputs (eagerly, through the captured graphs); its
    parameters and code are untouched. Graph breaks give one report section per graph.
    """
    merged = RewriteReport(graph="model")

    def capture(gm, example_inputs):
        merged.extend(rewrite(gm, allow_merged=allow_merged, graph_name=f"graph_{len(merged.sites)}", dry_run=True))
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    compiled(*example_args, **example_kwargs)
    return merged
