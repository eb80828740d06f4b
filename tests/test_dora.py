"""DoRA: peft ``use_dora=True`` and torchtune-style ``DoRALinear`` rewritten into runlora.dora_linear.

Tolerances: fp32 rtol 1e-4 / atol 1e-6 (the rewrite reassociates g ⊙ (XWᵀ + s·XAᵀBᵀ) and computes
the norms by another chain); bf16 relative norm error 2e-2 (a bf16 ulp is 7.8e-3, and eager peft
rounds its norms to bf16 where the op keeps fp32). Dropout is compared with the same seed: under
aot_eager the compiled graph draws its masks from the same generator in the same order.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import runlora_fx
from runlora_fx.ops import dora as dora_ops
from runlora_fx.plans.dora import NORM_PLANS

from test_pass import LMLogits, TARGETS, assert_same_lora_grads, assert_same_training, lm_inputs, lm_loss, tiny_llama

DORA_OP = torch.ops.runlora.dora_linear.default


def peft_dora_llama(layers=2, dtype=torch.float32, base=None, **lora):
    """peft DoRA on all 7 projections of ``base`` (default: a tiny Llama), B and m perturbed."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers, dtype) if base is None else base
    model = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS, use_dora=True, **lora),
                           autocast_adapter_dtype=False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: make the LoRA branch (and the norm) matter
            nn.init.normal_(p, std=0.05)
        if "lora_magnitude_vector" in name:
            with torch.no_grad():
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model


class DoRALinear(nn.Module):
    """torchtune.modules.peft.DoRALinear, its forward copied by hand (torchtune is not installed)."""

    def __init__(self, in_dim, out_dim, rank, alpha, dropout=0.0, use_bias=False):
        super().__init__()
        self.scaling = alpha / rank
        self.use_bias = use_bias
        linear = nn.Linear(in_dim, out_dim, bias=use_bias)
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if use_bias else None
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.empty(out_dim))
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_b.weight, std=0.05)
        with torch.no_grad():
            self.magnitude.copy_(self._get_weight_norm(self.weight, self.lora_b.weight @ self.lora_a.weight) * 1.1)

    def _get_weight_norm(self, weight, lora_weight):
        weight = weight + self.scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def forward(self, x):
        base_out = F.linear(x, self.weight, self.bias)
        x = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x))
        x_eye = torch.eye(self.lora_a.weight.shape[1], device=self.lora_a.weight.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(x_eye)).T
        magnitude = self.magnitude
        weight = self.weight.to(x.dtype)
        weight_norm = self._get_weight_norm(weight, lora_weight.detach())
        weight_norm = weight_norm.detach()
        mag_norm_scale = (magnitude / weight_norm).view(1, -1)
        dora_out = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return dora_out + base_out


