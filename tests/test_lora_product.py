"""The choices bytes decide (``plans.CHAIN_RECORDS``): keep X_l·Aᵀ or recompute it, the LoRA
term accumulated by its GEMM, the scale on the small side.

Keeping forward1's X_l·Aᵀ (n×r) for dB is exact and removes a GEMM that re-reads X_l; it costs
n·r adapter elements held to the backward. The lowered chain keeps it where that is at most 1/8
of x's bytes (``choose/lora_product.py``); the opaque op always recomputes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import runlora_fx
from runlora_fx.choose.lora_product import keeps_lora_product, price_lora_product
from runlora_fx.choose.roofline import backward_kernels, Layout
from runlora_fx.passes.lower import lowered_lora_linear
from runlora_fx.plans import BACKWARD_PLANS, CHAIN_RECORDS, FORWARD_PLANS, Needs

from test_merged_memory import LoraLayer, compile_and_step, I, O, R, N


def test_rule_keeps_only_where_forward1_forms_it_and_db_reads_it():
    kw = dict(dtype=torch.float32)
    assert keeps_lora_product("forward1", "backward1", Needs(), 512, 512, 16, **kw).keep
    assert keeps_lora_product("forward1", "backward5", Needs(), 512, 512, 16, **kw).keep
    assert not keeps_lora_product("forward2", "backward1", Needs(), 512, 512, 16, **kw).keep  # no X·Aᵀ formed
    assert not keeps_lora_product("forward1", "backward4", Needs(), 512, 512, 16, **kw).keep  # dB through T
    assert not keeps_lora_product("forward1", "backward1", Needs(lora_B=False), 512, 512, 16, **kw).keep


def test_rule_prices_memory_against_x():
    # r·e_a <= i·e_x / 8 keeps: r = 64 at i = 512 fp32 is exactly 1/8; r = 65 is over.
    at_limit = keeps_lora_product("forward1", "backward1", Needs(), 100, 512, 64, dtype=torch.float32)
    over = keeps_lora_product("forward1", "backward1", Needs(), 100, 512, 65, dtype=torch.float32)
    assert at_limit.keep and at_limit.memory_bytes == 100 * 64 * 4
    assert not over.keep and "1/8" in over.reason
    # fp32 adapters on a bf16 x: the kept product is fp32, x is bf16 (r=16, i=256: 64 vs 512/8)
    assert keeps_lora_product("forward1", "backward1", Needs(), 8, 256, 16, dtype=torch.bfloat16,
                              adapter_dtype=torch.float32).keep
    assert not keeps_lora_product("forward1", "backward1", Needs(), 8, 256, 17, dtype=torch.bfloat16,
                                  adapter_dtype=torch.float32).keep
    assert keeps_lora_product("forward1", "backward1", Needs(), 100, 512, 65, dtype=torch.float32, policy=True).keep
    assert not keeps_lora_product("forward1", "backward1", Needs(), 8, 4096, 8, dtype=torch.float32,
                                  policy=False).keep


def test_price_matches_the_roofline_kernels():
    # What the record says keeping saves equals the difference of the two kernel lists.
    from runlora_fx.plans import e_a, e_x, e_y, i, o, r, n
    sizes = {i: 512, o: 768, r: 16, e_x: 4, e_a: 4, e_y: 4}
    price = price_lora_product(1000, 512, 16, dtype=torch.float32)

    def total(kernels, field):
        return sum(int(getattr(k, field).xreplace({**sizes, n: 1000})) for k in kernels)

    recompute = backward_kernels("backward1", Needs(), Layout())
    keep = backward_kernels("backward1", Needs(), Layout(), keeps_lora_product=True)
    assert total(recompute, "flops") - total(keep, "flops") == price["flops_saved"] == 2 * 1000 * 512 * 16
    # the record counts the recompute GEMM and the s·A pass; the kept chain pays an o×r ·s
    assert total(recompute, "bytes") - total(keep, "bytes") > 0.9 * price["bytes_saved"]
    assert len(recompute) == len(keep) + 2  # s·A and the recompute GEMM


def _saved_by_lowered(x, layer, **kw):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowered_lora_linear(x, layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0,
                                forward_plan="forward1", backward_plan="backward1", **kw)
    return y, shapes


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("policy", [None, False])
def test_lowered_chain_keeps_the_product_and_is_exact(dtype, tol, policy):
    torch.manual_seed(0)
    layer = LoraLayer(dtype)
    x = torch.randn(N, I, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    (layer(x_ref).float() ** 2).sum().backward()
    want = [x_ref.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    layer.zero_grad()

    y, saved = _saved_by_lowered(x, layer, save_lora_product=policy)
    (y.float() ** 2).sum().backward()
    assert ((N, R) in saved) == (policy is None), saved  # I=64, R=4: 16 B <= 256/8 B per token
    for got, ref in zip([x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad], want):
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            mats = args[-2:]
            self.calls.append((func.overloadpacket.__name__, tuple(mats[0].shape), tuple(mats[1].shape)))
        if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_, torch.ops.aten.add, torch.ops.aten.add_):
            kind = "mul" if "mul" in func.overloadpacket.__name__ else "add"
            self.calls.append((kind,) + tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backward", ["backward1", "backward5"])
def test_chains_scale_small_operands_and_accumulate_in_the_gemm(backward):
    # scale_on_small_side: no mul touches an n×o or n×i tensor; accumulate_in_gemm: no add of
    # two n×o or n×i tensors (the LoRA terms go through addmm's input).
    torch.manual_seed(0)
    layer = LoraLayer(torch.float32)
    x = torch.randn(N, I, requires_grad=True)
    w, b, a, bb = layer.base.weight, layer.base.bias, layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    mode = _MatmulShapes()
    with mode:  # the catalogue's chains, as the op and the lowering run them
        FORWARD_PLANS["forward1"].run(x.detach(), w, b, a, bb, 2.0, None, None)
        BACKWARD_PLANS[backward].run(torch.randn(N, O), x.detach(), w, a, bb, 2.0, None, None, Needs())
    big = {(N, O), (N, I)}
    muls = [c for c in mode.calls if c[0] == "mul"]
    adds = [c for c in mode.calls if c[0] == "add"]
    assert muls and not [c for c in muls if big & set(c[1:])], muls
    assert not [c for c in adds if set(c[1:]) <= big and len(c) > 2], adds
    assert ("addmm", (N, R), (R, O)) in mode.calls  # Y = addmm(X·Wᵀ + b, X·Aᵀ, s·Bᵀ)
    if backward == "backward1":
        assert ("addmm", (N, R), (R, I)) in mode.calls  # dX = addmm(dY·W, s·Z, A)


def test_records_save_bytes_and_name_what_takes_them():
    from runlora_fx.plans import e_a, e_x, e_y, i, o, r, n
    sizes = {n: 8192, i: 2048, o: 2048, r: 16, e_x: 2, e_a: 2, e_y: 2}
    for rec in CHAIN_RECORDS.values():
        assert int(rec.bytes_saved.xreplace(sizes)) > 0, rec.name
        assert rec.formula and rec.instead_of and rec.applies_to
    assert int(CHAIN_RECORDS["keep_lora_product"].memory_added.xreplace(sizes)) == 8192 * 16 * 2
    assert {p for p, plan in BACKWARD_PLANS.items() if plan.db == "xa"} == {"backward1", "backward5", "backward7",
                                                                           "backward8"}
    assert not FORWARD_PLANS["forward1"].merged


def test_backend_keeps_it_under_inductor_and_reports_it():
    torch.manual_seed(0)
    layer = LoraLayer(torch.float32)
    x = torch.randn(N, I, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref)
    (y_ref ** 2).sum().backward()
    want = [x_ref.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    layer.zero_grad()

    backend = runlora_fx.make_backend(forward_plan="forward1", backward_plan="backward1")
    y, saved = compile_and_step(layer, x, backend)

    site = backend.reports[0].sites[0]
    assert site.lora_product.startswith("kept") and site.lora_product_bytes == N * R * 4
    assert "x·Aᵀ kept for dB at 1 sites" in backend.reports[0].summary()
    assert (N, R) in saved, saved
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, ref in zip([x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad], want):
        torch.testing.assert_close(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_opaque_op_reports_no_kept_bytes_when_policy_is_false():
    layer = LoraLayer(torch.float32)
    backend = runlora_fx.make_backend(inner="eager", forward_plan="forward1", backward_plan="backward1",
                                      save_lora_product=False)
    torch.compile(layer, backend=backend)(torch.randn(N, I))
    site = backend.reports[0].sites[0]
    assert site.lora_product_bytes == 0 and "save_lora_product=False" in site.lora_product


@pytest.mark.parametrize("group_siblings", [False, True])
@pytest.mark.parametrize("save_lora_product", [None, False])
def test_siblings_keep_or_recompute_the_product(group_siblings, save_lora_product):
    # Two sites on one x, forward1/backward1, under inductor. Kept (default): each site's n×r
    # X·Aᵀ is saved (a group keeps its members' columns of XA_cat). Recomputed: the backward's
    # X·(s·A)ᵀ must not be folded by the joint graph's CSE into the forward's X·Aᵀ, which would
    # keep it anyway. Gradients match eager either way.
    torch.manual_seed(0)

    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = LoraLayer(torch.float32), LoraLayer(torch.float32)

        def forward(self, x):
            return self.q(x) + self.k(x)

    model = Siblings()
    x = torch.randn(N, I, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    (model(x_ref) ** 2).sum().backward()
    want = [x_ref.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    backend = runlora_fx.make_backend(forward_plan="forward1", backward_plan="backward1",
                                      group_siblings=group_siblings, save_lora_product=save_lora_product)
    _, saved = compile_and_step(model, x, backend)

    report = backend.reports[0]
    assert len(report.sites) == 2 and bool(report.groups()) == group_siblings
    products = [s for s in saved if s in ((N, R), (N, 2 * R))]
    if save_lora_product is False:
        assert saved and not products, saved
        assert [s.lora_product_bytes for s in report.sites] == [0, 0]
    else:
        assert products in ([(N, R)] * 2, [(N, 2 * R)]), saved
        assert [s.lora_product_bytes for s in report.sites] == [N * R * 4] * 2
    got = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("case", ["fp32 adapters on bf16", "dropout input"])
def test_kept_product_with_adapter_dtype_or_its_own_input(case):
    # The kept X_l·Aᵀ is the LoRA input's product in the adapter dtype: peft's fp32 adapters on
    # a bf16 base (X_l = cast(x)), or dropout's X_l (its own tensor, with its own gradient).
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case.startswith("fp32") else torch.float32
    w, b = torch.randn(O, I, dtype=dtype) * 0.1, torch.randn(O, dtype=dtype)
    a = (torch.randn(R, I) * 0.1).requires_grad_(True)
    bb = (torch.randn(O, R) * 0.1).requires_grad_(True)
    x = torch.randn(N, I, dtype=dtype, requires_grad=True)
    x_lora = torch.nn.functional.dropout(x, 0.1) if case == "dropout input" else None
    adapter = torch.float32 if case.startswith("fp32") else None

    def eager():
        xl = x if x_lora is None else x_lora
        return torch.nn.functional.linear(x, w, b) + 2.0 * torch.nn.functional.linear(
            torch.nn.functional.linear(xl.float(), a), bb)

    outs = []
    for run in (eager, lambda: _saved(lowered_lora_linear, x, w, b, a, bb, x_lora, adapter)):
        x.grad = a.grad = bb.grad = None
        got = run()
        y, saved = got if isinstance(got, tuple) else (got, None)
        (y.float() ** 2).sum().backward(retain_graph=True)
        outs.append((y.float(), x.grad.clone(), a.grad.clone(), bb.grad.clone(), saved))
    assert (N, R) in outs[1][4], outs[1][4]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, ref in zip(outs[1][:4], outs[0][:4]):
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)


def _saved(fn, x, w, b, a, bb, x_lora, adapter):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, w, b, a, bb, 2.0, x_lora, adapter, "forward1", "backward1")
    return y, shapes
