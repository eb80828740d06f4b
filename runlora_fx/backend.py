"""torch.compile backends: ``torch.compile(model, backend="runlora")``.

The backend rewrites the Dynamo graph (``passes.rewrite``), then either lowers each
``runlora.lora_linear`` into its chosen ATen chain (``lowering="aten"``, so inductor fuses
around it) or keeps it as one opaque op (``lowering="opaque"``), then hands the graph to the
inner compiler: inductor (default), aot_eager or eager.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from .dump import dump_graph, readable
from .autotune import Autotuner
from .lowering import lower_runlora_ops
from .passes.rewrite import check_forced_plans, rewrite
from .select import check_criterion

__all__ = ["make_backend", "runlora_backend", "default_lowering"]

log = logging.getLogger("runlora_fx")

_INNER = ("inductor", "aot_eager", "eager")
_LOWERINGS = ("aten", "opaque")


def default_lowering(example_inputs) -> str:
    """The lowering the benchmarks favour on the inputs' device (BENCHMARKS.md).

    GPU (H200, TinyLlama shape): "aten" 58.0 ms/step vs "opaque" 63.5 — the opaque op blocks
    fusion. CPU (one layer, 4096x1024->2752, r=64): "aten" 232 ms vs "opaque" 243, within
    noise over four runs. So "aten" on both; ``example_inputs`` is kept for a per-device split.
    """
    return "aten"


def make_backend(*, inner: str = "inductor", lowering: Optional[str] = None, criterion: str = "flops",
                 allow_merged: Optional[bool] = None, forward_plan: Optional[str] = None,
                 backward_plan: Optional[str] = None, dump_dir: Optional[str] = None,
                 on_report: Optional[Callable] = None, device_model=None, time_budget_s: Optional[float] = None,
                 tuner=None, rewrite_4bit: Optional[bool] = None):
    """Builds a Dynamo backend that applies the runlora pass.

    Args:
        inner: "inductor" (default), "aot_eager" or "eager".
        lowering: "aten" (lower to the plan's ATen chain) or "opaque" (keep the op); None
            picks ``default_lowering``. Ignored for ``inner="eager"`` (the op runs as is).
        criterion, allow_merged, forward_plan, backward_plan, device_model, rewrite_4bit: see
            ``runlora_fx.rewrite``; criterion is "flops" (default), "roofline" or "time".
        dump_dir: write each graph before/after the pass, its forward and backward graphs,
            its report and an SVG there (also env RUNLORA_DUMP_DIR); see ``dump.py``.
        on_report: called with each graph's RewriteReport.
        time_budget_s: for "time": seconds of measuring for this backend, all graphs together;
            later sites not in the cache are chosen by the roofline.
        tuner: for "time": the ``autotune.Autotuner`` to use (cache directory, timer, budget);
            default: one with ``time_budget_s`` and the default cache.

    Returns:
        A callable ``backend(gm, example_inputs)``; its ``reports`` list collects the reports
        and, for "time", ``tuner`` is the Autotuner (``tuner.measurements``: pairs timed).
    """
    if inner not in _INNER:
        raise ValueError(f"runlora: inner={inner!r}, expected one of {_INNER}")
    if lowering is not None and lowering not in _LOWERINGS:
        raise ValueError(f"runlora: lowering={lowering!r}, expected one of {_LOWERINGS} or None")
    check_criterion(criterion)
    check_forced_plans(forward_plan, backward_plan)
    if criterion == "time" and tuner is None:
        tuner = Autotuner(time_budget_s=time_budget_s)
    reports = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        index = len(reports)
        dump = dump_dir or os.environ.get("RUNLORA_DUMP_DIR")
        before = readable(gm) if dump else None
        report = rewrite(gm, criterion=criterion, allow_merged=allow_merged, forward_plan=forward_plan,
                         backward_plan=backward_plan, graph_name=f"graph_{index}", device_model=device_model,
                         time_budget_s=time_budget_s, tuner=tuner, rewrite_4bit=rewrite_4bit)
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
    backend.tuner = tuner
    return backend


def runlora_backend(gm: torch.fx.GraphModule, example_inputs):
    """The ``"runlora"`` Dynamo backend: the pass with default settings, then inductor."""
    return make_backend()(gm, example_inputs)
