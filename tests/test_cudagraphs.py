"""CUDA graphs: ``torch.compile(..., backend="runlora", mode="reduce-overhead")`` keeps them.

Inductor hands each compiled graph to cudagraphs only if the post-grad graph has no op it
refuses (a CPU sync such as ``_local_scalar_dense``/``.item()``, ``_assert_scalar``, an op tagged
``cudagraph_unsafe``, an unbacked symbol), mutates no input that is not static (parameters and
buffers), rebinds no input's storage, and takes only tensors, SymInts and generators. These
tests capture the exact graphs inductor would check (``compile_fx``'s ``inner_compile``, after
inductor's own post-grad passes) for the lowered chain of every plan pair, the sibling group,
DoRA and the 4-bit ops, and apply inductor's checks (``torch._inductor.cudagraph_utils``,
``torch._inductor.utils.get_first_incompatible_cudagraph_node``) to them.

What a CPU cannot show: inductor's device check (a CPU node in a CUDA graph), which fails by
construction here; and the replay itself. The GPU suite runs the TinyLlama step with
``mode="reduce-overhead"`` (benchmarks/gpu_suite.sh) for that.
"""

import functools

import pytest
import torch
import torch.nn as nn
from torch._inductor import compile_fx as inductor_compile_fx
from torch._inductor import cudagraph_utils
from torch._inductor.utils import get_first_incompatible_cudagraph_node

import runlora_fx
from test_dora import peft_dora_mlp
from test_precision_policy import LoraLinear
from test_group import Siblings, sibling_inputs

SYNC_OPS = ("_local_scalar_dense", "item", "_assert_scalar", "nonzero", "sym_constrain_range")




def _mutated_inputs(gm) -> set:
    """Placeholder indices written by an op of the post-grad graph (what inductor calls mutated inputs)."""
    placeholders = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    mutated = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and value in placeholders:
                mutated.add(placeholders[value])
    return mutated


def cudagraph_refusals(gm, example_inputs, static_input_idxs) -> list:
    """Every reason inductor's checks give to keep ``gm`` out of CUDA graphs (device aside)."""
    reasons = []
    node = get_first_incompatible_cudagraph_node(gm)
    if node is not None:
        reasons.append(f"incompatible op {node.target}")
    reasons += [f"CPU sync {n.target}" for n in gm.graph.nodes
                if n.op == "call_function" and getattr(n.target, "_opname", None) in SYNC_OPS]
    storage = cudagraph_utils.get_input_storage_mutation_reason(cudagraph_utils.get_input_storage_mutation_info(gm))
    if storage:
        reasons.append(storage)
    not_static = _mutated_inputs(gm) - set(static_input_idxs)
    if not_static:
        reasons.append(f"mutated inputs that are not static: {sorted(not_static)}")
    if not all(isinstance(t, (torch.Tensor, torch.SymInt, torch.Generator)) for t in example_inputs):
        reasons.append("non-Tensor inputs")
    if any(isinstance(t, torch.SymInt) for t in example_inputs):
        reasons.append("host-side shape inputs (SymInt) in a static-shape compile")
    return reasons


def captured_graphs(model, inputs, monkeypatch, **backend_kwargs):
    """Compiles ``model`` with the runlora backend in mode="reduce-overhead", runs forward and
    backward, and returns (backend, [(post-grad gm, example inputs, inner_compile kwargs)])."""
    graphs = []

    def capture(gm, example_inputs, **kwargs):
        inductor_compile_fx._recursive_post_grad_passes(gm, is_inference=kwargs.get("is_inference", False))
        graphs.append((gm, list(example_inputs), kwargs))

        def run(args):
            values = list(args)
            args.clear()
            return gm(*values)

        run._boxed_call = True
        return run  # the graph runs as is: no code generation, so every case stays fast on a CPU

    monkeypatch.setattr(inductor_compile_fx, "compile_fx",
                        functools.partial(inductor_compile_fx.compile_fx, inner_compile=capture))
    torch._dynamo.reset()
    backend = runlora_fx.make_backend(mode="reduce-overhead", **backend_kwargs)
    out = torch.compile(model, backend=backend)(*inputs)
    (out if isinstance(out, torch.Tensor) else out.logits).float().square().mean().backward()
    return backend, graphs


