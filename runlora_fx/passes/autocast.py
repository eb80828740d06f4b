"""Autocast regions: the dtype a linear map computes in, read off the graph.

Under ``torch.autocast(device_type, dtype)`` a linear casts x, W, b (every floating input
on that device type except fp64) to ``dtype`` and computes there; the traced graph keeps
the fp32 operands and only the fake values say bf16. A region reaches the pass in one of
three ways:

    dynamo, autocast inside the compiled code:
        _enter_autocast = torch.amp.autocast_mode._enter_autocast('cpu', torch.bfloat16, True, None)
        linear = torch._C._nn.linear(x, W, b)            # example_value: bfloat16
        _exit_autocast = torch.amp.autocast_mode._exit_autocast(_enter_autocast)
    dynamo, autocast around the compiled call: no marker; the graph is traced (and guarded)
        under the ambient state, which is the state while the backend runs.
    torch.export under an outer autocast: no marker, no ambient state when the program is
        rewritten later; the fake values are all that is left (``linear``'s val is bf16).

``autocast_regions(graph)`` gives every node the regions active at it (markers over the
ambient state). ``match.py`` uses it to check that a site's dtypes are autocast's; the
rewrite then makes the casts explicit (``rewrite.py``), so the op computes in the autocast
dtype whatever autocast state it later runs under.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from .._compat import autocast_markers

__all__ = ["AutocastRegion", "LOW_PRECISION", "ambient_regions", "autocast_regions", "is_autocast_eligible"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


@dataclasses.dataclass(frozen=True)
class AutocastRegion:
    """One device type's autocast state at a node.

    Attributes:
        device_type: "cpu", "cuda", ...
        dtype: the autocast dtype, or None where autocast is disabled (``enabled=False``).
        source: "graph" (an ``_enter_autocast`` node) or "ambient" (the state the graph was
            traced under).
    """

    device_type: str
    dtype: Optional[torch.dtype]
    source: str


def is_autocast_eligible(dtype: torch.dtype) -> bool:
    """Autocast casts floating tensors other than fp64; integers and fp64 pass as they are."""
    return dtype.is_floating_point and dtype != torch.float64


def ambient_regions() -> dict:
    """{device_type: AutocastRegion} of the autocast state now (a Dynamo backend runs under the
    state its graph was traced and guarded in)."""
    regions = {}
    for device_type in _DEVICE_TYPES:
        try:
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                regions[device_type] = AutocastRegion(device_type, torch.get_autocast_dtype(device_type), "ambient")
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
    return regions


def autocast_regions(graph: fx.Graph, outer: Optional[dict] = None) -> dict:
    """{node: {device_type: AutocastRegion}} for every node of ``graph``.

    Args:
        graph: a graph whose ``_enter_autocast``/``_exit_autocast`` nodes (Dynamo) nest.
        outer: the regions around the graph; None: ``ambient_regions()``.
    """
    enter, exit_ = autocast_markers()
    state = dict(ambient_regions() if outer is None else outer)
    stack: list = []
    regions = {}
    for node in graph.nodes:
        if node.op == "call_function" and enter is not None and node.target is enter:
            device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            device_type = node.kwargs.get("device_type", device_type)
            dtype = node.kwargs.get("dtype", dtype)
            enabled = node.kwargs.get("enabled", enabled)
            stack.append(dict(state))
            if dtype is None and enabled:
                dtype = torch.get_autocast_dtype(device_type)
            state[device_type] = AutocastRegion(device_type, dtype if enabled else None, "graph")
        elif node.op == "call_function" and exit_ is not None and node.target is exit_ and stack:
            state = stack.pop()
        regions[node] = dict(state)
    return regions
