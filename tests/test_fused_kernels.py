"""The fused plan: its Triton kernels (``ops/fused.py``) against eager, its records and prices, and its selection.

The kernels run on CPU tensors through Triton's interpreter, which needs ``TRITON_INTERPRET=1``
set before triton is first imported; any pytest process has imported it by then (runlora_fx
imports torch._inductor, which imports triton), so setting it in this module would be too late.
``test_kernels_in_the_interpreter`` runs this file again in a subprocess with the variable set,
selecting the ``interpreted`` tests, which are skipped here. fp32 throughout (the interpreter's
tl.dot), fp16 for the mixed-dtype case; tolerances: rel 1e-5 against eager fp32.

    pytest tests/test_fused_kernels.py                                       # both halves
    TRITON_INTERPRET=1 pytest tests/test_fused_kernels.py -k interpreted     # the kernel half alone
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import pytest
import sympy
import torch
import torch.nn.functional as F

import runlora_fx
from runlora_fx.choose import measure, select
from runlora_fx.choose.roofline import Layout, backward_kernels, forward_kernels
from runlora_fx.ops import fused
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS, Needs, backward_plan, forward_plan
from runlora_fx.plans.catalogue import e_a, e_x, e_y, i as sym_i, n as sym_n, o as sym_o, r as sym_r

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not (INTERPRETED and fused.INTERPRETED),
                                 reason="runs in test_kernels_in_the_interpreter's TRITON_INTERPRET=1 subprocess")
NEEDS = [Needs(*c) for c in itertools.product([False, True], repeat=3) if any(c)]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _peft(x, W, b, A, B, s, x_lora=None):
    return F.linear(x, W, b) + F.linear(F.linear(x if x_lora is None else x_lora, A), B) * s


# --- the interpreter run ------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


# --- the kernels, one at a time -----------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("n,k,o,r", [(37, 29, 45, 3), (70, 45, 33, 1), (16, 64, 32, 16), (5, 7, 3, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_interpreted_mm_lowrank_matches_eager(n, k, o, r, bias):
    torch.manual_seed(0)
    x, W, S, B = torch.randn(n, k), torch.randn(o, k), torch.randn(n, r), torch.randn(o, r)
    b = torch.randn(o) if bias else None
    want = F.linear(x, W, b) + 0.7 * S @ B.t()
    # forward (K1): b = Wᵀ, a transposed view; dX (K3): b = W, v = A
    assert _rel(torch.ops.runlora.mm_lowrank(x, W.t(), b, S, B.t(), 0.7, torch.float32), want) < 1e-5
    g, A = torch.randn(n, o), torch.randn(r, k)
    assert _rel(torch.ops.runlora.mm_lowrank(g, W, None, S, A, 0.7, torch.float32), g @ W + 0.7 * S @ A) < 1e-5


@interpreted
def test_interpreted_every_candidate_block_shape_gives_the_same_result():
    torch.manual_seed(0)
    n, k, o, r = 70, 45, 37, 3
    x, W, S, B, b = torch.randn(n, k), torch.randn(o, k), torch.randn(n, r), torch.randn(o, r), torch.randn(o)
    g = torch.randn(n, o)
    want_y = F.linear(x, W, b) + 0.5 * S @ B.t()
    want_z, want_db = g @ B, 0.5 * g.t() @ S
    for cfg in fused.CANDIDATES["mm_lowrank"]:
        assert _rel(fused._mm_lowrank(x, W.t(), b, S, B.t(), 0.5, torch.float32, cfg), want_y) < 1e-5, cfg
    for cfg in fused.CANDIDATES["lowrank_grads"]:
        z, db = fused._lowrank_grads(g, B, S, 0.5, True, True, cfg)
        assert _rel(z, want_z) < 1e-5 and _rel(db, want_db) < 1e-5, cfg


@interpreted
@pytest.mark.parametrize("need_z,need_db", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_interpreted_lowrank_grads_reads_dy_once_for_z_and_db(need_z, need_db, deterministic):
    torch.manual_seed(0)
    n, o, r = 101, 45, 5  # 4 row blocks of 32: dB reduced across programs
    g, B, S = torch.randn(n, o), torch.randn(o, r), torch.randn(n, r)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)  # per-program dB partials summed, instead of atomics
    try:
        z, db = torch.ops.runlora.lowrank_grads(g, B, S if need_db else None, 1.5, need_z, need_db)
    finally:
        torch.use_deterministic_algorithms(before)
    assert z.shape == ((n, r) if need_z else (0,)) and db.shape == ((o, r) if need_db else (0,))
    if need_z:
        assert _rel(z, g @ B) < 1e-5
    if need_db:
        assert _rel(db, 1.5 * g.t() @ S) < 1e-5


# --- the plan through the op, the lowered chain, compile and export -----------------------------
def _site(n0=3, n1=13, i=29, o=45, r=5, *, bias, separate, needs, dtype=torch.float32, adapter=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, dt=dtype: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    lora_dtype = adapter or dtype
    x = rand(n0, n1, i).requires_grad_(needs.x)
    x_lora = rand(n0, n1, i).requires_grad_(needs.x) if separate else None
    W, b = rand(o, i) * i ** -0.5, rand(o) if bias else None
    A = (rand(r, i, dt=lora_dtype) * i ** -0.5).requires_grad_(needs.lora_A)
    B = rand(o, r, dt=lora_dtype).requires_grad_(needs.lora_B)
    dy = rand(n0, n1, o, dt=torch.promote_types(dtype, lora_dtype))
    return x, W, b, A, B, x_lora, dy


def _grads(y, site):
    x, W, b, A, B, x_lora, dy = site
    inputs = [t for t in (x, x_lora, A, B) if t is not None and t.requires_grad]
    return [y] + list(torch.autograd.grad(y, inputs, dy))


@interpreted
@pytest.mark.parametrize("path", ["op", "lowered"])
@pytest.mark.parametrize("r", [1, 5])
def test_interpreted_fused_pair_matches_eager_for_every_input_combination(path, r):
    from runlora_fx.passes.lower import lowered_lora_linear

    for bias, separate, needs in itertools.product([False, True], [False, True], NEEDS):
        site = _site(r=r, bias=bias, separate=separate, needs=needs)
        x, W, b, A, B, x_lora, dy = site
        call = torch.ops.runlora.lora_linear if path == "op" else lowered_lora_linear
        got = _grads(call(x, W, b, A, B, 0.7, x_lora, None, "fused", "fused"), site)
        want = _grads(_peft(x, W, b, A, B, 0.7, x_lora), site)
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and _rel(g, w) < 1e-5, (bias, separate, needs, k)


@interpreted
@pytest.mark.parametrize("keep", [False, True])
def test_interpreted_lowered_chain_keeps_or_recomputes_x_a(keep):
    from runlora_fx.passes.lower import lowered_lora_linear

    site = _site(bias=True, separate=False, needs=Needs())
    x, W, b, A, B, x_lora, dy = site
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = lowered_lora_linear(x, W, b, A, B, 0.7, None, None, "fused", "fused", save_lora_product=keep)
    assert ((39, 5) in saved) == keep
    for g, w in zip(_grads(y, site), _grads(_peft(x, W, b, A, B, 0.7), site)):
        assert _rel(g, w) < 1e-5


@interpreted
@pytest.mark.parametrize("separate", [False, True])
def test_interpreted_fp32_adapters_on_a_half_base_round_once(separate):
    # peft's default: fp32 adapters on a low-precision base (fp16 stands in for bf16, which the
    # interpreter's tl.dot does not take). The kernels round the sum once, eager rounds the base
    # GEMM first: the fused result must be at least as close to fp64 as eager's.
    site = _site(bias=True, separate=separate, needs=Needs(), dtype=torch.float16, adapter=torch.float32)
    x, W, b, A, B, x_lora, dy = site
    got = _grads(torch.ops.runlora.lora_linear(x, W, b, A, B, 0.7, x_lora, torch.float32, "fused", "fused"), site)

    def eager(x, W, b, A, B, x_lora):
        return F.linear(x, W, b) + F.linear(F.linear((x if x_lora is None else x_lora).to(A.dtype), A), B) * 0.7

    want = _grads(eager(x, W, b, A, B, x_lora), site)
    as64 = [t if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in site[:6]]
    exact = _grads(eager(*as64), (*as64, dy.double()))
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for g, w, e in zip(got, want, exact):
        assert _rel(g, e) <= 1.05 * _rel(w, e) + 1e-6, (_rel(g, e), _rel(w, e))


class _Lora(torch.nn.Module):
    def __init__(self, i=29, o=45, r=5, bias=True):
        super().__init__()
        self.base = torch.nn.Linear(i, o, bias=bias)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(i, r, bias=False)
        self.lora_B = torch.nn.Linear(r, o, bias=False)
        torch.nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 0.5


@interpreted
@pytest.mark.parametrize("lowering", ["aten", "opaque"])
def test_interpreted_backend_rewrites_to_the_fused_pair_and_dumps_it(lowering, tmp_path):
    torch.manual_seed(0)
    model = _Lora()
    x = torch.randn(3, 13, 29, requires_grad=True)
    want = _grads(model(x), (x, None, None, model.lora_A.weight, model.lora_B.weight, None, torch.randn(3, 13, 45)))
    backend = runlora_fx.make_backend(inner="aot_eager", lowering=lowering, forward_plan="fused",
                                      backward_plan="fused", dump_dir=str(tmp_path))
    dy = torch.randn(3, 13, 45)
    torch.manual_seed(0)
    got = _grads(torch.compile(model, backend=backend)(x),
                 (x, None, None, model.lora_A.weight, model.lora_B.weight, None, dy))
    want = _grads(model(x), (x, None, None, model.lora_A.weight, model.lora_B.weight, None, dy))
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5
    report = backend.reports[0]
    assert report.fallback is None and report.plan_counts() == {"fused/fused": 1}
    assert report.sites[0].chosen_flops == report.sites[0].original_flops  # forward1 + backward1's FLOPs
    after = (tmp_path / "graph_0.after.py").read_text()
    assert "'fused', 'fused'" in after, after


@interpreted
def test_interpreted_export_round_trip_keeps_the_fused_plan(tmp_path):
    torch.manual_seed(0)
    model = _Lora()
    x = torch.randn(6, 29)
    ep = runlora_fx.rewrite_exported_program(torch.export.export(model, (x,)), forward_plan="fused",
                                             backward_plan="fused")
    assert ep.runlora_report.plan_counts() == {"fused/fused": 1}
    path = tmp_path / "fused.pt2"
    torch.export.save(ep, str(path))
    loaded = runlora_fx.load(str(path))
    assert "'fused'" in loaded.graph_module.code
    assert _rel(loaded.module()(x), model(x)) < 1e-5


@interpreted
def test_interpreted_tuning_installs_a_block_shape_per_kernel_and_stays_exact():
    try:
        tuned = fused.tune_site(40, 29, 45, 3, dtype=torch.float32, bias=True, device="cpu")
        assert len(tuned) == 3  # K1, K2, K3; the interpreter keeps the first candidate that runs
        for key, fields in tuned.items():
            kernel = key.split("|")[0]
            assert fused.config_for(key, 4) == fused.KernelConfig(**fields) == fused.CANDIDATES[kernel][0]
        site = _site(i=29, o=45, r=3, n0=1, n1=40, bias=True, separate=False, needs=Needs())
        x, W, b, A, B, x_lora, dy = site
        got = _grads(torch.ops.runlora.lora_linear(x, W, b, A, B, 2.0, None, None, "fused", "fused"), site)
        for g, w in zip(got, _grads(_peft(x, W, b, A, B, 2.0), site)):
            assert _rel(g, w) < 1e-5
    finally:
        fused.forget_configs()


@interpreted
def test_interpreted_bench_fused_dry_runs_on_the_cpu(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fused.py"
    spec = importlib.util.spec_from_file_location("_bench_bench_fused", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--grid", "37x29x45x1", "--repeats", "1", "--warmup", "1",
                       "--md", str(tmp_path / "fused.md")])
    assert [r["correct"] for r in rows] == ["ok"] and rows[0]["fused_err"] < 1e-5
    assert "interpreter" in (tmp_path / "fused.md").read_text()


@interpreted
def test_interpreted_cpu_sites_never_choose_fused_even_with_the_kernels_at_hand(tmp_path):
    test_cpu_sites_never_choose_fused("time", torch.float32, tmp_path)


# --- the records and their prices (no kernels run) ----------------------------------------------
def test_fused_plans_are_looked_up_by_name_and_kept_apart_from_the_papers():
    f, b = forward_plan("fused"), backward_plan("fused")
    assert f.fused and b.fused and not f.merged and not b.merged
    assert "fused" not in FORWARD_PLANS and "fused" not in BACKWARD_PLANS  # every device runs those
    assert "one pass over dY" in b.formula and "Triton" in f.formula
    with pytest.raises(ValueError, match=r"known: \['forward1', 'forward2'\], and \['fused'\]"):
        forward_plan("forward9")


@pytest.mark.parametrize("needs", NEEDS)
def test_fused_flops_are_forward1_and_backward1s(needs):
    f, b = forward_plan("fused"), backward_plan("fused")
    assert sympy.expand(f.flops() - FORWARD_PLANS["forward1"].flops()) == 0
    assert sympy.expand(b.flops(needs=needs) - BACKWARD_PLANS["backward1"].flops(needs=needs)) == 0


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("layout", [Layout(), Layout(bias=True), Layout(separate_lora_input=True),
                                    Layout(torch.bfloat16, torch.float32)])
def test_roofline_kernels_of_the_fused_plan_sum_to_its_flops(needs, layout):
    for keeps in (False, True):
        kernels = forward_kernels("fused", layout)
        assert sympy.expand(sum(k.flops for k in kernels) - forward_plan("fused").flops()) == 0
        kernels = backward_kernels("fused", needs, layout, keeps_lora_product=keeps)
        want = backward_plan("fused").flops(needs=needs) - (2 * sym_n * sym_i * sym_r if keeps and needs.lora_B else 0)
        assert sympy.expand(sum(k.flops for k in kernels) - want) == 0


def _added(kernels_of, frozen):
    sizes = {sym_n: 8192, sym_i: 2048, sym_o: 2048, sym_r: 16, e_x: 2, e_a: 2, e_y: 2,
             sympy.Symbol("has_bias", nonnegative=True, integer=True): 0}
    total = sum(int(k.bytes.xreplace(sizes)) for k in kernels_of)
    return total - frozen, len(kernels_of) - 2


def test_fused_pair_moves_fewer_bytes_than_the_aten_pair_on_the_tinyllama_shape():
    layout = Layout(torch.bfloat16)
    frozen = 2 * (8192 * 2048 + 2048 * 2048 + 8192 * 2048) * 2  # X·Wᵀ and dY·W: read X or dY and W, write one
    fused_bytes, fused_launches = _added(forward_kernels("fused", layout) + backward_kernels(
        "fused", Needs(), layout, keeps_lora_product=True), frozen)
    aten_bytes, aten_launches = _added(forward_kernels("forward1", layout) + backward_kernels(
        "backward1", Needs(), layout, keeps_lora_product=True), frozen)
    # S = X·Aᵀ (reads X), K2 (reads dY), dA (reads X): three n×2048 reads, about 96 MiB
    assert 96 * 2**20 < fused_bytes < 100 * 2**20
    assert fused_bytes < 0.6 * aten_bytes and fused_launches == 5 and aten_launches == 6


def test_traffic_counter_prices_the_fused_pair_under_four_tenths_of_peft_inductor():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_traffic.py"
    spec = importlib.util.spec_from_file_location("_bench_bench_traffic_fused", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--modes", "", "--fused"])  # the TinyLlama layer, B=8 S=1024 r=16 bf16
    # peft + inductor as the counter counted it (BENCHMARKS.md: +2.525 GiB and +44 kernels per layer)
    counted = [{"mode": "frozen_inductor"}, {"mode": "peft_inductor", "lora_bytes": 2.525 * 2**30, "lora_kernels": 44}]
    rows = {r["pair"]: r for r in bench.fused_rows(args, counted)}
    # the analytic ATen chain agrees with the counted one (runlora ungrouped: 2.202 GiB, 42 kernels)
    assert abs(rows["forward1/backward1"]["lora_bytes"] / 2**30 - 2.202) < 0.01
    assert rows["forward1/backward1"]["lora_kernels"] == 42
    assert round(rows["forward1/backward1"]["q_proj_mib"]) == 258  # the issue's ~257 MiB a site
    fused_row = rows["fused/fused"]
    assert fused_row["vs_peft_bytes"] < 0.4 and fused_row["lora_kernels"] == 35


# --- selection: measured time only, on CUDA only ----------------------------------------------
def test_should_choose_fused_needs_three_percent():
    assert select.should_choose_fused(0.96, "forward1/backward1", 1.0)[0]
    take, why = select.should_choose_fused(0.98, "forward1/backward1", 1.0)
    assert not take and "0.980x the best ATen pair forward1/backward1: not chosen" in why


@pytest.mark.parametrize("criterion", ["flops", "roofline", "time"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sites_never_choose_fused(criterion, dtype, tmp_path):
    asked = []

    def timer(key, forward, backward):  # the fused pair would win by far, were it asked for
        asked.append(f"{forward}/{backward}")
        return 0.001 if forward == "fused" else 1.0

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([_Lora(29, 29, 4) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack().to(dtype)
    tuner = measure.Autotuner(cache_dir=str(tmp_path), timer=timer)
    backend = runlora_fx.make_backend(inner="eager", criterion=criterion, tuner=tuner, allow_merged=True)
    torch.compile(model, backend=backend)(torch.randn(64, 29, dtype=dtype, requires_grad=True))
    counts = backend.reports[0].plan_counts()
    assert sum(counts.values()) == 3 and not any("fused" in k for k in counts), counts
    assert "fused/fused" not in asked


@pytest.fixture
def fake_cuda(monkeypatch):
    """select and measure believe a CUDA device with the kernels is here (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(measure, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(fused, "unavailable_reason", lambda device, *args: None)


def _facts(**kw):
    return select.SiteFacts(8192, 2048, 2048, 16, dtype=torch.bfloat16, device="cuda", **kw)


def test_time_request_adds_the_fused_pair_on_cuda_and_keys_it_by_the_kernel_source(fake_cuda):
    key, pairs = select.time_request(_facts())
    assert pairs == ["forward1/backward1", "forward1/backward4", "forward1/backward5", "forward2/backward1",
                     "forward2/backward4", "forward2/backward5", "fused/fused"]
    assert str(key).endswith(f"|kernels fused {fused.SOURCE_HASH}")
    # DoRA's ops and a 4-bit base run ATen only; the 4-bit key stays the dense one
    assert "fused/fused" not in select.time_request(_facts(allow_fused=False))[1]
    key4, pairs4 = select.time_request(_facts(dequant_flops=2048 * 2048))
    assert "fused/fused" not in pairs4 and str(key4) == str(key)


@pytest.mark.parametrize("fused_s,chosen", [(0.95, ("fused", "fused")), (0.99, ("forward1", "backward1"))])
def test_time_chooses_fused_only_three_percent_ahead_of_the_best_aten_pair(fake_cuda, fused_s, chosen, tmp_path):
    times = {"forward1/backward1": 1.0, "fused/fused": fused_s}
    tuner = measure.Autotuner(cache_dir=str(tmp_path), timer=lambda key, f, b: times[f"{f}/{b}"])
    choice = select.choose(8192, 2048, 2048, 16, criterion="time", tuner=tuner, dtype=torch.bfloat16, device="cuda",
                           allow_merged=False)
    assert choice.criterion == "time" and (choice.forward.at(8192), choice.backward.at(8192)) == chosen
    assert choice.measured == times and "fused measured" in choice.note
    assert choice.forward_costs["fused"] == choice.forward_costs["forward1"]


def test_time_without_a_measurement_never_chooses_fused(fake_cuda, tmp_path):
    tuner = measure.Autotuner(cache_dir=str(tmp_path), timer=lambda *a: 1.0, time_budget_s=0)
    tuner.spent_s = 1.0  # budget spent: nothing is measured
    choice = select.choose(8192, 2048, 2048, 16, criterion="time", tuner=tuner, dtype=torch.bfloat16, device="cuda",
                           device_model="H200")
    assert choice.criterion == "roofline" and "fused" not in (choice.forward.at(8192), choice.backward.at(8192))


def test_tuned_block_shapes_are_cached_with_the_times_and_loaded_on_a_hit(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "measure_pairs", lambda key, pairs, **kw: {p: 1.0 for p in pairs})
    tuned = {"mm_lowrank|bfloat16,bfloat16,bfloat16->bfloat16|bT|N=2048 K=2048 R=16": dataclasses.asdict(
        fused.KernelConfig(64, 128, 64, 8, 4, 4))}
    monkeypatch.setattr(measure, "_tune_fused", lambda key: tuned)
    key, pairs = select.time_request(_facts())
    measure.Autotuner(cache_dir=str(tmp_path)).measure(key, pairs)
    entry = json.loads((tmp_path / "timings.json").read_text())["entries"][str(key)]
    assert entry["kernel_configs"] == tuned and set(entry["times_s"]) == set(pairs)
    fused.forget_configs()
    measure.forget_memory()
    try:
        again = measure.Autotuner(cache_dir=str(tmp_path))
        again.measure(key, pairs)
        assert again.measurements == 0
        assert fused.config_for(next(iter(tuned)), 2) == fused.KernelConfig(64, 128, 64, 8, 4, 4)
    finally:
        fused.forget_configs()


def test_fused_kernels_failing_on_the_device_leave_the_aten_pairs_measured(fake_cuda, monkeypatch, tmp_path):
    def measure_pairs(key, pairs, **kw):
        if "fused/fused" in pairs:
            raise RuntimeError("PTX compilation failed")
        return {p: 1.0 + k for k, p in enumerate(pairs)}

    monkeypatch.setattr(measure, "measure_pairs", measure_pairs)
    monkeypatch.setattr(measure, "_tune_fused", lambda key: {})
    tuner = measure.Autotuner(cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="the fused kernels failed .* timing the ATen pairs alone"):
        choice = select.choose(8192, 2048, 2048, 16, criterion="time", tuner=tuner, dtype=torch.bfloat16,
                               device="cuda", allow_merged=False)
    assert choice.criterion == "time" and str(choice.forward) == "forward1"
    assert choice.measured["fused/fused"] == float("inf") and "failed to run" in choice.note


def test_unavailable_reasons():
    if fused.triton is None or fused.INTERPRETED:
        pytest.skip("needs triton installed and not interpreted")
    assert "CUDA" in fused.unavailable_reason("cpu")
    assert "dtype torch.float64" in fused.unavailable_reason("cuda", torch.float64)
    assert "rank 256" in fused.unavailable_reason("cuda", torch.bfloat16, None, 256)
    assert fused.unavailable_reason("cuda", torch.bfloat16, torch.float32, 16) is None


def test_kernels_refuse_cpu_tensors_without_the_interpreter():
    if fused.triton is None or fused.INTERPRETED:
        pytest.skip("needs triton installed and not interpreted")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        torch.ops.runlora.lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0, None,
                                      None, "fused", "fused")


@pytest.mark.parametrize("kernel", ["_mm_lowrank_kernel", "_lowrank_grads_kernel"])
def test_kernels_compile_for_hopper_without_a_gpu(kernel):
    """The interpreter runs Python, not Triton's compiler: compile each kernel to a cubin for
    sm_90 (Triton's own ptxas, no driver needed) in bf16 with fp32 adapters and its default blocks."""
    if fused.triton is None or fused.INTERPRETED:
        pytest.skip("needs triton installed and not interpreted")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {exc}")
    fn = getattr(fused, kernel)
    if kernel == "_mm_lowrank_kernel":
        cfg = fused._default("mm_lowrank", 2)
        ptrs = {"a_ptr": "*fp32", "b_ptr": "*bf16", "bias_ptr": "*bf16", "u_ptr": "*fp32", "v_ptr": "*fp32",
                "c_ptr": "*bf16"}
        consts = dict(HAS_BIAS=True, PRECISION="ieee", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, BLOCK_R=16, GROUP_M=cfg.group_m)
    else:
        cfg = fused._default("lowrank_grads", 2)
        ptrs = {"g_ptr": "*fp32", "b_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*fp32", "db_ptr": "*fp32"}
        consts = dict(COMPUTE_Z=True, COMPUTE_DB=True, SPLIT_REDUCE=False, PRECISION="ieee", BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_R=16)
    signature = {name: ptrs.get(name) or ("constexpr" if name in consts else "fp32" if name == "scaling" else "i32")
                 for name in fn.arg_names}
    try:
        source = ASTSource(fn, signature, consts)
    except TypeError as exc:
        pytest.skip(f"this Triton's ASTSource differs: {exc}")
    compiled = fused.triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024


class _Stop(Exception):
    pass


def test_the_triton_ops_trace_into_the_joint_graph_as_kernels(monkeypatch):
    """Without the interpreter the ops are ``triton_op``s: AOTAutograd decomposes them into the
    kernels themselves, which inductor then launches directly. Traced only (no GPU here): without
    a driver torch cannot read which arguments a kernel writes and assumes all, hence the clones.
    The CPU site is declared runnable (it is never run) past the forced plan's legality check."""
    if fused.triton is None or fused.INTERPRETED:
        pytest.skip("needs triton installed and not interpreted")
    monkeypatch.setattr(fused, "unavailable_reason", lambda *args, **kwargs: None)
    from torch._dynamo.backends.common import aot_autograd
    from runlora_fx.passes.lower import lower_runlora_ops

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)

        def stop(*args):
            raise _Stop
        return stop

    def backend(gm, example_inputs):
        assert runlora_fx.rewrite(gm, forward_plan="fused", backward_plan="fused").rewritten == 1
        lower_runlora_ops(gm)
        return aot_autograd(fw_compiler=capture, bw_compiler=capture)(gm, example_inputs)

    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), pytest.raises(_Stop):
        torch.compile(_Lora(), backend=backend)(torch.randn(6, 29, requires_grad=True))
    forward, backward = graphs
    assert forward.count("triton_kernel_wrapper_functional(") == 1 and "runlora.mm_lowrank" not in forward
    assert backward.count("triton_kernel_wrapper_functional(") == 2 and "runlora.lowrank_grads" not in backward


@pytest.mark.skipif(fused.INTERPRETED or torch.cuda.is_available(), reason="the fused kernels can run here")
@pytest.mark.parametrize("forced", [("fused", None), (None, "fused"), ("fused", "fused")])
def test_forced_fused_plan_where_its_kernels_cannot_run_is_rejected_with_its_reason(forced):
    """A forced plan that cannot run on the site's device leaves the site alone, reported; with
    sibling grouping on too (a group runs the ATen plans only)."""
    from test_inplace_outputs import Siblings

    torch.manual_seed(0)
    backend = runlora_fx.make_backend(inner="aot_eager", group_siblings=True, forward_plan=forced[0],
                                      backward_plan=forced[1])
    torch.compile(Siblings(), backend=backend)(torch.randn(2, 7, 32)).sum().backward()
    (report,) = backend.reports
    assert report.rewritten == 0 and len(report.rejected) >= 3
    assert all("forced plan 'fused' cannot run here" in r.reason for r in report.rejected[:3]), report.rejected
