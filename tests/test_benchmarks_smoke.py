"""Smoke tests for benchmarks/: each script's main() runs at tiny sizes and fills its table.

Compiled modes run with ``--inner aot_eager`` (the same pass and lowering, without inductor's
code generation), so both tests together take well under a minute on 2 CPU cores.
"""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name):
    """Imports benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_layer():
    return load_script("bench_layer")


@pytest.fixture(scope="module")
def bench_model():
    return load_script("bench_model")


def assert_outputs(rows, json_path, md_path, columns):
    data = json.loads(json_path.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {"date", "torch", "device", "cpu"} <= set(data["env"])
    header = md_path.read_text().splitlines()
    table_header = next(line for line in header if line.startswith("| "))
    assert table_header == "| " + " | ".join(c.header for c in columns) + " |"


def test_bench_layer_main_fills_every_column(bench_layer, tmp_path):
    modes = ["frozen", "peft_eager", "peft_inductor", "forward2/backward5", "runlora_aten", "runlora_opaque"]
    json_path, md_path = tmp_path / "layer.json", tmp_path / "layer.md"
    rows = bench_layer.main(["--quick", "--inner", "aot_eager", "--grid", "16x64x96x4", "--warmup", "1",
                             "--repeats", "1", "--modes", ",".join(modes), "--json", str(json_path),
                             "--md", str(md_path)])

    assert [row["mode"] for row in rows] == modes
    for row in rows:
        for key in ("ms", "gflops_per_s", "x_limit", "speedup_vs_peft_eager", "speedup_vs_peft_inductor", "flops"):
            assert row[key] > 0, (row["mode"], key)
        assert row["saved_bytes"] >= 0
    by_mode = {row["mode"]: row for row in rows}
    assert by_mode["frozen"]["x_limit"] == pytest.approx(1.0)
    forward, backward = by_mode["runlora_aten"]["plan"].split("/")  # the plan the pass chose
    assert forward in bench_layer.FORWARD_PLANS and backward in bench_layer.BACKWARD_PLANS
    # the op keeps x only (fp32, 16x64); peft also keeps x@A (16x4)
    assert by_mode["forward2/backward5"]["saved_bytes"] == 16 * 64 * 4
    assert by_mode["peft_eager"]["saved_bytes"] == 16 * 64 * 4 + 16 * 4 * 4
    assert_outputs(rows, json_path, md_path, bench_layer.COLUMNS)


def test_bench_layer_runs_merged_variants_only_in_low_precision(bench_layer):
    fp32 = bench_layer.parse_point("4096x1024x2752x64", torch.float32)
    bf16 = bench_layer.parse_point("4096x1024x2752x64", torch.bfloat16)

    assert not set(bench_layer.MERGED) & set(bench_layer.modes_for(fp32, None))
    assert set(bench_layer.MERGED) <= set(bench_layer.modes_for(bf16, None))
    assert bench_layer.TARGET in bench_layer.DEFAULT_GRID["cpu"]


def test_bench_model_main_fills_every_column(bench_model, tmp_path):
    modes = ["frozen_inductor", "peft_eager", "peft_inductor", "runlora"]
    json_path, md_path = tmp_path / "model.json", tmp_path / "model.md"
    rows = bench_model.main(["--quick", "--inner", "aot_eager", "--layers", "1", "--batch", "1", "--seq", "16",
                             "--warmup", "1", "--repeats", "1", "--modes", ",".join(modes),
                             "--json", str(json_path), "--md", str(md_path)])

    assert [row["mode"] for row in rows] == modes
    for row in rows:
        for key in ("ms", "first_s", "speedup_vs_peft_eager", "speedup_vs_peft_inductor", "x_frozen"):
            assert row[key] > 0, (row["mode"], key)
        assert row["peak_gib"] is None  # CPU
    runlora = rows[-1]
    assert runlora["sites"] == 7  # q, k, v, o, gate, up, down of the one layer
    assert_outputs(rows, json_path, md_path, bench_model.COLUMNS)


def test_bench_dora_main_on_4bit_bases_with_dropout(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the QDoRA benchmark needs bitsandbytes (in the test extra)")
    json_path = tmp_path / "dora.json"
    rows = load_script("bench_dora").main(["--inner", "aot_eager", "--base", "bnb_nf4", "--dropout", "0.1",
                                           "--hidden", "64", "--layers", "1", "--seq", "16", "--rank", "4",
                                           "--warmup", "0", "--repeats", "1", "--json", str(json_path)])
    by = {row["mode"]: row for row in rows}
    assert list(by) == ["peft DoRA eager", "peft DoRA + inductor", "runlora DoRA", "runlora LoRA",
                        "peft LoRA + inductor"]
    assert by["runlora DoRA"]["sites"] == by["runlora LoRA"]["sites"] == 7
    assert all(row["median_ms"] > 0 and row["saved_MiB"] > 0 for row in rows)
    assert json.loads(json_path.read_text())["args"]["base"] == "bnb_nf4"


def test_bench_criteria_main_adds_the_calibrated_roofline(tmp_path):
    from runlora_fx.choose.roofline import device_model_for

    bench_criteria = load_script("bench_criteria")
    model_path = tmp_path / "cpu.json"
    model_path.write_text(json.dumps(device_model_for("cpu").to_dict()))
    json_path, md_path = tmp_path / "criteria.json", tmp_path / "criteria.md"
    rows = bench_criteria.main(["--quick", "--grid", "32x64x96x4", "--warmup", "1", "--repeats", "1",
                                "--tune-repeats", "1", "--device-model", str(model_path),
                                "--json", str(json_path), "--md", str(md_path)])
    assert [row["criterion"] for row in rows] == ["flops", "roofline", "time", "roofline_calibrated"]
    for row in rows:
        assert row["ms"] > 0 and row["x_best"] >= 1.0 and row["pair"].split(" ")[0] in row["all_ms"]
    # The same constants as the table: the calibrated roofline must choose as the roofline does.
    assert rows[3]["pair"] == rows[1]["pair"]
    assert_outputs(rows, json_path, md_path, bench_criteria.COLUMNS)


def test_check_qlora_passes_on_cpu():
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (in the test extra)")
    assert load_script("check_qlora").main(["--inner", "aot_eager"]) == 0


def test_profile_step_writes_a_table_per_mode(tmp_path):
    out = tmp_path / "profile.md"
    text = load_script("profile_step").main(["--quick", "--inner", "aot_eager", "--layers", "1", "--batch", "1",
                                             "--seq", "16", "--warmup", "1", "--steps", "1", "--rows", "5",
                                             "--modes", "peft_eager,runlora", "--out", str(out)])
    assert out.read_text() == text
    for mode in ("peft_eager", "runlora"):
        assert f"## llama_tiny {mode}" in text
    assert text.count("aten::mm") >= 2  # the heaviest ops are listed for both modes


def test_gpu_suite_new_steps_dry_run_on_cpu(tmp_path):
    """``DEVICE=cpu QUICK=1`` of gpu_suite.sh's reduce-overhead step (the only new step that is
    not a plain bench_model.py call, which the tests above cover) and its collect step: one
    table printed, one suite.json written, the per-step JSON files merged away.

    The whole suite is a few minutes on 2 CPU cores (every step imports torch, transformers and
    peft anew), too slow for CI; ``STEPS`` picks the subset."""
    import os
    import subprocess

    env = dict(os.environ, DEVICE="cpu", QUICK="1", STEPS="reduce_overhead", OUT=str(tmp_path),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(BENCH_DIR / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.json", "suite.log", "summary.md"]
    suite = json.loads((tmp_path / "suite.json").read_text())
    rows = suite["reduce_overhead"]["rows"]
    assert [r["mode"] for r in rows] == ["peft_inductor", "runlora", "runlora_roofline"]
    assert all(r["compile_mode"] == "reduce-overhead" and r["cudagraph_skips"] == 0 and r["ms"] > 0 for r in rows)
    assert rows[1]["sites"] == 7
    table = [line for line in done.stdout.splitlines() if line.startswith("| reduce_overhead |")]
    assert len(table) == 3, done.stdout
    assert "| reduce_overhead | 0 |" in (tmp_path / "summary.md").read_text()
