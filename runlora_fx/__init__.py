"""runlora_fx: RunLoRA's cheapest LoRA computation chains, as a torch.fx / torch.compile pass.

    torch.compile(model, backend="runlora")            # or backend=runlora_fx.make_backend(...)
    runlora_fx.rewrite_exported_program(ep)             # torch.export programs
    runlora_fx.explain(model, *example_inputs)          # what would be rewritten, and why
    runlora_fx.tune(model, *example_inputs)             # time plans ahead for criterion="time"
    with runlora_fx.install(): torch.compile(model)     # the pass inside plain inductor compiles

The package reads as the pipeline a graph travels (docs/design.md, "Layout"): front doors here
(``backend``, ``export``, ``explain``, ``tuning``, ``cli``) -> ``passes/`` (dialects, match,
rewrite, lower) -> ``choose/`` (FLOPs, roofline, measured time) -> ``ops/`` (the torch.library
contract) -> ``plans/`` (the catalogue); ``inspection/`` reads what happened, ``options``
holds every setting and default.
"""

from ._compat import check_torch_version

check_torch_version()

from . import ops  # noqa: E402  registers torch.ops.runlora.*
from .backend import make_backend, runlora_backend  # noqa: E402
from .choose import PlanChoice, choose_plan  # noqa: E402
from .choose.roofline import DeviceModel  # noqa: E402
from .explain import explain  # noqa: E402
from .export import load, rewrite_exported_program  # noqa: E402
from .inspection.coverage import Coverage, coverage  # noqa: E402
from .inspection.report import RewriteReport  # noqa: E402
from .install import install, uninstall  # noqa: E402
from .ops import quantized as qlora  # noqa: E402  the 4-bit ops, under their former name
from .options import RewriteOptions  # noqa: E402
from .passes.dora import make_peft_dora_traceable  # noqa: E402
from .passes.rewrite import rewrite  # noqa: E402
from .passes.upstream import UPSTREAM_SPOTS, make_upstream_traceable  # noqa: E402  compile-only fixes of upstream spots
from .plans import BACKWARD_PLANS, FORWARD_PLANS, Needs, PiecewisePlan  # noqa: E402
from .tuning import tune  # noqa: E402

__all__ = [
    "BACKWARD_PLANS",
    "Coverage",
    "DeviceModel",
    "FORWARD_PLANS",
    "Needs",
    "PiecewisePlan",
    "PlanChoice",
    "RewriteOptions",
    "RewriteReport",
    "UPSTREAM_SPOTS",
    "choose_plan",
    "coverage",
    "explain",
    "install",
    "load",
    "make_backend",
    "make_peft_dora_traceable",
    "make_upstream_traceable",
    "ops",
    "qlora",
    "rewrite",
    "rewrite_exported_program",
    "runlora_backend",
    "tune",
    "uninstall",
]
from ._version import __version__  # noqa: E402
