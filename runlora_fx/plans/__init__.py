"""The plan catalogue: every way to compute a LoRA layer's forward and backward.

    catalogue.py   the records: each plan's formula, FLOPs (sympy) and ATen implementation
    piecewise.py   plan strings piecewise in n ("forward1|741:forward2"), resolved in the op

Everything else reads this package: the ops run the chosen record, ``choose/`` prices the
records, the passes write plan strings into the graph.
"""

from .catalogue import (BACKWARD_PLANS, FORWARD_PLANS, BackwardPlan, ForwardPlan, Needs, backward_plan,
                        forward_plan, i, n, o, r)
from .piecewise import PiecewisePlan, parse_plan, resolve_plan

__all__ = ["BACKWARD_PLANS", "FORWARD_PLANS", "BackwardPlan", "ForwardPlan", "Needs", "PiecewisePlan",
           "backward_plan", "forward_plan", "i", "n", "o", "parse_plan", "r", "resolve_plan"]
