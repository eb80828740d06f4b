"""Sites inside the higher-order regions Dynamo emits (activation checkpointing, wrap,
nested_compile_region): rewritten, reported with the user's paths, recomputed with the chosen
plan, trained as eager, and saving no more than the unrewritten checkpointed model."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode

import runlora_fx
from runlora_fx.passes.subgraphs import region_bodies

from test_pass import LORA_OP, TorchtuneLoRALinear, assert_same_training, lm_inputs, lm_loss, mse, peft_llama, seq_inputs

HOP = torch.ops.higher_order


def checkpointed(model, reentrant=False):
    """HF gradient checkpointing with the default use_cache (transformers 5.25 warns inside the
    checkpointed frame; ``passes/upstream.py`` makes that traceable)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    return model


class CheckpointedBlocks(nn.Module):
    """Two LoRA blocks, each run under torch.utils.checkpoint (``reentrant`` selects the form)."""

    def __init__(self, i=32, reentrant=False):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(TorchtuneLoRALinear(i, 2 * i, 4), nn.GELU(), TorchtuneLoRALinear(2 * i, i, 4))
            for _ in range(2))
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:
            x = ckpt.checkpoint(block, x, use_reentrant=self.reentrant)
        return x


SITE_PATHS = {f"layers.{layer}.{block}.{proj}" for layer in (0, 1) for block, projs in (
    ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for proj in projs}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_hf_gradient_checkpointing_every_site_rewritten_and_training_matches(reentrant):
    backend = assert_same_training(checkpointed(peft_llama(), reentrant), lm_inputs, lm_loss, expect_sites=14, steps=2,
                                   backend_kwargs=dict(inner="aot_eager", lowering="aten"))
    # HF's input-grad hook (requires_grad_ on the embedding output) breaks the graph before the
    # decoder, so Dynamo's frame, and the paths it records, start at the LlamaModel
    assert {s.path for r in backend.reports for s in r.sites} == SITE_PATHS
    assert not [x for r in backend.reports for x in r.rejected]


@pytest.mark.parametrize("backend_kwargs", [dict(inner="aot_eager", lowering="aten"),
                                            dict(inner="aot_eager", lowering="opaque"), dict(inner="eager")],
                         ids=["aot-lowered", "aot-opaque", "eager"])
def test_torch_utils_checkpoint_hand_written_model(backend_kwargs):
    torch.manual_seed(0)
    backend = assert_same_training(CheckpointedBlocks(), seq_inputs(32), mse, expect_sites=4, steps=2,
                                   backend_kwargs=backend_kwargs)
    assert {s.path for s in backend.reports[0].sites} == {f"blocks.{b}.{k}" for b in (0, 1) for k in (0, 2)}


def test_bodies_are_entered_lowered_and_lint():
    torch.manual_seed(0)
    grabbed = []
    backend = runlora_fx.make_backend(inner="aot_eager", lowering="aten",
                                      on_report=lambda r: grabbed.append(r))
    model = CheckpointedBlocks()
    gms = []

    def capture(gm, example_inputs):
        gms.append(gm)
        return backend(gm, example_inputs)

    torch.compile(model, backend=capture)(torch.randn(2, 5, 32, requires_grad=True)).sum().backward()
    (gm,) = gms
    bodies = region_bodies(gm)
    assert len(bodies) == 2
    hops = [n for n in gm.graph.nodes if n.target is HOP.tag_activation_checkpoint]
    assert len(hops) == 2
    for body in bodies:
        body.graph.lint()
        lowered = [n for n in body.graph.nodes if n.op == "call_function" and n.target.__name__ == "lowered_lora_linear"]
        assert len(lowered) == 2
        for node in lowered:
            assert "example_value" in node.meta and node.meta.get("nn_module_stack") and node.meta.get("stack_trace")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is LORA_OP:
            self.calls.append((args[8], args[9]))
        return func(*args, **(kwargs or {}))


def test_backward_recomputes_the_op_with_its_chosen_plans():
    """inner="eager": the checkpoint HOP runs torch.utils.checkpoint, so backward re-runs each
    site's op (the chosen forward plan) before its backward plan."""
    torch.manual_seed(0)
    backend = runlora_fx.make_backend(inner="eager")
    compiled = torch.compile(CheckpointedBlocks(), backend=backend)
    x = torch.randn(64, 8, 32, requires_grad=True)  # n=512 > i·o/(i+o): forward2 wins
    loss = compiled(x).pow(2).mean()
    chosen = sorted((s.forward_plan, s.backward_plan) for s in backend.reports[0].sites)
    assert any(f == "forward2" for f, _ in chosen), chosen
    counter = _CountOps()
    with counter:
        loss.backward()
    assert sorted(counter.calls) == chosen  # each site recomputed once, with its plans


def _saved(fn, persistent):
    """(count, bytes) of distinct activation tensors saved for backward (parameters excluded)."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())] = (
                t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(seen), sum(seen.values())


@pytest.mark.parametrize("inner", ["aot_eager"])
def test_saved_activations_no_more_than_unrewritten_checkpointed_model(inner):
    model = checkpointed(peft_llama())
    ref = copy.deepcopy(model)
    ids = lm_inputs()
    backend = runlora_fx.make_backend(inner=inner)
    ours = torch.compile(model, backend=backend)
    theirs = torch.compile(ref, backend=inner)
    lm_loss(ours, ids), lm_loss(theirs, ids)  # compile both
    assert sum(r.rewritten for r in backend.reports) == 14
    persistent = {p.untyped_storage().data_ptr() for m in (model, ref) for p in [*m.parameters(), *m.buffers()]}
    got = _saved(lambda: lm_loss(ours, ids), persistent)
    want = _saved(lambda: lm_loss(theirs, ids), persistent)
    assert got[0] <= want[0] and got[1] <= want[1], (got, want)


def test_gradient_checkpointing_on_qlora_base():
    pytest.importorskip("bitsandbytes")
    from test_qlora import qlora_llama

    model = checkpointed(qlora_llama())
    backend = assert_same_training(model, lm_inputs, lm_loss, expect_sites=14, steps=2)
    ops = {s.path.rsplit(".", 1)[-1] for r in backend.reports for s in r.sites}
    assert ops == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("reentrant", [True], ids=["reentrant"])
def test_reentrant_checkpoint_is_traced_as_the_same_region(reentrant):
    """torch 2.13's Dynamo traces use_reentrant=True into the same tag_activation_checkpoint
    op (with use_reentrant=True as a kwarg; AOTAutograd runs it non-reentrant): no graph break."""
    torch.manual_seed(0)
    backend = assert_same_training(CheckpointedBlocks(reentrant=reentrant), seq_inputs(32), mse, expect_sites=4,
                                   steps=2)
    assert len(backend.reports) == 1


def test_nested_compile_region_body_is_rewritten_once_for_every_call():
    torch.manual_seed(0)

    class Repeated(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(TorchtuneLoRALinear(32, 32, 4) for _ in range(3))

        @torch.compiler.nested_compile_region
        def block(self, layer, x):
            return torch.tanh(layer(x))

        def forward(self, x):
            for layer in self.blocks:
                x = self.block(layer, x)
            return x

    backend = assert_same_training(Repeated(), seq_inputs(32), mse, expect_sites=1, steps=2)
    assert len(backend.reports) == 1


def test_internal_error_leaves_every_body_unchanged(monkeypatch):
    import importlib

    rewrite_mod = importlib.import_module("runlora_fx.passes.rewrite")  # the package re-exports rewrite()

    torch.manual_seed(0)
    gms = []

    def capture(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch.compile(CheckpointedBlocks(), backend=capture)(torch.randn(2, 5, 32, requires_grad=True))
    (gm,) = gms
    before = [body.code for body in region_bodies(gm)]

    def fail(_sites):  # after the bodies were rewritten
        raise RuntimeError("planted")

    monkeypatch.setattr(rewrite_mod, "_warn_restored_dx", fail)
    with pytest.warns(UserWarning, match="pass failed, graph left unchanged"):
        report = rewrite_mod.rewrite(gm)
    assert report.rewritten == 0
    assert [body.code for body in region_bodies(gm)] == before
    for body in region_bodies(gm):
        assert not [n for n in body.graph.nodes if n.target is LORA_OP]
