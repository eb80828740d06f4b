"""Reliability: clear errors on bad input, odd but valid inputs, old artifacts, and scale."""

import itertools
import operator
import re
import subprocess
import sys
import time
import warnings
import zipfile

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

import runlora_fx
from runlora_fx._compat import check_torch_version
from runlora_fx.passes.rewrite import rewrite
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS

op = torch.ops.runlora.lora_linear
PAIRS = list(itertools.product(FORWARD_PLANS, BACKWARD_PLANS))


def reference(x, W, b, A, B, s, xl=None):
    return F.linear(x, W, b) + F.linear(F.linear(x if xl is None else xl, A), B) * s


# --- the op: bad arguments give ValueErrors naming the argument and the shapes ----------------
def _good(**override):
    """Arguments of a valid call (x 3×8, W 16×8, r=4), built in the current (fake) mode."""
    args = dict(x=torch.empty(3, 8), weight=torch.empty(16, 8), bias=None, lora_A=torch.empty(4, 8),
                lora_B=torch.empty(16, 4), scaling=0.5)
    args.update({k: v() if callable(v) else v for k, v in override.items()})
    return args


BAD_ARGS = {
    "x last dim": (dict(x=lambda: torch.empty(3, 7)), r"x has shape \(3, 7\), expected \(\.\.\., 8\) .*\(16, 8\)"),
    "1-D weight": (dict(weight=lambda: torch.empty(16)), r"weight must be 2-D \(out, in\); got shape \(16,\)"),
    "lora_A in": (dict(lora_A=lambda: torch.empty(4, 9)), r"lora_A has shape \(4, 9\), expected \(r, 8\)"),
    "1-D lora_A": (dict(lora_A=lambda: torch.empty(8)), r"lora_A has shape \(8,\), expected \(r, 8\)"),
    "lora_B out": (dict(lora_B=lambda: torch.empty(15, 4)), r"lora_B has shape \(15, 4\), expected \(16, 4\)"),
    "lora_B rank": (dict(lora_B=lambda: torch.empty(16, 5)), r"lora_B has shape \(16, 5\), expected \(16, 4\)"),
    "bias": (dict(bias=lambda: torch.empty(15)), r"bias has shape \(15,\), expected \(16,\)"),
    "x_lora": (dict(x_lora=lambda: torch.empty(2, 8)), r"x_lora has shape \(2, 8\), expected x's shape \(3, 8\)"),
    "weight dtype": (dict(weight=lambda: torch.empty(16, 8, dtype=torch.float64)),
                     r"x, weight and bias must share a dtype; got x torch.float32, weight torch.float64"),
    "bias dtype": (dict(bias=lambda: torch.empty(16, dtype=torch.bfloat16)), r"bias torch.bfloat16"),
    "adapter dtype": (dict(lora_A=lambda: torch.empty(4, 8, dtype=torch.float64)),
                      r"LoRA branch computes in torch.float32 .* lora_A torch.float64, lora_B torch.float32"),
    "device": (dict(lora_B=lambda: torch.empty(16, 4, device="meta")),
               r"one device; got .*'lora_B': device\(type='meta'\)"),
    "forward plan": (dict(forward_plan="forward9"),
                     r"forward_plan='forward9': unknown forward plan 'forward9'; known: \['forward1', 'forward2'\]"),
    "backward plan": (dict(backward_plan="backward1|64:backward0"),
                      r"backward_plan=.*unknown backward plan 'backward0'; known: \['backward1', .*'backward8'\]"),
    "malformed plan": (dict(forward_plan="forward1|x:forward2"), r"forward_plan=.*malformed plan"),
    "merged + x_lora": (dict(x_lora=lambda: torch.empty(3, 8), forward_plan="forward2"),
                        r"forward plan 'forward2' merges W \+ sBA, which needs x_lora=None"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "eager"])
def test_bad_op_arguments_raise_value_error_naming_them(case, fake):
    override, pattern = BAD_ARGS[case]
    mode = FakeTensorMode() if fake else torch.no_grad()
    with mode, pytest.raises(ValueError, match=r"^runlora\.lora_linear: .*" + pattern):
        op(**_good(**override))


