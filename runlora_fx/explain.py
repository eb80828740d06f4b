"""``explain(model, *inputs)``: a dry run that reports what the pass would do."""

from __future__ import annotations

from typing import Optional

import torch

from .inspection.coverage import ModelWatch
from .inspection.report import RewriteReport
from .options import RewriteOptions
from ._compat import ensure_compile_start_callbacks
from .passes import dora as _dora, upstream as _upstream  # noqa: F401  register their compile-start fixes
from .passes.rewrite import rewrite

__all__ = ["explain"]


def explain(model: torch.nn.Module, *example_args, allow_merged=None, dynamic=None,
            options: Optional[RewriteOptions] = None, **example_kwargs) -> RewriteReport:
    """Traces ``model`` with Dynamo, matches and chooses, and reports; compiles nothing.

    The model runs once on the example inputs (eagerly, through the captured graphs); its
    parameters and code are untouched. Graph breaks give one report section per graph.
    ``options`` (a ``RewriteOptions``) sets the pass as a compile would; ``allow_merged``
    replaces its field. The report's ``coverage`` (``inspection/coverage.py``) names every LoRA
    layer of the model that no graph held, ran eagerly, or was left alone, and why.
    """
    options = RewriteOptions.build(options) if allow_merged is None else RewriteOptions.build(
        options, allow_merged=allow_merged)
    merged = RewriteReport(graph="model")
    watch = ModelWatch(model)

    def capture(gm, example_inputs):
        report = rewrite(gm, options, graph_name=f"graph_{len(watch.reports)}", dry_run=True)
        watch.reports.append((None, report))
        merged.extend(report)
        return gm.forward

    ensure_compile_start_callbacks()  # before Dynamo traces: peft's DoRA, upstream spots (passes/dora.py, upstream.py)
    try:
        compiled = torch.compile(model, backend=capture, dynamic=dynamic)
        compiled(*example_args, **example_kwargs)
    finally:
        watch.close()
    merged.coverage = watch.fates()
    return merged
