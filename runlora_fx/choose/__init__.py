"""Choosing a site's plans: what each plan costs, and the one ``choose`` that dispatches by criterion.

    flops.py      criterion="flops": sympy FLOPs of every plan; piecewise in a symbolic n
    roofline.py   criterion="roofline": FLOPs, bytes moved and launches per kernel on a device model
    lora_product.py  keep forward1's X_l·Aᵀ for dB or recompute it (the lowered chain's choice)
    measure.py    criterion="time": each pair timed on the device, cached on disk (``Autotuner``)
    select.py     ``choose`` / ``choose_for``: one entry point for the three; ``SiteFacts``

The plans themselves (formulas, implementations) are ``plans/``; this package only prices them.
"""

from .flops import PlanChoice, applicable_plans, choose_plan
from .measure import Autotuner
from .roofline import DeviceModel
from .select import CRITERIA, SiteFacts, check_criterion, choose, choose_for, time_request

__all__ = ["Autotuner", "CRITERIA", "DeviceModel", "PlanChoice", "SiteFacts", "applicable_plans",
           "check_criterion", "choose", "choose_for", "choose_plan", "time_request"]
