"""The sympy cost model and the selector."""

import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from runlora_fx.choose import choose_plan
from runlora_fx.plans import parse_plan
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS, Needs, i, n, o


def test_forward2_wins_iff_n_above_io_over_i_plus_o():
    diff = sympy.simplify(FORWARD_PLANS["forward1"].flops() - FORWARD_PLANS["forward2"].flops())
    (threshold,) = sympy.solve(sympy.Eq(diff, 0), n)
    assert sympy.simplify(threshold - i * o / (i + o)) == 0


def test_backward5_beats_backward1_iff_n_above_o():
    diff = sympy.simplify(BACKWARD_PLANS["backward1"].flops() - BACKWARD_PLANS["backward5"].flops())
    (threshold,) = sympy.solve(sympy.Eq(diff, 0), n)
    assert threshold == o


def test_dominated_plans_never_win_under_parameter_reduction():
    for n_, i_, o_, r_ in [(64, 512, 1376, 8), (4096, 1024, 2752, 64), (10**6, 4096, 11008, 128), (3, 64, 64, 1)]:
        costs = {name: p.flops(n_, i_, o_, r_) for name, p in BACKWARD_PLANS.items()}
        best = min(costs.values())
        assert all(costs[name] > best or not p.dominated or costs[name] == best
                   for name, p in BACKWARD_PLANS.items())
        assert min(c for name, c in costs.items() if not BACKWARD_PLANS[name].dominated) == best


@settings(max_examples=60, deadline=None)
@given(i_=st.integers(8, 4096), o_=st.integers(8, 4096), r_=st.integers(1, 64), scale=st.integers(1, 4),
       needs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
def test_piecewise_plan_agrees_with_concrete_around_each_threshold(i_, o_, r_, scale, needs):
    s0 = sympy.Symbol("s0", positive=True, integer=True)
    symbolic = choose_plan(scale * s0, i_, o_, r_, needs=Needs(*needs))
    points = {1, 2, 10**6}
    for piecewise in (symbolic.forward, symbolic.backward):
        for min_n, _ in piecewise.pieces[1:]:
            points |= {min_n - 1, min_n, min_n + 1}
    for n_ in sorted(p for p in points if p >= 1):
        concrete = choose_plan(n_, i_, o_, r_, needs=Needs(*needs))
        assert symbolic.forward.at(n_) == str(concrete.forward), n_
        assert symbolic.backward.at(n_) == str(concrete.backward), n_


def test_symbolic_choice_is_the_known_piecewise():
    s0 = sympy.Symbol("s0", positive=True, integer=True)
    choice = choose_plan(s0, 1024, 2752, 64)
    assert str(choice.forward) == "forward1|747:forward2"  # i·o/(i+o) = 746.3
    assert str(choice.backward) == "backward1|2753:backward5"  # n > o
    assert parse_plan(str(choice.forward)) == choice.forward


def test_separate_input_and_mixed_dtype_exclude_merged_plans():
    for kw in (dict(separate_lora_input=True), dict(mixed_dtype=True), dict(allow_merged=False)):
        choice = choose_plan(10**6, 1024, 2752, 8, **kw)
        assert set(choice.forward_costs) == {"forward1"}
        assert set(choice.backward_costs) == {"backward1"}


def test_no_dx_needed_changes_the_backward_cost():
    full = BACKWARD_PLANS["backward1"].flops(100, 64, 64, 8)
    no_x = BACKWARD_PLANS["backward1"].flops(100, 64, 64, 8, Needs(x=False))
    assert full - no_x == 2 * 100 * 64 * 64 + 2 * 100 * 8 * 64
