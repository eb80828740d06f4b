"""Autocast sites, run-time tensor scales (peft compiled hotswap) and no silent misses.

Tolerances (loss: relative error; grads: relative norm error per parameter), rewritten vs eager
under the same autocast: bf16 2e-2, fp16 5e-3 (the rewrite's chain rounds in another order
than eager's linear + mul + add; fp32 grads of fp32 params come through bf16/fp16 GEMMs).
fp32 sites (tensor scales): rtol 1e-4, atol 1e-6.
"""

import copy

import pytest
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx.passes.rewrite import rewrite

from test_pass import lm_inputs, lm_loss, peft_llama

LORA_OP = torch.ops.runlora.lora_linear.default
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _compare_one_step(model, dtype, *, backend_kwargs=None, expect_sites=14):
    """loss + every grad of the compiled model under autocast(cpu, dtype) vs eager under it."""
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(**(backend_kwargs or {"inner": "aot_eager"}))
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(0)
    ids = lm_inputs()
    with torch.autocast("cpu", dtype):
        loss = lm_loss(compiled, ids)
        ref_loss = lm_loss(ref, ids)
    loss.backward()
    ref_loss.backward()
    assert sum(r.rewritten for r in backend.reports) == expect_sites, [str(r) for r in backend.reports]
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys() and len(got) == 2 * expect_sites
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < TOL[dtype]
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32, k  # fp32 params get fp32 grads through the casts
        assert _rel(got[k], want[k]) < TOL[dtype], f"{k}: {_rel(got[k], want[k]):.2e}"
    return backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_peft_llama_every_site_rewritten(dtype):
    backend = _compare_one_step(peft_llama(), dtype)
    report = backend.reports[0]
    assert {s.dtype for s in report.sites} == {str(dtype).replace("torch.", "")}
    assert all(s.adapter_dtype is None for s in report.sites)  # the casts replace peft's fp32 branch
    assert not report.rejected


def test_autocast_bf16_base_with_peft_fp32_adapters():
    """A bf16 model whose peft adapters are fp32 (peft's default), under bf16 autocast: only the
    LoRA branch changes dtype (fp32 A, B cast to bf16 by autocast); every site is rewritten."""
    model = peft_llama(layers=1, dtype=torch.bfloat16)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(inner="aot_eager")
    ids = lm_inputs()
    with torch.autocast("cpu", torch.bfloat16):
        loss, ref_loss = lm_loss(torch.compile(model, backend=backend), ids), lm_loss(ref, ids)
    loss.backward()
    ref_loss.backward()
    assert backend.reports[0].rewritten == 7 and not backend.reports[0].rejected
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < TOL[torch.bfloat16]
    got, want = _grads(model), _grads(ref)
    assert len(want) == 14
    for k in want:
        assert got[k].dtype == torch.float32 and _rel(got[k], want[k]) < TOL[torch.bfloat16], k


class LoRALayer(nn.Module):
    """base(x) + s * B(A(x)); ``autocast`` wraps the forward in torch.autocast (Dynamo's markers);
    ``lora_fp32`` runs the LoRA branch with autocast disabled."""

    def __init__(self, i=64, o=96, r=4, scale=2.0, autocast=None, lora_fp32=False):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(i, o).requires_grad_(False)
        self.A = nn.Linear(i, r, bias=False)
        self.B = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.B.weight, std=0.1)
        self.scale, self.autocast, self.lora_fp32 = scale, autocast, lora_fp32

    def lora(self, x):
        if self.lora_fp32:
            with torch.autocast("cpu", enabled=False):
                return self.B(self.A(x.float())) * self.scale
        return self.B(self.A(x)) * self.scale

    def forward(self, x):
        if self.autocast is None:
            return self.base(x) + self.lora(x)
        with torch.autocast("cpu", self.autocast):
            return self.base(x) + self.lora(x)


