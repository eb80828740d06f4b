"""Graph dumps for each compiled graph, so a rewrite can be read and diffed.

For graph ``graph_K`` the directory receives::

    graph_K.before.py      the Dynamo graph as handed to the backend (shapes and dtypes)
    graph_K.after.py       the same graph after the pass: runlora.lora_linear nodes
    graph_K.forward.py     the forward ATen ops of the rewritten graph: runlora.lora_linear
    graph_K.backward.py    its backward ops: runlora.lora_linear_backward
    graph_K.report.md/.json
    graph_K.after.svg      when pydot and graphviz are installed; runlora nodes filled orange

Graphs are numbered per directory for the whole process (``next_graph_name``): two compiles,
or two front doors, dumping into one directory write ``graph_0.*``, ``graph_1.*``, ... and never
overwrite each other; the first graph in a fresh directory is ``graph_0``.

Dumping never fails a compile: a dump step that raises is skipped with a warning.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings

import torch
import torch.fx as fx

from .report import RewriteReport

__all__ = ["dump_graph", "next_graph_name", "readable"]

_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def next_graph_name(directory: str) -> str:
    """``"graph_K"``: the next dump name for ``directory`` in this process (0, 1, ... per directory)."""
    key = os.path.abspath(directory)
    with _COUNTERS_LOCK:
        counter = _COUNTERS.setdefault(key, itertools.count())
        return f"graph_{next(counter)}"


def readable(gm: fx.GraphModule) -> str:
    """The graph as Python code annotated with shapes and dtypes."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def dump_graph(directory: str, name: str, before: str, gm: fx.GraphModule, report: RewriteReport,
               example_inputs=None) -> list:
    """Writes the dump files of one compiled graph; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    files = {
        f"{name}.before.py": before,
        f"{name}.after.py": readable(gm),
        f"{name}.report.md": report.to_markdown() + "\n",
        f"{name}.report.json": report.to_json() + "\n",
    }
    if example_inputs is not None:
        files.update(_guarded("forward/backward graphs", _joint_graphs, name, gm, example_inputs) or {})
    paths = []
    for fname, text in files.items():
        paths.append(os.path.join(directory, fname))
        with open(paths[-1], "w") as f:
            f.write(text)
    svg = os.path.join(directory, f"{name}.after.svg")
    if _guarded("SVG", _write_svg, gm, svg):
        paths.append(svg)
    return paths


def _guarded(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a dump must never break the user's compile
        warnings.warn(f"runlora: skipped dumping the {what} ({type(exc).__name__}: {exc})", stacklevel=3)
        return None


def _joint_graphs(name: str, gm: fx.GraphModule, example_inputs) -> dict:
    """Traces forward + backward of the rewritten graph with make_fx and splits the joint
    graph: nodes that depend on the incoming gradients are the backward."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    with torch.enable_grad():
        outs = gm(*inputs)
    outs = [o for o in (outs if isinstance(outs, (list, tuple)) else [outs])
            if isinstance(o, torch.Tensor) and o.requires_grad]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outs or not wrt:
        return {}
    tangents = [torch.ones_like(o) for o in outs]

    def joint(primals, cotangents):
        with torch.enable_grad():
            res = gm(*primals)
        res = [o for o in (res if isinstance(res, (list, tuple)) else [res])
               if isinstance(o, torch.Tensor) and o.requires_grad]
        grads = torch.autograd.grad(res, [p for p in primals if isinstance(p, torch.Tensor) and p.requires_grad],
                                    cotangents, allow_unused=True)
        return res, grads

    traced = make_fx(joint)(inputs, tangents)
    n_primals = len(inputs)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    backward = set(placeholders[n_primals:])
    for node in traced.graph.nodes:
        if node.op != "placeholder" and any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    fwd = [n.format_node() for n in traced.graph.nodes if n.op != "output" and n not in backward]
    bwd = [n.format_node() for n in traced.graph.nodes if n.op not in ("output", "placeholder") and n in backward]
    header = "# {} graph of {} (ATen ops, from make_fx of forward + autograd.grad)\n"
    return {
        f"{name}.forward.py": header.format("forward", name) + "\n".join(filter(None, fwd)) + "\n",
        f"{name}.backward.py": header.format("backward", name) + "\n".join(filter(None, bwd)) + "\n",
    }


def _write_svg(gm: fx.GraphModule, path: str) -> bool:
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
        import pydot  # noqa: F401
    except ImportError:
        return False
    import shutil

    if shutil.which("dot") is None:
        return False
    dot = FxGraphDrawer(gm, "rewritten", ignore_getattr=True).get_dot_graph()
    for node in dot.get_nodes():
        if "runlora" in str(node.get("label") or ""):
            node.set("fillcolor", "orange")
            node.set("style", "filled")
    dot.write_svg(path)
    return True