class TwoDoRA(nn.Module):
    def __init__(self, dropout=0.0, use_bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.up = DoRALinear(32, 48, 4, 8, dropout, use_bias)
        self.down = DoRALinear(48, 32, 4, 8, dropout, use_bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def mlp_inputs():
    return torch.randn(2, 10, 32, requires_grad=True)


def mlp_loss(model, x):
    return model(x).square().mean()


def _magnitudes(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if "magnitude" in k}


def _moved(before, model):
    """Names of the magnitude vectors the SGD steps changed (their gradients were compared too)."""
    after = dict(model.named_parameters())
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


# --- peft --------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout, layers", [(0.0, 2), (0.1, 1)], ids=["nodrop", "drop0.1"])
def test_peft_dora_llama_every_site_rewritten_and_training_matches(dropout, layers):
    model = peft_dora_llama(layers, lora_dropout=dropout)
    before = _magnitudes(model)
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=7 * layers, steps=1)
    sites = backend.reports[0].sites
    assert all(s.kind == "dora" and s.norm_plan in NORM_PLANS and s.dora_form == "peft" for s in sites)
    assert all(s.separate_lora_input == (dropout > 0) for s in sites)
    assert len(_moved(before, model)) == 7 * layers
    assert not backend.reports[0].rejected, backend.reports[0].rejected


def test_peft_dora_llama_bf16():
    model = peft_dora_llama(layers=1, dtype=torch.bfloat16)
    assert_same_training(model, lm_inputs, lm_loss, expect_sites=7, steps=1, dtype_tol=2e-2)


def peft_dora_mlp(**lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], use_dora=True, **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_peft_dora_opaque_op(dropout):
    """lowering="opaque": the custom op itself (its register_autograd backward) trains like eager."""
    backend = assert_same_training(peft_dora_mlp(lora_dropout=dropout), mlp_inputs, mlp_loss, expect_sites=2,
                                   steps=2, backend_kwargs={"inner": "aot_eager", "lowering": "opaque"})
    assert all(s.separate_lora_input == (dropout > 0) for s in backend.reports[0].sites)


def test_peft_dora_with_bias_and_each_forced_norm_plan():
    for plan in ("forward1", "forward2"):
        model = peft_dora_mlp()
        backend = assert_same_training(model, mlp_inputs, mlp_loss, expect_sites=2, steps=2,
                                       backend_kwargs={"inner": "aot_eager", "forward_plan": plan})
        norms = {s.norm_plan for s in backend.reports[0].sites}
        assert {s.forward_plan for s in backend.reports[0].sites} == {plan}
        # forward2 forms W + sBA anyway, so the norm reads it; forward1 never forms it
        assert norms == ({"norm_merged"} if plan == "forward2" else {"norm_lowrank"}), norms


# --- torchtune ---------------------------------------------------------------------------
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_torchtune_dora_rewritten_and_training_matches(dropout, use_bias):
    model = TwoDoRA(dropout, use_bias)
    before = _magnitudes(model)
    backend = assert_same_training(model, mlp_inputs, mlp_loss, expect_sites=2, steps=3)
    sites = backend.reports[0].sites
    assert {s.dora_form for s in sites} == {"torchtune" if use_bias or dropout else "peft"}
    assert _moved(before, model) == {"up.magnitude", "down.magnitude"}


def test_rewritten_graph_contract():
    """graph.lint passes; the op and its getitem carry example_value, stack_trace, nn_module_stack;
    no identity matrix and no norm is left."""
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    model = TwoDoRA()
    torch.compile(model, backend=capture)(mlp_inputs())
    gm = captured[0]
    report = runlora_fx.rewrite(gm)
    gm.graph.lint()
    ops = [n for n in gm.graph.nodes if n.target is DORA_OP]
    assert len(ops) == report.rewritten == 2
    for op in ops:
        (getitem,) = op.users
        for node in (op, getitem):
            assert "example_value" in node.meta and node.meta.get("stack_trace") and node.meta.get("nn_module_stack")
    assert not [n for n in gm.graph.nodes if n.target in (torch.eye, torch._C._linalg.linalg_norm)]


# --- torch.export ------------------------------------------------------------------------
def _training_grads(module, x):
    x = x.detach().requires_grad_(True)
    loss = module(x).square().mean()
    params = [p for p in module.parameters() if p.requires_grad]
    return [loss, *torch.autograd.grad(loss, [*params, x])]


_EXPORTED = {"torchtune": lambda: TwoDoRA(use_bias=False), "torchtune_bias": lambda: TwoDoRA(use_bias=True),
             "peft": lambda: peft_dora_mlp(),
             # dropout 0.1: the program draws its masks in eager's order, so seeded runs agree
             "torchtune_bias_drop": lambda: TwoDoRA(dropout=0.1, use_bias=True),
             "peft_drop": lambda: peft_dora_mlp(lora_dropout=0.1)}


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "decomposed"])
@pytest.mark.parametrize("form", sorted(_EXPORTED))
def test_export_rewrite_save_load_round_trip(form, decompose):
    # Decomposed (run_decompositions()): linear is view/permute/addmm, torch.eye an
    # arange == arange chain, detach an alias. Every DoRA layer is still found and trains as eager.
    model = _EXPORTED[form]()
    x = mlp_inputs()
    ep = torch.export.export(model, (x,))
    if decompose:
        ep = ep.run_decompositions()
    runlora_fx.rewrite_exported_program(ep)
    assert ep.runlora_report.rewritten == 2, str(ep.runlora_report)
    assert all(s.kind == "dora" for s in ep.runlora_report.sites) and not ep.runlora_report.rejected
    assert [s.separate_lora_input for s in ep.runlora_report.sites] == [form.endswith("drop")] * 2
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = runlora_fx.load(buf)
    assert sum(n.target is DORA_OP for n in loaded.graph.nodes) == 2
    torch.manual_seed(7)
    got = _training_grads(loaded.module(), x)
    torch.manual_seed(7)
    want = _training_grads(model, x)
    assert len(got) == len(want) == 8  # loss, A, B, m of both layers, x
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_export_peft_dora():
    model = peft_dora_mlp()
    x = mlp_inputs()
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (x,)))
    assert ep.runlora_report.rewritten == 2, str(ep.runlora_report)
    for g, w in zip(_training_grads(ep.module(), x), _training_grads(model, x)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_decomposed_export_peft_dora_llama():
    model = LMLogits(peft_dora_llama(layers=1))
    ids = lm_inputs()
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (ids,)).run_decompositions())
    report = ep.runlora_report
    assert report.rewritten == 7 and {s.kind for s in report.sites} == {"dora"}, str(report)
    torch.testing.assert_close(ep.module()(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert_same_lora_grads(ep.module(), model, ids, expect=21)  # A, B, m of 7 layers


# --- the op and its norm plans -----------------------------------------------------------
def _reference(x, W, b, A, B, m, s, x_lora, form):
    c = torch.linalg.norm(W + s * (B @ A).detach(), dim=1).detach()
    g = (m / c).view(1, -1)
    xl = x if x_lora is None else x_lora
    base = F.linear(x, W, b)
    lora = F.linear(F.linear(xl, A), B) * s
    if form == "torchtune":
        return (g - 1) * base + g * lora + base
    term = F.linear(x_lora, W) if x_lora is not None else (base if b is None else base - b)
    return base + (g - 1) * term + g * lora


@pytest.mark.parametrize("form", ["peft", "torchtune"])
@pytest.mark.parametrize("separate", [False, True], ids=["x", "x_lora"])
def test_op_every_plan_matches_reference(form, separate):
    torch.manual_seed(0)
    W, b = torch.randn(24, 16), torch.randn(24)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    m = torch.rand(24, requires_grad=True)
    x = torch.randn(2, 6, 16, requires_grad=True)
    x_lora = x * torch.bernoulli(torch.full_like(x, 0.7)) / 0.7 if separate else None
    want_y = _reference(x, W, b, A, B, m, 2.0, x_lora, form)
    gy = torch.randn_like(want_y)
    want = torch.autograd.grad(want_y, (x, A, B, m), gy, retain_graph=True)
    merged_ok = not (separate and form == "torchtune")
    for norm in NORM_PLANS:
        for fwd in ("forward1", "forward2") if merged_ok else ("forward1",):
            for bwd in ("backward1", "backward4", "backward5") if merged_ok else ("backward1",):
                y = DORA_OP(x, W, b, A, B, m, 2.0, x_lora, form, norm, fwd, bwd)[0]
                got = torch.autograd.grad(y, (x, A, B, m), gy, retain_graph=True)
                torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"{norm} {fwd} {bwd}")


def test_lowrank_norm_cache_keyed_on_weight_version():
    dora_ops.clear_row_norm_cache()
    torch.manual_seed(0)
    W = torch.randn(24, 16)
    A, B, m = torch.randn(4, 16), torch.randn(24, 4), torch.rand(24)
    x = torch.randn(5, 16)
    y1 = DORA_OP(x, W, None, A, B, m, 2.0, None, "peft", "norm_lowrank", "forward1", "backward1")[2]
    y2 = DORA_OP(x, W, None, A, B, m, 2.0, None, "peft", "norm_lowrank", "forward1", "backward1")[2]
    assert dora_ops.row_norm_cache_info()["hits"] == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        W.mul_(2.0)  # an in-place change bumps W._version: the cache must not serve the old norms
    c = DORA_OP(x, W, None, A, B, m, 2.0, None, "peft", "norm_lowrank", "forward1", "backward1")[2]
    torch.testing.assert_close(c, torch.linalg.norm(W + 2.0 * B @ A, dim=1))
    assert dora_ops.row_norm_cache_info()["misses"] == 2


# --- legality ----------------------------------------------------------------------------
def test_trainable_base_weight_is_left_alone_with_reason():
    model = TwoDoRA()
    model.up.weight.requires_grad_(True)
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(inner="aot_eager")
    x = mlp_inputs()
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), ref(x))
    report = backend.reports[0]
    assert report.rewritten == 1
    assert any("requires grad" in r.reason and r.path.startswith("up") for r in report.rejected), report.rejected


