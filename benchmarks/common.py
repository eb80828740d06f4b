"""Shared helpers for the benchmark scripts: timing, saved-activation bytes, tables, output.

Not a library: ``bench_layer.py`` and ``bench_model.py`` import it from this folder, and it
prints nothing. Timing follows the usual rules: warm-up first (the first call compiles), then
the median of the repeats; CUDA events on the GPU, ``time.perf_counter`` on the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from runlora_fx.choose.measure import cpu_model

__all__ = [
    "DTYPES",
    "Column",
    "Timing",
    "environment",
    "markdown_table",
    "ratio",
    "saved_activation_bytes",
    "sync",
    "time_interleaved",
    "time_once",
    "time_steps",
    "warm_up",
    "write_outputs",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Timing:
    """What ``time_steps`` measured.

    Attributes:
        first_s: the first call alone, in seconds (includes compilation for compiled modes).
        median_ms: median over the timed repeats, in milliseconds.
        min_ms: the fastest repeat, in milliseconds.
        times_ms: every timed repeat, in milliseconds.
    """

    def __init__(self, first_s: float, times_ms: Sequence[float]):
        self.first_s = first_s
        self.times_ms = list(times_ms)
        self.median_ms = statistics.median(self.times_ms)
        self.min_ms = min(self.times_ms)


def sync(device: str) -> None:
    """Waits for queued device work (no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(step: Callable[[], object], *, device: str, warmup: int) -> float:
    """Calls ``step()`` ``warmup`` times (at least once); returns the first call's seconds.

    The first call of a compiled mode includes compilation, so its time is the compile time
    plus one step.
    """
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - start
    for _ in range(max(warmup, 1) - 1):
        step()
    sync(device)
    return first_s


def time_once(step: Callable[[], object], *, device: str) -> float:
    """Milliseconds of one ``step()``: CUDA events on the GPU, ``perf_counter`` on the CPU."""
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


def time_steps(step: Callable[[], object], *, device: str, warmup: int, repeats: int) -> Timing:
    """Times ``step()``: ``warmup`` untimed calls (the first one timed alone), then ``repeats`` timed.

    Args:
        step: one full unit of work (e.g. a training step); its result is discarded.
        device: "cpu" or "cuda".
        warmup: untimed calls including the first (at least 1).
        repeats: timed calls (at least 1).

    Returns:
        Timing with the first call's seconds and the repeats' milliseconds.
    """
    first_s = warm_up(step, device=device, warmup=warmup)
    return Timing(first_s, [time_once(step, device=device) for _ in range(max(repeats, 1))])


def time_interleaved(steps: dict, *, device: str, warmup: int, repeats: int) -> dict:
    """Times several steps round-robin, so background load on a shared machine hits all alike.

    Args:
        steps: name -> step callable.
        device, warmup, repeats: as for ``time_steps``; each step is warmed up in turn first.

    Returns:
        name -> Timing.
    """
    first = {name: warm_up(step, device=device, warmup=warmup) for name, step in steps.items()}
    times: dict = {name: [] for name in steps}
    for _ in range(max(repeats, 1)):
        for name, step in steps.items():
            times[name].append(time_once(step, device=device))
    return {name: Timing(first[name], times[name]) for name in steps}


def saved_activation_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during one ``step()``, parameters excluded.

    Every tensor packed by autograd (``torch.autograd.graph.saved_tensors_hooks``) is counted
    once per storage, by the storage's size: a view keeps its whole base alive. Storages of
    ``exclude`` (weights, adapters) are not counted.

    Args:
        step: runs forward and backward once.
        exclude: tensors whose storages are not activations.

    Returns:
        The byte count.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


class Column:
    """One markdown column: the row key, its header and a format for numbers."""

    def __init__(self, key: str, header: str, fmt: str = "{}"):
        self.key, self.header, self.fmt = key, header, fmt

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or value == "":
            return "-"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.fmt.format(value)
        return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows as a GitHub markdown table; missing values print as '-'."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: str) -> dict:
    """Date, machine, library versions: the header of every result file."""
    import importlib.metadata as md

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_outputs(*, rows: Sequence[dict], env: dict, argv: Sequence[str], table: str,
                  json_path: Optional[str], md_path: Optional[str], title: str) -> None:
    """Writes the rows as JSON and the table as markdown, each only when a path is given."""
    command = "python " + " ".join(argv)
    if json_path:
        _make_parent(json_path)
        with open(json_path, "w") as f:
            json.dump({"title": title, "command": command, "env": env, "rows": list(rows)}, f, indent=1)
    if md_path:
        _make_parent(md_path)
        header = (f"## {title}\n\n`{command}`\n\n{env['date']}, {env['device']}"
                  f" ({env.get('gpu') or env['cpu']}, {env['cpu_count']} cores), torch {env['torch']}\n\n")
        with open(md_path, "w") as f:
            f.write(header + table + "\n")


def _make_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
