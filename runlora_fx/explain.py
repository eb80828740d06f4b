"""``explain(model, *inputs)``: a dry run that reports what the pass would do."""

from __future__ import annotations

from typing import Optional

import torch

from .inspection.report import RewriteReport
from .options import RewriteOptions
from .passes.dora import make_peft_dora_traceable
from .passes.rewrite import rewrite

__all__ = ["explain"]


def explain(model: torch.nn.Module, *example_args, allow_merged=None, dynamic=None,
            options: Optional[RewriteOptions] = None, **example_kwargs) -> RewriteReport:
    """Traces ``model`` with Dynamo, matches and chooses, and reports; compiles nothing.

    The model runs once on the example inputs (eagerly, through the captured graphs); its
    parameters and code are untouched. Graph breaks give one report section per graph.
    ``options`` (a ``RewriteOptions``) sets the pass as a compile would; ``allow_merged``
    replaces its field.
    """
    options = RewriteOptions.build(options) if allow_merged is None else RewriteOptions.build(
        options, allow_merged=allow_merged)
    merged = RewriteReport(graph="model")

    def capture(gm, example_inputs):
        merged.extend(rewrite(gm, options, graph_name=f"graph_{len(merged.sites)}", dry_run=True))
        return gm.forward

    make_peft_dora_traceable()  # before Dynamo traces: peft's DoRA would graph-break (passes/dora.py)
    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    compiled(*example_args, **example_kwargs)
    return merged
