"""The front doors: backend="runlora" with mode/options, install(), HF Trainer, per-layer
compile, warm starts from the compile caches, dump numbering, tuning progress.

Every compiled run is compared with eager (fp32: loss and every gradient, rtol 1e-4) and counts
the rewritten sites.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import runlora_fx
from runlora_fx.choose.measure import Autotuner, TuneKey, _Progress, pair_name
from runlora_fx.install import LowerRunLoRAOps, RunLoRAPass, source_fingerprint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL, ATOL = 1e-4, 1e-5  # fp32


class LoraLinear(nn.Module):
    """A hand-written LoRA layer: frozen base, y = x W^T + b + s (x A^T) B^T."""

    def __init__(self, i, o, r=4, scaling=2.0):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, i) / i**0.5)
        self.lora_b = nn.Parameter(torch.randn(o, r) * 0.05)
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)


def two_layers():
    torch.manual_seed(0)
    return nn.Sequential(LoraLinear(32, 48), nn.GELU(), LoraLinear(48, 32))


def peft_llama(layers=1, hidden=32, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: make the LoRA branch matter
            nn.init.normal_(p, std=0.05)
    return model


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same_step(compiled, model, ref, x):
    """One forward + backward of ``compiled`` (wrapping ``model``) against ``ref`` in eager."""
    loss = compiled(x).pow(2).mean()
    loss.backward()
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    got, want = grads(model), grads(ref)
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


@pytest.fixture
def cold_caches():
    """No AOTAutograd / FX graph cache: the pre-grad passes run (a cache hit runs none).
    Compiled kernels are still reused from disk."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def lowered_count(graph):
    return sum(getattr(n.target, "__name__", "") == "lowered_lora_linear" for n in graph.nodes)


def dumped_reports(directory):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(directory, "graph_*.report.json")))]


# --- 1. backend="runlora" with mode= / options= ---------------------------------------------
def test_compile_mode_reaches_inductor_through_the_runlora_backend(tmp_path, monkeypatch, cold_caches):
    monkeypatch.setenv("RUNLORA_DUMP_DIR", str(tmp_path))
    seen = []
    lower_call = LowerRunLoRAOps.__call__

    def spy(self, graph):
        seen.append((torch._inductor.config.max_autotune, torch._inductor.config.coordinate_descent_tuning))
        return lower_call(self, graph)

    monkeypatch.setattr(LowerRunLoRAOps, "__call__", spy)
    model = two_layers()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="runlora", mode="max-autotune-no-cudagraphs")
    assert_same_step(compiled, model, ref, torch.randn(16, 32))
    (report,) = dumped_reports(tmp_path)
    assert len(report["sites"]) == 2 and not report["rejected"]
    assert seen == [(True, True)]  # the mode's patches were in force while inductor compiled
    assert torch._inductor.config.max_autotune is False  # and only then


def test_inductor_options_dict_through_make_backend():
    backend = runlora_fx.make_backend(inductor_options={"epilogue_fusion": False})
    model = two_layers()
    ref = copy.deepcopy(model)
    assert_same_step(torch.compile(model, backend=backend), model, ref, torch.randn(16, 32))
    assert len(backend.reports[0].sites) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"options": {"no_such_option": 1}}, "Unexpected optimization option no_such_option"),
    ({"options": {"epilogue_fusion": "yes"}}, "Unexpected type of attr epilogue_fusion"),
    ({"mode": "fastest-please"}, "Unrecognized mode=fastest-please"),
])
def test_what_inductor_rejects_is_rejected_with_inductors_message(kwargs, message):
    with pytest.raises(Exception, match=message):
        torch.compile(two_layers(), backend="runlora", **kwargs)(torch.randn(4, 32))
    inductor_kwargs = {"mode": kwargs.get("mode"), "inductor_options": kwargs.get("options")}
    with pytest.raises(RuntimeError, match=message):
        runlora_fx.make_backend(**inductor_kwargs)


