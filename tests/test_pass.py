"""The pass on real producers: every LoRA layer rewritten, outputs and gradients as eager."""

import copy
import importlib
import operator
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import runlora_fx
from runlora_fx.passes.rewrite import rewrite

LORA_OP = torch.ops.runlora.lora_linear.default
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers=2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101)
    return LlamaForCausalLM(cfg).to(dtype)


def peft_llama(layers=2, dtype=torch.float32, **lora):
    from peft import LoraConfig, get_peft_model

    autocast = lora.pop("autocast_adapter_dtype", True)
    model = get_peft_model(tiny_llama(layers, dtype), LoraConfig(r=8, target_modules=TARGETS, **lora),
                           autocast_adapter_dtype=autocast)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: make the LoRA branch matter
            nn.init.normal_(p, std=0.05)
    return model


def lora_grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_training(model, make_inputs, loss_fn, *, backend_kwargs=None, rtol=1e-4, expect_sites, steps=5,
                         dtype_tol=None):
    """Compile a copy with the runlora backend; compare loss and grads, then `steps` SGD steps."""
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(**(backend_kwargs or {"inner": "aot_eager"}))
    compiled = torch.compile(model, backend=backend)
    opt_a = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_b = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        torch.manual_seed(step)
        inputs = make_inputs()
        torch.manual_seed(100 + step)
        loss = loss_fn(compiled, inputs)
        loss.backward()
        torch.manual_seed(100 + step)
        ref_loss = loss_fn(ref, inputs)
        ref_loss.backward()
        if step == 0:
            got, want = lora_grads(model), lora_grads(ref)
            assert got.keys() == want.keys() and got
            if dtype_tol is None:
                torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-6)
                for k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=1e-6, msg=k)
            else:
                assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < dtype_tol
                for k in want:
                    err = (got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp_min(1e-12)
                    assert err < dtype_tol, f"{k}: relative norm error {err:.2e}"
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    total = sum(r.rewritten for r in backend.reports)
    assert total == expect_sites, [str(r) for r in backend.reports]
    final_a = {k: p for k, p in model.named_parameters() if p.requires_grad}
    final_b = dict(ref.named_parameters())
    tol = dict(rtol=rtol, atol=1e-5) if dtype_tol is None else dict(rtol=dtype_tol, atol=dtype_tol)
    for k, p in final_a.items():
        torch.testing.assert_close(p.float(), final_b[k].float(), **tol, msg=k)
    return backend


def lm_inputs():
    return torch.randint(0, 101, (2, 12))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


# --- producers -------------------------------------------------------------------------
def test_peft_llama_every_site_rewritten_and_training_matches():
    backend = assert_same_training(peft_llama(), lm_inputs, lm_loss, expect_sites=14)
    paths = [s.path for s in backend.reports[0].sites]
    assert "base_model.model.model.layers.0.self_attn.q_proj" in paths


def test_peft_llama_with_dropout():
    assert_same_training(peft_llama(lora_dropout=0.1), lm_inputs, lm_loss, expect_sites=14)


def test_peft_rslora_and_lora_bias():
    backend = assert_same_training(peft_llama(use_rslora=True, lora_bias=True), lm_inputs, lm_loss, expect_sites=14)
    assert all(s.forward_plan for s in backend.reports[0].sites)


def test_peft_fp32_adapters_on_bf16_base():
    model = peft_llama(dtype=torch.bfloat16)  # peft keeps adapters in fp32 by default
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, dtype_tol=2e-2)
    site = backend.reports[0].sites[0]
    assert site.dtype == "bfloat16" and site.adapter_dtype == "float32"


def test_peft_two_active_adapters_rewrites_one_per_layer_and_reports_the_other():
    from peft import LoraConfig

    model = peft_llama(layers=1)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_B.second" in name:
            nn.init.normal_(p, std=0.05)
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=7)
    assert len(backend.reports[0].rejected) == 2


class TorchtuneLoRALinear(nn.Module):
    """torchtune's LoRALinear shape: scalar on the left, dropout, F.linear base."""

    def __init__(self, i, o, r, alpha=16.0, dropout=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5, requires_grad=False)
        self.lora_a = nn.Linear(i, r, bias=False)
        self.lora_b = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.05)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        out = F.linear(x, self.weight)
        lora_out = self.lora_b(self.lora_a(self.dropout(x)))
        return out + self.scaling * lora_out


