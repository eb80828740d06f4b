"""The README's demo, ``examples/quickstart.py``, run as a user runs it: in a subprocess.

It compiles a tiny peft Llama twice (inductor, runlora), about a minute on 2 CPU cores.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_three_ways_and_rewrites_every_site(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 40
    modes = ("peft eager", "peft + inductor", "runlora ")
    rows = {line.split("  ")[0]: line.split() for line in lines if line.startswith(modes)}
    assert set(rows) == {"peft eager", "peft + inductor", "runlora"}
    first, last = ([float(row[k]) for row in rows.values()] for k in (-2, -1))
    assert max(first) - min(first) < 1e-3 and max(last) - min(last) < 1e-3  # the same training, fp32
    assert "runlora: rewrote 14 of 14 LoRA-shaped sites" in proc.stdout
    assert "14 LoRA layers: 14 rewritten" in proc.stdout  # the model-level count: no layer ran eagerly
    assert not re.search(r"\w+Warning: ", proc.stderr), proc.stderr  # Python warnings (numpy missing, deprecations)
