"""Every torch-version branch and every private torch API runlora_fx touches lives here."""

from __future__ import annotations

import torch

__all__ = ["TORCH_MIN", "TORCH_MAX_EXCLUSIVE", "check_torch_version", "custom_graph_pass_base", "detect_fake_mode",
           "dynamo_graph_break_reasons", "eager_backward_compile", "ensure_compile_start_callbacks", "in_optimized_module",
           "inductor_config_patches", "innermost_backend", "install_ddp_presplit_hook", "is_dynamo_control_flow",
           "on_compile_start",
           "wrap_inductor_compile_fx", "size_hint", "torch_version"]

# Tested on 2.11 (GPU machine) and 2.13 (CPU CI). torch.library.custom_op with
# register_autograd / register_fake and ExportedProgram.run_decompositions() as used here
# exist from 2.5 on, but only the tested range is declared.
TORCH_MIN = (2, 11)
TORCH_MAX_EXCLUSIVE = (2, 14)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """Returns (major, minor) of the given or installed torch version string."""
    text = (version or torch.__version__).split("+")[0]
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch_version(version: str | None = None) -> None:
    """Raises ImportError naming the supported range when torch is outside it."""
    found = torch_version(version)
    if not TORCH_MIN <= found < TORCH_MAX_EXCLUSIVE:
        lo = ".".join(map(str, TORCH_MIN))
        hi = ".".join(map(str, TORCH_MAX_EXCLUSIVE))
        raise ImportError(
            f"runlora_fx supports torch>={lo},<{hi}; found torch {version or torch.__version__}"
        )


def detect_fake_mode(tensors):
    """The FakeTensorMode the given tensors belong to, or None."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(tensors)


def size_hint(size) -> int:
    """A concrete value for an int or SymInt (its size hint)."""
    if isinstance(size, torch.SymInt):
        node = size.node
        return int(node.shape_env.size_hint(node.expr)) if node.hint is None else int(node.hint)
    return int(size)


def inductor_config_patches(mode=None, options=None) -> dict:
    """The inductor config patches ``torch.compile(mode=..., options=...)`` makes for "inductor".

    Built by torch's own ``_TorchCompileInductorWrapper``, so a mode or option inductor rejects
    raises inductor's own RuntimeError.
    """
    if not mode and not options:
        return {}
    return dict(torch._TorchCompileInductorWrapper(mode, dict(options or {}), None).config)


def custom_graph_pass_base():
    """Inductor's ``CustomGraphPass`` base class (``torch._inductor.custom_graph_pass``)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def autocast_markers() -> tuple:
    """(enter, exit): the functions Dynamo records for a ``with torch.autocast(...)`` inside a
    compiled region, ``_enter_autocast(device_type, dtype, enabled, cache_enabled)`` and
    ``_exit_autocast(ctx)`` (private to ``torch.amp.autocast_mode``); (None, None) if absent."""
    mode = torch.amp.autocast_mode
    return getattr(mode, "_enter_autocast", None), getattr(mode, "_exit_autocast", None)


_COMPILE_START: list = []  # the callbacks runlora_fx runs when Dynamo starts compiling a frame


def on_compile_start(callback) -> bool:
    """Runs ``callback()`` when Dynamo starts compiling a frame, before it traces
    (``torch._dynamo.callback_handler``, private); False where that hook is absent.
    ``torch._dynamo.reset()`` clears these callbacks: the front doors put them back
    (``ensure_compile_start_callbacks``)."""
    if callback not in _COMPILE_START:
        _COMPILE_START.append(callback)
    return ensure_compile_start_callbacks()


