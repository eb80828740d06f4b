"""Choosing plans by more than FLOPs: criterion="roofline" and criterion="time"."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import sympy
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx.choose import roofline
from runlora_fx.choose.measure import Autotuner, TuneKey, pair_name
from runlora_fx.plans import BACKWARD_PLANS, FORWARD_PLANS, Needs
from runlora_fx.choose import choose

PAIRS = [pair_name(f, b) for f in ("forward1", "forward2") for b in ("backward1", "backward4", "backward5")]


class LoraLinear(nn.Module):
    """A hand-written LoRA layer: frozen nn.Linear plus (x Aᵀ) Bᵀ s."""

    def __init__(self, i, o, r):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, i) * 0.1)
        self.B = nn.Parameter(torch.randn(o, r) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * 2.0


def two_layers():
    torch.manual_seed(0)
    return nn.Sequential(LoraLinear(32, 48, 4), nn.GELU(), LoraLinear(48, 32, 4))


class FakeTimer:
    """Seconds per pair from a table (1 ms for the rest); counts calls."""

    def __init__(self, fast=None):
        self.fast = fast or {}
        self.calls = []

    def __call__(self, key, forward, backward):
        self.calls.append((str(key), forward, backward))
        return self.fast.get(pair_name(forward, backward), 1e-3)


def key(n=64, i=32, o=48, r=4):
    return TuneKey("fake device", torch.__version__, "float32", None, n, i, o, r, (True, True, True), False, True)


def compile_and_run(model, x, **backend_kwargs):
    backend = runlora_fx.make_backend(inner="aot_eager", **backend_kwargs)
    y = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    return backend


# --- roofline ------------------------------------------------------------------------------
def test_kernel_flops_sum_to_the_plan_flops():
    layouts = [roofline.Layout(), roofline.Layout(torch.bfloat16, torch.float32),
               roofline.Layout(separate_lora_input=True, bias=True)]
    for layout in layouts:
        for name, plan in FORWARD_PLANS.items():
            total = sum(k.flops for k in roofline.forward_kernels(name, layout))
            assert sympy.simplify(total - plan.flops()) == 0, name
        for name, plan in BACKWARD_PLANS.items():
            for needs in (Needs(), Needs(x=False), Needs(lora_A=False, lora_B=False)):
                total = sum((k.flops for k in roofline.backward_kernels(name, needs, layout)), sympy.Integer(0))
                assert sympy.simplify(total - plan.flops(needs=needs)) == 0, (name, needs)


def test_roofline_keeps_forward1_where_the_merged_weight_costs_more_bytes_than_it_saves():
    # Llama-3-8B down_proj, one batch of 4096 tokens, bf16 (2 bytes), r=16, H200 model:
    # 989e12 FLOP/s, 4.8e12 B/s, 4 µs per kernel. FLOPs: forward2's extra 2·i·r·o (1.88 G) <
    # forward1's 2·n·r·(i+o) (2.42 G), so FLOPs choose forward2. Bytes: forward2 reads W and
    # writes W + sBA (2·o·i·2 = 235 MB); forward1 reads x for X·Aᵀ and reads + writes Y once
    # more (n·(i+2o)·2 = 185 MB): forward1 is 6.4 µs faster despite its extra launch.
    n, i, o, r, e, peak, bw, launch = 4096, 14336, 4096, 16, 2, 989e12, 4.8e12, 4e-6
    gemm = max(2 * n * i * o / peak, (n * i + o * i + n * o) * e / bw) + launch  # X·Wᵀ, or X·W'ᵀ
    forward1 = (gemm
                + max(2 * n * i * r / peak, (n * i + r * i + n * r) * e / bw) + launch  # X·Aᵀ
                + max(2 * n * r * o / peak, (2 * n * o + n * r + o * r) * e / bw) + launch)  # Y + s·XA·Bᵀ
    forward2 = max(2 * o * r * i / peak, (2 * o * i + o * r + r * i) * e / bw) + launch + gemm  # W + sBA
    assert forward1 == pytest.approx(537.01e-6, abs=0.01e-6) and forward2 == pytest.approx(543.44e-6, abs=0.01e-6)

    kwargs = dict(allow_merged=True, dtype=torch.bfloat16, device_model="H200")
    by_flops = choose(n, i, o, r, criterion="flops", **kwargs)
    by_roofline = choose(n, i, o, r, criterion="roofline", **kwargs)
    assert str(by_flops.forward) == "forward2"
    assert str(by_roofline.forward) == "forward1"
    assert by_roofline.criterion == "roofline"
    assert by_roofline.estimated["forward"]["forward1"] == pytest.approx(forward1, rel=1e-9)
    assert by_roofline.estimated["forward"]["forward2"] == pytest.approx(forward2, rel=1e-9)
    # Backward: n = o is a FLOPs tie (backward1 kept). In bytes too: backward1 accumulates s·Z·A
    # into dY·W by addmm (accumulate_in_gemm: reads and writes n×i once more, 2·n·i·2 = 235 MB)
    # where backward5 reads W and writes W + sBA (2·o·i·2 = 235 MB); one launch each.
    est = by_roofline.estimated["backward"]
    assert est["backward1"] == pytest.approx(est["backward5"], rel=1e-3)
    assert str(by_flops.backward) == "backward1" and str(by_roofline.backward) == "backward1"


def test_a_user_device_model_without_memory_costs_agrees_with_flops():
    flops_bound = runlora_fx.DeviceModel("flops only", {"bfloat16": 1e15}, bandwidth=float("inf"), launch_s=0.0)
    choice = choose(4096, 14336, 4096, 16, criterion="roofline", allow_merged=True, dtype=torch.bfloat16,
                    device_model=flops_bound)
    assert (str(choice.forward), choice.estimated["device"]) == ("forward2", "flops only")


def test_roofline_piecewise_plan_agrees_with_concrete_choices():
    s0 = sympy.Symbol("s0", positive=True, integer=True)
    model = roofline.DEVICE_MODELS["H200"]
    layout = roofline.Layout(torch.bfloat16)
    fwd, bwd, _ = roofline.choose_roofline(s0, 14336, 4096, 16, model=model, layout=layout)
    assert len(fwd.pieces) == 2 and len(bwd.pieces) == 2
    points = {1, 2, 64, 10**6} | {m + d for p in (fwd, bwd) for m, _ in p.pieces[1:] for d in (-1, 0, 1)}
    for n in sorted(points):
        f, b, _ = roofline.choose_roofline(n, 14336, 4096, 16, model=model, layout=layout)
        assert (fwd.at(n), bwd.at(n)) == (str(f), str(b)), n


def test_roofline_through_the_backend_reports_estimates():
    backend = compile_and_run(two_layers(), torch.randn(64, 32), criterion="roofline", device_model="H200")
    site = backend.reports[0].sites[0]
    assert site.criterion == "roofline" and site.estimated_s["device"] == "H200"
    assert set(site.estimated_s["forward"]) == {"forward1", "forward2"}
    assert "chosen by" in str(backend.reports[0])


# --- time ----------------------------------------------------------------------------------
def test_time_picks_the_measured_fastest_where_flops_disagree(tmp_path):
    timer = FakeTimer({"forward1/backward4": 2e-4})  # FLOPs choose forward2/backward5 here
    tuner = Autotuner(cache_dir=str(tmp_path), timer=timer)
    x = torch.randn(64, 32, requires_grad=True)
    flops = compile_and_run(two_layers(), x)
    timed = compile_and_run(two_layers(), x, criterion="time", tuner=tuner)
    assert {(s.forward_plan, s.backward_plan) for s in flops.reports[0].sites} == {("forward2", "backward5")}
    assert {(s.forward_plan, s.backward_plan) for s in timed.reports[0].sites} == {("forward1", "backward4")}
    assert len(timer.calls) == 2 * len(PAIRS)  # two keys (32->48, 48->32), six pairs each


def test_report_carries_criterion_and_measured_table(tmp_path):
    tuner = Autotuner(cache_dir=str(tmp_path), timer=FakeTimer({"forward2/backward1": 1e-4}))
    backend = compile_and_run(two_layers(), torch.randn(64, 32), criterion="time", tuner=tuner)
    data = json.loads(backend.reports[0].to_json())
    assert data["schema"] == 1 and data["criterion"] == "time"
    site = data["sites"][0]
    assert site["criterion"] == "time" and site["criterion_note"] is None
    assert site["measured_s"] == {p: (1e-4 if p == "forward2/backward1" else 1e-3) for p in PAIRS}
    assert site["original_flops"] is not None  # FLOPs columns stay, whatever chose
    assert data["totals"]["criteria"] == {"time": 2}


def test_time_budget_zero_falls_back_to_roofline_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    backend = compile_and_run(two_layers(), torch.randn(64, 32), criterion="time", time_budget_s=0)
    report = backend.reports[0]
    assert backend.tuner.measurements == 0
    assert all(s.criterion == "roofline" and s.measured_s is None and s.estimated_s for s in report.sites)
    assert all("time budget of 0 s spent" in s.criterion_note for s in report.sites)
    assert "chosen by roofline: 2" in report.summary()
    assert not (tmp_path / "timings.json").exists()


def test_corrupt_or_stale_cache_is_ignored_with_a_warning_and_remeasured(tmp_path):
    path = tmp_path / "timings.json"
    for content, match in (("{not json", "corrupt"), (json.dumps({"schema": 0, "entries": {}}), "schema 0")):
        runlora_fx.choose.measure.forget_memory(str(tmp_path))
        path.write_text(content)
        timer = FakeTimer()
        with pytest.warns(UserWarning, match=match):
            table = Autotuner(cache_dir=str(tmp_path), timer=timer).measure(key(), PAIRS)
        assert len(timer.calls) == len(PAIRS) and set(table) == set(PAIRS)
        assert str(key()) in json.loads(path.read_text())["entries"]


def test_hits_skip_measuring_and_missing_pairs_are_measured(tmp_path):
    Autotuner(cache_dir=str(tmp_path), timer=FakeTimer()).measure(key(), PAIRS[:3])
    timer = FakeTimer()
    tuner = Autotuner(cache_dir=str(tmp_path), timer=timer)
    tuner.measure(key(), PAIRS[:3])
    assert timer.calls == []
    tuner.measure(key(), PAIRS)
    assert [c[1:] for c in timer.calls] == [tuple(p.split("/")) for p in PAIRS[3:]]


def test_progress_line_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    requests = [(key(n=n), PAIRS) for n in (1, 2, 3)]
    Autotuner(cache_dir=str(tmp_path / "a"), timer=FakeTimer()).measure_all(requests)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    Autotuner(cache_dir=str(tmp_path / "b"), timer=FakeTimer(), progress=True).measure_all(requests)
    assert "runlora: tuning 3/3: 3x32->48 r4 float32" in capsys.readouterr().err


def test_tune_ahead_then_compile_measures_nothing_new(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    model, x = two_layers(), torch.randn(64, 32, requires_grad=True)
    tuned = runlora_fx.tune(model, x)  # the real timer, on this CPU
    assert len(tuned) == 2 and all(v["source"] == "measured" and len(v["times_s"]) == 6 for v in tuned.values())
    backend = compile_and_run(model, x, criterion="time")
    assert backend.tuner.measurements == 0
    sites = backend.reports[0].sites
    assert all(s.criterion == "time" for s in sites)
    assert sorted(tuple(sorted(s.measured_s.items())) for s in sites) == \
        sorted(tuple(sorted(v["times_s"].items())) for v in tuned.values())


# --- the disk cache across processes ---------------------------------------------------------
TUNE_SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn as nn, runlora_fx
    from runlora_fx.choose.measure import Autotuner

    class LoraLinear(nn.Module):
        def __init__(self, i, o, r):
            super().__init__()
            self.base = nn.Linear(i, o).requires_grad_(False)
            self.A = nn.Parameter(torch.randn(r, i) * 0.1)
            self.B = nn.Parameter(torch.randn(o, r) * 0.1)

        def forward(self, x):
            return self.base(x) + (x @ self.A.t()) @ self.B.t() * 2.0

    torch.manual_seed(0)
    tuner = Autotuner(repeats=2)
    tuned = runlora_fx.tune(nn.Sequential(LoraLinear(16, 24, 4), nn.ReLU(), LoraLinear(24, 16, 4)),
                            torch.randn(8, 16), tuner=tuner)
    print(json.dumps({"measurements": tuner.measurements, "best": sorted(v["best"] for v in tuned.values())}))
""")

