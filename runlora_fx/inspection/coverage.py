"""Model-level coverage: every LoRA layer a model holds, against what the pass did with it.

A report knows only the graphs the pass saw. A LoRA layer Dynamo ran eagerly (a graph break
inside a checkpointed region sends the whole frame to eager; a frame skipped after an error)
is in no graph, and nothing else would say so. When a ``torch.compile``'d module whose backend
is runlora's (``backend="runlora"``, ``make_backend()``, or inductor with ``install()``) starts
compiling, each LoRA layer of the wrapped model gets a forward pre-hook that does nothing
under compilation (Dynamo traces it away) and, when the layer runs eagerly inside that
compiled module's call, records it with its checkpointed region and the graph breaks Dynamo
recorded, and warns once per model.

    runlora_fx.coverage(model)           # Coverage: rewritten / rejected / ran eagerly / not seen
    print(runlora_fx.coverage(model))    # one line per LoRA layer that was not rewritten

LoRA layers are the modules with ``lora_A`` and ``lora_B`` (peft, loralib, most hand-written) or
``lora_a`` and ``lora_b`` (torchtune); a report's site paths, which start at the compiled frame's
root, are matched to the model's module paths by their dotted suffix.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import warnings
import weakref
from typing import Optional

import torch

from .._compat import dynamo_graph_break_reasons, in_optimized_module, innermost_backend, on_compile_start

__all__ = ["Coverage", "LayerFate", "ModelWatch", "coverage", "lora_layers", "note_report", "watch_model"]

log = logging.getLogger("runlora_fx.coverage")

_ADAPTER_PAIRS = (("lora_A", "lora_B"), ("lora_a", "lora_b"))


def lora_layers(model: torch.nn.Module) -> dict:
    """{module path: module} for every LoRA layer of ``model`` (outermost only)."""
    found = {}
    for path, module in model.named_modules():
        if any(p == "" or path.startswith(p + ".") for p in found):  # inside a LoRA layer already found
            continue
        if any(hasattr(module, a) and hasattr(module, b) for a, b in _ADAPTER_PAIRS):
            found[path] = module
    return found


@dataclasses.dataclass
class LayerFate:
    """What happened to one LoRA layer.

    ``status``: "rewritten", "rejected" (``reason`` says why), "not linear" (a LoRA the pass
    does not match by design: ``reason`` says which), "ran eagerly" (``region``: the
    checkpointed layer it sits in, if any; ``graph_breaks``: what Dynamo recorded), or "not seen"
    (in no graph the pass saw and never run eagerly inside the compiled module: not reached,
    served from a warm cache, or split by a graph break inside the layer).
    """

    path: str
    status: str
    reason: Optional[str] = None
    region: Optional[str] = None
    graph_breaks: tuple = ()


@dataclasses.dataclass
class Coverage:
    """Every LoRA layer of one model and its fate."""

    model: str
    layers: list

    def count(self, status: str) -> int:
        return sum(1 for f in self.layers if f.status == status)

    def summary(self) -> str:
        counts = collections.Counter(f.status for f in self.layers)
        parts = [f"{counts[s]} {s}" for s in ("rewritten", "rejected", "not linear", "ran eagerly", "not seen")
                 if counts[s]]
        return f"runlora: {self.model}: {len(self.layers)} LoRA layers: " + (", ".join(parts) or "none")

    def __str__(self) -> str:
        lines = [self.summary()]
        for fate in self.layers:
            if fate.status == "rewritten":
                continue
            detail = fate.reason or ""
            if fate.status == "ran eagerly":
                detail = (f"in checkpointed region {fate.region}; " if fate.region else "") + (
                    "graph breaks: " + " | ".join(fate.graph_breaks) if fate.graph_breaks else "no graph break recorded")
            lines.append(f"  {fate.path}: {fate.status}" + (f" ({detail})" if detail else ""))
        return "\n".join(lines)


class ModelWatch:
    """The hooks on one model's LoRA layers and what they and the pass saw."""

    def __init__(self, model: torch.nn.Module):
        self.model_name = type(model).__name__
        self.layers = lora_layers(model)
        self.paths = {id(m): path for path, m in model.named_modules()}
        self.reports: list = []  # (the compiled frame's module path, its RewriteReport)
        self.eager: dict = {}  # path -> (region, graph breaks)
        self.breaks_before = dynamo_graph_break_reasons()
        self.warned = False
        self._checkpointed = {path: _checkpointed_region(model, path) for path in self.layers}
        ref = weakref.ref(self)
        self._handles = [module.register_forward_pre_hook(_eager_hook(ref, path)) for path, module in self.layers.items()]

    def close(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def record_eager(self, path: str) -> None:
        breaks = _new_breaks(self.breaks_before)
        self.eager[path] = (self._checkpointed[path], breaks)
        if not self.warned:
            self.warned = True
            region = self._checkpointed[path]
            warnings.warn(
                f"runlora: LoRA layer {path} of {self.model_name} ran outside every compiled graph"
                + (f" (checkpointed region {region})" if region else "")
                + ": Dynamo ran it eagerly, so it is neither rewritten nor compiled. "
                + ("Graph breaks Dynamo recorded: " + " | ".join(breaks) if breaks else "Dynamo recorded no graph break")
                + ". runlora_fx.coverage(model) lists every LoRA layer's fate.", stacklevel=3)

    def fates(self) -> Coverage:
        rewritten = [_full_path(root, s.path, self.layers) for root, r in self.reports for s in r.sites]
        rejected = [(_full_path(root, x.path, self.layers), x.reason) for root, r in self.reports for x in r.rejected]
        out = []
        for path, module in self.layers.items():
            not_linear = _not_a_linear_lora(module)
            if not_linear:
                out.append(LayerFate(path, "not linear", reason=not_linear))
            elif any(_inside(p, path) for p in rewritten):
                out.append(LayerFate(path, "rewritten"))
            elif path in self.eager:
                region, breaks = self.eager[path]
                out.append(LayerFate(path, "ran eagerly", region=region, graph_breaks=breaks))
            elif any(_inside(p, path) for p, _ in rejected):
                reason = next(r for p, r in rejected if _inside(p, path))
                out.append(LayerFate(path, "rejected", reason=reason))
            else:
                out.append(LayerFate(path, "not seen", reason="in no graph the pass saw: not reached, a warm "
                                     "cache hit, or split by a graph break inside the layer"))
        return Coverage(self.model_name, out)


_WATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, ModelWatch]" = weakref.WeakKeyDictionary()
_COMPILING: list = []  # the watch of the model whose compile is in progress (one thread compiles at a time)


