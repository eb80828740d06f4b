"""Spots in upstream packages that stop Dynamo inside a LoRA model, made traceable while compiling.

A graph break inside a checkpointed region is one Dynamo cannot take: it runs the whole frame
eagerly (every LoRA layer in it included, plain inductor too). Each record below names one
such spot, the release it was seen in, what Dynamo said, and how it is made traceable. Every
fix acts only on Dynamo's tracing; what eager computes is unchanged. The fixes are applied when
Dynamo starts compiling a frame (``_compat.on_compile_start``), once the package is imported,
the way ``passes/dora.py`` makes peft's DoRA layer traceable.

    transformers 5.25.0  merge_with_config_defaults (utils/generic.py) calls
                         logger.warning_once("`use_cache=True` is incompatible with gradient
                         checkpointing ...") in the frame that runs the checkpointed layers.
                         Dynamo: "logging.Logger method not supported". Fix: transformers'
                         ``warning_once`` joins ``torch._dynamo.config.ignore_logging_functions``
                         (Dynamo drops the call from the graph; eager still warns).
    kernels 0.19.1       the layer wrapper of ``use_kernelized_func`` (kernels/_internals/layer/
                         layer.py) sets and resets a module-level CompileableContextVar around
                         every decorated forward (Llama's attention, ...). Under compile that is a
                         write to a global object; inside a checkpoint Dynamo refuses it ("HOP:
                         Unsafe side effect"). Fix: while compiling, a ``set`` whose routing
                         selects no kernel (every entry's forward is its class's own, i.e. the
                         model was not kernelized) is skipped and its ``reset`` with it: the
                         wrapper then runs the original function, as it would with the write.
                         A kernelized model keeps the write (and its graph break).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable

import torch

from .._compat import on_compile_start

__all__ = ["UPSTREAM_SPOTS", "UpstreamSpot", "make_upstream_traceable"]

log = logging.getLogger("runlora_fx.upstream")


@dataclasses.dataclass(frozen=True)
class UpstreamSpot:
    """One upstream spot Dynamo cannot trace, and its compile-only fix.

    Attributes:
        package: the distribution it is in.
        seen_in: the release it was seen in.
        where: module and function.
        dynamo_says: the graph break's first line.
        apply: makes it traceable; returns True when in place (False: the package or the
            spot is not there).
    """

    package: str
    seen_in: str
    where: str
    dynamo_says: str
    apply: Callable[[], bool]


def _ignore_transformers_warning_once() -> bool:
    logging_module = sys.modules.get("transformers.utils.logging")
    warning_once = getattr(logging_module, "warning_once", None)
    if warning_once is None:
        return False
    torch._dynamo.config.ignore_logging_functions.add(warning_once)
    return True


_SKIPPED_SET = object()  # the token a skipped ``set`` returns; its ``reset`` does nothing


def _skip_unrouted_kernel_context() -> bool:
    layer = sys.modules.get("kernels._internals.layer.layer")
    context_var = getattr(layer, "CompileableContextVar", None)
    if context_var is None or not all(hasattr(context_var, m) for m in ("set", "reset", "get")):
        return False
    if getattr(context_var.set, "runlora_fx", False):
        return True
    original_set, original_reset = context_var.set, context_var.reset

    def set(self, value):  # noqa: A001 - the method's own name
        if torch.compiler.is_compiling() and not self.uses_global_var and _routes_to_no_kernel(value):
            return _SKIPPED_SET
        return original_set(self, value)

    def reset(self, token):
        if token is _SKIPPED_SET:
            return None
        return original_reset(self, token)

    set.runlora_fx = reset.runlora_fx = True
    context_var.set, context_var.reset = set, reset
    return True


def _routes_to_no_kernel(value) -> bool:
    """True when every (kernel wrapper, forward) entry routes to the wrapper class's own forward:
    the decorated function then runs its plain implementation, with or without the routing."""
    if not isinstance(value, dict):
        return False
    for entry in value.values():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            return False
        wrapper, forward = entry
        if forward is not getattr(type(wrapper), "forward", None):
            return False
    return True


UPSTREAM_SPOTS: tuple[UpstreamSpot, ...] = (
    UpstreamSpot("transformers", "5.25.0", "transformers.utils.generic.merge_with_config_defaults",
                 "logging.Logger method not supported for non-export cases", _ignore_transformers_warning_once),
    UpstreamSpot("kernels", "0.19.1", "kernels._internals.layer.layer.CompileableContextVar.set",
                 "HOP: Unsafe side effect (Attempted to mutate CompileableContextVar)", _skip_unrouted_kernel_context),
)


def make_upstream_traceable() -> list[UpstreamSpot]:
    """Applies every spot's fix whose package is imported; returns the spots in place."""
    applied = []
    for spot in UPSTREAM_SPOTS:
        try:
            if spot.apply():
                applied.append(spot)
        except Exception:  # noqa: BLE001 - never break a compile over an upstream fix
            log.debug("runlora: could not make %s traceable", spot.where, exc_info=True)
    return applied


on_compile_start(make_upstream_traceable)
make_upstream_traceable()  # packages imported before runlora_fx: in place at once