class LoralibLinear(nn.Linear):
    """microsoft/loralib's Linear: matmul with transposes and an in-place add."""

    def __init__(self, i, o, r, alpha=8):
        super().__init__(i, o)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, i) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(o, r) * 0.1)
        self.lora_dropout = nn.Dropout(0.1)
        self.scaling = alpha / r

    def forward(self, x):
        result = F.linear(x, self.weight.T.T, bias=self.bias)
        result += (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class HandWritten(nn.Module):
    """x @ W + (x @ A) @ B with W stored in×out, and an F.linear form."""

    def __init__(self, i, o, r):
        super().__init__()
        self.W = nn.Parameter(torch.randn(i, o) / i**0.5, requires_grad=False)
        self.A = nn.Parameter(torch.randn(i, r) * 0.1)
        self.B = nn.Parameter(torch.randn(r, o) * 0.1)
        self.W2 = nn.Parameter(torch.randn(o, o) / o**0.5, requires_grad=False)
        self.A2 = nn.Parameter(torch.randn(4, o) * 0.1)
        self.B2 = nn.Parameter(torch.randn(o, 4) * 0.1)

    def forward(self, x):
        h = x @ self.W + (x @ self.A) @ self.B * 0.5
        h = torch.tanh(h)
        return F.linear(h, self.W2) + 2.0 * F.linear(F.linear(h, self.A2), self.B2)


def seq_inputs(i):
    return lambda: torch.randn(3, 7, i, requires_grad=True)


def mse(model, x):
    return model(x).pow(2).mean()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torchtune_style(dropout):
    model = nn.Sequential(TorchtuneLoRALinear(32, 48, 4, dropout=dropout), nn.GELU(), TorchtuneLoRALinear(48, 32, 4))
    assert_same_training(model, seq_inputs(32), mse, expect_sites=2)


def test_loralib_style():
    model = nn.Sequential(LoralibLinear(32, 48, 4), nn.ReLU(), LoralibLinear(48, 16, 4))
    assert_same_training(model, seq_inputs(32), mse, expect_sites=2)


def test_hand_written_matmul_and_linear_forms():
    assert_same_training(HandWritten(32, 40, 4), seq_inputs(32), mse, expect_sites=2)


class BiasAddedAfter(nn.Module):
    """``x @ W.T + b + s·lora``: the bias added after a bias-free base (dialect "bias added after")."""

    def __init__(self, i, o, r):
        super().__init__()
        self.W = nn.Parameter(torch.randn(o, i) / i**0.5, requires_grad=False)
        self.b = nn.Parameter(torch.randn(o), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, i) * 0.1)
        self.B = nn.Parameter(torch.randn(o, r) * 0.1)

    def forward(self, x):
        return x @ self.W.T + self.b + 0.5 * ((x @ self.A.T) @ self.B.T)


def test_bias_added_after_a_bias_free_base():
    backend = assert_same_training(BiasAddedAfter(32, 40, 4), seq_inputs(32), mse, expect_sites=1)
    assert not backend.reports[0].rejected


def test_a_non_bias_add_is_not_read_as_the_bias():
    """A (o,)-shaped add in another dtype than the output would promote it: no bias, no site."""

    class Promoting(BiasAddedAfter):
        def forward(self, x):
            return x @ self.W.T + self.b.double() + 0.5 * ((x @ self.A.T) @ self.B.T)

    model = Promoting(32, 40, 4)
    backend = runlora_fx.make_backend(inner="aot_eager")
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.reports[0].rewritten == 0


def test_gpt2_conv1d_addmm_base():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=32)
    assert_same_training(peft_conv1d(GPT2LMHeadModel(cfg)), lm_inputs, lm_loss, expect_sites=8, steps=2)