def _graph_of(model, x):
    """The Dynamo graph of ``model(x)`` (fake values included), without running any pass."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab)(x)
    return graphs[0]


@pytest.mark.parametrize("lowering", ["aten", "opaque"])
def test_autocast_region_inside_the_compiled_code(lowering):
    """The lowered chain and the opaque op both see bf16 operands: autocast inside them casts nothing."""
    model = LoRALayer(autocast=torch.bfloat16)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 8, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    backend = runlora_fx.make_backend(inner="aot_eager", lowering=lowering)
    y = torch.compile(model, backend=backend)(x)
    y_ref = ref(xr)
    assert backend.reports[0].rewritten == 1 and backend.reports[0].sites[0].dtype == "bfloat16"
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert _rel(y, y_ref) < TOL[torch.bfloat16]
    (y.float() ** 2).sum().backward()
    (y_ref.float() ** 2).sum().backward()
    for got, want in ((x.grad, xr.grad), (model.A.weight.grad, ref.A.weight.grad),
                      (model.B.weight.grad, ref.B.weight.grad)):
        assert got.dtype == torch.float32 and _rel(got, want) < TOL[torch.bfloat16]


def test_autocast_rewrite_casts_explicitly_with_metadata():
    gm = _graph_of(nn.Sequential(LoRALayer(autocast=torch.bfloat16)), torch.randn(8, 64, requires_grad=True))
    report = rewrite(gm)
    assert report.rewritten == 1 and report.sites[0].path == "0"
    gm.graph.lint()
    (op,) = [n for n in gm.graph.nodes if n.target is LORA_OP]
    x, weight, bias, lora_a, lora_b = op.args[:5]
    for arg in (x, weight, bias, lora_a, lora_b):
        assert arg.target is torch.ops.aten.to.dtype and arg.args[1] is torch.bfloat16
        assert arg.meta["example_value"].dtype == torch.bfloat16
        assert "stack_trace" in arg.meta and "nn_module_stack" in arg.meta
    assert op.meta["example_value"].dtype == torch.bfloat16


def test_autocast_merged_plans_follow_the_compute_dtype():
    """fp32 parameters under bf16 autocast: the policy sees bf16, so no merged plan by default
    (FLOPs alone pick forward2 at n=512 > i*o/(i+o) = 38.4), and allow_merged=True allows it."""
    x = torch.randn(512, 64, requires_grad=True)
    report = rewrite(_graph_of(LoRALayer(autocast=torch.bfloat16), x))
    assert (report.sites[0].forward_plan, report.sites[0].backward_plan) == ("forward1", "backward1")
    report = rewrite(_graph_of(LoRALayer(autocast=torch.bfloat16), x), allow_merged=True)
    assert report.sites[0].forward_plan == "forward2"
    report = rewrite(_graph_of(LoRALayer(), x))  # the same layer in fp32: merged by default
    assert report.sites[0].forward_plan == "forward2"


def test_autocast_lora_branch_outside_autocast_is_rejected_with_reason():
    gm = _graph_of(LoRALayer(autocast=torch.bfloat16, lora_fp32=True), torch.randn(8, 64, requires_grad=True))
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    (rejection,) = report.rejected
    assert "lora_A's linear in torch.float32" in rejection.reason


def test_autocast_region_that_disagrees_with_the_values_is_rejected():
    """A site whose values say bf16 but whose region says fp16 is not autocast's: left alone."""
    gm = _graph_of(LoRALayer(autocast=torch.bfloat16), torch.randn(8, 64, requires_grad=True))
    (enter,) = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "_enter_autocast"]
    enter.args = (enter.args[0], torch.float16, *enter.args[2:])
    gm.recompile()
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    assert "autocast region here (graph) is torch.float16" in report.rejected[0].reason


def test_export_under_autocast_then_rewrite():
    model = LoRALayer()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        ep = torch.export.export(model, (x,))
    ep = runlora_fx.rewrite_exported_program(ep)
    assert ep.runlora_report.rewritten == 1 and ep.runlora_report.sites[0].dtype == "bfloat16"
    assert any(n.target is LORA_OP for n in ep.graph.nodes)
    xr = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        y_ref = ref(xr)
    y = ep.module()(x)  # the casts are explicit: the rewritten program computes in bf16 without autocast
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < TOL[torch.bfloat16]
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32 and _rel(x.grad, xr.grad) < TOL[torch.bfloat16]


