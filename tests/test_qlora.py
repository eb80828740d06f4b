"""QLoRA: peft on bitsandbytes 4-bit bases, rewritten into runlora.lora_linear_4bit."""

import copy

import pytest
import torch
import torch.nn as nn

import runlora_fx

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (in the test extra)")

from test_pass import LORA_OP, TARGETS, assert_same_training, lm_inputs, lm_loss, tiny_llama  # noqa: E402

OP = torch.ops.runlora.lora_linear_4bit.default


def quantize_linears(model, quant_type, double_quant):
    """Swaps every LoRA target nn.Linear for a bitsandbytes Linear4bit holding its weight."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type=quant_type,
                                      compress_statistics=double_quant)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double_quant)._quantize("cpu")
                setattr(module, child_name, q)
    return model


def qlora_llama(quant_type="nf4", double_quant=True, layers=2):
    from peft import LoraConfig, get_peft_model

    model = quantize_linears(tiny_llama(layers), quant_type, double_quant)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_qlora_llama_all_sites_rewritten_and_training_matches(quant_type, double_quant):
    model = qlora_llama(quant_type, double_quant)
    # Same dequantization as bitsandbytes, so the quantized tolerance is the fp32 one.
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, steps=5)
    assert all(s.forward_plan.startswith("forward") for s in backend.reports[0].sites)


def _persistent_storages(model):
    """Storages of parameters, buffers and 4-bit quantization states: not activations."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _saved_bytes(fn, persistent):
    """Bytes of distinct activation tensors saved for backward (parameters excluded)."""
    seen, shapes = {}, []

    def pack(t):
        if t.untyped_storage().data_ptr() in persistent:
            return t
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), shapes


# eager: the op as is; aot_eager + lowering: AOTAutograd must not merge forward's and
# backward's dequantization into one saved weight.
BACKENDS = [dict(inner="eager"), dict(inner="aot_eager", lowering="aten"), dict(inner="aot_eager", lowering="opaque")]
BACKEND_IDS = ["eager", "aot-lowered", "aot-opaque"]


@pytest.mark.parametrize("backend_kwargs", BACKENDS, ids=BACKEND_IDS)
def test_no_dequantized_weight_is_saved_and_saved_bytes_do_not_grow(backend_kwargs):
    torch.manual_seed(0)
    model = qlora_llama(layers=1)
    ref = copy.deepcopy(model)
    ids = lm_inputs()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(**backend_kwargs))
    # The baseline goes through the same compile path minus the pass: transformers takes other
    # code paths (masks) under Dynamo, so plain eager is not the like-for-like reference.
    baseline = torch.compile(ref, backend=backend_kwargs["inner"])
    lm_loss(compiled, ids), lm_loss(baseline, ids)  # compile both
    ours, shapes = _saved_bytes(lambda: lm_loss(compiled, ids), _persistent_storages(model))
    theirs, _ = _saved_bytes(lambda: lm_loss(baseline, ids), _persistent_storages(ref))
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    floating = [s for s, dt in shapes if dt.is_floating_point]
    assert not weight_shapes & set(floating), "a dequantized weight was saved for backward"
    assert ours <= theirs, (ours, theirs)