def ensure_compile_start_callbacks() -> bool:
    """Registers (again, after a ``torch._dynamo.reset()``) and runs every ``on_compile_start``
    callback; False where Dynamo's callback hook is absent."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None or not hasattr(handler, "register_start_callback"):
        return False
    registered = getattr(handler, "start_callbacks", [])
    for callback in _COMPILE_START:
        if not any(getattr(c, "runlora_callback", None) is callback for c in registered):
            def start(*_, _callback=callback):
                _callback()
            start.runlora_callback = callback
            handler.register_start_callback(start)
        callback()
    return True


def in_optimized_module() -> bool:
    """Whether a ``torch.compile``'d module's call is running (``torch._dynamo.eval_frame``'s
    flag, private; set around ``OptimizedModule.__call__``, eager fallbacks inside it included)."""
    check = getattr(torch._dynamo.eval_frame, "_is_in_optimized_module", None)
    return bool(check()) if check is not None else False


def innermost_backend(callback):
    """The backend a Dynamo callback wraps (``torch._dynamo.eval_frame.innermost_backend``)."""
    return torch._dynamo.eval_frame.innermost_backend(callback)


def dynamo_graph_break_reasons() -> dict:
    """{reason: count} of the graph breaks Dynamo has counted in this process (``torch._dynamo.utils.counters``)."""
    return dict(torch._dynamo.utils.counters["graph_break"])


def eager_backward_compile(enabled: bool = True):
    """AOTAutograd compiles the backward graph with the forward, not at the first backward
    (``torch._functorch.config.force_non_lazy_backward_lowering``), so a compile failure surfaces
    while the backend can still fall back; a no-op context where the flag is absent."""
    import contextlib

    config = torch._functorch.config
    if not enabled or not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


def wrap_inductor_compile_fx(make_wrapper):
    """Replaces ``torch._inductor.compile_fx.compile_fx`` (private; inductor's entry points,
    ``backend="inductor"`` and ``torch.compile(mode=/options=)``'s wrapper, import it at each call)
    by ``make_wrapper(original)``; returns a function that puts the original back."""
    import torch._inductor.compile_fx as module

    original = module.compile_fx
    module.compile_fx = make_wrapper(original)

    def restore():
        module.compile_fx = original

    return restore


def is_dynamo_control_flow(error: BaseException) -> bool:
    """Whether ``error`` is Dynamo's own signal to its tracer (restart the analysis, skip the
    frame), raised through a backend: it must pass through, never be taken for a failure."""
    exc = torch._dynamo.exc
    kinds = tuple(k for k in (getattr(exc, "RestartAnalysis", None), getattr(exc, "SkipFrame", None)) if k)
    return isinstance(error, kinds)


def install_ddp_presplit_hook() -> bool:
    """Lets a runlora backend rewrite a Dynamo graph whole before DDPOptimizer splits it.

    DDPOptimizer (``torch._dynamo.backends.distributed``, private) splits each graph of a
    DDP-wrapped model at its gradient-bucket edges and calls the backend on every piece; a
    split between a site's lora_A and lora_B leaves neither piece a whole site. This wraps
    ``DDPOptimizer.compile_fn``: when its backend (or the ``compiler_fn`` of the
    ``torch.compile(mode=/options=)`` wrapper around it) has ``runlora_presplit``, that
    context manager rewrites the whole graph first (each site becomes one op node, which a
    split cannot cut) and the backend then only lowers and compiles the pieces. Any other
    backend runs DDPOptimizer unchanged. Idempotent; False where DDPOptimizer is absent.
    """
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:
        return False
    original = DDPOptimizer.compile_fn
    if getattr(original, "runlora_hook", False):
        return True

    def compile_fn(self, gm, example_inputs, **compiler_configs):
        backend = self.backend_compile_fn
        presplit = getattr(getattr(backend, "compiler_fn", backend), "runlora_presplit", None)
        if presplit is None:
            return original(self, gm, example_inputs, **compiler_configs)
        with presplit(gm, example_inputs):
            return original(self, gm, example_inputs, **compiler_configs)

    compile_fn.runlora_hook = True
    compile_fn.__wrapped__ = original
    DDPOptimizer.compile_fn = compile_fn
    return True
