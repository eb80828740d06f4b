"""benchmarks/bench_traffic.py: the fusion model on a known graph, and main() on a tiny Llama."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_traffic():
    spec = importlib.util.spec_from_file_location("_bench_bench_traffic", BENCH_DIR / "bench_traffic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_fusion_model_counts_one_gemm_and_one_fused_epilogue(bench_traffic):
    # y = relu(x @ w + 1) * 2: the mm is an extern kernel; add, relu and mul fuse into one kernel
    def f(x, w):
        return torch.relu(torch.mm(x, w) + 1) * 2

    x, w = torch.randn(8, 16), torch.randn(16, 4)
    graph = make_fx(f, tracing_mode="fake")(x, w).graph
    cost = bench_traffic.count_graph(graph, dtype=torch.float32)

    assert (cost.kernels, cost.gemms) == (2, 1)
    assert cost.flops == 2 * 8 * 16 * 4
    # mm reads x and w and writes xw; the fused kernel reads xw and writes y
    assert cost.bytes == 4 * (8 * 16 + 16 * 4 + 8 * 4) + 4 * (8 * 4 + 8 * 4)


def test_fusion_model_does_not_fuse_across_a_gemm(bench_traffic):
    # a = x + 1 feeds a mm whose result is added back to a: the second add needs the mm's
    # output, so it cannot join a's kernel
    def f(x, w):
        a = x + 1
        return torch.mm(a, w) + a

    x, w = torch.randn(8, 8), torch.randn(8, 8)
    cost = bench_traffic.count_graph(make_fx(f, tracing_mode="fake")(x, w).graph, dtype=torch.float32)
    assert (cost.kernels, cost.gemms) == (3, 1)


def test_main_counts_a_tiny_llama(bench_traffic, tmp_path):
    json_path = tmp_path / "traffic.json"
    rows = bench_traffic.main(["--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
                               "--layers", "1", "--vocab", "64", "--seq", "8", "--batch", "4",
                               "--rank", "2", "--dtype", "float32", "--modes", "frozen_inductor,peft_inductor",
                               "--json", str(json_path)])

    frozen, peft = rows
    for row in rows:
        for key in ("kernels", "gemms", "bytes", "flops", "est_s", "fwd_out_bytes"):
            assert row[key] > 0, (row["mode"], key)
    assert peft["lora_kernels"] > 0 and peft["lora_bytes"] > 0
    assert peft["lora_flops"] > 0
    # counted at n = 4·8 = 32 tokens: each of the 7 sites adds at least its forward X·Aᵀ, 2·n·i·r (i >= 32, r = 2)
    assert peft["lora_flops"] >= 7 * 2 * 32 * 32 * 2
    assert frozen["lora_kernels"] == 0
    assert json.loads(json_path.read_text())["rows"][1]["mode"] == "peft_inductor"


def test_ranking_check_fails_when_merged_is_not_faster(bench_traffic):
    est = {"frozen_inductor": 1.0, "runlora_roofline_merged": 2.0, "runlora_merged": 2.5, "peft_inductor": 3.0,
           "runlora": 3.1}
    rows = [{"mode": mode, "est_s": value} for mode, value in est.items()]
    assert bench_traffic.ranking_check(rows)[0]  # peft_inductor and runlora tie: either order passes

    rows[2]["est_s"] = 3.5  # runlora_merged slower than peft_inductor
    ok, text = bench_traffic.ranking_check(rows)
    assert not ok and text.startswith("ranking check (FAIL)")