def _fp32_adapters_on_bf16_llama(**lora):
    """peft's default on a bf16 model: adapters and magnitudes in fp32 (autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(1, torch.bfloat16), LoraConfig(r=8, target_modules=TARGETS, use_dora=True,
                                                                      **lora))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


def test_peft_fp32_adapters_on_bf16_base():
    """The base GEMM and dY·W in bf16, the LoRA chain, norms, g and the output in fp32 (then cast
    back by the graph), as eager peft promotes: every site rewritten, grads (fp32) within bf16's
    tolerance of eager's."""
    model = _fp32_adapters_on_bf16_llama()
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=7, steps=2, dtype_tol=2e-2)
    sites = backend.reports[0].sites
    assert [(s.dtype, s.adapter_dtype, s.forward_plan) for s in sites] == [("bfloat16", "float32", "forward1")] * 7


def test_opcheck_fp32_adapters_on_bf16_base_and_the_op_refuses_other_mixes():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    W, b = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    m = (torch.rand(48) + 0.5).requires_grad_()
    for norm in NORM_PLANS:
        args = (x, W, b, A, B, m, 2.0, None, "peft", norm, "forward1", "backward1", torch.float32)
        torch.library.opcheck(DORA_OP, args)
        assert [t.dtype for t in DORA_OP(*args)] == [torch.float32] * 3
    with pytest.raises(ValueError, match="merges W"):
        DORA_OP(x, W, b, A, B, m, 2.0, None, "peft", "norm_lowrank", "forward2", "backward1", torch.float32)
    with pytest.raises(ValueError, match="must share a dtype"):
        DORA_OP(x, W, b, A, B, m, 2.0, None, "peft", "norm_lowrank", "forward1", "backward1")