def test_backward_dequantizes_only_when_dx_is_needed(monkeypatch):
    from runlora_fx.ops import quantized as qlora

    calls = []
    real = qlora.dequantize_4bit
    monkeypatch.setattr(qlora, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    layer = bnb.nn.Linear4bit(32, 48, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False)._quantize("cpu")
    qs = layer.weight.quant_state
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    args = ([layer.weight.view(-1, 1), qs.absmax, None, None, None], f"bnb_{qs.quant_type}", [qs.blocksize],
            list(qs.shape), None, A, B, 0.5)
    for x_grad, expected in ((False, 1), (True, 2)):
        calls.clear()
        x = torch.randn(6, 32, requires_grad=x_grad)
        torch.ops.runlora.lora_linear_4bit(x, *args).sum().backward()
        assert len(calls) == expected
        want = torch.nn.functional.linear(x, real(*args[:4], torch.float32)) + (x @ A.T) @ B.T * 0.5
        torch.testing.assert_close(torch.ops.runlora.lora_linear_4bit(x, *args), want, rtol=1e-5, atol=1e-5)


def test_opcheck_4bit_op():
    layer = bnb.nn.Linear4bit(32, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False, compress_statistics=True)._quantize("cpu")
    qs = layer.weight.quant_state
    x = torch.randn(2, 3, 32, requires_grad=True)
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    qtensors = [layer.weight.view(-1, 1), qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset]
    args = (x, qtensors, f"bnb_{qs.quant_type}", [qs.blocksize], list(qs.shape), layer.bias.detach(), A, B, 0.5,
            None, None, "forward2", "backward5")
    torch.library.opcheck(OP, args)


class TorchtuneNF4LoRALinear(nn.Module):
    """torchtune's QLoRA LoRALinear: a torchao NF4Tensor base through ``linear_nf4``, its
    bias (if any) added after it."""

    def __init__(self, i, o, r, use_bias=False):
        super().__init__()
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        self.weight = nn.Parameter(to_nf4(torch.randn(o, i) / i**0.5), requires_grad=False)
        self.bias = nn.Parameter(0.1 * torch.randn(o), requires_grad=False) if use_bias else None
        self.lora_a = nn.Linear(i, r, bias=False)
        self.lora_b = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.05)
        self.scaling = 2.0

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        out = linear_nf4(input=x, weight=self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out + self.scaling * self.lora_b(self.lora_a(x))


def nf4_model(use_bias=False):
    pytest.importorskip("torchao", reason="the torchtune-style QLoRA test needs torchao (in the test extra)")
    torch.manual_seed(0)
    return nn.Sequential(TorchtuneNF4LoRALinear(256, 512, 8, use_bias), nn.GELU(),
                         TorchtuneNF4LoRALinear(512, 256, 8, use_bias))


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_torchao_nf4_base_all_sites_rewritten_and_training_matches(use_bias):
    assert_same_training(nf4_model(use_bias), lambda: torch.randn(2, 6, 256, requires_grad=True),
                         lambda m, x: m(x).pow(2).mean(), expect_sites=2, steps=5)


@pytest.mark.parametrize("backend_kwargs", BACKENDS[:2], ids=BACKEND_IDS[:2])
def test_torchao_nf4_saves_no_dequantized_weight(backend_kwargs):
    model = nf4_model()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(**backend_kwargs))
    x = torch.randn(2, 6, 256, requires_grad=True)
    compiled(x)  # compiles
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled(x).pow(2).mean()
    dense_weights = [t for t in saved if tuple(t.shape) in {(512, 256), (256, 512)} and type(t) is torch.Tensor]
    assert not dense_weights, [tuple(t.shape) for t in dense_weights]
    # What backward dequantizes from: the NF4Tensors (eager), or their packed data (AOTAutograd
    # flattens the subclass into its inner tensors).
    packed = [t for t in saved if "NF4" in type(t).__name__ or (t.dtype == torch.uint8 and t.numel() == 512 * 128)]
    assert len(packed) == 2, [(type(t).__name__, t.dtype, tuple(t.shape)) for t in saved]


# --- torch.export ----------------------------------------------------------------------
OP_4BIT = torch.ops.runlora.lora_linear_4bit.default


class LMLoss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss


def _grads(module):
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


def _assert_trains_like_eager(module, model, inputs, loss_fn, steps=3):
    """`steps` SGD steps of the rewritten program and of the eager model: same losses and grads."""
    opt_a = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    opt_b = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        got_loss, want_loss = loss_fn(module, inputs), loss_fn(model, inputs)
        got_loss.backward()
        want_loss.backward()
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
        got, want = _grads(module), _grads(model)
        assert len(got) == len(want) > 0
        for (k, g), (_, w) in zip(sorted(got.items()), sorted(want.items())):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"step {step}: {k}")
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_export_bnb_qlora_every_site_rewritten_and_trains_like_eager(quant_type, double_quant):
    torch.manual_seed(0)
    model = LMLoss(qlora_llama(quant_type, double_quant))
    ids = lm_inputs()
    # strict: non-strict export fails inside bitsandbytes (Linear4bit re-wraps its fake weight).
    ep = torch.export.export(copy.deepcopy(model), (ids,), strict=True)
    # torch.export traces MatMul4Bit.forward under no_grad, so the exported program alone
    # drops dX through the 4-bit bases; the rewrite warns and gives it back.
    with pytest.warns(UserWarning, match="traced under no_grad"):
        ep = runlora_fx.rewrite_exported_program(ep)
    assert ep.runlora_report.rewritten == 14, str(ep.runlora_report)
    assert sum(n.target is OP_4BIT for n in ep.graph.nodes) == 14
    assert not [n for n in ep.graph.nodes if "gemm_4bit" in str(n.target)]
    _assert_trains_like_eager(ep.module(), model, ids, lambda m, x: m(x))