# --- the op: odd but valid inputs ---------------------------------------------------------------
@pytest.mark.parametrize("fwd,bwd", PAIRS)
def test_non_contiguous_inputs_give_correct_results(fwd, bwd):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()  # (2, 5, 12)
    W = torch.randn(20, 12, dtype=torch.float64, generator=g).t().contiguous().t()  # (20, 12), strides (1, 20)
    A = torch.randn(12, 4, dtype=torch.float64, generator=g).t().requires_grad_()  # (4, 12) view
    B = torch.randn(4, 20, dtype=torch.float64, generator=g).t().requires_grad_()  # (20, 4) view
    b = torch.randn(40, dtype=torch.float64, generator=g)[::2]  # strided bias
    assert not (x.is_contiguous() or W.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    gy = torch.randn(2, 5, 20, dtype=torch.float64, generator=g)
    y = op(x, W, b, A, B, 0.7, None, None, fwd, bwd)
    ref = reference(x, W, b, A, B, 0.7)
    torch.testing.assert_close(y, ref)
    for got, want in zip(torch.autograd.grad(y, (x, A, B), gy), torch.autograd.grad(ref, (x, A, B), gy)):
        torch.testing.assert_close(got, want)


def test_non_contiguous_inputs_pass_opcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, dtype=torch.float64, generator=g).t().requires_grad_()
    W = torch.randn(12, 10, dtype=torch.float64, generator=g).t()
    A = torch.randn(12, 3, dtype=torch.float64, generator=g).t().requires_grad_()
    B = torch.randn(3, 10, dtype=torch.float64, generator=g).t().requires_grad_()
    for fwd, bwd in (("forward1", "backward1"), ("forward2", "backward5"), ("forward2", "backward4")):
        torch.library.opcheck(op.default, (x, W, None, A, B, 0.5, None, None, fwd, bwd))


