"""The op contract: opcheck, gradcheck, FLOPs = sympy, equality with eager, what is saved."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import runlora_fx  # noqa: F401
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS, Needs

op = torch.ops.runlora.lora_linear
PAIRS = list(itertools.product(FORWARD_PLANS, BACKWARD_PLANS))


def make(shape=(3, 5), i=12, o=20, r=4, dtype=torch.float64, bias=True, x_grad=True, separate=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, i, dtype=dtype, generator=g).requires_grad_(x_grad)
    W = torch.randn(o, i, dtype=dtype, generator=g)
    b = torch.randn(o, dtype=dtype, generator=g) if bias else None
    A = torch.randn(r, i, dtype=dtype, generator=g).requires_grad_()
    B = torch.randn(o, r, dtype=dtype, generator=g).requires_grad_()
    xl = torch.randn(*shape, i, dtype=dtype, generator=g).requires_grad_(x_grad) if separate else None
    return x, W, b, A, B, xl


def reference(x, W, b, A, B, s, xl=None):
    return F.linear(x, W, b) + F.linear(F.linear(x if xl is None else xl, A), B) * s


def legal(fwd, bwd, separate):
    return not separate or not (FORWARD_PLANS[fwd].merged or BACKWARD_PLANS[bwd].merged)


# Merged plans need x_lora=None (see test_merged_plan_rejects_separate_input).
LEGAL = [(f, b, sep) for (f, b) in PAIRS for sep in (False, True) if legal(f, b, sep)]


@pytest.mark.parametrize("fwd,bwd,separate", LEGAL)
@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["xgrad", "nogradx"])
def test_opcheck(fwd, bwd, separate, shape, bias, x_grad):
    x, W, b, A, B, xl = make(shape, bias=bias, x_grad=x_grad, separate=separate)
    torch.library.opcheck(op.default, (x, W, b, A, B, 0.5, xl, None, fwd, bwd))


@pytest.mark.parametrize("bwd", list(BACKWARD_PLANS))
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)])
def test_opcheck_backward_op(bwd, needs):
    x, W, _, A, B, _ = make()
    gy = torch.randn(3, 5, 20, dtype=torch.float64)
    args = (gy, x.detach(), W, A.detach(), B.detach(), 0.5, None, None, bwd, list(needs))
    torch.library.opcheck(torch.ops.runlora.lora_linear_backward.default, args)


@pytest.mark.parametrize("fwd,bwd", PAIRS)
def test_gradcheck_float64(fwd, bwd):
    x, W, b, A, B, _ = make()
    assert torch.autograd.gradcheck(lambda x, A, B: op(x, W, b, A, B, 0.7, None, None, fwd, bwd), (x, A, B))


def test_gradcheck_separate_lora_input():
    x, W, b, A, B, xl = make(separate=True)
    assert torch.autograd.gradcheck(lambda x, xl, A, B: op(x, W, b, A, B, 0.7, xl), (x, xl, A, B))


@pytest.mark.parametrize("fwd,bwd", PAIRS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_matches_eager(fwd, bwd, dtype, tol):
    x, W, b, A, B, _ = make((4, 16), i=64, o=96, r=8, dtype=dtype)
    gy = torch.randn(4, 16, 96, dtype=dtype)
    ref = reference(x, W, b, A, B, 0.5)
    y = op(x, W, b, A, B, 0.5, None, None, fwd, bwd)
    for got, want in zip((y, *torch.autograd.grad(y, (x, A, B), gy)), (ref, *torch.autograd.grad(ref, (x, A, B), gy))):
        assert got.dtype == want.dtype
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < tol, f"{fwd}/{bwd} {dtype}: relative error {err:.2e} >= {tol}"


def test_fp32_adapters_on_bf16_base_reproduce_eager_dtype_flow():
    x, W, b, A, B, _ = make((4, 16), i=64, o=96, r=8, dtype=torch.bfloat16)
    A32, B32 = A.detach().float().requires_grad_(), B.detach().float().requires_grad_()
    y = op(x, W, b, A32, B32, 0.5, None, torch.float32)
    ref = F.linear(x, W, b) + F.linear(F.linear(x.to(torch.float32), A32), B32) * 0.5
    assert y.dtype == ref.dtype == torch.float32
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, A32, B32), gy)
    want = torch.autograd.grad(ref, (x, A32, B32), gy)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), i=st.integers(2, 40), o=st.integers(2, 40), r=st.integers(1, 8),
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
    fwd=st.sampled_from(list(FORWARD_PLANS)), bwd=st.sampled_from(list(BACKWARD_PLANS)),
)
def test_flops_expression_equals_flop_counter(n, i, o, r, needs, fwd, bwd):
    """The sympy FLOPs of each plan equal the mm/addmm FLOPs its implementation issues."""
    x, W, A, B, gy = torch.randn(n, i), torch.randn(o, i), torch.randn(r, i), torch.randn(o, r), torch.randn(n, o)
    fwd_flops = _count(lambda: FORWARD_PLANS[fwd].run(x, W, None, A, B, 0.5, None, None))
    bwd_flops = _count(lambda: BACKWARD_PLANS[bwd].run(gy, x, W, A, B, 0.5, None, None, Needs(*needs)))
    assert fwd_flops == FORWARD_PLANS[fwd].flops(n, i, o, r)
    assert bwd_flops == BACKWARD_PLANS[bwd].flops(n, i, o, r, Needs(*needs))


def test_flop_counter_sees_through_the_op():
    """FlopCounterMode on a rewritten model counts each op by its plan's formula."""
    x, W, b, A, B, _ = make((3, 5), dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        op(x, W, b, A, B, 0.5, None, None, "forward2", "backward5").sum().backward()
    assert counter.get_total_flops() == FORWARD_PLANS["forward2"].flops(15, 12, 20, 4) + BACKWARD_PLANS[
        "backward5"].flops(15, 12, 20, 4)


@pytest.mark.parametrize("fwd,bwd", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_inputs(fwd, bwd, dtype):
    r = 3
    x, W, b, A, B, _ = make((4, 6), i=10, o=14, r=r, dtype=dtype)
    if dtype == torch.bfloat16:  # peft's fp32 adapters on a bf16 base
        A, B, adapter, fwd, bwd = A.detach().float().requires_grad_(), B.detach().float().requires_grad_(), torch.float32, "forward1", "backward1"
    else:
        adapter = None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        op(x, W, b, A, B, 0.5, None, adapter, fwd, bwd)
    assert saved, "nothing saved"
    for t in saved:
        assert t.shape[-1] != r or t is A or t is B, f"saved a (..., r) tensor of shape {tuple(t.shape)}"
        if t.shape == x.shape:
            assert t.dtype == x.dtype, "saved a copy of x in another dtype"
    input_ptrs = {t.data_ptr() for t in (x, W, A, B)}
    assert all(t.data_ptr() in input_ptrs for t in saved), "saved a tensor that is not an input"


def test_trainable_weight_is_an_error():
    x, W, b, A, B, _ = make()
    with pytest.raises(RuntimeError, match="weight requires grad"):
        op(x, W.requires_grad_(), b, A, B, 0.5)


@pytest.mark.parametrize("change,match", [
    (dict(A=torch.randn(4, 11, dtype=torch.float64)), r"lora_A has shape \(4, 11\), expected \(r, 12\)"),
    (dict(B=torch.randn(19, 4, dtype=torch.float64)), r"lora_B has shape \(19, 4\), expected \(20, 4\)"),
    (dict(b=torch.randn(3, dtype=torch.float64)), r"bias has shape \(3,\), expected \(20,\)"),
    (dict(x=torch.randn(3, 5, 13, dtype=torch.float64)), r"x has shape \(3, 5, 13\), expected \(\.\.\., 12\)"),
    (dict(W=torch.randn(20, 12)), r"share a dtype"),
    (dict(fwd="forward9"), r"unknown forward plan 'forward9'"),
    (dict(bwd="backward1|10:nope"), r"unknown backward plan 'nope'"),
    (dict(bwd="backward1|x:backward5"), r"malformed plan"),
])
def test_bad_input_names_the_argument(change, match):
    x, W, b, A, B, _ = make()
    args = dict(x=x, W=W, b=b, A=A, B=B, fwd="forward1", bwd="backward1") | change
    with pytest.raises(ValueError, match=match):
        op(args["x"], args["W"], args["b"], args["A"], args["B"], 0.5, None, None, args["fwd"], args["bwd"])


def test_merged_plan_rejects_separate_input():
    x, W, b, A, B, xl = make(separate=True)
    with pytest.raises(ValueError, match="merges W \\+ sBA"):
        op(x, W, b, A, B, 0.5, xl, None, "forward2", "backward1")


def test_piecewise_plan_resolves_per_call():
    x, W, b, A, B, _ = make((40,), i=12, o=20, r=4)
    plan = "forward1|10:forward2"
    small = _count(lambda: op(x[:5], W, b, A, B, 0.5, None, None, plan, "backward1"))
    large = _count(lambda: op(x, W, b, A, B, 0.5, None, None, plan, "backward1"))
    assert small == FORWARD_PLANS["forward1"].flops(5, 12, 20, 4)
    assert large == FORWARD_PLANS["forward2"].flops(40, 12, 20, 4)


def test_zero_tokens_give_an_empty_result():
    x, W, b, A, B, _ = make((0,))
    y = op(x, W, b, A, B, 0.5)
    assert y.shape == (0, 20)
