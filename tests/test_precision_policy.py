"""The precision policy for merged plans (docs/numerics.md, "Precision policy"; examples/bf16_text_study.py).

Merged plans (forward2, backward4/5) form W + sBA in W's dtype, so by default they are used
for fp32/fp64 weights only; ``allow_merged=True`` turns them on in bf16/fp16. The shape below
is one where FLOPs pick forward2/backward5 whenever merged plans are allowed (n = 256 tokens >
i·o/(i+o) = 16 and > o = 32).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import runlora_fx
from runlora_fx.options import default_allow_merged


class LoraLinear(nn.Module):
    def __init__(self, i=32, o=32, r=4, scale=2.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, i) / i**0.5)
        self.lora_B = nn.Parameter(torch.randn(o, r) * 0.05)
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def _compile_and_compare(dtype, tol, **backend_kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(), nn.GELU(), LoraLinear()).to(dtype)
    ref = copy.deepcopy(model)
    backend = runlora_fx.make_backend(inner="aot_eager", **backend_kwargs)
    x = torch.randn(8, 32, 32, dtype=dtype)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    torch.compile(model, backend=backend)(x).float().square().mean().backward()
    ref(x_ref).float().square().mean().backward()
    for got, want in [(x.grad, x_ref.grad)] + [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())
                                                if p.requires_grad]:
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < tol, f"relative norm error {err:.2e} >= {tol}"
    report = backend.reports[0]
    assert report.rewritten == 2, str(report)
    return {(s.forward_plan, s.backward_plan) for s in report.sites}


def test_default_allow_merged_is_off_in_low_precision_only():
    assert [default_allow_merged(d) for d in (torch.bfloat16, torch.float16)] == [False, False]
    assert [default_allow_merged(d) for d in (torch.float32, torch.float64)] == [True, True]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_default_keeps_unmerged_plans(dtype):
    assert _compile_and_compare(dtype, 2e-2) == {("forward1", "backward1")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_allow_merged_runs_merged_plans(dtype):
    assert _compile_and_compare(dtype, 2e-2, allow_merged=True) == {("forward2", "backward5")}


def test_fp32_default_runs_merged_plans():
    assert _compile_and_compare(torch.float32, 1e-5) == {("forward2", "backward5")}


def _site_notes(dtype, **backend_kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LoraLinear().to(dtype)
    backend = runlora_fx.make_backend(inner="aot_eager", **backend_kwargs)
    torch.compile(model, backend=backend)(torch.randn(8, 32, 32, dtype=dtype, requires_grad=True)).sum().backward()
    return [(s.criterion, s.criterion_note) for s in backend.reports[0].sites]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_report_names_the_precision_policy_that_decided(dtype):
    state = "allowed" if default_allow_merged(dtype) else "off"
    [(criterion, note)] = _site_notes(dtype)
    assert criterion == "flops" and note.startswith(f"precision: merged plans {state} in {str(dtype)[6:]} by default")
    [(_, note)] = _site_notes(dtype, allow_merged=True)
    assert note == f"precision: merged plans allowed in {str(dtype)[6:]} by allow_merged=True"


def test_fp32_report_has_no_precision_note():
    assert _site_notes(torch.float32) == [("flops", None)]


def test_default_follows_the_precision_rule_verdict():
    """docs/precision_rule.json (examples/bf16_text_study.py's grid) decides the bf16/fp16 default."""
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "precision_rule.json"
    data = json.loads(path.read_text())
    assert set(data["meta"]["dtypes"]) == {"bf16", "fp16"} and len(data["meta"]["lrs"]) == 3
    assert data["verdict"]["runs"] == 3 * data["meta"]["seeds"] * 2
    verdict = data["verdict"]["merged_default"]
    assert [default_allow_merged(d) for d in (torch.bfloat16, torch.float16)] == [verdict, verdict]
