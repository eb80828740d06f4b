"""DoRA on 4-bit bases (QDoRA): peft ``use_dora=True`` on bitsandbytes ``Linear4bit`` and
torchtune-style DoRA on a torchao NF4Tensor, rewritten into runlora.dora_linear_4bit (or its
lowered NF4 form).

Tolerances: fp32 rtol 1e-4 / atol 1e-6, the dense DoRA ones (the op dequantizes W exactly as its
library does, so only the DoRA reassociation differs); bf16 relative norm error 2e-2.
"""

import copy

import pytest
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx.ops import dora as dora_ops

bnb = pytest.importorskip("bitsandbytes", reason="QDoRA tests need bitsandbytes (in the test extra)")

from test_dora import mlp_loss, peft_dora_llama  # noqa: E402
from test_pass import TARGETS, assert_same_training, lm_inputs, lm_loss, tiny_llama  # noqa: E402
from test_qlora import LMLoss, _assert_trains_like_eager, _saved_bytes, quantize_linears  # noqa: E402

OP = torch.ops.runlora.dora_linear_4bit.default


def qdora_llama(quant_type="nf4", double_quant=True, layers=1, dtype=torch.float32, **lora):
    base = quantize_linears(tiny_llama(layers, dtype), quant_type, double_quant)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype
    return peft_dora_llama(base=base, **lora)


def bnb_dora_mlp(bias=True, double_quant=True, dropout=0.0):
    """One peft DoRA layer on a bitsandbytes Linear4bit with a bias (peft's base − bias form)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(32, 48, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)._quantize("cpu")
    if bias:
        layer.bias.requires_grad_(False)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=4, target_modules=["0"], use_dora=True,
                                                            lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def mlp_inputs():
    return torch.randn(2, 10, 32, requires_grad=True)


# --- peft on bitsandbytes ----------------------------------------------------------------
@pytest.mark.parametrize("quant_type,double_quant,dropout", [("nf4", True, 0.0), ("fp4", False, 0.1)],
                         ids=["nf4-dq-nodrop", "fp4-nodq-drop0.1"])
def test_peft_dora_on_bnb_llama_every_site_rewritten_and_training_matches(quant_type, double_quant, dropout):
    model = qdora_llama(quant_type, double_quant, lora_dropout=dropout)
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=7, steps=2)
    report = backend.reports[0]
    assert all(s.kind == "dora" and s.base_format == f"bnb_{quant_type}" for s in report.sites), str(report)
    assert all(s.separate_lora_input == (dropout > 0) for s in report.sites)
    assert not report.rejected, report.rejected


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("backend_kwargs", [dict(inner="aot_eager"), dict(inner="aot_eager", lowering="opaque"),
                                            dict(inner="inductor")], ids=["lowered", "opaque", "inductor"])
def test_peft_dora_on_bnb_with_bias(double_quant, backend_kwargs):
    assert_same_training(bnb_dora_mlp(double_quant=double_quant), mlp_inputs, mlp_loss, expect_sites=1, steps=2,
                         backend_kwargs=backend_kwargs)


def test_peft_dora_on_bnb_bf16():
    model = qdora_llama(dtype=torch.bfloat16)
    assert_same_training(model, lm_inputs, lm_loss, expect_sites=7, steps=1, dtype_tol=2e-2)


def test_peft_dora_on_bnb_with_fp32_adapters_on_bf16_compute():
    """peft's default: fp32 adapters and magnitudes on a bf16 4-bit base (the usual QDoRA)."""
    from peft import LoraConfig, get_peft_model

    base = quantize_linears(tiny_llama(1, torch.bfloat16), "nf4", True)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
    model = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS, use_dora=True))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=7, steps=2, dtype_tol=2e-2)
    sites = backend.reports[0].sites
    assert [(s.dtype, s.adapter_dtype, s.base_format) for s in sites] == [("bfloat16", "float32", "bnb_nf4")] * 7


def test_peft_dora_on_bnb_left_to_the_library_when_asked():
    model = bnb_dora_mlp()
    backend = runlora_fx.make_backend(inner="aot_eager", rewrite_4bit=False)
    x = mlp_inputs()
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    report = backend.reports[0]
    assert report.rewritten == 0
    assert [r.reason for r in report.rejected] == ["rewrite_4bit=False"], report.rejected


