"""The plan catalogue: every way to compute a LoRA layer's forward and backward.

    catalogue.py   the records: each plan's formula, FLOPs (sympy) and ATen implementation, and
                   the chain records bytes decide (``CHAIN_RECORDS``)
    piecewise.py   plan strings piecewise in n ("forward1|741:forward2"), resolved in the op

Everything else reads this package: the ops run the chosen record, ``choose/`` prices the
records, the passes write plan strings into the graph.
"""

from .catalogue import (BACKWARD_PLANS, CHAIN_RECORDS, FORWARD_PLANS, BackwardPlan, ChainRecord, ForwardPlan, Needs,
                        backward_plan, e_a, e_x, e_y, forward1_with_lora_product, forward_plan, i, n, o, r,
                        rows_as_output)
from .piecewise import PiecewisePlan, parse_plan, resolve_plan

__all__ = ["BACKWARD_PLANS", "CHAIN_RECORDS", "FORWARD_PLANS", "BackwardPlan", "ChainRecord", "ForwardPlan", "Needs",
           "PiecewisePlan", "backward_plan", "e_a", "e_x", "e_y", "forward1_with_lora_product", "forward_plan", "i",
           "n", "o", "parse_plan", "r", "resolve_plan", "rows_as_output"]