# --- 2. install() ---------------------------------------------------------------------------
def test_install_rewrites_every_site_under_plain_inductor(cold_caches):
    model = two_layers()
    ref = copy.deepcopy(model)
    before = torch._inductor.config.pre_grad_custom_pass
    with runlora_fx.install() as pass_:
        assert torch._inductor.config.pre_grad_custom_pass is pass_
        assert_same_step(torch.compile(model), model, ref, torch.randn(16, 32))
    assert torch._inductor.config.pre_grad_custom_pass is before
    (report,) = pass_.reports
    assert len(report.sites) == 2 and not report.rejected


def test_the_pre_grad_graph_still_has_dynamos_example_values(monkeypatch, cold_caches):
    seen = []
    rewrite_call = RunLoRAPass.__call__

    def spy(self, graph):
        nodes = [n for n in graph.nodes if n.op == "call_function"]
        seen.append(all("example_value" in n.meta for n in nodes))
        rewrite_call(self, graph)
        seen.append(lowered_count(graph))

    monkeypatch.setattr(RunLoRAPass, "__call__", spy)
    with runlora_fx.install():
        torch.compile(two_layers())(torch.randn(4, 32, requires_grad=True))
    assert seen == [True, 2]


def test_install_uninstall_restore_and_chain_a_previous_pass():
    def user_pass(graph):
        return None

    with torch._inductor.config.patch(pre_grad_custom_pass=user_pass):
        _install_uninstall_in_order(user_pass)
    assert torch._inductor.config.pre_grad_custom_pass is None


def _install_uninstall_in_order(user_pass):
    first = runlora_fx.install(criterion="roofline")
    assert torch._inductor.config.pre_grad_custom_pass == [user_pass, first]
    second = runlora_fx.install(allow_merged=False)
    assert runlora_fx.uninstall() is second
    assert torch._inductor.config.pre_grad_custom_pass == [user_pass, first]
    assert runlora_fx.uninstall() is first
    assert torch._inductor.config.pre_grad_custom_pass is user_pass
    assert runlora_fx.uninstall() is None
    with pytest.raises(TypeError, match="unknown option"):
        runlora_fx.install(criterio="flops")
    assert torch._inductor.config.pre_grad_custom_pass is user_pass


def test_install_pass_uuid_covers_version_sources_and_options():
    a = runlora_fx.install(forward_plan="forward1")
    b = runlora_fx.install(forward_plan="forward2")
    c = runlora_fx.install(forward_plan="forward1")
    try:
        assert a.uuid() == c.uuid() != b.uuid()
        assert runlora_fx.__version__ in a.uuid() and source_fingerprint() in a.uuid()
        assert a.options.key() in a.uuid()
    finally:
        a.uninstall()
    assert not (a.installed or b.installed or c.installed)


# --- 3. HF Trainer, per-layer compile -------------------------------------------------------
class _TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows=8, seq=16, vocab=64):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (rows, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, name, model, **args):
    from transformers import Trainer, TrainingArguments

    losses = []

    class Record(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    targs = TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
                              learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                              logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, **args)
    Record(model=model, args=targs, train_dataset=_TokenRows()).train()
    return losses


@pytest.mark.slow
def test_hf_trainer_torch_compile_after_install_trains_like_inductor(tmp_path):
    plain = _train(tmp_path, "plain", peft_llama(), torch_compile=True)
    torch._dynamo.reset()
    with runlora_fx.install() as pass_, torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):  # a cache hit would run no pass
        rewritten = _train(tmp_path, "runlora", peft_llama(), torch_compile=True)
    assert len(rewritten) == len(plain) == 4
    torch.testing.assert_close(rewritten, plain, rtol=1e-4, atol=1e-5)
    assert sum(len(r.sites) for r in pass_.reports) == 7  # q k v o gate up down of the one layer
    assert all(not r.rejected for r in pass_.reports)


