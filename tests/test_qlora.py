"""QLoRA: peft on bitsandbytes 4-bit bases, rewritten into runlora.lora_linear_4bit."""

import copy

import pytest
import torch
import torch.nn as nn

import runlora_fx

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (in the test extra)")

from test_pass import TARGETS, assert_same_training, lm_inputs, lm_loss, tiny_llama  # noqa: E402

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


def test_no_dequantized_weight_is_saved_and_saved_bytes_do_not_grow():
    torch.manual_seed(0)
    model = qlora_llama(layers=1)
    ref = copy.deepcopy(model)
    ids = lm_inputs()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="eager"))
    ours, shapes = _saved_bytes(lambda: lm_loss(compiled, ids), _persistent_storages(model))
    theirs, _ = _saved_bytes(lambda: lm_loss(ref, ids), _persistent_storages(ref))
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    floating = [s for s, dt in shapes if dt.is_floating_point]
    assert not weight_shapes & set(floating), "a dequantized weight was saved for backward"
    assert ours <= theirs, (ours, theirs)


def test_backward_dequantizes_only_when_dx_is_needed(monkeypatch):
    from runlora_fx import qlora

    calls = []
    real = qlora.dequantize_4bit
    monkeypatch.setattr(qlora, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    layer = bnb.nn.Linear4bit(32, 48, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False)._quantize("cpu")
    qs = layer.weight.quant_state
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    args = (layer.weight.view(-1, 1), qs.absmax, None, None, None, list(qs.shape), qs.blocksize, qs.quant_type, None,
            A, B, 0.5)
    for x_grad, expected in ((False, 1), (True, 2)):
        calls.clear()
        x = torch.randn(6, 32, requires_grad=x_grad)
        torch.ops.runlora.lora_linear_4bit(x, *args).sum().backward()
        assert len(calls) == expected
        want = torch.nn.functional.linear(x, real(*args[:8], torch.float32)) + (x @ A.T) @ B.T * 0.5
        torch.testing.assert_close(torch.ops.runlora.lora_linear_4bit(x, *args), want, rtol=1e-5, atol=1e-5)


def test_opcheck_4bit_op():
    layer = bnb.nn.Linear4bit(32, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False, compress_statistics=True)._quantize("cpu")
    qs = layer.weight.quant_state
    x = torch.randn(2, 3, 32, requires_grad=True)
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    args = (x, layer.weight.view(-1, 1), qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset, list(qs.shape),
            qs.blocksize, qs.quant_type, layer.bias.detach(), A, B, 0.5, None, None, "forward2", "backward5")
    torch.library.opcheck(OP, args)


class TorchtuneNF4LoRALinear(nn.Module):
    """torchtune's QLoRA LoRALinear: a torchao NF4Tensor base through ``linear_nf4``."""

    def __init__(self, i, o, r):
        super().__init__()
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        self.weight = nn.Parameter(to_nf4(torch.randn(o, i) / i**0.5), requires_grad=False)
        self.lora_a = nn.Linear(i, r, bias=False)
        self.lora_b = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.05)
        self.scaling = 2.0

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        return linear_nf4(input=x, weight=self.weight) + self.scaling * self.lora_b(self.lora_a(x))


def nf4_model():
    pytest.importorskip("torchao", reason="the torchtune-style QLoRA test needs torchao (in the test extra)")
    torch.manual_seed(0)
    return nn.Sequential(TorchtuneNF4LoRALinear(256, 512, 8), nn.GELU(), TorchtuneNF4LoRALinear(512, 256, 8))


def test_torchao_nf4_base_all_sites_rewritten_and_training_matches():
    assert_same_training(nf4_model(), lambda: torch.randn(2, 6, 256, requires_grad=True),
                         lambda m, x: m(x).pow(2).mean(), expect_sites=2, steps=5)


def test_torchao_nf4_saves_no_dequantized_weight():
    model = nf4_model()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="eager"))
    x = torch.randn(2, 6, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled(x).pow(2).mean()
    dense_weights = [t for t in saved if tuple(t.shape) in {(512, 256), (256, 512)} and type(t) is torch.Tensor]
    assert not dense_weights, [tuple(t.shape) for t in dense_weights]
    assert sum("NF4" in type(t).__name__ for t in saved) == 2
