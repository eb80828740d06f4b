"""torch.compile backends: ``torch.compile(model, backend="runlora")``.

The backend rewrites the Dynamo graph (``passes/rewrite.py``), then either lowers each
``runlora.lora_linear`` into its chosen ATen chain (``lowering="aten"``, so inductor fuses
around it) or keeps it as one opaque op (``lowering="opaque"``), then hands the graph to the
inner compiler: inductor (default), aot_eager or eager.

``torch.compile(model, backend="runlora", mode=..., options=...)`` passes ``mode`` and
``options`` here; they become inductor config patches exactly as for ``backend="inductor"``
(``_compat.inductor_config_patches``, torch's own translation, so inductor's errors are
inductor's). With inductor, the lowering runs as inductor's pre-grad pass
(``install.LowerRunLoRAOps``, after the AOTAutogradCache lookup): the graph the caches key on
holds ``runlora.lora_linear`` with its plan strings, so a warm start hits AOTAutogradCache and
the FX graph cache, and a different plan is a different key.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Callable, Optional

import torch

from ._compat import (eager_backward_compile, ensure_compile_start_callbacks, inductor_config_patches,
                      install_ddp_presplit_hook, is_dynamo_control_flow)
from .choose.measure import tuner_for
from .install import LowerRunLoRAOps, note_fallback, rewrite_and_report, with_pre_grad_pass
from .options import INNER_COMPILERS, LOWERINGS, RewriteOptions, default_lowering
from .passes import dora as _dora, upstream as _upstream  # noqa: F401  register their compile-start fixes
from .passes.lower import lower_runlora_ops
from .passes.match import module_path

__all__ = ["make_backend", "runlora_backend"]

log = logging.getLogger("runlora_fx")


def make_backend(*, inner: str = "inductor", lowering: Optional[str] = None, dump_dir: Optional[str] = None,
                 on_report: Optional[Callable] = None, options: Optional[RewriteOptions] = None,
                 mode: Optional[str] = None, inductor_options: Optional[dict] = None, **option_fields):
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
            time_budget_s=, tuner=, rewrite_4bit=, group_siblings=, save_lora_product=). For "time",
            one tuner (and its time budget) serves every graph of this backend.
        mode, inductor_options: inductor's ``mode`` ("max-autotune-no-cudagraphs", ...) and
            config dict, as ``torch.compile(mode=, options=)`` takes them for "inductor";
            checked here with inductor's own messages. ``torch.compile(backend=make_backend(...),
            mode=..., options=...)`` also passes them per call; those apply after these.

    If compiling a rewritten graph fails (tracing the lowered chain, AOTAutograd, inductor, the
    backward included), the graph is compiled again as it came, with one warning naming the
    graph, its first site and the error; the report's ``fallback`` records it. A failure of the
    graph as it came is the user's, and is raised.

    Returns:
        A callable ``backend(gm, example_inputs)``; its ``reports`` list collects the reports,
        ``options`` is the validated ``RewriteOptions`` and, for "time", ``tuner`` is the
        Autotuner (``tuner.measurements``: pairs timed). ``runlora_presplit`` is what
        DDPOptimizer's hook calls to rewrite a DDP graph whole before splitting it
        (``_compat.install_ddp_presplit_hook``); the report is the whole graph's.
    """
    if inner not in INNER_COMPILERS:
        raise ValueError(f"runlora: inner={inner!r}, expected one of {INNER_COMPILERS}")
    if lowering is not None and lowering not in LOWERINGS:
        raise ValueError(f"runlora: lowering={lowering!r}, expected one of {LOWERINGS} or None")
    rewrite_options = tuner_for(RewriteOptions.build(options, **option_fields))
    if lowering == "opaque" or inner == "eager":  # the op itself keeps only its inputs: X_l·Aᵀ is recomputed
        rewrite_options = RewriteOptions.build(rewrite_options, save_lora_product=False)
    ensure_compile_start_callbacks()  # before Dynamo traces: peft's DoRA, upstream spots (passes/dora.py, upstream.py)
    base_patches = inductor_config_patches(mode, inductor_options)
    reports = []

    presplit = []  # set while DDPOptimizer compiles the pieces of a graph already rewritten whole

    @contextlib.contextmanager
    def runlora_presplit(gm: torch.fx.GraphModule, example_inputs):
        """Rewrites the whole Dynamo graph before DDPOptimizer splits it at bucket edges
        (``_compat.install_ddp_presplit_hook``): a rewritten site is one node, so no split cuts
        it between A and B; the backend then only lowers and compiles each piece."""
        _rewrite(gm, example_inputs)
        presplit.append(gm)
        try:
            yield
        finally:
            presplit.pop()

    def _rewrite(gm, example_inputs):
        return rewrite_and_report(gm, rewrite_options, reports, dump_dir=dump_dir, on_report=on_report,
                           example_inputs=example_inputs)

    def backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                options: Optional[dict] = None):
        patches = {**base_patches, **inductor_config_patches(mode, options)}
        if presplit:  # rewritten whole already: nothing to fall back to here
            return _compile(gm, example_inputs, patches, rewritten=True)
        original = copy.deepcopy(gm)
        report = _rewrite(gm, example_inputs)
        _warn_cut_sites(gm)
        if not report.rewritten:
            return _compile(gm, example_inputs, patches, rewritten=False)
        try:
            return _compile(gm, example_inputs, patches, rewritten=True)
        except Exception as error:  # noqa: BLE001 - the safety net: compile the graph as it came
            if is_dynamo_control_flow(error):  # Dynamo restarting its analysis (dynamic shapes): not a failure
                raise
            note_fallback([report], error)
            return _compile(original, example_inputs, patches, rewritten=False)

    def _compile(gm, example_inputs, patches, *, rewritten: bool):
        lowered = rewritten and (lowering or default_lowering(example_inputs)) == "aten"
        if inner == "eager":
            return gm.forward
        if inner == "aot_eager":
            if lowered:
                lower_runlora_ops(gm, save_lora_product=rewrite_options.save_lora_product)
            from torch._dynamo.backends.debugging import aot_eager
            with eager_backward_compile(rewritten):
                return aot_eager(gm, example_inputs)
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx
        if lowered:  # as inductor's pre-grad pass, after the cache lookup: the caches key on the op
            patches = dict(patches, pre_grad_custom_pass=with_pre_grad_pass(
                patches.get("pre_grad_custom_pass", config.pre_grad_custom_pass),
                LowerRunLoRAOps(rewrite_options.save_lora_product)))
        with eager_backward_compile(rewritten):  # a backward that fails to compile fails here, not mid-step
            return compile_fx(gm, example_inputs, config_patches=patches)

    backend.reports = reports
    backend.runlora_presplit = runlora_presplit
    backend.options = rewrite_options
    backend.tuner = rewrite_options.tuner
    return backend