@pytest.mark.parametrize("fwd,bwd", PAIRS)
@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["n0", "b2s0"])
def test_zero_tokens_forward_and_backward(fwd, bwd, shape):
    x = torch.randn(*shape, 8, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    A = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    y = op(x, W, b, A, B, 0.5, None, None, fwd, bwd)
    assert y.shape == (*shape, 16)
    gx, ga, gb = torch.autograd.grad(y.sum(), (x, A, B))
    assert gx.shape == x.shape and ga.shape == A.shape and gb.shape == B.shape
    assert not ga.any() and not gb.any()


class LoraLayer(nn.Module):
    def __init__(self, i=8, o=12, r=2):
        super().__init__()
        self.W = nn.Parameter(torch.randn(o, i), requires_grad=False)
        self.A, self.B = nn.Parameter(torch.randn(r, i)), nn.Parameter(torch.randn(o, r))

    def forward(self, x):
        return F.linear(x, self.W) + F.linear(F.linear(x, self.A), self.B) * 0.5


def test_zero_tokens_through_the_pass():
    layer = LoraLayer(8, 16, 4)
    gm = fx.symbolic_trace(layer)
    x = torch.randn(0, 8, requires_grad=True)
    ShapeProp(gm).propagate(x)
    assert rewrite(gm).rewritten == 1
    y = gm(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and not layer.A.grad.any()


# --- the public API: bad options name the allowed values ----------------------------------------
def _tiny_graph():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    ShapeProp(gm).propagate(torch.randn(2, 4))
    return gm


@pytest.mark.parametrize("call,pattern", [
    (lambda: runlora_fx.make_backend(inner="nope"),
     r"inner='nope', expected one of \('inductor', 'aot_eager', 'eager'\)"),
    (lambda: runlora_fx.make_backend(lowering="nope"), r"lowering='nope', expected one of \('aten', 'opaque'\)"),
    (lambda: rewrite(_tiny_graph(), criterion="nope"), r"criterion 'nope' is not available; expected .*'flops'"),
    (lambda: rewrite(_tiny_graph(), forward_plan="forward9"),
     r"unknown forward plan 'forward9'; known: \['forward1'"),
    (lambda: rewrite(_tiny_graph(), backward_plan="backward1|8:bw"),
     r"unknown backward plan 'bw'; known: \['backward1'"),
], ids=["inner", "lowering", "criterion", "forward_plan", "backward_plan"])
def test_bad_public_options_raise_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# --- torch versions --------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.9.0", "2.10.1+cu126", "2.14.0", "3.0.0", "1.13.1"])
def test_unsupported_torch_version_names_the_supported_range(version):
    with pytest.raises(ImportError, match=re.escape(f"supports torch>=2.11,<2.14; found torch {version}")):
        check_torch_version(version)


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.11.0", "2.12.1+cu130", "2.13.0a0+git1234"])
def test_supported_torch_versions_pass(version):
    check_torch_version(version)


# --- saved programs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pt2(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "lora.pt2"
    ep = torch.export.export(LoraLayer(), (torch.randn(3, 8),))
    ep = runlora_fx.rewrite_exported_program(ep, forward_plan="forward1")
    assert ep.runlora_report.rewritten == 1
    torch.export.save(ep, path)
    return path


def test_pt2_loaded_without_runlora_fx_names_the_op(saved_pt2):
    script = f"import torch; torch.export.load({str(saved_pt2)!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "runlora.lora_linear" in done.stderr, done.stderr[-2000:]


def test_pt2_with_a_plan_this_version_does_not_know(saved_pt2, tmp_path):
    """A program saved by a (hypothetical) newer runlora_fx with plan 'forward9' fails with a
    message naming the plan and the known ones, not a KeyError deep inside."""
    patched = tmp_path / "forward9.pt2"
    with zipfile.ZipFile(saved_pt2) as src, zipfile.ZipFile(patched, "w", zipfile.ZIP_STORED) as dst:
        replaced = 0
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("models/model.json"):
                replaced = data.count(b'"as_string": "forward1"')
                data = data.replace(b'"as_string": "forward1"', b'"as_string": "forward9"')
            dst.writestr(info, data)
    assert replaced == 1
    module = runlora_fx.load(patched).module()
    with pytest.raises(ValueError, match=r"forward_plan='forward9': unknown forward plan 'forward9'; "
                                         r"known: \['forward1', 'forward2'\]"):
        module(torch.randn(3, 8))


# --- scale -------------------------------------------------------------------------------------
def deep_lora_graph(sites: int, width: int = 8, rank: int = 2):
    """An fx graph of ``sites`` chained LoRA linears, built directly (tracing 1000 modules takes
    longer than the pass), with ShapeProp's metadata; returns it, an input and its output."""
    g = torch.Generator().manual_seed(0)
    root, graph = nn.Module(), fx.Graph()
    h = graph.placeholder("x")
    for k in range(sites):
        w = torch.randn(width, width, generator=g) / width**0.5
        root.register_parameter(f"w{k}", nn.Parameter(w, requires_grad=False))
        root.register_parameter(f"a{k}", nn.Parameter(torch.randn(rank, width, generator=g)))
        root.register_parameter(f"b{k}", nn.Parameter(torch.randn(width, rank, generator=g) * 0.1))
        base = graph.call_function(F.linear, (h, graph.get_attr(f"w{k}")))
        xa = graph.call_function(F.linear, (h, graph.get_attr(f"a{k}")))
        lora = graph.call_function(operator.mul, (graph.call_function(F.linear, (xa, graph.get_attr(f"b{k}"))), 0.5))
        h = graph.call_function(operator.add, (base, lora))
    graph.output(h)
    gm = fx.GraphModule(root, graph)
    x = torch.randn(4, width, generator=g)
    ShapeProp(gm).propagate(x)
    with torch.no_grad():
        return gm, x, gm(x)


def _time_rewrite(sites: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        gm, x, want = deep_lora_graph(sites)
        start = time.perf_counter()
        report = rewrite(gm)
        best = min(best, time.perf_counter() - start)
        assert report.rewritten == sites and not report.rejected
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-4, atol=1e-5)
    return best


def test_rewrite_of_1000_sites_is_fast_and_linear():
    _time_rewrite(4, 1)  # warm caches and imports
    t250 = _time_rewrite(250, 3)  # best of 3: the machine is shared
    t1000 = _time_rewrite(1000, 3)
    print(f"rewrite: 250 sites {t250:.3f} s, 1000 sites {t1000:.3f} s")
    assert t1000 < 2.0, f"1000 sites took {t1000:.2f} s"
    # Linear up to noise; a quadratic step (say, a graph walk per site) would give ~16x.
    assert t1000 < 4 * t250 + 0.5, f"not linear: 250 sites {t250:.3f} s, 1000 sites {t1000:.3f} s"


def test_chained_rewrite_keeps_graph_contract():
    gm, x, want = deep_lora_graph(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "pass failed", no "erase_node on an already erased node"
        rewrite(gm)
    gm.graph.lint()
    ops = [n for n in gm.graph.nodes if n.target is op.default]
    assert len(ops) == 6 and [n.args[0] for n in ops[1:]] == ops[:-1]
    assert not [n for n in gm.graph.nodes if n.target in (F.linear, operator.add, operator.mul)]
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-6)