WRITER_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from runlora_fx.choose.measure import Autotuner, TuneKey

    proc, run_dir = int(sys.argv[1]), sys.argv[2]
    tuner = Autotuner(cache_dir=run_dir, timer=lambda key, f, b: 1e-3 * (proc + 1))
    open(os.path.join(run_dir, f"ready{proc}"), "w").close()
    while not os.path.exists(os.path.join(run_dir, "go")):
        time.sleep(0.005)
    for k in range(25):
        key = TuneKey("fake device", torch.__version__, "float32", None, 1000 * proc + k, 32, 48, 4,
                      (True, True, True), False, False)
        tuner.measure(key, ["forward1/backward1", "forward2/backward5"])
""")


def _env(cache_dir):
    env = dict(os.environ, RUNLORA_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
    env.pop("XDG_CACHE_HOME", None)
    return env


def test_cache_round_trip_across_processes(tmp_path):
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", TUNE_SCRIPT], env=_env(tmp_path), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["measurements"] == 2 * 6 and runs[1]["measurements"] == 0
    assert runs[0]["best"] == runs[1]["best"]
    assert len(json.loads((tmp_path / "timings.json").read_text())["entries"]) == 2


def test_two_processes_writing_at_once_keep_both_sets(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(k), str(tmp_path)], env=_env(tmp_path),
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in (0, 1)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    data = json.loads((tmp_path / "timings.json").read_text())
    ns = sorted(int(k.split("|")[4].split()[0][2:]) for k in data["entries"])
    assert ns == list(range(25)) + list(range(1000, 1025))
    assert all(len(e["times_s"]) == 2 for e in data["entries"].values())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --- 4-bit bases and calibrated device models ----------------------------------------------
def test_a_quantized_base_is_ranked_on_the_dense_layer_by_roofline_and_time(tmp_path):
    """Dequantization costs every pair the same, so roofline and time choose as for the dense
    layer, and FLOPs still price the dequantization."""
    n, i, o, r = 2048, 1024, 2752, 16
    dense = choose(n, i, o, r, criterion="roofline", device_model="H200", dtype=torch.bfloat16)
    quant = choose(n, i, o, r, criterion="roofline", device_model="H200", dtype=torch.bfloat16, dequant_flops=o * i)
    assert (str(quant.forward), str(quant.backward)) == (str(dense.forward), str(dense.backward))
    assert quant.criterion == "roofline" and "4-bit base" in quant.note
    timer = FakeTimer({"forward2/backward1": 1e-4})
    timed = choose(64, 32, 48, 4, criterion="time", dequant_flops=48 * 32,
                   tuner=Autotuner(cache_dir=str(tmp_path), timer=timer))
    assert timed.criterion == "time" and (str(timed.forward), str(timed.backward)) == ("forward2", "backward1")
    assert "4-bit base" in timed.note
    flops = choose(64, 32, 48, 4, criterion="flops", dequant_flops=48 * 32)
    assert flops.forward_costs["forward1"] == choose(64, 32, 48, 4).forward_costs["forward1"] + 48 * 32


def test_calibrate_measures_the_device_and_round_trips_as_json(tmp_path):
    model = roofline.calibrate("cpu", ["float32"], matmul_size=128, copy_bytes=2**20, repeats=3)
    table = roofline.device_model_for("cpu")
    assert model.name == "cpu (calibrated)"
    assert 1e8 < model.peak_flops["float32"] < 1e14 and 1e8 < model.bandwidth < 1e13 and 0 < model.launch_s < 1e-3
    assert model.peak_flops["bfloat16"] == table.peak_flops["bfloat16"]  # not measured: the table's
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(model.to_dict()))
    assert roofline.resolve_device_model(str(path), "cpu") == model
    chosen = choose(4096, 1024, 2752, 64, criterion="roofline", device_model=str(path))
    assert chosen.estimated["device"] == "cpu (calibrated)"
    with pytest.raises(ValueError, match="missing"):
        roofline.DeviceModel.from_dict({"name": "x"})


def test_calibrate_command_writes_a_device_model(tmp_path, capsys):
    from runlora_fx.cli import main

    assert main(["calibrate", "--device", "cpu", "--dtypes", "float32", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "peak float32" in out and "bandwidth" in out and "launch" in out
    assert roofline.DeviceModel.from_dict(json.loads((tmp_path / "d.json").read_text())).bandwidth > 0
    assert main(["calibrate", "--device", "cpu", "--dtypes", "float33"]) == 2
