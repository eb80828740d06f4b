"""Reports, logs and dumps: what the pass matched, what it chose and why."""

import json
import logging

import pytest
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx import Needs, choose_plan

from test_pass import TARGETS, lm_inputs, lm_loss, peft_llama


@pytest.fixture(scope="module")
def llama_report():
    torch._dynamo.reset()
    model = peft_llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = runlora_fx.explain(model, input_ids=lm_inputs(), labels=lm_inputs())
    return model, before, report


def test_explain_reports_every_site_with_its_module_path(llama_report):
    model, _, report = llama_report
    expected = {name for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS and hasattr(mod, "lora_A")}
    assert len(expected) == 14
    assert {s.path for s in report.sites} == expected
    assert report.totals()["sites"] == 14 and not report.rejected


def test_explain_plans_agree_with_the_selector(llama_report):
    _, _, report = llama_report
    for s in report.sites:
        needs = Needs(**s.needs)
        want = choose_plan(s.n_hint, s.i, s.o, s.r, needs=needs)
        assert (s.forward_plan, s.backward_plan) == (str(want.forward), str(want.backward)), s.path
        assert set(s.forward_costs) == set(want.forward_costs)
        assert s.forward_costs["forward1"]["value"] == int(want.forward_costs["forward1"])
        assert s.chosen_flops <= s.original_flops
        # fp32: x@A is not saved by the op; the lowered chain keeps it where forward1 forms it
        assert s.activation_bytes_saved == s.n_hint * s.r * 4 - s.lora_product_bytes
        assert s.lora_product_bytes == (s.n_hint * s.r * 4 if s.forward_plan == "forward1" else 0)


def test_explain_leaves_the_model_untouched(llama_report):
    model, before, _ = llama_report
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.grad is not None for p in model.parameters())


def test_report_formats(llama_report):
    _, _, report = llama_report
    text = str(report)
    assert "base_model.model.model.layers.1.mlp.down_proj" in text
    assert "runlora: rewrote 14 of 14 LoRA-shaped sites" in text
    data = json.loads(report.to_json())
    assert data["schema"] == 1 and len(data["sites"]) == 14
    site = data["sites"][0]
    for key in ("path", "n", "i", "o", "r", "dtype", "forward_plan", "backward_plan", "forward_costs",
                "backward_costs", "original_flops", "chosen_flops", "flops_saved_pct", "activation_bytes_saved"):
        assert key in site
    assert data["totals"]["plans"] == report.plan_counts()
    md = report.to_markdown()
    assert md.count("\n| base_model") == 14


def test_symbolic_n_is_reported_with_its_hint():
    torch._dynamo.reset()
    model = peft_llama(layers=1)
    report = runlora_fx.explain(model, input_ids=lm_inputs(), dynamic=True)
    site = report.sites[0]
    assert site.n_hint == 24 and not site.n.isdigit()
    assert "|" in site.forward_plan  # a piecewise plan


def test_one_info_line_per_compiled_graph(caplog):
    torch._dynamo.reset()
    model = peft_llama(layers=1)
    with caplog.at_level(logging.INFO, logger="runlora_fx"):
        torch.compile(model, backend=runlora_fx.make_backend(inner="eager"))(input_ids=lm_inputs())
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("runlora_fx")]
    assert len(lines) == 1
    assert lines[0].startswith("runlora: rewrote 7 of 7 LoRA-shaped sites (")
    assert "saved activations" in lines[0]


def test_dump_dir_writes_before_after_forward_backward(tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setenv("RUNLORA_DUMP_DIR", str(tmp_path))
    model = peft_llama(layers=1)
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager"))
    lm_loss(compiled, lm_inputs()).backward()
    read = lambda suffix: (tmp_path / f"graph_0.{suffix}").read_text()  # noqa: E731
    assert "torch._C._nn.linear" in read("before.py") and "torch.ops.runlora" not in read("before.py")
    # 7 sites: o_proj and down_proj alone, q/k/v and gate/up as two sibling groups
    assert read("after.py").count("torch.ops.runlora.lora_linear.default") == 2
    assert read("after.py").count("torch.ops.runlora.lora_linear_group.default") == 2
    assert read("forward.py").count("runlora.lora_linear.default") == 2
    assert read("forward.py").count("runlora.lora_linear_group.default") == 2
    assert read("backward.py").count("runlora.lora_linear_backward.default") == 2
    assert read("backward.py").count("runlora.lora_linear_group_backward.default") == 2
    assert json.loads(read("report.json"))["totals"]["sites"] == 7
    assert "| base_model.model.model.layers.0.self_attn.q_proj" in read("report.md")


def test_dump_svg_highlights_runlora_nodes(tmp_path):
    pytest.importorskip("pydot", reason="SVG dumps need pydot and graphviz")
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("SVG dumps need graphviz's dot")
    torch._dynamo.reset()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(16, 16).requires_grad_(False)
            self.a, self.b = nn.Linear(16, 2, bias=False), nn.Linear(2, 16, bias=False)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    torch.compile(Layer(), backend=runlora_fx.make_backend(inner="eager", dump_dir=str(tmp_path)))(torch.randn(3, 16))
    svg = (tmp_path / "graph_0.after.svg").read_text()
    assert "runlora" in svg and "orange" in svg
