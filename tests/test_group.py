"""Sibling groups: sites reading one x computed by one runlora.lora_linear_group, exactly as eager."""

import copy
import logging
import operator

import pytest
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx.choose.group import GroupMember, price_group, should_group
from runlora_fx.choose.roofline import DEVICE_MODELS
from runlora_fx.passes.rewrite import rewrite
from test_pass import (LMLogits, assert_same_lora_grads, assert_same_training, capture_graph, lm_inputs, lm_loss,
                       peft_llama)

GROUP_OP = torch.ops.runlora.lora_linear_group.default
LORA_OP = torch.ops.runlora.lora_linear.default
LAYER_GROUPS = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]


def group_members(report) -> list:
    """[[short module name, ...] per group], in order."""
    return [[path.split(".")[-1] for path in label.split(": ")[1].split(", ")] for label in report.groups()]


class Siblings(nn.Module):
    """Three LoRA linears on one x (ranks 4/8/2, scales 2.0/0.5/1.5) and one on another input."""

    def __init__(self, i=32, outs=(32, 16, 8), ranks=(4, 8, 2), scales=(2.0, 0.5, 1.5)):
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(i, o) for o in outs)
        self.lora_A = nn.ModuleList(nn.Linear(i, r, bias=False) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, o, bias=False) for r, o in zip(ranks, outs))
        self.other = nn.Linear(i, 8)
        self.other_A, self.other_B = nn.Linear(i, 4, bias=False), nn.Linear(4, 8, bias=False)
        self.scales = scales
        for m in [*self.base, self.other]:
            m.requires_grad_(False)
        for lb in [*self.lora_B, self.other_B]:
            nn.init.normal_(lb.weight, std=0.05)

    def forward(self, x, x2):
        outs = [base(x) + s * lb(la(x)) for base, la, lb, s in zip(self.base, self.lora_A, self.lora_B, self.scales)]
        other = self.other(x2) + 2.0 * self.other_B(self.other_A(x2))
        return sum(o.mean(-1) for o in outs) + other.mean(-1)


def sibling_inputs():
    return torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 5, 32)


# --- a peft Llama: q/k/v and gate/up per layer --------------------------------------------
def test_llama_groups_formed_and_training_matches_fp32():
    backend = assert_same_training(peft_llama(), lm_inputs, lm_loss, expect_sites=14, steps=2,
                                   backend_kwargs={"inner": "aot_eager"})
    report = backend.reports[0]
    assert group_members(report) == LAYER_GROUPS * 2, str(report)
    assert sum(1 for s in report.sites if s.group is None) == 4  # o_proj, down_proj
    assert report.totals()["groups"] == 4 and "4 sibling groups (10 sites)" in report.summary()


@pytest.mark.parametrize("adapters", ["fp32 adapters", "bf16 adapters"])
def test_llama_groups_train_as_eager_in_bf16(adapters):
    model = peft_llama(dtype=torch.bfloat16, autocast_adapter_dtype=adapters == "fp32 adapters")
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, dtype_tol=2e-2, steps=2,
                                   backend_kwargs={"inner": "aot_eager"})
    assert group_members(backend.reports[0]) == LAYER_GROUPS * 2, str(backend.reports[0])


def test_llama_groups_through_opaque_op():
    backend = assert_same_training(peft_llama(layers=1), lm_inputs, lm_loss, expect_sites=7, steps=2,
                                   backend_kwargs={"inner": "aot_eager", "lowering": "opaque"})
    assert group_members(backend.reports[0]) == LAYER_GROUPS


def test_runlora_backend_with_inductor_lowers_groups(caplog):
    """backend="runlora": the pass with default options, then the lowered group under inductor."""
    model = peft_llama(layers=1)
    ref = copy.deepcopy(model)
    ids = lm_inputs()
    with caplog.at_level(logging.INFO, logger="runlora_fx"):
        loss = lm_loss(torch.compile(model, backend="runlora"), ids)
    loss.backward()
    ref_loss = lm_loss(ref, ids)
    ref_loss.backward()
    assert any("2 sibling groups (5 sites)" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) == 14
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_group_nodes_carry_metadata_and_the_graph_lints():
    model = peft_llama(layers=1)
    gm = capture_graph(model, lm_inputs())
    adds = {n.name: dict(n.meta) for n in gm.graph.nodes}
    report = rewrite(gm)
    gm.graph.lint()
    groups = [n for n in gm.graph.nodes if n.target is GROUP_OP]
    assert len(groups) == 2 and sum(n.target is LORA_OP for n in gm.graph.nodes) == 2
    assert [len(n.args[1]) for n in groups] == [3, 2]
    for node in groups:
        assert [tuple(v.shape) for v in node.meta["example_value"]] == [(2, 12, o) for o in
                                                                        ((64, 32, 32) if len(node.args[1]) == 3
                                                                         else (128, 128))]
        assert "stack_trace" in node.meta and "nn_module_stack" in node.meta
        items = [u for u in node.users if u.target is operator.getitem]
        assert len(items) == len(node.args[1])
        for item in items:
            assert "stack_trace" in item.meta and "nn_module_stack" in item.meta
            assert item.meta["example_value"].shape == node.meta["example_value"][item.args[1]].shape
    paths = {s.path.split(".")[-1]: s for s in report.sites}
    assert paths["q_proj"].group == paths["v_proj"].group != paths["gate_proj"].group
    assert paths["o_proj"].group is None and paths["o_proj"].group_note is None
    assert "group" in report.to_markdown() and "Sibling groups:" in report.to_markdown()
    assert adds  # the graph had its adds before the rewrite


