"""The ExportedProgram front door: ``rewrite_exported_program(ep)``.

Works on torch.export's training IR (``aten.linear`` ...) and on the ATen IR after
``run_decompositions()`` (``view``/``permute``/``mm``/``addmm``). The rewritten program
holds ``runlora.lora_linear`` nodes; it runs (``.module()``), trains, survives
``run_decompositions()`` and round-trips ``torch.export.save``/``load`` once
``runlora_fx`` is imported (``runlora_fx.load`` checks that for you).
"""

from __future__ import annotations

from typing import Optional

import torch

from .inspection.report import RewriteReport
from .options import RewriteOptions
from .passes.rewrite import rewrite

__all__ = ["rewrite_exported_program", "load"]


def _mark_parameters(ep) -> None:
    """Records each lifted parameter's requires_grad on its placeholder (fake values may not)."""
    params = dict(ep.named_parameters())
    params.update(ep.named_buffers())
    lifted = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            t = params.get(lifted[node.name])
            if t is not None:
                node.meta["runlora_requires_grad"] = bool(t.requires_grad)


def rewrite_exported_program(ep: torch.export.ExportedProgram, options: Optional[RewriteOptions] = None, *,
                             graph_name: str = "exported_program", **option_fields) -> torch.export.ExportedProgram:
    """Rewrites the LoRA sites of ``ep`` in place and returns it.

    Args:
        ep: an ExportedProgram (training IR or decomposed).
        options, **option_fields: as for ``runlora_fx.rewrite`` (allow_merged, forward_plan, ...).
            ``rewrite_4bit`` defaults to True here: an exported program is not tied to one
            device's kernels.
        graph_name: label for the report.

    Returns:
        ``ep`` itself, with ``ep.runlora_report`` set to the RewriteReport.
    """
    _mark_parameters(ep)
    # the program keeps the opaque op, which recomputes X_l·Aᵀ: report and price it so
    options = RewriteOptions.build(options, **{**option_fields, "save_lora_product": False})
    if options.rewrite_4bit is None:
        options = RewriteOptions.build(options, rewrite_4bit=True)
    report: RewriteReport = rewrite(ep.graph_module, options, graph_name=graph_name)
    _sync_output_specs(ep)
    ep.runlora_report = report
    return ep


def _sync_output_specs(ep) -> None:
    """Points the output specs at the nodes the graph returns (a rewritten add may be one)."""
    from torch.export.graph_signature import TensorArgument

    output = next(node for node in reversed(ep.graph.nodes) if node.op == "output")
    returned = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    for spec, node in zip(ep.graph_signature.output_specs, returned):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, torch.fx.Node):
            spec.arg.name = node.name


def load(path, **kwargs) -> torch.export.ExportedProgram:
    """``torch.export.load`` with runlora's ops registered (importing this module did that)."""
    return torch.export.load(path, **kwargs)