@pytest.mark.slow
def test_hf_trainer_gradient_checkpointing_after_install_rewrites_every_site(tmp_path):
    """Trainer(gradient_checkpointing=True, torch_compile=True) with the default use_cache: the
    checkpointed layer compiles (``passes/upstream.py``) and every site in it is rewritten."""
    eager = _train(tmp_path, "eager", peft_llama(), gradient_checkpointing=True)
    torch._dynamo.reset()
    with runlora_fx.install() as pass_, torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        rewritten = _train(tmp_path, "runlora", peft_llama(), torch_compile=True, gradient_checkpointing=True)
    torch.testing.assert_close(rewritten, eager, rtol=1e-4, atol=1e-5)
    assert sum(len(r.sites) for r in pass_.reports) == 7


def test_hf_trainer_with_a_precompiled_model_needs_remove_unused_columns_false(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_DUMP_DIR", str(tmp_path / "dumps"))
    eager = _train(tmp_path, "eager", peft_llama())
    compiled = torch.compile(peft_llama(), backend="runlora")
    with pytest.raises(ValueError, match="expected by the model: args,kwargs"):  # (*args, **kwargs): all dropped
        _train(tmp_path, "dropped", compiled)
    losses = _train(tmp_path, "kept", torch.compile(peft_llama(), backend="runlora"), remove_unused_columns=False)
    torch.testing.assert_close(losses, eager, rtol=1e-4, atol=1e-5)
    assert sum(len(r["sites"]) for r in dumped_reports(tmp_path / "dumps")) == 7


def test_per_layer_compile_by_backend_name_rewrites_every_site(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_DUMP_DIR", str(tmp_path))
    model, ref = peft_llama(layers=2), peft_llama(layers=2)
    for layer in model.base_model.model.model.layers:
        layer.compile(backend="runlora")
    ids = torch.randint(0, 64, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    want = grads(ref)
    for k, g in grads(model).items():
        torch.testing.assert_close(g, want[k], rtol=RTOL, atol=ATOL, msg=k)
    reports = dumped_reports(tmp_path)
    assert len(reports) == 2 and [len(r["sites"]) for r in reports] == [7, 7]


# --- 4. warm starts -------------------------------------------------------------------------
_WARM_START = textwrap.dedent('''
    import json, sys, torch
    import torch.nn as nn, torch.nn.functional as F
    import runlora_fx
    from torch._dynamo.utils import counters

    class LoraLinear(nn.Module):
        def __init__(self, i, o, r=4):
            super().__init__()
            self.base = nn.Linear(i, o)
            self.base.requires_grad_(False)
            self.lora_a = nn.Parameter(torch.randn(r, i) / i**0.5)
            self.lora_b = nn.Parameter(torch.randn(o, r) * 0.05)

        def forward(self, x):
            return self.base(x) + 2.0 * F.linear(F.linear(x, self.lora_a), self.lora_b)

    torch.manual_seed(0)
    model = LoraLinear(32, 48)
    backend = runlora_fx.make_backend(forward_plan=sys.argv[1])
    x = torch.randn(16, 32)
    loss = torch.compile(model, backend=backend)(x).pow(2).mean()
    loss.backward()
    from runlora_fx.install import LowerRunLoRAOps
    print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                      "uuid": LowerRunLoRAOps().uuid(), "package": runlora_fx.__file__,
                      "sites": len(backend.reports[0].sites), "loss": loss.item(),
                      "grad": model.lora_a.grad.sum().item()}))
''')


def _compile_in_a_fresh_process(script, cache_dir, forward_plan):
    package = script.parent / "snapshot"  # runlora_fx's sources as of now: edits meanwhile change no key
    if not package.exists():
        shutil.copytree(os.path.dirname(runlora_fx.__file__), package / "runlora_fx",
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "RUNLORA_DUMP_DIR": "",
           "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), forward_plan], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_hits_the_compile_caches(tmp_path):
    script = tmp_path / "warm_start.py"
    script.write_text(_WARM_START)
    cold = _compile_in_a_fresh_process(script, tmp_path / "cache", "forward1")
    warm = _compile_in_a_fresh_process(script, tmp_path / "cache", "forward1")
    other = _compile_in_a_fresh_process(script, tmp_path / "cache", "forward2")
    assert cold["package"].startswith(str(tmp_path)) and warm["uuid"] == cold["uuid"]
    assert cold["aot"].get("autograd_cache_saved") == 1 and "autograd_cache_bypass" not in cold["aot"]
    assert warm["aot"].get("autograd_cache_hit") == 1 and warm["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert other["aot"].get("autograd_cache_miss") == 1  # another plan is another key
    assert cold["sites"] == warm["sites"] == other["sites"] == 1
    assert (warm["loss"], warm["grad"]) == (cold["loss"], cold["grad"])


def test_the_cached_graph_holds_the_op_and_inductor_runs_the_lowered_chain(monkeypatch, cold_caches):
    keyed, lowered = [], []
    lower_call = LowerRunLoRAOps.__call__

    def spy(self, graph):
        keyed.append(sum(n.target is torch.ops.runlora.lora_linear.default for n in graph.nodes))
        lower_call(self, graph)
        lowered.append(lowered_count(graph))

    monkeypatch.setattr(LowerRunLoRAOps, "__call__", spy)
    model = two_layers()
    ref = copy.deepcopy(model)
    assert_same_step(torch.compile(model, backend="runlora"), model, ref, torch.randn(16, 32))
    assert keyed == [2] and lowered == [2]


# --- 5. dumps -------------------------------------------------------------------------------
def test_two_compiles_in_one_process_do_not_overwrite_each_others_dumps(tmp_path):
    fresh = tmp_path / "fresh"
    first = runlora_fx.make_backend(inner="eager", dump_dir=str(fresh))
    second = runlora_fx.make_backend(inner="eager", dump_dir=str(fresh))
    torch.compile(two_layers(), backend=first)(torch.randn(4, 32))
    torch.compile(LoraLinear(8, 12), backend=second)(torch.randn(3, 8))
    names = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(str(fresh / "*.report.json")))
    assert names == ["graph_0", "graph_1"]
    assert [r["sites"][0]["i"] for r in dumped_reports(fresh)] == [32, 8]
    assert first.reports[0].graph == "graph_0" and second.reports[0].graph == "graph_1"
    other = runlora_fx.make_backend(inner="eager", dump_dir=str(tmp_path / "other"))
    torch.compile(LoraLinear(8, 12), backend=other)(torch.randn(3, 8))
    assert os.path.exists(tmp_path / "other" / "graph_0.report.json")  # a fresh directory starts at 0


# --- 6. tuning progress ---------------------------------------------------------------------
class SlowTimer:
    """A fake timer that takes ``seconds`` of wall time per pair."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, key, forward, backward):
        time.sleep(self.seconds)
        return 1e-3


def _requests(count):
    pairs = [pair_name(f, b) for f in ("forward1", "forward2") for b in ("backward1", "backward5")]
    return [(TuneKey("fake device", torch.__version__, "float32", None, n, 32, 48, 4, (True, True, True), False,
                     True), pairs) for n in range(1, count + 1)]


def test_tuning_longer_than_two_seconds_shows_a_tqdm_bar(tmp_path, capsys):
    pytest.importorskip("tqdm")
    Autotuner(cache_dir=str(tmp_path), timer=SlowTimer(0.3), progress=True).measure_all(_requests(3))
    err = capsys.readouterr().err
    assert "runlora: tuning 1/3" in err  # the line first,
    assert "runlora: tuning:" in err and "shape" in err  # then tqdm's bar (desc, unit) after ~2 s


def test_a_quick_tuning_shows_only_the_line(tmp_path, capsys):
    Autotuner(cache_dir=str(tmp_path), timer=SlowTimer(0.0), progress=True).measure_all(_requests(3))
    err = capsys.readouterr().err
    assert "runlora: tuning 3/3" in err and "runlora: tuning:" not in err


def test_without_tqdm_the_line_goes_on(monkeypatch):
    import io

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    clock = iter([0.0, 5.0, 6.0])
    stream = io.StringIO()
    progress = _Progress(2, stream=stream, enabled=True, clock=lambda: next(clock))
    progress.update(0, "first")
    progress.update(1, "second")
    progress.close()
    assert "runlora: tuning 1/2: first" in stream.getvalue() and "runlora: tuning 2/2: second" in stream.getvalue()
