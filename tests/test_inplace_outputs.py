"""A rewritten site's output behaves like any tensor: in place on it or on a view or reshape of
it, read by several users, returned from the graph. Exact on every path (fx rewrite with the
op's own autograd, Dynamo with the op, the lowered chain, the opaque op, inductor, sibling
groups, DoRA, 4-bit bases, export programs): fp32 1e-5 and fp64 1e-10 relative to the largest
entry, bf16 2e-2.

The generated cases are ``test_fuzz``'s dialects (base and LoRA spellings, scales, dropout,
casts, shared and chained inputs, blockers) with an epilogue drawn per site.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

import runlora_fx
from runlora_fx.passes.rewrite import rewrite

from test_fuzz import FuzzNet, cases, fuzz_settings, is_legal, make_input, run
from test_pass import TorchtuneLoRALinear

EPILOGUES = ("none", "iadd", "mul_", "relu_", "view_add_", "reshape_mul_", "slice_zero_")
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def apply_epilogue(kind: str, y: torch.Tensor) -> torch.Tensor:
    """``kind`` applied in place to y (or to a view or reshape of y); returns y."""
    if kind == "iadd":
        y += 0.25
    elif kind == "mul_":
        y.mul_(1.5)
    elif kind == "relu_":
        y.relu_()
    elif kind == "view_add_":
        y.view(-1, y.shape[-1]).add_(0.125)
    elif kind == "reshape_mul_":
        y.reshape(-1).mul_(0.5)
    elif kind == "slice_zero_":
        y[..., :1].zero_()
    return y


class EpilogueNet(FuzzNet):
    def __init__(self, case, epilogues):
        super().__init__(case)
        self.epilogues = epilogues

    def epilogue(self, k, y):
        return apply_epilogue(self.epilogues[k], y)


@st.composite
def cases_with_epilogues(draw, max_sites=3):
    case = draw(cases(max_sites=max_sites))
    return case, tuple(draw(st.sampled_from(EPILOGUES[1:])) for _ in case.sites)


def assert_rel_close(got, want, tol):
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.abs().any()
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
        err = (a.double() - b.double()).abs().max().item() / scale if b.numel() else 0.0
        assert err <= tol, f"relative error {err:.3g} > {tol}"


def assert_same_run(got, want, dtype):
    (g_out, g_grad), (w_out, w_grad) = got, want
    assert len(g_out) == len(w_out) and len(g_grad) == len(w_grad)
    assert_rel_close(g_out, w_out, REL_TOL[dtype])
    assert_rel_close(g_grad, w_grad, REL_TOL[dtype])


def legal_sites(case):
    return sum(is_legal(case, s) for s in case.sites)


@fuzz_settings(80)
@given(cases_with_epilogues())
def test_fx_rewrite_with_inplace_epilogues_matches_eager(drawn):
    case, epilogues = drawn
    model = EpilogueNet(case, epilogues)
    x = make_input(case)
    want = run(model, x, case.seed)
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    report = rewrite(gm)
    gm.graph.lint()
    assert report.rewritten == legal_sites(case), [r.reason for r in report.rejected]
    assert_same_run(run(gm, x, case.seed), want, case.base_dtype)


BACKENDS = [dict(inner="eager"), dict(inner="aot_eager", lowering="aten"), dict(inner="aot_eager", lowering="opaque")]


@fuzz_settings(8)
@given(cases_with_epilogues(), st.sampled_from(range(len(BACKENDS))))
def test_dynamo_with_inplace_epilogues_matches_eager(drawn, which):
    case, epilogues = drawn
    torch._dynamo.reset()
    model = EpilogueNet(case, epilogues)
    x = make_input(case)
    want = run(model, x, case.seed)
    backend = runlora_fx.make_backend(**BACKENDS[which])
    got = run(torch.compile(model, backend=backend, fullgraph=True), x, case.seed)
    assert sum(r.rewritten for r in backend.reports) == legal_sites(case)
    assert_same_run(got, want, case.base_dtype)


# --- the paths one at a time, each epilogue ------------------------------------------------

class OneSite(nn.Module):
    def __init__(self, epilogue, i=16, o=24, r=4, dtype=torch.float32):
        super().__init__()
        self.lora = TorchtuneLoRALinear(i, o, r).to(dtype)
        self.kind = epilogue

    def forward(self, x):
        y = apply_epilogue(self.kind, self.lora(x))
        return y, y * 2  # y returned from the graph and read by another user


class ParallelBlock(nn.Module):
    """A parallel-attention block (GPT-J, Falcon style): the MLP output takes the attention
    output in place."""

    def __init__(self, h=32):
        super().__init__()
        self.attn = TorchtuneLoRALinear(h, h, 4)
        self.up = TorchtuneLoRALinear(h, 2 * h, 4)
        self.down = TorchtuneLoRALinear(2 * h, h, 4)

    def forward(self, x):
        attn_out = self.attn(x)
        mlp_out = self.down(torch.nn.functional.gelu(self.up(x)))
        mlp_out += attn_out
        return mlp_out + x


class Siblings(nn.Module):
    """q, k, v read the same x (a sibling group); each output is modified in place."""

    def __init__(self, h=32):
        super().__init__()
        self.q, self.k, self.v = (TorchtuneLoRALinear(h, h, 4) for _ in range(3))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        q.mul_(0.5)
        k.view(-1, k.shape[-1]).add_(1.0)
        v += q
        return q * k + v


def train_compare(model, x, backend_kwargs, *, expect_sites, dtype=torch.float32, loss=None):
    """Loss and every trainable grad of a compiled copy against eager, relative to the largest entry."""
    loss = loss or (lambda out: sum((o.float() ** 2).mean() for o in (out if isinstance(out, tuple) else (out,))))
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(**backend_kwargs)
    compiled = torch.compile(model, backend=backend)
    got, want = loss(compiled(x)), loss(ref(x))
    got.backward()
    want.backward()
    assert sum(r.rewritten for r in backend.reports) == expect_sites, [str(r) for r in backend.reports]
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
    assert pairs
    assert_rel_close([got.detach()] + [a for a, _ in pairs], [want.detach()] + [b for _, b in pairs], REL_TOL[dtype])
    return backend


ALL_BACKENDS = BACKENDS + [dict()]
ALL_IDS = ["eager-op", "aot-lowered", "aot-opaque", "inductor"]


@pytest.mark.parametrize("backend_kwargs", ALL_BACKENDS, ids=ALL_IDS)
@pytest.mark.parametrize("epilogue", EPILOGUES[1:])
def test_inplace_on_site_output(epilogue, backend_kwargs):
    torch.manual_seed(0)
    train_compare(OneSite(epilogue), torch.randn(2, 5, 16), backend_kwargs, expect_sites=1)


@pytest.mark.parametrize("backend_kwargs", ALL_BACKENDS, ids=ALL_IDS)
def test_parallel_block_adds_attention_into_mlp_in_place(backend_kwargs):
    torch.manual_seed(0)
    train_compare(ParallelBlock(), torch.randn(2, 7, 32), backend_kwargs, expect_sites=3)


@pytest.mark.parametrize("backend_kwargs", BACKENDS[1:] + [dict()], ids=ALL_IDS[1:])
def test_sibling_group_outputs_modified_in_place(backend_kwargs):
    torch.manual_seed(0)
    backend = train_compare(Siblings(), torch.randn(2, 7, 32), dict(backend_kwargs, group_siblings=True),
                            expect_sites=3)
    assert [s.group for r in backend.reports for s in r.sites if s.group], "the siblings were not grouped"


@pytest.mark.parametrize("backend_kwargs", ALL_BACKENDS, ids=ALL_IDS)
def test_bf16_inplace_epilogue(backend_kwargs):
    torch.manual_seed(0)
    train_compare(OneSite("iadd", dtype=torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16),
                  backend_kwargs, expect_sites=1, dtype=torch.bfloat16)


class DoraEpilogue(nn.Module):
    def __init__(self, epilogue):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(16, 24), nn.Tanh())
        self.peft = get_peft_model(inner, LoraConfig(r=4, target_modules=["0"], use_dora=True))
        for name, p in self.peft.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
        self.kind = epilogue

    def forward(self, x):
        return apply_epilogue(self.kind, self.peft.base_model.model[0](x))


@pytest.mark.parametrize("backend_kwargs", BACKENDS[1:] + [dict()], ids=ALL_IDS[1:])
@pytest.mark.parametrize("epilogue", ["iadd", "view_add_"])
def test_dora_output_modified_in_place(epilogue, backend_kwargs):
    backend = train_compare(DoraEpilogue(epilogue), torch.randn(2, 5, 16), backend_kwargs, expect_sites=1)
    assert [s.kind for r in backend.reports for s in r.sites] == ["dora"]


@pytest.mark.parametrize("backend_kwargs", [dict(inner="aot_eager", lowering="aten"), dict()], ids=["aot-lowered",
                                                                                                    "inductor"])
def test_4bit_base_output_modified_in_place(backend_kwargs):
    from test_qlora import TorchtuneNF4LoRALinear

    pytest.importorskip("torchao")

    class NF4Epilogue(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lora = TorchtuneNF4LoRALinear(256, 512, 8, False)

        def forward(self, x):
            return apply_epilogue("reshape_mul_", self.lora(x)) + 1.0

    train_compare(NF4Epilogue(), torch.randn(2, 6, 256), backend_kwargs, expect_sites=1)


def test_exported_program_with_inplace_epilogues():
    torch.manual_seed(0)
    model = ParallelBlock()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    ep = torch.export.export(model, (x,))
    report = runlora_fx.rewrite_exported_program(ep).runlora_report
    assert report.rewritten == 3, str(report)
    got_module = ep.module()
    got, want = got_module(x).pow(2).mean(), ref(x).pow(2).mean()
    got.backward()
    want.backward()
    trained = dict(got_module.named_parameters())
    pairs = [(trained[name].grad, p.grad) for name, p in ref.named_parameters() if p.grad is not None]
    assert pairs and all(a is not None for a, _ in pairs)
    assert_rel_close([got.detach()] + [a for a, _ in pairs], [want.detach()] + [b for _, b in pairs], 1e-5)