def _eager_hook(ref, path):
    def hook(module, args):
        if torch.compiler.is_compiling():
            return None
        watch = ref()
        if watch is not None and path not in watch.eager and in_optimized_module():
            watch.record_eager(path)
        return None

    return hook


def _not_a_linear_lora(module: torch.nn.Module) -> Optional[str]:
    """Why a LoRA layer is one the pass does not match by design, or None. peft's
    ``ParamWrapper`` (``target_parameters``: LoRA on a weight tensor, such as a fused MoE's 3-D
    experts) adds s·B·A to the weight inside the base layer's own op: there is no x·Aᵀ·Bᵀ chain.
    peft's Embedding and Conv LoRA are not linear maps of x."""
    name = type(module).__name__
    if name == "ParamWrapper":
        return "peft LoRA on a parameter (target_parameters, e.g. fused MoE experts): s·B·A is added to the weight"
    if name in ("Embedding", "Conv1d", "Conv2d", "Conv3d", "ConvNd") and type(module).__module__.startswith("peft."):
        return f"peft {name} LoRA: not a linear map of x"
    return None


def _full_path(root: Optional[str], site_path: str, layers: dict) -> str:
    """A site's path from the model's root: the compiled frame's module path joined to the
    site's (a frame whose root is the LoRA layer itself reports the site by its node name)."""
    if root is None:
        return site_path
    if root in layers:
        return root
    return f"{root}.{site_path}" if root else site_path