# --- torchtune-style DoRA on a torchao NF4Tensor -----------------------------------------
class NF4DoRALinear(nn.Module):
    """torchtune.modules.peft.DoRALinear(quantize_base=True), its forward copied by hand."""

    def __init__(self, in_dim, out_dim, rank, alpha, dropout=0.0, use_bias=False):
        super().__init__()
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        self.scaling = alpha / rank
        self.use_bias = use_bias
        self.weight = nn.Parameter(to_nf4(torch.randn(out_dim, in_dim) / in_dim**0.5), requires_grad=False)
        self.bias = nn.Parameter(0.1 * torch.randn(out_dim), requires_grad=False) if use_bias else None
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.05)
        self.magnitude = nn.Parameter(torch.rand(out_dim) + 0.5)

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        base_out = linear_nf4(input=x, weight=self.weight)
        if self.use_bias:
            base_out = base_out + self.bias
        x = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x))
        x_eye = torch.eye(self.lora_a.weight.shape[1], device=self.lora_a.weight.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(x_eye)).T
        weight = self.weight.to(x.dtype)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).to(weight.dtype)
        mag_norm_scale = (self.magnitude / weight_norm.detach()).view(1, -1)
        dora_out = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return dora_out + base_out


def nf4_dora_model(dropout=0.0, use_bias=False):
    pytest.importorskip("torchao", reason="the torchtune-style QDoRA tests need torchao (in the test extra)")
    torch.manual_seed(0)
    return nn.Sequential(NF4DoRALinear(256, 512, 8, 16, dropout, use_bias), nn.GELU(),
                         NF4DoRALinear(512, 256, 8, 16, dropout, use_bias))


def nf4_inputs():
    return torch.randn(2, 6, 256, requires_grad=True)


@pytest.mark.parametrize("dropout,use_bias", [(0.0, False), (0.1, True)], ids=["nodrop", "drop0.1-bias"])
def test_torchtune_dora_on_nf4_rewritten_and_training_matches(dropout, use_bias):
    backend = assert_same_training(nf4_dora_model(dropout, use_bias), nf4_inputs, mlp_loss, expect_sites=2, steps=3)
    sites = backend.reports[0].sites
    form = "torchtune" if dropout or use_bias else "peft"  # without bias and dropout the two forms agree
    assert [(s.kind, s.dora_form, s.base_format) for s in sites] == [("dora", form, "torchao_nf4")] * 2
    assert not backend.reports[0].rejected


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_export_torchtune_dora_on_nf4_rewritten_trains_and_round_trips(tmp_path, use_bias):
    model = nf4_dora_model(use_bias=use_bias)
    x = torch.randn(2, 6, 256)
    ep = runlora_fx.rewrite_exported_program(torch.export.export(copy.deepcopy(model), (x,)))
    assert ep.runlora_report.rewritten == 2 and not ep.runlora_report.rejected, str(ep.runlora_report)
    assert [n.args[2] for n in ep.graph.nodes if n.target is OP] == ["torchao_nf4"] * 2
    # the two dequantization chains per layer (base GEMM and norm) are gone with the linears they fed
    assert not [n for n in ep.graph.nodes if n.target in (torch.ops.aten.linear.default,
                                                          torch.ops.aten.linalg_vector_norm.default)]
    module = ep.module()
    _assert_trains_like_eager(module, model, x.requires_grad_(), mlp_loss)
    torch.export.save(ep, tmp_path / "qdora.pt2")
    loaded = runlora_fx.load(tmp_path / "qdora.pt2")
    assert sum(n.target is OP for n in loaded.graph.nodes) == 2
    torch.testing.assert_close(loaded.module()(x), ep.module()(x))


def test_strict_export_peft_dora_on_bnb_trains_like_eager():
    """Strict export traces peft's dequantize_module_weight with Dynamo: the polyfill must be in place."""
    assert runlora_fx.make_peft_dora_traceable()
    torch.manual_seed(0)
    model = LMLoss(qdora_llama())
    ids = lm_inputs()
    ep = torch.export.export(copy.deepcopy(model), (ids,), strict=True)
    with pytest.warns(UserWarning, match="traced under no_grad"):
        ep = runlora_fx.rewrite_exported_program(ep)
    assert ep.runlora_report.rewritten == 7 and not ep.runlora_report.rejected, str(ep.runlora_report)
    assert sum(n.target is OP for n in ep.graph.nodes) == 7
    assert not [n for n in ep.graph.nodes if "bitsandbytes" in str(n.target)]
    _assert_trains_like_eager(ep.module(), model, ids, lambda m, x: m(x))


# --- what the rewrite saves and dequantizes ----------------------------------------------
def _dense_weights(saved, shapes):
    """The saved floating tensors shaped like a W, either way round (autograd saves Wᵀ for mm)."""
    both = set(shapes) | {s[::-1] for s in shapes}
    return [tuple(t.shape) for t in saved if type(t) is torch.Tensor and t.is_floating_point()
            and tuple(t.shape) in both]


@pytest.mark.parametrize("backend_kwargs", [dict(inner="aot_eager"), dict(inner="aot_eager", lowering="opaque")],
                         ids=["lowered", "opaque"])