# --- tensor scales ------------------------------------------------------------------------
def _hotswap_llama(seed=0, alpha=16):
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    torch.manual_seed(seed)
    model = peft_llama(lora_alpha=alpha)
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    return model


def test_peft_compiled_hotswap_every_site_rewritten_at_padded_rank():
    model = _hotswap_llama()
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(0)
    ids = lm_inputs()
    loss, ref_loss = lm_loss(compiled, ids), lm_loss(ref, ids)
    loss.backward()
    ref_loss.backward()
    report = backend.reports[0]
    assert report.rewritten == 14 and not report.rejected
    assert {s.r for s in report.sites} == {16}  # priced at the padded rank
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys() and len(got) == 28
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_hotswap_in_place_after_compile_needs_no_recompile():
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    model = _hotswap_llama()
    backend = runlora_fx.make_backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    ids = lm_inputs()
    with torch.no_grad():
        before = compiled(input_ids=ids).logits
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    other = peft_llama(lora_alpha=64)  # another adapter: other weights, rank 8, scale 64/8
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_A" in name:
                p.normal_(std=0.2)
    new = {k: v for k, v in other.state_dict().items() if "lora_" in k}  # keys as peft loads them: ...lora_A.default.weight
    hotswap_adapter_from_state_dict(model, new, "default", other.peft_config["default"])
    scale = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert torch.is_tensor(scale) and scale.item() == 8.0
    with torch.no_grad():
        after = compiled(input_ids=ids).logits
        want = other(input_ids=ids).logits
    assert len(backend.reports) == 1 and torch._dynamo.utils.counters["frames"]["ok"] == frames  # no recompile
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)


class ParamScale(nn.Module):
    """A user's trainable 0-d scale, once after B and once between A and B."""

    def __init__(self, between=False):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(32, 48).requires_grad_(False)
        self.A = nn.Linear(32, 4, bias=False)
        self.B = nn.Linear(4, 48, bias=True)  # a lora_B bias is scaled too
        self.s = nn.Parameter(torch.tensor(0.7))
        self.between = between

    def forward(self, x):
        if self.between:
            return self.base(x) + self.B(self.A(x) * self.s)
        return self.base(x) + self.s * self.B(self.A(x))