def runlora_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                    options: Optional[dict] = None):
    """The ``"runlora"`` Dynamo backend: the pass with default settings, then inductor.

    ``torch.compile(model, backend="runlora", mode=..., options=...)`` passes inductor's
    ``mode`` and ``options`` dict here; they patch inductor's config as for "inductor".
    """
    ensure_compile_start_callbacks()  # for the frames after this one, after a torch._dynamo.reset()
    if _PRESPLIT:  # a piece of a DDP graph rewritten whole (runlora_presplit)
        return _PRESPLIT[-1](gm, example_inputs, mode=mode, options=options)
    return make_backend(mode=mode, inductor_options=options)(gm, example_inputs)


_PRESPLIT: list = []  # the backend DDPOptimizer's pieces of one graph share


@contextlib.contextmanager
def _default_presplit(gm: torch.fx.GraphModule, example_inputs):
    backend = make_backend()
    with backend.runlora_presplit(gm, example_inputs):
        _PRESPLIT.append(backend)
        try:
            yield
        finally:
            _PRESPLIT.pop()


runlora_backend.runlora_presplit = _default_presplit
install_ddp_presplit_hook()

_cut_warned: set = set()


def _warn_cut_sites(gm: torch.fx.GraphModule) -> None:
    """A piece DDPOptimizer split off without the whole-graph rewrite (a backend wrapped in a
    callable that hides ``runlora_presplit``): warn once per site whose A and B it cut apart."""
    if "DDPOptimizer" not in str(getattr(gm, "compile_subgraph_reason", "")):
        return
    cut = set()  # sites whose adapter linears are left over after the pass (peft lora_A, torchtune lora_a)
    for node in gm.graph.nodes:
        path = (module_path(node) + ".").lower() if node.op == "call_function" else ""
        for adapter in (".lora_a.", ".lora_b."):
            if adapter in path:
                cut.add(module_path(node)[:path.index(adapter)])
    new = sorted(cut - _cut_warned)
    if new:
        _cut_warned.update(new)
        warnings.warn(
            f"runlora: DDPOptimizer split {len(new)} LoRA site(s) between lora_A and lora_B before the pass saw "
            f"them (first: {new[0]}); they are not rewritten. Pass the runlora backend to torch.compile directly "
            "(its pre-split rewrite keeps each site whole), or set torch._dynamo.config.optimize_ddp = "
            "'python_reducer', or raise DDP's bucket_cap_mb", stacklevel=2)