def assert_cudagraph_safe(backend, graphs, sites):
    assert sum(r.rewritten for r in backend.reports) == sites, [str(r) for r in backend.reports]
    assert [("is_backward" in kw) for _, _, kw in graphs] == [False, True], "expected one forward, one backward"
    for gm, example_inputs, kwargs in graphs:
        assert kwargs["cudagraphs"], "mode='reduce-overhead' did not reach inductor"
        assert cudagraph_refusals(gm, example_inputs, kwargs["static_input_idxs"]) == [], gm.code
        gm.graph.lint()


PAIRS = [(f, b) for f in ("forward1", "forward2") for b in ("backward1", "backward4", "backward5")]


@pytest.mark.parametrize("forward,backward", PAIRS, ids=[f"{f}-{b}" for f, b in PAIRS])
def test_lowered_chain_of_each_plan_pair_is_cudagraph_safe(forward, backward, monkeypatch):
    torch.manual_seed(0)
    backend, graphs = captured_graphs(LoraLinear(o=48), (torch.randn(4, 64, 32, requires_grad=True),), monkeypatch,
                                      forward_plan=forward, backward_plan=backward)
    assert backend.reports[0].plan_counts() == {f"{forward}/{backward}": 1}
    for gm, _, _ in graphs:  # the lowered chain, not the op
        assert not [n for n in gm.graph.nodes if "runlora" in str(n.target)], gm.code
    assert_cudagraph_safe(backend, graphs, sites=1)


def test_opaque_op_is_cudagraph_safe(monkeypatch):
    torch.manual_seed(0)
    backend, graphs = captured_graphs(LoraLinear(o=48), (torch.randn(4, 64, 32, requires_grad=True),), monkeypatch,
                                      lowering="opaque", allow_merged=True)
    assert any("runlora" in str(n.target) for gm, _, _ in graphs for n in gm.graph.nodes)
    assert_cudagraph_safe(backend, graphs, sites=1)


def test_sibling_group_is_cudagraph_safe(monkeypatch):
    torch.manual_seed(0)
    backend, graphs = captured_graphs(Siblings(), sibling_inputs(), monkeypatch, group_siblings=True)
    assert backend.reports[0].groups(), str(backend.reports[0])
    assert_cudagraph_safe(backend, graphs, sites=4)


def test_dora_is_cudagraph_safe(monkeypatch):
    backend, graphs = captured_graphs(peft_dora_mlp(), (torch.randn(4, 16, 32, requires_grad=True),), monkeypatch)
    assert_cudagraph_safe(backend, graphs, sites=2)


def test_4bit_base_is_cudagraph_safe(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit case needs bitsandbytes (in the test extra)")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=False)
    base = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=4, target_modules=["0"]))
    backend, graphs = captured_graphs(model, (torch.randn(4, 16, 64, requires_grad=True),), monkeypatch,
                                      rewrite_4bit=True)
    assert_cudagraph_safe(backend, graphs, sites=1)


def test_the_checks_refuse_a_graph_inductor_would_refuse(monkeypatch):
    """The negative controls: an input mutated in place, then a CPU sync, are caught."""
    class Bad(nn.Module):
        def forward(self, x, counter):
            counter.add_(1)
            return x * 2

    backend, graphs = captured_graphs(Bad(), (torch.randn(4, 8, requires_grad=True), torch.zeros(())), monkeypatch)
    reasons = [r for gm, ex, kw in graphs for r in cudagraph_refusals(gm, ex, kw["static_input_idxs"])]
    assert any("mutated inputs" in r for r in reasons), reasons


def test_the_checks_refuse_a_cpu_sync(monkeypatch):
    class Sync(nn.Module):
        def forward(self, x):
            k = x.detach().abs().sum().int().item()  # a size read back to the host
            return x * torch.ones(k).sum()

    with torch._dynamo.config.patch(capture_scalar_outputs=True):  # .item() in the graph, not a break
        backend, graphs = captured_graphs(Sync(), (torch.randn(4, 8, requires_grad=True),), monkeypatch)
    reasons = [r for gm, ex, kw in graphs for r in cudagraph_refusals(gm, ex, kw["static_input_idxs"])]
    assert any("_local_scalar_dense" in r for r in reasons), reasons