# --- torch.export -------------------------------------------------------------------------
def test_export_groups_run_train_and_round_trip(tmp_path):
    model = LMLogits(peft_llama(layers=1))
    ids = lm_inputs()
    # forced: the exported graph reads the MLP's x as needing no dX, and at n = 24 without dX
    # the cost model finds gate/up's cats cost more than they save
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (ids,)), group_siblings=True)
    assert ep.runlora_report.rewritten == 7
    assert [len(n.args[1]) for n in ep.graph.nodes if n.target is GROUP_OP] == [3, 2]
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = runlora_fx.load(tmp_path / "m.pt2")
    assert [len(n.args[1]) for n in loaded.graph.nodes if n.target is GROUP_OP] == [3, 2]
    module = loaded.module()
    torch.testing.assert_close(module(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert_same_lora_grads(module, model, ids, expect=14)


# --- ranks, scales, dtypes inside one group ------------------------------------------------
@pytest.mark.parametrize("lowering", ["aten", "opaque"])
def test_different_ranks_and_scales_in_one_group(lowering):
    torch.manual_seed(0)
    model = Siblings()
    backend = assert_same_training(model, sibling_inputs, lambda m, xs: m(*xs).pow(2).mean(), expect_sites=4,
                                   backend_kwargs={"inner": "aot_eager", "lowering": lowering,
                                                   "group_siblings": True})
    report = backend.reports[0]
    (label,) = report.groups()
    assert [s.r for s in report.sites if s.group == label] == [4, 8, 2]
    assert [s.group for s in report.sites if s.path.startswith("other")] == [None]


def test_merged_members_inside_a_group_are_exact():
    """forward2/backward5 members (W + sBA) beside forward1/backward1 ones: same grads as eager."""
    torch.manual_seed(0)
    backend = assert_same_training(Siblings(), sibling_inputs, lambda m, xs: m(*xs).pow(2).mean(), expect_sites=4,
                                   backend_kwargs={"inner": "aot_eager", "group_siblings": True,
                                                   "forward_plan": "forward2", "backward_plan": "backward5"})
    (label,) = backend.reports[0].groups()
    assert {(s.forward_plan, s.backward_plan) for s in backend.reports[0].sites} == {("forward2", "backward5")}


# --- what must not group -------------------------------------------------------------------
def test_different_lora_inputs_are_not_grouped_and_say_why():
    """peft's dropout is one module per site: each LoRA branch reads its own dropout(x)."""
    gm = capture_graph(peft_llama(layers=1, lora_dropout=0.1), lm_inputs())
    report = rewrite(gm)
    assert report.rewritten == 7 and not report.groups()
    assert not [n for n in gm.graph.nodes if n.target is GROUP_OP]
    notes = {s.path.split(".")[-1]: s.group_note for s in report.sites}
    assert "LoRA input differs" in notes["k_proj"] and "LoRA input differs" in notes["up_proj"]
    assert notes["o_proj"] is None  # no sibling at all
    assert "not grouped:" in str(report)


class GradientlessSiblings(Siblings):
    """Member 1 only picks member 0's features (``topk`` indices); member 2 runs under no_grad:
    eagerly, both keep ``grad = None`` on their LoRA weights (DeepSeek-style sparse-attention indexers)."""

    def forward(self, x, x2):
        y0, y1 = [self.base[j](x) + self.scales[j] * self.lora_B[j](self.lora_A[j](x)) for j in (0, 1)]
        with torch.no_grad():
            y2 = self.base[2](x) + self.scales[2] * self.lora_B[2](self.lora_A[2](x))
        picked = y0.gather(-1, y1.topk(4, dim=-1).indices)
        other = self.other(x2) + 2.0 * self.other_B(self.other_A(x2))
        return picked.mean(-1) + y2.mean(-1) + other.mean(-1)


class SiblingsWrittenInPlace(Siblings):
    """The members' outputs are written into one tensor (``out[..., :o] = y``), then read."""

    def forward(self, x, x2):
        outs = [base(x) + s * lb(la(x)) for base, la, lb, s in zip(self.base, self.lora_A, self.lora_B, self.scales)]
        packed = x.new_zeros(*x.shape[:-1], sum(o.shape[-1] for o in outs))
        start = 0
        for o in outs:
            packed[..., start:start + o.shape[-1]] = o
            start += o.shape[-1]
        return packed.pow(2).mean(-1) + (self.other(x2) + 2.0 * self.other_B(self.other_A(x2))).mean(-1)


def test_siblings_that_get_no_gradient_stay_out_of_groups():
    """Grouped, the backward run for member 0 would hand members 1 and 2 zero grads, which an
    optimizer steps on; alone, their grads stay None, as eager's."""
    backend = assert_same_training(GradientlessSiblings(), sibling_inputs, lambda m, xs: m(*xs).sum(), expect_sites=4,
                                   steps=2, backend_kwargs={"inner": "aot_eager", "group_siblings": True})
    report = backend.reports[0]
    assert not report.groups(), str(report)
    notes = {s.path: s.group_note for s in report.sites}
    assert "carries no gradient" in notes["y1"] and "grad disabled" in notes["y2"], notes


def test_siblings_written_in_place_into_one_tensor_still_group():
    backend = assert_same_training(SiblingsWrittenInPlace(), sibling_inputs, lambda m, xs: m(*xs).sum(),
                                   expect_sites=4, steps=2, backend_kwargs={"inner": "aot_eager"})
    assert [len(label.split(", ")) for label in backend.reports[0].groups()] == [3], str(backend.reports[0])


def test_sites_on_different_inputs_never_group():
    gm = capture_graph(Siblings(), *sibling_inputs())
    report = rewrite(gm, group_siblings=True)
    assert report.rewritten == 4
    (group,) = [n for n in gm.graph.nodes if n.target is GROUP_OP]
    assert len(group.args[1]) == 3
    (other,) = [s for s in report.sites if s.path.startswith("other")]
    assert other.group is None and other.group_note is None


def test_group_siblings_false_keeps_one_op_per_site():
    gm = capture_graph(peft_llama(layers=1), lm_inputs())
    report = rewrite(gm, group_siblings=False)
    assert sum(n.target is LORA_OP for n in gm.graph.nodes) == 7 and not report.groups()
    assert "group_siblings=False" in runlora_fx.RewriteOptions(group_siblings=False).key()


def test_backward4_members_are_not_grouped():
    """backward4 computes dA, dB from T = XᵀdY per member: nothing is shared."""
    gm = capture_graph(Siblings(), *sibling_inputs())
    report = rewrite(gm, group_siblings=True, backward_plan="backward4")
    assert not report.groups() and report.rewritten == 4
    assert all("backward4" in s.group_note for s in report.sites if not s.path.startswith("other"))


# --- the cost model -------------------------------------------------------------------------
def test_group_cost_saves_bytes_and_launches_at_equal_flops():
    members = [GroupMember(o, 16, "forward1", "backward1") for o in (2048, 512, 512)]
    cost = price_group(4096, 2048, members, dtype=torch.float32)
    assert cost.flops_delta == 0
    # forward, dA and the recomputed XA each read x once instead of three times
    assert cost.terms["forward X_l·Aᵀ"][0] == 2 * 4096 * 2048 * 4 - 2 * 48 * 2048 * 4
    assert cost.bytes_saved > 0 and cost.launches_saved > 0
    assert should_group(cost, DEVICE_MODELS["cpu"]) and should_group(cost, DEVICE_MODELS["H200"])


def test_group_cost_refuses_where_cats_cost_more_than_they_save():
    """One token, rank 64: the cats of A (r·i) outweigh the saved reads of x (n·i)."""
    members = [GroupMember(64, 64, "forward1", "backward1", needs_a=False, needs_b=False) for _ in range(2)]
    cost = price_group(1, 64, members, dtype=torch.float32, needs_x=False)
    assert cost.bytes_saved < 0 and not should_group(cost, DEVICE_MODELS["H200"])


def test_bench_group_quick_runs(capsys):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_group

    rows = bench_group.main(["--quick", "--no-inductor", "--repeats", "1"])
    modes = {row["mode"] for row in rows}
    assert {"peft_eager", "sites/chosen", "group/chosen", "group/forward1/backward1"} <= modes
    assert all(row["median_ms"] > 0 for row in rows)