def test_mixed_dtypes_with_dropout_left_alone_with_reason():
    """fp32 adapters on a bf16 base with dropout (peft's second base GEMM then runs in fp32 on a
    cast W): not rewritten, and the report says why."""
    model = _fp32_adapters_on_bf16_llama(lora_dropout=0.1)
    backend = runlora_fx.make_backend(inner="aot_eager")
    ids = lm_inputs()
    torch.manual_seed(0)
    got = lm_loss(torch.compile(model, backend=backend), ids)
    torch.manual_seed(0)
    torch.testing.assert_close(got, lm_loss(model, ids))
    report = backend.reports[0]
    assert report.rewritten == 0
    reasons = [r.reason for r in report.rejected if "lora_magnitude_vector" in r.path]
    assert len(reasons) == 7 and all("mixed" in r for r in reasons), report.rejected


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_peft_dora_on_gpt2_conv1d(dropout):
    """GPT-2's Conv1D holds W as in×out (peft's fan_in_fan_out): the norm reads Wᵀ, which peft
    wraps in a new nn.Parameter (a graph break, polyfilled); every site is rewritten."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=101, n_positions=32)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                            fan_in_fan_out=True, use_dora=True, lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=4, steps=2)
    assert all(s.kind == "dora" for s in backend.reports[0].sites) and not backend.reports[0].rejected


def test_dora_under_autocast_left_alone_with_reason():
    """Under autocast peft's BA, base and LoRA linears compute in bf16 while the norm and the
    scale stay fp32: not rewritten, the output is eager's, and each layer says why."""
    model = peft_dora_llama(layers=1)
    backend = runlora_fx.make_backend(inner="aot_eager")
    ids = lm_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = lm_loss(torch.compile(model, backend=backend), ids), lm_loss(model, ids)
    torch.testing.assert_close(got, want)
    report = backend.reports[0]
    assert report.rewritten == 0
    dora_reasons = [r.reason for r in report.rejected if "lora_magnitude_vector" in r.path]
    assert len(dora_reasons) == 7 and all("mixed-dtype DoRA" in r for r in dora_reasons), report.rejected


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_peft_dora_under_gradient_checkpointing(reentrant):
    """peft's DoRA layer clears its cache on every forward, which Dynamo refuses inside a
    checkpointed region; with runlora_fx's replacement (it clears only a non-empty cache) the
    checkpointed bodies trace whole and every site is rewritten. The default use_cache: its
    warning inside the checkpointed frame is made traceable (``passes/upstream.py``)."""
    model = peft_dora_llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, steps=1)
    assert all(s.kind == "dora" for r in backend.reports for s in r.sites)