def _inside(site_path: str, layer_path: str) -> bool:
    """A rejected product's path (``...q_proj.lora_B.default``) or a site's path, seen from any
    frame root, belongs to ``layer_path``."""
    for k in range(len(layer_path.split("."))):
        suffix = ".".join(layer_path.split(".")[k:])
        if site_path == suffix or site_path.startswith(suffix + "."):
            return True
    return False


def _checkpointed_region(model: torch.nn.Module, path: str) -> Optional[str]:
    """The innermost ancestor of ``path`` that runs under gradient checkpointing (HF's
    ``GradientCheckpointingLayer`` and layers with ``gradient_checkpointing=True``), or None."""
    parts = path.split(".")
    for k in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:k])
        try:
            module = model.get_submodule(ancestor)
        except AttributeError:
            continue
        if getattr(module, "gradient_checkpointing", False) is True:
            return ancestor
    return None


def _new_breaks(before: dict) -> tuple:
    """The first lines of the graph breaks Dynamo counted since ``before`` ({reason: count}),
    checkpoint and higher-order-op breaks first, at most three."""
    lines = [r.splitlines()[0].strip() for r, k in dynamo_graph_break_reasons().items() if k > before.get(r, 0)]
    lines = list(dict.fromkeys(line for line in lines if line))
    lines.sort(key=lambda line: 0 if ("HOP" in line or "checkpoint" in line) else 1)
    return tuple(lines[:3])


def _is_runlora_compile(optimized) -> bool:
    """Whether the compiled module's backend runs the runlora pass."""
    try:
        backend = innermost_backend(optimized.dynamo_ctx.callback)
    except Exception:  # noqa: BLE001 - an unknown wrapper: not ours
        return False
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile(mode=/options=)'s wrapper
    if getattr(backend, "runlora_presplit", None) is not None:
        return True
    from torch._inductor import config

    passes = config.pre_grad_custom_pass
    passes = passes if isinstance(passes, (list, tuple)) else [passes]
    return any(getattr(p, "runs_runlora_pass", False) for p in passes)


def _compiling_module():
    """(the ``torch.compile``'d module whose call is compiling a frame now, the innermost module
    whose frame is being compiled), both found on the stack; (None, None) outside a compile."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame, innermost = sys._getframe(2), None
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, torch.nn.Module):
            innermost = candidate if innermost is None else innermost
            if isinstance(candidate, OptimizedModule):
                return candidate, innermost
        frame = frame.f_back
    return None, None


def _watch_compiling_model() -> None:
    """Compile-start callback: hooks the LoRA layers of the model being compiled by a runlora
    backend (before Dynamo traces the frame, so the hooks never cause a recompile)."""
    _COMPILING.clear()
    try:
        optimized, innermost = _compiling_module()
        if optimized is None or not _is_runlora_compile(optimized):
            return
        watch = watch_model(optimized._orig_mod)
        root = "" if innermost is optimized else watch.paths.get(id(innermost))
        _COMPILING.append((watch, root))
    except Exception:  # noqa: BLE001 - coverage must never break a compile
        log.debug("runlora: could not watch the model being compiled", exc_info=True)


def watch_model(model: torch.nn.Module) -> ModelWatch:
    """Hooks ``model``'s LoRA layers (once per model); returns its watch."""
    watch = _WATCHES.get(model)
    if watch is None:
        watch = _WATCHES[model] = ModelWatch(model)
    return watch


def note_report(report) -> None:
    """Counts a graph's report towards the model being compiled (front doors call this)."""
    if _COMPILING:
        watch, root = _COMPILING[0]
        watch.reports.append((root, report))


def coverage(model: torch.nn.Module) -> Coverage:
    """Every LoRA layer of ``model`` and its fate so far, from the runlora compiles of it (through
    ``torch.compile(model, ...)``) and the eager runs seen inside them."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    watch = _WATCHES.get(model)
    if watch is None:
        return Coverage(type(model).__name__, [LayerFate(p, "not seen", reason="no runlora compile of this model "
                                                         "ran in this process") for p in lora_layers(model)])
    return watch.fates()


on_compile_start(_watch_compiling_model)
