"""The backend's safety net: a rewritten graph that fails to compile is compiled as it came,
with one warning and the report's ``fallback``; training then matches plain compilation."""

import copy
import warnings

import pytest
import torch

import runlora_fx
from runlora_fx.passes import lower

from test_pass import TorchtuneLoRALinear


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(TorchtuneLoRALinear(16, 32, 4), torch.nn.GELU(), TorchtuneLoRALinear(32, 16, 4))


def _step(model, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _injected(*_, **__):
    raise RuntimeError("injected failure in the lowered chain")


@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("backend_kwargs", [dict(), dict(inner="aot_eager")], ids=["inductor", "aot_eager"])
def test_injected_compile_failure_trains_like_plain_compile_and_warns_once(monkeypatch, phase, backend_kwargs):
    monkeypatch.setattr(lower._LoweredLoRA, phase, staticmethod(_injected))
    model, plain_model = _model(), _model()
    x = torch.randn(3, 5, 16)
    backend = runlora_fx.make_backend(**backend_kwargs)
    compiled = torch.compile(model, backend=backend)
    plain = torch.compile(plain_model, backend=backend_kwargs.get("inner", "inductor"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_step(compiled, x) for _ in range(2)]
    want = [_step(plain, x) for _ in range(2)]
    ours = [w for w in caught if "compiling it without the rewrite" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "injected failure" in str(ours[0].message) and "0" in str(ours[0].message)
    (report,) = backend.reports
    assert report.rewritten == 2 and "injected failure" in report.fallback
    assert "NOT APPLIED" in report.summary()
    for (loss, grads), (loss_want, grads_want) in zip(got, want):
        torch.testing.assert_close(loss, loss_want, rtol=1e-5, atol=1e-6)
        for g, h in zip(grads, grads_want):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_no_fallback_when_the_rewritten_graph_compiles():
    backend = runlora_fx.make_backend(inner="aot_eager")
    _step(torch.compile(_model(), backend=backend), torch.randn(3, 5, 16))
    (report,) = backend.reports
    assert report.rewritten == 2 and report.fallback is None
    assert report.to_dict()["fallback"] is None


def test_a_graph_that_fails_without_the_rewrite_too_raises(monkeypatch):
    """Only a failure the rewrite caused falls back: the graph as it came failing is raised."""
    from torch._dynamo.backends import debugging

    def broken(gm, example_inputs, **kwargs):
        raise RuntimeError("the inner compiler fails on every graph")

    monkeypatch.setattr(debugging, "aot_eager", broken)
    compiled = torch.compile(_model(), backend=runlora_fx.make_backend(inner="aot_eager"))
    with pytest.raises(Exception, match="fails on every graph"):
        compiled(torch.randn(3, 5, 16))


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_install_injected_failure_trains_like_plain_inductor_and_warns_once(monkeypatch, phase):
    """install(): the pass runs inside inductor's compile; a failure after it falls back too."""
    monkeypatch.setattr(lower._LoweredLoRA, phase, staticmethod(_injected))
    model, plain_model = _model(), _model()
    x = torch.randn(3, 5, 16)
    want = [_step(torch.compile(plain_model), x) for _ in range(2)]
    torch._dynamo.reset()
    with runlora_fx.install() as pass_, torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model)
        got = [_step(compiled, x) for _ in range(2)]
    ours = [w for w in caught if "compiling it without the rewrite" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    (report,) = pass_.reports
    assert report.rewritten == 2 and "injected failure" in report.fallback
    for (loss, grads), (loss_want, grads_want) in zip(got, want):
        torch.testing.assert_close(loss, loss_want, rtol=1e-5, atol=1e-6)
        for g, h in zip(grads, grads_want):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)
    import torch._inductor.compile_fx as compile_fx_module
    assert not getattr(compile_fx_module.compile_fx, "runlora_fallback", False)  # uninstalled: put back


class _PeftProj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        if x.dim() == 4:  # (2, heads, 12, head_dim): merged heads, a view whose head sizes go dynamic
            x = x.permute(0, 2, 1, 3).reshape(2, 12, 64)
        return self.proj(x)


def _peft_proj():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_PeftProj(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))


def test_dynamo_restarting_its_analysis_passes_through_the_net():
    """With dynamic=True Dynamo restarts its analysis from inside the backend
    (TensorifyScalarRestartAnalysis): its signal, not a failure to fall back from."""
    backend = runlora_fx.make_backend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(_peft_proj(), backend=backend, dynamic=True)(torch.randn(2, 12, 64, requires_grad=True)).sum() \
            .backward()
    assert not [w for w in caught if "without the rewrite" in str(w.message)]
    assert all(r.fallback is None for r in backend.reports) and sum(r.rewritten for r in backend.reports) >= 1


def test_symbolic_feature_sizes_are_priced_not_fallen_back_from():
    """A LoRA input whose feature size is symbolic (merged heads, head sizes dynamic on the
    second call): the lowered chain prices its X·Aᵀ at the size hints."""
    backend = runlora_fx.make_backend()
    compiled = torch.compile(_peft_proj(), backend=backend)
    for heads in (4, 8):
        compiled(torch.randn(2, heads, 12, 64 // heads, requires_grad=True)).sum().backward()
    assert len(backend.reports) == 2
    assert all(r.fallback is None and r.rewritten == 1 for r in backend.reports), [r.summary() for r in backend.reports]