# --- the cost model ----------------------------------------------------------------------
def test_choose_dora_norm_follows_the_forward_plan():
    """forward2 forms W + sBA anyway, so its norm costs only the o×i reduction; without a merged
    forward the low-rank identity (no o×i temporary) is cheaper than forming W + sBA."""
    from runlora_fx.choose.dora import choose_dora
    from runlora_fx.choose.select import SiteFacts
    from runlora_fx.options import RewriteOptions

    big = choose_dora(SiteFacts(4096, 512, 1408, 16), RewriteOptions())
    assert (str(big.forward), big.norm) == ("forward2", "norm_merged")
    # At n < i·o/(i+o) plain LoRA keeps forward1, but every DoRA norm pays ~2·o·r·i anyway
    # (BA or W·Aᵀ), so forming W + sBA once for both is cheaper: the choice is joint.
    small = choose_dora(SiteFacts(64, 512, 1408, 16), RewriteOptions())
    assert str(small.plans.forward) == "forward2" and small.norm == "norm_merged"
    assert str(choose_dora(SiteFacts(64, 512, 1408, 16), RewriteOptions(forward_plan="forward1")).forward) == "forward1"
    no_merge = choose_dora(SiteFacts(4096, 512, 1408, 16, allow_merged=False), RewriteOptions())
    assert (str(no_merge.forward), no_merge.norm) == ("forward1", "norm_lowrank")
    costs = {k: int(v) for k, v in no_merge.pair_costs.items()}
    assert costs["forward1/norm_lowrank"] < costs["forward1/norm_merged"]


def test_explain_lists_dora_sites_and_nothing_else():
    model = peft_dora_mlp(lora_dropout=0.1)
    report = runlora_fx.explain(model, mlp_inputs())
    assert [s.kind for s in report.sites] == ["dora", "dora"] and not report.rejected, str(report)
    assert "norm_" in str(report) and "(DoRA)" in str(report)


def test_compiled_steps_compute_weight_norms_once():
    """Under torch.compile (lowered, norm_lowrank) ‖W‖²_row is computed on the first step only."""
    model = TwoDoRA()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager", forward_plan="forward1"))
    dora_ops.clear_row_norm_cache()
    for _ in range(3):
        compiled(mlp_inputs()).sum().backward()
    assert dora_ops.row_norm_cache_info() == {"hits": 4, "misses": 2, "entries": 2}
