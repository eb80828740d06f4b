"""``runlora_fx.install()``: the pass inside every inductor compile, with no backend to name.

    pass_ = runlora_fx.install(criterion="flops")      # or: with runlora_fx.install() as pass_:
    model = torch.compile(model)                        # plain inductor; HF Trainer(torch_compile=True)
    ...
    pass_.reports                                       # one RewriteReport per graph the pass ran on
    runlora_fx.uninstall()

``install`` sets ``torch._inductor.config.pre_grad_custom_pass`` to a ``RunLoRAPass`` (an
inductor ``CustomGraphPass``). Inductor runs pre-grad passes on the Dynamo graph inside
``aot_module_simplified`` (``torch/_functorch/aot_autograd.py``), after the AOTAutogradCache
lookup when every custom pass has a ``uuid()`` ("late" timing), so a warm start of the same
graph hits the cache and runs no pass at all. The graph there is still Dynamo's torch IR with
its ``example_value`` metadata, which is what ``passes/rewrite.py`` matches. The pass rewrites
``graph.owning_module`` and lowers each ``runlora.lora_linear`` into its plan's ATen chain, as
``make_backend(lowering="aten")`` does.

``uuid()`` covers ``runlora_fx.__version__``, a hash of the package's sources and
``RewriteOptions.key()``, so the cache never serves a graph rewritten by other code or other
settings. With ``criterion="time"`` the choice also depends on the timing cache on disk; a warm
start reuses the plans chosen when the entry was written (every plan is exact).

``LowerRunLoRAOps`` is the lowering alone; ``make_backend`` hands it to inductor the same way,
so the graph it keys the caches on holds ``runlora.lora_linear`` (an OpOverload, cacheable, its
plan strings in the key) rather than the lowered autograd.Function, which AOTAutogradCache
bypasses.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pathlib
import threading
import warnings
from typing import Callable, Optional

import torch

from ._compat import (custom_graph_pass_base, eager_backward_compile, ensure_compile_start_callbacks,
                      is_dynamo_control_flow, wrap_inductor_compile_fx)
from ._version import __version__
from .choose.measure import tuner_for
from .inspection.coverage import note_report
from .inspection.dump import dump_graph, next_graph_name, readable
from .options import RewriteOptions
from .passes.lower import lower_runlora_ops
from .passes import dora as _dora, upstream as _upstream  # noqa: F401  register their compile-start fixes
from .passes.rewrite import rewrite

__all__ = ["LowerRunLoRAOps", "RunLoRAPass", "install", "note_fallback", "rewrite_and_report", "source_fingerprint",
           "uninstall", "with_pre_grad_pass"]

log = logging.getLogger("runlora_fx.install")

_PACKAGE = pathlib.Path(__file__).resolve().parent
_FINGERPRINT: list = []
_INSTALLED: list = []  # [(pass, previous value of pre_grad_custom_pass)], innermost last
_LOCK = threading.Lock()
_RESTORE_COMPILE_FX: list = []  # puts inductor's compile_fx back when the last pass is uninstalled
_OUTERMOST = threading.local()  # compile_fx calls itself: only the outermost call falls back


def source_fingerprint() -> str:
    """sha256 of every ``.py`` file of the installed runlora_fx package (paths and contents)."""
    if not _FINGERPRINT:
        digest = hashlib.sha256()
        for path in sorted(_PACKAGE.rglob("*.py")):
            digest.update(str(path.relative_to(_PACKAGE)).encode())
            digest.update(path.read_bytes())
        _FINGERPRINT.append(digest.hexdigest())
    return _FINGERPRINT[0]


class LowerRunLoRAOps(custom_graph_pass_base()):
    """Inductor pre-grad pass: each runlora op -> its plan's ATen chain (``passes/lower.py``).

    Matches::

        y = torch.ops.runlora.lora_linear.default(x, W, b, A, B, 2.0, None, None, 'forward2', 'backward5')

    Rewrite to::

        y = runlora_fx.passes.lower.lowered_lora_linear(x, W, b, A, B, 2.0, None, None, 'forward2', 'backward5')
    """

    def __init__(self, save_lora_product: Optional[bool] = None):
        self.save_lora_product = save_lora_product

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is not None:
            lower_runlora_ops(gm, save_lora_product=self.save_lora_product)

    def uuid(self) -> str:
        return f"runlora_fx-lower;{__version__};{source_fingerprint()};save_lora_product={self.save_lora_product}"


class RunLoRAPass(LowerRunLoRAOps):
    """Inductor pre-grad pass: the runlora rewrite, then the lowering.

    Matches (Dynamo's torch IR, see ``passes/match.py``)::

        base = torch._C._nn.linear(x, W, b)
        lora = torch._C._nn.linear(torch._C._nn.linear(x_lora, A), B) * 2.0
        y    = base + lora

    Rewrite to::

        y = runlora_fx.passes.lower.lowered_lora_linear(x, W, b, A, B, 2.0, x_lora, None, 'forward2', 'backward5')

    Args:
        options: the pass's settings (validated ``RewriteOptions``).
        dump_dir: write each graph's dumps there (also env RUNLORA_DUMP_DIR), as ``make_backend``.
        on_report: called with each graph's RewriteReport.

    Attributes:
        reports: one RewriteReport per graph the pass ran on (none for a cache hit).
        options: the ``RewriteOptions`` in use.
    """

    runs_runlora_pass = True  # inspection/coverage.py: a compile with this pass installed is runlora's

    def __init__(self, options: RewriteOptions, *, dump_dir: Optional[str] = None,
                 on_report: Optional[Callable] = None):
        super().__init__(options.save_lora_product)
        self.options = tuner_for(options)
        self.dump_dir = dump_dir
        self.on_report = on_report
        self.reports: list = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        ensure_compile_start_callbacks()  # for the frames after this one, after a torch._dynamo.reset()
        gm = graph.owning_module
        if gm is None:
            return
        rewrite_and_report(gm, self.options, self.reports, dump_dir=self.dump_dir, on_report=self.on_report)
        lower_runlora_ops(gm, save_lora_product=self.save_lora_product)

    def uuid(self) -> str:
        return f"runlora_fx-pass;{__version__};{source_fingerprint()};{self.options.key()}"

    @property
    def installed(self) -> bool:
        return any(p is self for p, _ in _INSTALLED)

    def uninstall(self) -> None:
        """Removes this pass (and any installed after it), restoring what was there before."""
        with _LOCK:
            while self.installed:
                _pop()

    def __enter__(self) -> "RunLoRAPass":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def rewrite_and_report(gm: torch.fx.GraphModule, options: RewriteOptions, reports: list, *,
                       dump_dir: Optional[str] = None, on_report: Optional[Callable] = None,
                       example_inputs=None):
    """A front door's step for one graph: rewrite it, append its report to ``reports``, hand the
    report to ``on_report`` and dump the graph to ``dump_dir`` (or env RUNLORA_DUMP_DIR)."""
    dump = dump_dir or os.environ.get("RUNLORA_DUMP_DIR")
    name = next_graph_name(dump) if dump else f"graph_{len(reports)}"
    before = readable(gm) if dump else None
    report = rewrite(gm, options, graph_name=name)
    reports.append(report)
    note_report(report)
    if on_report is not None:
        on_report(report)
    if dump:
        dump_graph(dump, name, before, gm, report, example_inputs)
    return report


def note_fallback(reports: list, error: BaseException) -> None:
    """The safety net's record: every report of the failed graph gets ``fallback``, and one
    warning names the graph, its first rewritten site and the error."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0][:300] if text else repr(error)}"
    for report in reports:
        report.fallback = reason
    first = reports[0]
    warnings.warn(f"runlora: compiling {first.graph} with its {sum(r.rewritten for r in reports)} rewritten site(s) "
                  f"failed (first: {first.sites[0].path}): {reason}; compiling it without the rewrite", stacklevel=3)
    log.warning("runlora: %s compiled without the rewrite", first.graph, exc_info=error)


def _compile_fx_with_fallback(original):
    """inductor's ``compile_fx`` while a ``RunLoRAPass`` is installed: if compiling a graph the
    pass rewrote fails (the lowered chain's tracing, AOTAutograd, inductor, the backward
    included), the graph is compiled again as Dynamo gave it, without the pass."""

    def compile_fx(model_, example_inputs_, *args, **kwargs):
        passes = [p for p, _ in _INSTALLED]
        if getattr(_OUTERMOST, "active", False) or not passes or not isinstance(model_, torch.fx.GraphModule):
            return original(model_, example_inputs_, *args, **kwargs)
        snapshot = copy.deepcopy(model_)
        seen = {id(p): len(p.reports) for p in passes}
        _OUTERMOST.active = True
        try:
            with eager_backward_compile():  # a backward that fails to compile fails here, not mid-step
                return original(model_, example_inputs_, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the safety net; a failure without the rewrite is raised
            rewritten = [r for p in passes for r in p.reports[seen[id(p)]:] if r.rewritten]
            if not rewritten or is_dynamo_control_flow(error):
                raise
            note_fallback(rewritten, error)
            from torch._inductor import config

            current = config.pre_grad_custom_pass
            others = [q for q in (current if isinstance(current, (list, tuple)) else [current])
                      if q is not None and not isinstance(q, RunLoRAPass)]
            with config.patch(pre_grad_custom_pass=(others if len(others) > 1 else others[0] if others else None)):
                return original(snapshot, example_inputs_, *args, **kwargs)
        finally:
            _OUTERMOST.active = False

    compile_fx.runlora_fallback = True
    return compile_fx


def with_pre_grad_pass(current, new_pass):
    """``pre_grad_custom_pass`` value with ``new_pass`` run after the passes in ``current``."""
    if not current:
        return new_pass
    passes = list(current) if isinstance(current, (list, tuple)) else [current]
    return passes + [new_pass]


def install(*, dump_dir: Optional[str] = None, on_report: Optional[Callable] = None,
            options: Optional[RewriteOptions] = None, **option_fields) -> RunLoRAPass:
    """Runs the runlora pass in every inductor compile until ``uninstall()``.

    Sets ``torch._inductor.config.pre_grad_custom_pass`` to a ``RunLoRAPass`` (after any pass
    already there). Also a context manager: ``with runlora_fx.install(): ...`` uninstalls on exit.
    While installed, a graph the pass rewrote that then fails to compile is compiled again
    without the pass, with one warning; its reports' ``fallback`` says why.

    Args:
        dump_dir: write each graph before/after the pass and its report there (also env
            RUNLORA_DUMP_DIR); see ``inspection/dump.py``.
        on_report: called with each graph's RewriteReport.
        options, **option_fields: a ``RewriteOptions`` and/or its fields (criterion=,
            allow_merged=, forward_plan=, ...), as for ``make_backend``.

    Returns:
        The installed ``RunLoRAPass``; ``.reports`` collects the reports.
    """
    from torch._inductor import config

    ensure_compile_start_callbacks()  # before Dynamo traces: peft's DoRA, upstream spots (passes/dora.py, upstream.py)
    new_pass = RunLoRAPass(RewriteOptions.build(options, **option_fields), dump_dir=dump_dir, on_report=on_report)
    with _LOCK:
        previous = config.pre_grad_custom_pass
        config.pre_grad_custom_pass = with_pre_grad_pass(previous, new_pass)
        _INSTALLED.append((new_pass, previous))
        if not _RESTORE_COMPILE_FX:
            _RESTORE_COMPILE_FX.append(wrap_inductor_compile_fx(_compile_fx_with_fallback))
    log.info("runlora: installed as inductor's pre_grad_custom_pass (%s)", new_pass.options.key())
    return new_pass


def uninstall() -> Optional[RunLoRAPass]:
    """Removes the most recently installed pass, restoring the previous ``pre_grad_custom_pass``.

    Returns:
        The pass removed, or None when none was installed.
    """
    with _LOCK:
        return _pop() if _INSTALLED else None


def _pop() -> RunLoRAPass:
    from torch._inductor import config

    removed, previous = _INSTALLED.pop()
    config.pre_grad_custom_pass = previous
    if not _INSTALLED and _RESTORE_COMPILE_FX:
        _RESTORE_COMPILE_FX.pop()()
    return removed
