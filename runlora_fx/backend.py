"""torch.compile backends: ``torch.compile(model, backend="runlora")``.

The backend rewrites the Dynamo graph (``passes/rewrite.py``), then either lowers each
``runlora.lora_linear`` into its chosen ATen chain (``lowering="aten"``, so inductor fuses
around it) or keeps it as one opaque op (``lowering="opaque"``), then hands the graph to the
inner compiler: inductor (default), aot_eager or eager.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from .choose.measure import tuner_for
from .inspection.dump import dump_graph, readable
from .options import INNER_COMPILERS, LOWERINGS, RewriteOptions, default_lowering
from .passes.lower import lower_runlora_ops
from .passes.rewrite import rewrite

__all__ = ["make_backend", "runlora_backend"]

log = logging.getLogger("runlora_fx")


def make_backend(*, inner: str = "inductor", lowering: Optional[str] = None, dump_dir: Optional[str] = None,
                 on_report: Optional[Callable] = None, options: Optional[RewriteOptions] = None, **option_fields):
    """Builds a Dynamo backend that applies the runlora pass.

    Args:
        inner: "inductor" (default), "aot_eager" or "eager".
        lowering: "aten" (lower to the plan's ATen chain) or "opaque" (keep the op); None
            picks ``options.default_lowering``. Ignored for ``inner="eager"`` (the op runs as is).
        dump_dir: write each graph before/after the pass, its forward and backward graphs,
            its report and an SVG there (also env RUNLORA_DUMP_DIR); see ``inspection/dump.py``.
        on_report: called with each graph's RewriteReport.
        options, **option_fields: the pass's settings, a ``RewriteOptions`` and/or its fields
            (criterion=, allow_merged=, forward_plan=, backward_plan=, device_model=,
            time_budget_s=, tuner=, rewrite_4bit=). For "time", one tuner (and its time budget)
            serves every graph of this backend.

    Returns:
        A callable ``backend(gm, example_inputs)``; its ``reports`` list collects the reports,
        ``options`` is the validated ``RewriteOptions`` and, for "time", ``tuner`` is the
        Autotuner (``tuner.measurements``: pairs timed).
    """
    if inner not in INNER_COMPILERS:
        raise ValueError(f"runlora: inner={inner!r}, expected one of {INNER_COMPILERS}")
    if lowering is not None and lowering not in LOWERINGS:
        raise ValueError(f"runlora: lowering={lowering!r}, expected one of {LOWERINGS} or None")
    options = tuner_for(RewriteOptions.build(options, **option_fields))
    reports = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        index = len(reports)
        dump = dump_dir or os.environ.get("RUNLORA_DUMP_DIR")
        before = readable(gm) if dump else None
        report = rewrite(gm, options, graph_name=f"graph_{index}")
        reports.append(report)
        if on_report is not None:
            on_report(report)
        if dump:
            dump_graph(dump, f"graph_{index}", before, gm, report, example_inputs)
        mode = lowering or default_lowering(example_inputs)
        if inner == "eager":
            return gm.forward
        if mode == "aten":
            lower_runlora_ops(gm)
        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    backend.reports = reports
    backend.options = options
    backend.tuner = options.tuner
    return backend


def runlora_backend(gm: torch.fx.GraphModule, example_inputs):
    """The ``"runlora"`` Dynamo backend: the pass with default settings, then inductor."""
    return make_backend()(gm, example_inputs)