@pytest.mark.parametrize("between", [False, True])
def test_trainable_tensor_scale_is_a_runtime_argument_with_its_grad(between):
    if between:  # B's bias is not scaled when s sits between A and B: not a LoRA product with a bias
        model = ParamScale(between)
        model.B.bias = None
    else:
        model = ParamScale(between)
    ref = copy.deepcopy(model)
    x = torch.randn(6, 32, requires_grad=True)
    backend = runlora_fx.make_backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    y = compiled(x)
    assert backend.reports[0].rewritten == 1
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-6)
    (y ** 2).sum().backward()
    want = {k: p.grad for k, p in ((k, p) for k, p in model.named_parameters() if p.requires_grad)}
    model.zero_grad()
    (y_ref ** 2).sum().backward()
    for k, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(want[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    with torch.no_grad():
        model.s.fill_(-1.5)
        ref.s.fill_(-1.5)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-6)  # read at run time
    assert len(backend.reports) == 1


def test_tensor_scale_is_folded_into_lora_b_not_baked():
    gm = _graph_of(ParamScale(), torch.randn(6, 32))
    assert rewrite(gm).rewritten == 1
    (op,) = [n for n in gm.graph.nodes if n.target is LORA_OP]
    assert op.args[5] == 1.0
    lora_b = op.args[4]
    assert lora_b.target is torch.ops.aten.mul.Tensor and lora_b.args[1].op == "placeholder"
    assert "example_value" in lora_b.meta and "stack_trace" in lora_b.meta


# --- no silent misses -----------------------------------------------------------------------
class Unadded(nn.Module):
    """Two LoRA-shaped products: one returned as is, one multiplied by a vector (not a scalar);
    and a chain whose inner dim is not small."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(64, 64).requires_grad_(False)
        self.A = nn.Linear(64, 4, bias=False)
        self.B = nn.Linear(4, 64, bias=False)
        self.A2 = nn.Linear(64, 4, bias=False)
        self.B2 = nn.Linear(4, 64, bias=False)
        self.gate = nn.Parameter(torch.randn(64))
        self.wide1 = nn.Linear(64, 48, bias=False)  # inner dim 48: not LoRA-shaped
        self.wide2 = nn.Linear(48, 64, bias=False)

    def forward(self, x):
        return (self.B(self.A(x)), self.base(x) + self.B2(self.A2(x)) * self.gate,
                self.wide2(self.wide1(x)))


def test_lora_shaped_products_left_alone_are_reported():
    gm = _graph_of(Unadded(), torch.randn(8, 64))
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    reasons = sorted(r.reason for r in report.rejected)
    shaped = [r for r in reasons if r.startswith("LoRA-shaped product")]
    assert len(shaped) == 2, reasons
    assert any("returned as is" in r for r in shaped)
    assert any("multiplied by" in r and "(64,)" in r for r in shaped)
    assert len(reasons) == 2  # the wide chain (inner dim 48 of 64) is not LoRA-shaped
    assert "rewrote 0 of 2 LoRA-shaped sites" in report.summary()


def test_lora_shaped_product_with_two_users_is_reported_once():
    class TwoUsers(LoRALayer):
        def forward(self, x):
            lora = self.B(self.A(x))
            return self.base(x) + lora * 2.0, lora

    class TwoUsersNoAdd(LoRALayer):
        def forward(self, x):
            lora = self.B(self.A(x))
            return lora * 2.0, lora.tanh()

    gm = _graph_of(TwoUsers(), torch.randn(8, 64))
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    assert [r.reason for r in report.rejected] == ["intermediate lora has a user outside the LoRA subgraph"]
    gm = _graph_of(TwoUsersNoAdd(), torch.randn(8, 64))
    (rejection,) = rewrite(gm).rejected
    assert "has 2 users" in rejection.reason and rejection.reason.startswith("LoRA-shaped product")


class DoraLike(nn.Module):
    """peft's DoRA forward, hand-written: the weight norm reads B·A through an identity matrix."""

    def __init__(self, i=64, o=96, r=4, scale=2.0):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(i, o, bias=False).requires_grad_(False)
        self.A = nn.Linear(i, r, bias=False)
        self.B = nn.Linear(r, o, bias=False)
        self.magnitude = nn.Parameter(self.base.weight.norm(dim=1))
        self.scale = scale

    def forward(self, x):
        base = self.base(x)
        lora_weight = self.B(self.A(torch.eye(self.A.in_features))).T
        weight_norm = (self.base.weight + self.scale * lora_weight).norm(dim=1).detach()
        mag_norm_scale = (self.magnitude / weight_norm).view(1, -1)
        return (mag_norm_scale - 1) * base + mag_norm_scale * self.B(self.A(x)) * self.scale


def test_unmatched_dora_product_is_reported_once():
    """Were no matcher to read DoRA, the scan alone names the layer, once: the identity product
    B·A of its weight norm is not a layer on activations and is not counted."""
    from runlora_fx.passes.match import find_unmatched_products

    gm = _graph_of(nn.Sequential(DoraLike()), torch.randn(8, 64))
    (found,) = find_unmatched_products(gm.graph, [], [])
    assert found.path == "0.B" and "r=4, 64 -> 96" in found.reason
    assert "multiplied by mag_norm_scale" in found.reason and "(1, 96)" in found.reason


def test_export_of_a_model_that_enters_autocast():
    """torch.export writes the region as wrap_with_autocast(..., body, ...): the site in its body
    is rewritten with the same casts, and the program still trains like the eager model."""
    model = LoRALayer(autocast=torch.bfloat16)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 64, requires_grad=True)
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (x,)))
    assert ep.runlora_report.rewritten == 1 and ep.runlora_report.sites[0].dtype == "bfloat16"
    body = [m for m in ep.graph_module.modules() if m is not ep.graph_module and isinstance(m, torch.fx.GraphModule)]
    assert any(n.target is LORA_OP for m in body for n in m.graph.nodes)
    xr = x.detach().clone().requires_grad_(True)
    y, y_ref = ep.module()(x), ref(xr)
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < TOL[torch.bfloat16]
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32 and _rel(x.grad, xr.grad) < TOL[torch.bfloat16]