def peft_conv1d(model):
    """peft LoRA r=4 on a GPT-style model's Conv1D layers, lora_B nonzero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


class MergedHeadsConv1DLoRA(nn.Module):
    """openai-gpt's attention output: heads merged by ``view(contiguous(permute(h)), [b, s, h * d])``,
    then a Conv1D base (``view(addmm(b, view(x, [-1, i]), W), [b, s, o])``) with a LoRA branch."""

    def __init__(self, heads=4, head_dim=8, out=24, r=4):
        super().__init__()
        i = heads * head_dim
        self.W = nn.Parameter(torch.randn(i, out) / i**0.5, requires_grad=False)  # Conv1D holds W.T
        self.bias = nn.Parameter(torch.randn(out), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, i) / i**0.5)
        self.B = nn.Parameter(torch.randn(out, r) * 0.05)

    def forward(self, h):
        b, heads, s, d = h.shape
        x = h.permute(0, 2, 1, 3).contiguous().view(b, s, heads * d)
        base = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.W).view(b, s, -1)
        return base + 2.0 * ((x @ self.A.T) @ self.B.T)


def test_conv1d_base_on_merged_heads_reads_x_before_the_head_split():
    """The input's rows are the merged tensor's, not the 4-D one's: the walk back through views
    stops where the last dimension changes."""
    assert_same_training(MergedHeadsConv1DLoRA(), lambda: torch.randn(2, 4, 5, 8, requires_grad=True), mse,
                         expect_sites=1, steps=2)


def test_openai_gpt_conv1d_every_site_rewritten():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    cfg = OpenAIGPTConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=32,
                          attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    assert_same_training(peft_conv1d(OpenAIGPTLMHeadModel(cfg)), lm_inputs, lm_loss, expect_sites=8, steps=2)


def test_bf16_adapters_relative_norm_error():
    model = peft_llama(dtype=torch.bfloat16, autocast_adapter_dtype=False)
    assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, dtype_tol=2e-2, steps=2)


# --- inductor: lowered and opaque ------------------------------------------------------
@pytest.mark.parametrize("lowering", ["aten", "opaque"])
def test_inductor_lowered_and_opaque_match_eager(lowering):
    model = nn.Sequential(TorchtuneLoRALinear(32, 48, 4), nn.GELU(), TorchtuneLoRALinear(48, 32, 4))
    backend = assert_same_training(model, seq_inputs(32), mse, expect_sites=2, steps=2,
                                   backend_kwargs={"lowering": lowering, "allow_merged": True})
    assert {s.forward_plan for s in backend.reports[0].sites} <= {"forward1", "forward2"}


def test_fixed_shapes_compile_once_and_dynamic_at_most_twice():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = peft_llama(layers=1)
    counter = CompileCounterWithBackend(runlora_fx.make_backend(inner="aot_eager"))
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        lm_loss(compiled, torch.randint(0, 101, (2, 12))).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(runlora_fx.make_backend(inner="aot_eager"))
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for seq in (8, 12, 20, 48):
        lm_loss(compiled, torch.randint(0, 101, (2, seq))).backward()
    assert counter.frame_count <= 2


def test_no_new_graph_breaks():
    model = peft_llama(layers=1)
    ids = lm_inputs()
    plain = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    backend = runlora_fx.make_backend(inner="eager")
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    assert len(backend.reports) == plain.graph_count
    assert sum(r.rewritten for r in backend.reports) == 7


# --- graph contract, legality, safety ----------------------------------------------------
def capture_graph(model, *inputs):
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab)(*inputs)
    return graphs[0]


def test_new_node_keeps_metadata_and_graph_lints():
    gm = capture_graph(nn.Sequential(TorchtuneLoRALinear(16, 24, 4)), torch.randn(2, 16))
    (add,) = [n for n in gm.graph.nodes if n.target is operator.add]
    add_meta = dict(add.meta)
    report = rewrite(gm)
    gm.graph.lint()
    (node,) = [n for n in gm.graph.nodes if n.target is LORA_OP]
    assert report.rewritten == 1
    assert node.meta["example_value"].shape == (2, 24)
    assert "stack_trace" in node.meta and "return out + self.scaling * lora_out" in node.meta["stack_trace"]
    assert node.meta["nn_module_stack"] == add_meta["nn_module_stack"]
    assert report.sites[0].path == "0"
    assert not [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]


def test_trainable_base_weight_is_left_alone_with_reason():
    layer = TorchtuneLoRALinear(16, 24, 4)
    layer.weight.requires_grad_(True)
    gm = capture_graph(layer, torch.randn(2, 16))
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    assert "requires grad" in report.rejected[0].reason


class ExtraUser(TorchtuneLoRALinear):
    def forward(self, x):
        xa = self.lora_a(x)
        return F.linear(x, self.weight) + self.lora_b(xa) * 2.0, xa.sum()


def test_extra_user_of_xa_blocks_the_rewrite():
    gm = capture_graph(ExtraUser(16, 24, 4), torch.randn(2, 16))
    before = gm.code
    report = rewrite(gm)
    assert report.rewritten == 0 and gm.code == before
    assert "user outside the LoRA subgraph" in report.rejected[0].reason


def test_internal_error_warns_and_leaves_graph_unchanged(monkeypatch):
    rw = importlib.import_module("runlora_fx.passes.rewrite")

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(rw, "rewrite_sites", boom)
    model = TorchtuneLoRALinear(16, 24, 4)
    backend = runlora_fx.make_backend(inner="aot_eager")
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match="pass failed, graph left unchanged .*injected"):
        y = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(y, model(x))
    assert backend.reports[0].rewritten == 0


def test_symbolic_trace_with_shape_prop():
    from torch.fx.passes.shape_prop import ShapeProp

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(16, 24)
            self.base.requires_grad_(False)
            self.a = nn.Linear(16, 4, bias=False)
            self.b = nn.Linear(4, 24, bias=False)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x)) * 0.5

    block = Block()
    gm = torch.fx.symbolic_trace(block)
    x = torch.randn(3, 16)
    ShapeProp(gm).propagate(x)
    report = rewrite(gm)
    assert report.rewritten == 1
    torch.testing.assert_close(gm(x), block(x))


# --- torch.export ----------------------------------------------------------------------
class LMLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def assert_same_lora_grads(module, model, ids, *, expect):
    """One backward of a sum of squares through both: the same grads, ``expect`` of them."""
    module(ids).pow(2).mean().backward()
    model(ids).pow(2).mean().backward()
    got = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) == expect
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def sites_in_ops(graph) -> int:
    """Sites computed by runlora ops: one per lora_linear, one per member of a lora_linear_group."""
    group = torch.ops.runlora.lora_linear_group.default
    return sum(1 if n.target is LORA_OP else len(n.args[1]) if n.target is group else 0 for n in graph.nodes)


def test_export_rewrite_runs_trains_and_survives_decompositions():
    model = LMLogits(peft_llama())
    ids = lm_inputs()
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (ids,)))
    assert ep.runlora_report.rewritten == 14
    torch.testing.assert_close(ep.module()(ids), model(ids))
    decomposed = ep.run_decompositions()
    assert sites_in_ops(decomposed.graph) == 14  # sibling groups (q/k/v, gate/up) hold several
    module = ep.module()
    assert_same_lora_grads(module, model, ids, expect=28)


def test_export_decomposed_ir_is_matched():
    model = LMLogits(peft_llama(layers=1))
    ids = lm_inputs()
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (ids,)).run_decompositions())
    # o_proj reads a non-contiguous input, which decomposes into the expand + bmm form.
    assert ep.runlora_report.rewritten == 7, str(ep.runlora_report)
    assert not [n for n in ep.graph.nodes if n.target is torch.ops.aten.bmm.default
                and "o_proj" in str(n.meta.get("nn_module_stack", ""))]
    module = ep.module()
    torch.testing.assert_close(module(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert_same_lora_grads(module, model, ids, expect=14)


def test_export_save_load_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = LMLogits(peft_llama())
    ids = lm_inputs()
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (ids,)))
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save({"ids": ids, "out": model(ids).detach()}, tmp_path / "io.pt")
    model(ids).pow(2).mean().backward()
    torch.save({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, tmp_path / "grads.pt")
    script = textwrap.dedent(f"""
        import torch, runlora_fx
        ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = ep.module()
        out = m(io["ids"])
        torch.testing.assert_close(out, io["out"])
        out.pow(2).mean().backward()
        want = torch.load({str(tmp_path / 'grads.pt')!r})
        got = {{k: p.grad for k, p in m.named_parameters() if p.grad is not None}}
        assert len(got) == len(want) == 28, (len(got), len(want))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
        group = torch.ops.runlora.lora_linear_group.default
        print("ok", sum(1 if n.target is torch.ops.runlora.lora_linear.default else len(n.args[1])
                        if n.target is group else 0 for n in ep.graph.nodes))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 14"
    bare = subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(tmp_path / 'm.pt2')!r})"],
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0
    assert "runlora.lora_linear" in bare.stderr and "import the custom op" in bare.stderr


