"""The ``runlora-fx`` command line, run as a user runs it: in a subprocess.

Each test builds its input (a saved program, a factory module, nothing), runs
``python -m runlora_fx.cli ...``, and checks the exit status, the printed report or grid, and
the files written. A subprocess imports torch afresh (2-3 s each on 2 CPU cores).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import runlora_fx
from runlora_fx import cli
from runlora_fx.inspection import regions

ROOT = Path(__file__).resolve().parents[1]


class LoRALinear(nn.Module):
    """A hand-written LoRA layer: frozen base plus 2.0 * B(A(x))."""

    def __init__(self, i, o, r):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(i, r, bias=False)
        self.lora_B = nn.Linear(r, o, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


class Net(nn.Module):
    """One LoRA layer at path ``proj`` whose add is the program's output."""

    def __init__(self):
        super().__init__()
        self.proj = LoRALinear(16, 24, 4)

    def forward(self, x):
        return self.proj(x)


def run_cli(*args, cwd, pythonpath=()):
    env = dict(os.environ)
    paths = [*map(str, pythonpath), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, "-m", "runlora_fx.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_explain_pt2_writes_rewritten_program(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 8, 16)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")

    proc = run_cli("explain", tmp_path / "model.pt2", "--write", tmp_path / "out.pt2", "--json", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["totals"]["sites"] == 1
    assert [s["path"] for s in report["sites"]] == ["proj"]
    ep = runlora_fx.load(tmp_path / "out.pt2")
    ops = [n for n in ep.graph.nodes if n.target is torch.ops.runlora.lora_linear.default]
    assert len(ops) == 1
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)  # fp32


def test_explain_factory_reports_sites(tmp_path):
    factories = tmp_path / "factories"
    factories.mkdir()
    (factories / "lora_factory.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        class LoRALinear(nn.Module):
            def __init__(self, i, o, r):
                super().__init__()
                self.base = nn.Linear(i, o)
                self.base.requires_grad_(False)
                self.lora_A = nn.Linear(i, r, bias=False)
                self.lora_B = nn.Linear(r, o, bias=False)

            def forward(self, x):
                return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.up = LoRALinear(16, 32, 4)
                self.down = LoRALinear(32, 16, 4)

            def forward(self, x):
                return self.down(torch.relu(self.up(x)))

        def make_model():
            return MLP(), (torch.randn(2, 8, 16),)
    """))

    proc = run_cli("explain", "lora_factory:make_model", "--json", cwd=tmp_path, pythonpath=[factories])

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["totals"]["sites"] == 2
    assert sorted(s["path"] for s in report["sites"]) == ["down", "up"]


def test_regions_writes_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    np = pytest.importorskip("numpy")

    proc = run_cli("regions", "--in", 4096, "--out", 11008, "--tokens", "512..131072", "--ranks", "4,64,4096",
                   "-o", tmp_path / "regions.png", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    pixels = image.imread(tmp_path / "regions.png")
    width, height = (round(v * regions.DPI) for v in regions.FIGSIZE)
    assert pixels.shape[:2] == (height, width)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 3


def test_regions_json_matches_thresholds(tmp_path):
    i, o = 4096, 11008
    proc = run_cli("regions", "--in", i, "--out", o, "--tokens", "64..131072", "--ranks", "8,512", "--json",
                   cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []  # --json without -o plots nothing
    grid = json.loads(proc.stdout)
    assert grid["ranks"] == [8, 512] and grid["tokens"] == [2**k for k in range(6, 18)]
    expected = [("forward2" if n > i * o / (i + o) else "forward1") + "/" + ("backward5" if n > o else "backward1")
                for n in grid["tokens"]]
    assert grid["winners"] == [expected, expected]


def test_help_lists_commands(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for command in ("explain", "regions", "calibrate"):
        listed = [line for line in lines if line.split()[:1] == [command]]
        assert len(listed) == 1 and len(listed[0].split()) > 3, f"{command}: no one-line description in\n{proc.stdout}"
        assert any(line.strip().startswith(f"runlora-fx {command} ") for line in lines), f"{command}: no example"


@pytest.mark.parametrize("argv, message", [
    (["regions", "--in", "4096", "--out", "11k"], "argument --out: expected a positive integer, got '11k'"),
    (["regions", "--in", "4096", "--out", "11008", "--ranks", "64,8"], "expected increasing values, got '64,8'"),
    (["calibrate", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["calibrate", "--device", "cpu", "--dtypes", "bf16"],
     "expected torch dtype names such as bfloat16,float32, got 'bf16'"),
    (["frobnicate"], "invalid choice: 'frobnicate' (choose from"),
])
def test_bad_argument_names_expected_and_got(capsys, argv, message):
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code

    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("target, message", [
    ("no_such_module_xyz:make_model", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_factory", "module 'json' has no attribute 'no_such_factory'"),
    ("json:decoder", "expected a function returning (model, args)"),
    ("not_a_spec", "expected FILE.pt2"),
    ("missing.pt2", "no such file"),
])
def test_explain_bad_target_fails_clearly(tmp_path, target, message):
    proc = run_cli("explain", target, cwd=tmp_path)

    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_factory_result_is_checked(monkeypatch, tmp_path):
    (tmp_path / "shapes_factory.py").write_text(textwrap.dedent("""
        import torch

        def with_kwargs():
            return torch.nn.Linear(2, 2), [torch.ones(2)], {"unused": 1}

        def not_a_model():
            return "model", (torch.ones(2),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    model, args, kwargs = cli._call_factory("shapes_factory:with_kwargs")
    assert isinstance(model, nn.Linear) and isinstance(args, tuple) and kwargs == {"unused": 1}
    with pytest.raises(cli.CliError, match="expected a torch.nn.Module"):
        cli._call_factory("shapes_factory:not_a_model")


@pytest.mark.parametrize("text, values", [("64..512", [64, 128, 256, 512]), ("1,3, 8", [1, 3, 8]), ("16", [16])])
def test_grid_argument(text, values):
    assert cli._grid(text) == values


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails

    with pytest.raises(ImportError, match="pip install matplotlib"):
        regions.plot_regions(64, 128, [256], [4], tmp_path / "regions.png")