@pytest.mark.parametrize("model_fn,inputs_fn,shapes", [
    (lambda: bnb_dora_mlp(dropout=0.1), mlp_inputs, {(48, 32)}),
    (lambda: nf4_dora_model(dropout=0.1), nf4_inputs, {(512, 256), (256, 512)}),
], ids=["bnb", "nf4"])
def test_no_dequantized_weight_is_saved(backend_kwargs, model_fn, inputs_fn, shapes):
    """peft's dropout form runs a second base GEMM on the dequantized W, which eager autograd
    saves for dX; the rewritten step saves only the packed weight."""
    model = model_fn()
    model.train()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(**backend_kwargs))
    x = inputs_fn()
    compiled(x)  # compiles
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled(x)
    assert not _dense_weights(saved, shapes)
    eager = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: eager.append(t) or t, lambda t: t):
        model(x)
    if isinstance(model, nn.Sequential):
        return  # torchtune-style: linear_nf4 saves the NF4Tensor itself, and the norm is detached
    assert _dense_weights(eager, shapes), "the eager reference no longer saves a dequantized W"


def test_one_dequantization_per_forward_and_one_for_dx(monkeypatch):
    """The op dequantizes W once per forward (the base GEMM and the norm share it) and once in
    backward for dX; with x not needing grad, backward dequantizes nothing."""
    from runlora_fx.ops import dora as ops_dora

    calls = []
    real = ops_dora.dequantize_4bit
    monkeypatch.setattr(ops_dora, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    layer = bnb_dora_mlp().base_model.model[0].base_layer
    qs = layer.weight.quant_state
    qtensors = [layer.weight, qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset]
    torch.manual_seed(0)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    m = torch.rand(48).add_(0.5).requires_grad_()
    args = (qtensors, "bnb_nf4", [qs.blocksize], list(qs.shape), layer.bias, A, B, m, 2.0)
    dora_ops.clear_row_norm_cache()
    torch.ops.runlora.dora_linear_4bit(torch.randn(6, 32), *args)  # ‖W‖²_row: one dequantization, then cached
    for x_grad, expected in ((False, 1), (True, 2)):
        calls.clear()
        x = torch.randn(6, 32, requires_grad=x_grad)
        y = torch.ops.runlora.dora_linear_4bit(x, *args, None, "peft", "norm_lowrank", "forward1", "backward1")[0]
        y.sum().backward()
        assert len(calls) == expected, (x_grad, len(calls))
    # and it equals the dense op on the dequantized W
    w = real(qtensors, "bnb_nf4", [qs.blocksize], list(qs.shape), torch.float32)
    x = torch.randn(6, 32)
    for norm in ("norm_lowrank", "norm_merged"):
        for fwd in ("forward1", "forward2"):
            got = torch.ops.runlora.dora_linear_4bit(x, *args, None, "peft", norm, fwd, "backward1")
            want = torch.ops.runlora.dora_linear(x, w, layer.bias, A, B, m, 2.0, None, "peft", norm, fwd, "backward1")
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_compiled_steps_compute_4bit_weight_norms_once():
    """Under torch.compile (lowered, norm_lowrank) ‖W‖²_row of each packed W is computed on the
    first step only, keyed on the packed tensor."""
    model = nf4_dora_model()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager", forward_plan="forward1"))
    dora_ops.clear_row_norm_cache()
    for _ in range(3):
        compiled(nf4_inputs()).sum().backward()
    info = dora_ops.row_norm_cache_info()
    assert (info["misses"], info["hits"]) == (2, 4), info


def test_opcheck_dora_4bit_ops():
    layer = bnb_dora_mlp(double_quant=False).base_model.model[0].base_layer
    qs = layer.weight.quant_state
    qtensors = [layer.weight, qs.absmax, None, None, None]
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    m = torch.rand(48).add_(0.5).requires_grad_()
    for fwd, norm in (("forward1", "norm_lowrank"), ("forward2", "norm_merged")):
        torch.library.opcheck(OP, (x, qtensors, "bnb_nf4", [qs.blocksize], list(qs.shape), layer.bias, A, B, m, 2.0,
                                   None, "peft", norm, fwd, "backward1"))
    dora_ops.clear_row_norm_cache()
    torch.library.opcheck(torch.ops.runlora.row_sq_norms_4bit.default,
                          (qtensors, "bnb_nf4", [qs.blocksize], list(qs.shape), torch.float32))


def test_saved_activations_below_peft_eager():
    """Bytes saved for backward by one compiled QDoRA step are at most eager peft's."""
    model = qdora_llama(lora_dropout=0.1)
    model.train()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager"))
    ids = lm_inputs()
    lm_loss(compiled, ids)  # compiles
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    ours, _ = _saved_bytes(lambda: lm_loss(compiled, ids), persistent)
    theirs, _ = _saved_bytes(lambda: lm_loss(model, ids), persistent)
    assert ours < theirs, (ours, theirs)