def test_runlora_backend_name_resolves_through_the_entry_point():
    """``torch.compile(model, backend="runlora")`` works after install (HF Trainer's
    ``torch_compile_backend="runlora"`` passes the same string)."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "runlora"]
    assert ep.load() is runlora_fx.runlora_backend
    assert "runlora" in torch._dynamo.list_backends()
    model = TorchtuneLoRALinear(16, 24, 4)
    x = torch.randn(2, 16)
    torch.testing.assert_close(torch.compile(model, backend="runlora")(x), model(x))


class PerBatchWeight(nn.Module):
    """``bmm(x, W_b)`` with one weight per batch element: not a linear map, never a LoRA base."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(2, 16, 24), requires_grad=False)
        self.A = nn.Linear(16, 4, bias=False)
        self.B = nn.Linear(4, 24, bias=False)

    def forward(self, x):
        return torch.bmm(x, self.W) + self.B(self.A(x)) * 2.0


def test_decomposed_bmm_with_a_per_batch_weight_is_not_a_site():
    model = PerBatchWeight()
    x = torch.randn(2, 5, 16)
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (x,)).run_decompositions())
    assert ep.runlora_report.rewritten == 0
    assert [r.reason for r in ep.runlora_report.rejected] == ["the LoRA product is not added to a linear base output"]
    torch.testing.assert_close(ep.module()(x), model(x))
