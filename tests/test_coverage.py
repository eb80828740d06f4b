"""Model-level coverage: every LoRA layer against the sites rewritten or rejected; layers that
ran outside every compiled graph are named once, with their checkpointed region and the graph
break (``inspection/coverage.py``)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import runlora_fx
from runlora_fx.inspection.coverage import lora_layers

from test_pass import TorchtuneLoRALinear, lm_inputs, lm_loss, peft_llama


class Block(nn.Module):
    """A checkpointed block (``gradient_checkpointing`` as HF's layers carry it) whose body
    graph-breaks inside the checkpoint: Dynamo runs the whole frame eagerly."""

    def __init__(self, h=16, breaks=True):
        super().__init__()
        self.gradient_checkpointing = True
        self.up, self.down = TorchtuneLoRALinear(h, 2 * h, 4), TorchtuneLoRALinear(2 * h, h, 4)
        self.breaks = breaks

    def _body(self, x):
        if self.breaks:
            torch._dynamo.graph_break()
        return self.down(torch.tanh(self.up(x)))

    def forward(self, x):
        return ckpt.checkpoint(self._body, x, use_reentrant=False)


class Net(nn.Module):
    def __init__(self, breaks=True):
        super().__init__()
        self.inp = TorchtuneLoRALinear(16, 16, 4)
        self.blocks = nn.ModuleList([Block(breaks=breaks), Block(breaks=breaks)])

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_lora_layers_of_peft_torchtune_and_loralib_models():
    assert len(lora_layers(peft_llama(layers=2))) == 14
    assert sorted(lora_layers(Net())) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up", "inp"]


@pytest.mark.parametrize("door", ["name", "make_backend"])
def test_layers_run_eagerly_in_a_checkpointed_region_are_named_once(door):
    torch.manual_seed(0)
    model = Net()
    backend = "runlora" if door == "name" else runlora_fx.make_backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compiled(torch.randn(2, 3, 16)).sum().backward()
    ours = [str(w.message) for w in caught if "ran outside every compiled graph" in str(w.message)]
    assert len(ours) == 1, ours
    assert "checkpointed region blocks.0" in ours[0] and "graph_break" in ours[0].replace(" ", "_").lower()
    cov = runlora_fx.coverage(compiled)
    fates = {f.path: f for f in cov.layers}
    assert fates["inp"].status == "rewritten"
    eager = {p for p, f in fates.items() if f.status == "ran eagerly"}
    assert eager == {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}
    assert fates["blocks.1.up"].region == "blocks.1" and fates["blocks.1.up"].graph_breaks
    assert "4 ran eagerly" in cov.summary() and "1 rewritten" in cov.summary()


def test_no_warning_and_every_layer_rewritten_when_the_region_compiles():
    torch.manual_seed(0)
    model = Net(breaks=False)
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 3, 16)).sum().backward()
    assert not [w for w in caught if "ran outside every compiled graph" in str(w.message)]
    cov = runlora_fx.coverage(model)
    assert cov.count("rewritten") == 5 and len(cov.layers) == 5, str(cov)


def test_eager_runs_outside_a_compiled_call_are_not_flagged():
    model = Net()
    torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager"))(torch.randn(2, 3, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 3, 16))  # the user's own eager call
    assert runlora_fx.coverage(model).count("ran eagerly") <= 4
    assert not [w for w in caught if "ran outside every compiled graph" in str(w.message)]


def test_hf_checkpointed_llama_every_layer_rewritten():
    model = peft_llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compiled = torch.compile(model, backend=runlora_fx.make_backend(inner="aot_eager"))
    lm_loss(compiled, lm_inputs()).backward()
    cov = runlora_fx.coverage(model)
    assert cov.count("rewritten") == 14, str(cov)


def test_explain_reports_coverage():
    report = runlora_fx.explain(Net(), torch.randn(2, 3, 16))
    assert report.coverage is not None and report.coverage.count("ran eagerly") == 4
    assert "ran eagerly" in str(report) and report.to_dict()["coverage"]