def _program_storages(ep):
    """Storages of an exported program's parameters, buffers and lifted constants."""
    tensors = list(ep.state_dict.values()) + [t for t in ep.constants.values() if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_export_bnb_qlora_saves_no_dequantized_weight():
    torch.manual_seed(0)
    model = LMLoss(qlora_llama(layers=1))
    ids = lm_inputs()
    plain = torch.export.export(copy.deepcopy(model), (ids,), strict=True)
    with pytest.warns(UserWarning, match="traced under no_grad"):
        ours = runlora_fx.rewrite_exported_program(torch.export.export(copy.deepcopy(model), (ids,), strict=True))
    ours_bytes, shapes = _saved_bytes(lambda: ours.module()(ids), _program_storages(ours))
    plain_bytes, _ = _saved_bytes(lambda: plain.module()(ids), _program_storages(plain))
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert not weight_shapes & {s for s, dt in shapes if dt.is_floating_point}
    # The plain program saves nothing for the bases (it drops their dX); ours saves x and no x @ A.
    assert ours_bytes <= plain_bytes, (ours_bytes, plain_bytes)


def test_torchao_nf4_dequantization_equals_torchao_bitwise():
    pytest.importorskip("torchao", reason="needs torchao (in the test extra)")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from runlora_fx.ops.quantized import dequantize_4bit

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        nf4 = to_nf4(torch.randn(128, 256, dtype=dtype))
        qtensors = [nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean, nf4.nf4]
        for out_dtype in (torch.float32, torch.bfloat16):
            ours = dequantize_4bit(qtensors, "torchao_nf4", [nf4.block_size, nf4.scaler_block_size], [128, 256],
                                   out_dtype)
            assert torch.equal(ours, nf4.to(out_dtype)), (dtype, out_dtype)


def test_export_torchao_nf4_every_site_rewritten_trains_and_round_trips(tmp_path):
    model = nf4_model()
    x = torch.randn(2, 6, 256)
    ep = runlora_fx.rewrite_exported_program(torch.export.export(copy.deepcopy(model), (x,)))
    assert ep.runlora_report.rewritten == 2, str(ep.runlora_report)
    assert [n.args[2] for n in ep.graph.nodes if n.target is OP_4BIT] == ["torchao_nf4"] * 2
    assert not [n for n in ep.graph.nodes if n.target is torch.ops.aten.linear.default
                and tuple(n.args[1].meta["val"].shape) in {(512, 256), (256, 512)}]
    loss = lambda m, x: m(x).pow(2).mean()  # noqa: E731
    module = ep.module()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss(module, x.requires_grad_())
    assert not [t for t in saved if tuple(t.shape) in {(512, 256), (256, 512)}], "a dequantized weight was saved"
    _assert_trains_like_eager(module, model, x, loss)
    torch.export.save(ep, tmp_path / "nf4.pt2")
    loaded = runlora_fx.load(tmp_path / "nf4.pt2")
    assert sum(n.target is OP_4BIT for n in loaded.graph.nodes) == 2
    torch.testing.assert_close(loaded.module()(x), ep.module()(x))


def test_export_chain_that_is_not_nf4_dequantization_stays_dense():
    """A chain over an NF4Tensor's inner tensors is read as NF4 only if it computes exactly
    that; here one mask is changed, so the site keeps its computed weight (dense op)."""
    model = nf4_model()
    x = torch.randn(2, 6, 256)
    ep = torch.export.export(model, (x,))
    masks = [n for n in ep.graph.nodes if n.target is torch.ops.aten.__and__.Scalar]
    masks[0].args = (masks[0].args[0], 0b0111)
    ep.graph_module.recompile()
    want = ep.module()(x)
    ep = runlora_fx.rewrite_exported_program(ep)
    targets = [n.target for n in ep.graph.nodes if n.target in (OP_4BIT, LORA_OP)]
    assert sorted(map(str, targets)) == sorted(map(str, [LORA_OP, OP_4BIT]))
    torch.testing.assert_close(ep.module()(x), want)


def test_4bit_sites_are_left_to_the_library_on_cuda_by_default_and_when_asked():
    from runlora_fx.options import default_rewrite_4bit

    assert default_rewrite_4bit("cpu") and not default_rewrite_4bit("cuda:0")
    torch.manual_seed(0)
    model = qlora_llama(layers=1)
    backend = runlora_fx.make_backend(inner="aot_eager", rewrite_4bit=False)
    ids = lm_inputs()
    torch.testing.assert_close(lm_loss(torch.compile(model, backend=backend), ids), lm_loss(model, ids))
    report = backend.reports[0]
    assert report.rewritten == 0
    assert [r.reason for r in report.rejected] == ["rewrite_4bit=False"] * 7


def test_opcheck_dequantize_op_and_it_equals_the_function():
    from runlora_fx.ops.quantized import dequantize_4bit

    layer = bnb.nn.Linear4bit(32, 48, bias=False, compute_dtype=torch.float32, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False, compress_statistics=True)._quantize("cpu")
    qs = layer.weight.quant_state
    qtensors = [layer.weight.view(-1, 1), qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset]
    args = (qtensors, "bnb_nf4", [qs.blocksize], [48, 32], torch.float32, "backward")
    torch.library.opcheck(torch.ops.runlora.dequantize_4bit.default, args)
    assert torch.equal(torch.ops.runlora.dequantize_4bit(*args), dequantize_4bit(*args[:4], torch.float32))


def test_strict_export_torchao_nf4_restores_dx_and_trains_like_eager():
    model = nf4_model()
    x = torch.randn(2, 6, 256)
    ep = torch.export.export(copy.deepcopy(model), (x,), strict=True)
    with pytest.warns(UserWarning, match="traced under no_grad"):
        ep = runlora_fx.rewrite_exported_program(ep)
    assert ep.runlora_report.rewritten == 2, str(ep.runlora_report)
    assert not [n for n in ep.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    _assert_trains_like_eager(ep.module(), model, x.requires_grad_(), lambda m, x: m(x).pow(2).mean())
