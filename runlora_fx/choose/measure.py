"""``criterion="time"``: measure each candidate plan pair on the real device, and cache it.

For every distinct site key (device, torch version, dtypes, n, i, o, r, needed gradients,
separate LoRA input, bias) the tuner runs each applicable (forward, backward) pair through
the op itself, ``torch.ops.runlora.lora_linear`` forward and its autograd backward, on random
data (never zeros: peft's zero-initialised B would time a different computation), and keeps
the median of the repeats after a warm-up: ``torch.cuda.Event`` on the GPU,
``time.perf_counter`` on the CPU. A key's pairs are timed round-robin (repeat k of each, then
k+1), so load drifting on a shared machine falls on all of them alike.

Results are cached in memory (per process) and on disk, one JSON file::

    {"schema": 1, "entries": {"<key>": {"times_s": {"forward2/backward5": 0.0123, ...},
                                        "measured_at": "<iso date>", "warmup": 2, "repeats": 5,
                                        "kernel_configs": {...}}}}

Where the fused pair (Triton kernels, ``ops/fused.py``) is a candidate, the key names the
kernels' source hash (``TuneKey.kernels``: an edited kernel is measured again), the kernels'
block shapes are tuned for the key's sizes before its pairs are timed (``fused.tune_site``, at
compile time, never inside CUDA-graph capture), and the shapes chosen are stored with the
times (``kernel_configs``) and loaded again on a hit, so the cached times are those of the
configuration that runs.

in ``$RUNLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/runlora_fx``, else ``~/.cache/runlora_fx``.
A hit measures nothing. A corrupt file, or one of another schema, is ignored with a warning
(and replaced on the next write). Writes are atomic (a temporary file in the same directory,
then ``os.replace``) and merge under an exclusive ``fcntl.flock`` on ``timings.json.lock``:
read what is there, add ours, replace, so two processes tuning at once keep both sets.

``Autotuner(time_budget_s=...)`` stops measuring once that much wall time is spent (a key
being measured is finished); later keys that miss the cache fall back to the roofline.

``runlora_fx.tune(model, *example_inputs)`` (``tuning.py``) does all of it ahead of time: it
captures the model's sites with a dry run (as ``explain`` does) and measures each key, so a
later ``make_backend(criterion="time")`` compile only reads the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch

from .. import ops  # noqa: F401  registers torch.ops.runlora.lora_linear, which is timed
from ..ops import fused
from ..options import RewriteOptions
from ..plans import Needs

try:  # POSIX; elsewhere writes are read-merge-replace without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "SCHEMA",
    "Autotuner",
    "SiteInputs",
    "TuneKey",
    "cache_path",
    "cpu_model",
    "default_cache_dir",
    "device_name",
    "measure_pair",
    "measure_pairs",
    "pair_name",
    "tuner_for",
]

log = logging.getLogger("runlora_fx.choose.measure")

SCHEMA = 1
CACHE_FILE = "timings.json"

Timer = Callable[["TuneKey", str, str], float]


def pair_name(forward: str, backward: str) -> str:
    """``"forward2/backward5"``: how pairs are named in tables and reports."""
    return f"{forward}/{backward}"


def default_cache_dir() -> str:
    """``$RUNLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/runlora_fx``, else ``~/.cache/runlora_fx``."""
    explicit = os.environ.get("RUNLORA_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "runlora_fx")


def cache_path(cache_dir: Optional[str] = None) -> str:
    """The timing cache file in ``cache_dir`` (default: ``default_cache_dir()``)."""
    return os.path.join(cache_dir or default_cache_dir(), CACHE_FILE)


def device_name(device) -> str:
    """What a timing depends on about the device: the GPU's name, or the CPU's and its threads."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return dev.type


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """Everything a site's timings depend on; ``str()`` is its cache key.

    Attributes:
        device: ``device_name(...)`` of the device the site runs on.
        torch: torch's version.
        dtype, adapter_dtype: x/W's dtype and the op's adapter_dtype argument (names).
        n, i, o, r: tokens (the size hint when symbolic), in, out, rank.
        needs: (x, lora_A, lora_B) gradients needed.
        separate_lora_input: the LoRA branch reads its own input (dropout).
        bias: the base layer has a bias.
        torch_device: where to measure ("cuda:0", "cpu"); not part of the key.
        kernels: ``"fused <source hash>"`` where the fused kernels can run on the device, else
            None (and absent from the key string).
    """

    device: str
    torch: str
    dtype: str
    adapter_dtype: Optional[str]
    n: int
    i: int
    o: int
    r: int
    needs: tuple
    separate_lora_input: bool
    bias: bool
    torch_device: str = dataclasses.field(default="cpu", compare=False)
    kernels: Optional[str] = None

    @classmethod
    def for_site(cls, *, device, dtype: torch.dtype, adapter_dtype: Optional[torch.dtype], n: int, i: int, o: int,
                 r: int, needs: Needs, separate_lora_input: bool, bias: bool,
                 kernels: Optional[str] = None) -> "TuneKey":
        return cls(device_name(device), torch.__version__, _dtype_name(dtype), _dtype_name(adapter_dtype),
                   int(n), int(i), int(o), int(r), (bool(needs.x), bool(needs.lora_A), bool(needs.lora_B)),
                   bool(separate_lora_input), bool(bias), str(torch.device(device)), kernels)

    def __str__(self) -> str:
        needs = "".join(name for name, on in zip(("x", "A", "B"), self.needs) if on) or "none"
        return (f"{self.device}|torch {self.torch}|{self.dtype}|adapter {self.adapter_dtype}|"
                f"n={self.n} i={self.i} o={self.o} r={self.r}|grads {needs}|"
                f"separate_input={int(self.separate_lora_input)}|bias={int(self.bias)}"
                + (f"|kernels {self.kernels}" if self.kernels else ""))

    @property
    def label(self) -> str:
        """Short, for progress lines."""
        return f"{self.n}x{self.i}->{self.o} r{self.r} {self.dtype}"


# --- measuring -----------------------------------------------------------------------------
class SiteInputs:
    """Random tensors for one key (never zeros), built once and reused by each of its pairs.

    ``step(forward, backward)`` returns the measured unit: the op's forward, then
    ``autograd.grad`` of the inputs whose gradients the key needs against a random dY.
    """

    def __init__(self, key: TuneKey):
        dev = torch.device(key.torch_device)
        dtype = getattr(torch, key.dtype)
        adapter = getattr(torch, key.adapter_dtype) if key.adapter_dtype else None
        lora_dtype = adapter or dtype
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, std=1.0, dt=dtype, grad=False):
            t = (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dt)
            return t.requires_grad_(grad)

        need_x, need_a, need_b = key.needs
        self.x = rand(key.n, key.i, grad=need_x)
        self.x_lora = rand(key.n, key.i, grad=need_x) if key.separate_lora_input else None  # as dropout(x)
        self.weight = rand(key.o, key.i, std=key.i ** -0.5)
        self.bias = rand(key.o, std=0.1) if key.bias else None
        self.lora_A = rand(key.r, key.i, std=key.i ** -0.5, dt=lora_dtype, grad=need_a)
        self.lora_B = rand(key.o, key.r, std=0.02, dt=lora_dtype, grad=need_b)
        self.adapter_dtype = adapter
        out_dtype = torch.promote_types(dtype, lora_dtype)
        self.grad_y = rand(key.n, key.o, dt=out_dtype)
        self.inputs = [t for t in (self.x, self.x_lora, self.lora_A, self.lora_B) if t is not None and t.requires_grad]

    def step(self, forward: str, backward: str) -> Callable[[], object]:
        def run():
            y = torch.ops.runlora.lora_linear(self.x, self.weight, self.bias, self.lora_A, self.lora_B, 2.0,
                                              self.x_lora, self.adapter_dtype, forward, backward)
            if self.inputs:
                torch.autograd.grad(y, self.inputs, self.grad_y)
        return run


def seconds_once(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one ``step()`` takes: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    begin_s = time.perf_counter()
    step()
    return time.perf_counter() - begin_s


def measure_pairs(key: TuneKey, pairs: Sequence[str], *, warmup: int = 2, repeats: int = 5,
                  inputs: Optional[SiteInputs] = None) -> dict:
    """{pair: median seconds} of one forward + backward each, for ``key``: the default timing.

    Each pair is warmed up in turn, then the repeats go round-robin (repeat k of every pair,
    then k+1), so load that drifts on a shared machine falls on all pairs alike.
    ``inputs`` (``SiteInputs(key)``) is built here when not given.
    """
    device = torch.device(key.torch_device)
    with torch.enable_grad():
        inputs = inputs or SiteInputs(key)
        steps = {p: inputs.step(*p.split("/")) for p in pairs}
        for step in steps.values():
            for _ in range(max(warmup, 1)):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times: dict = {p: [] for p in pairs}
        for _ in range(max(repeats, 1)):
            for p, step in steps.items():
                times[p].append(seconds_once(step, device))
    return {p: statistics.median(t) for p, t in times.items()}


def measure_pair(key: TuneKey, forward: str, backward: str, *, warmup: int = 2, repeats: int = 5,
                 inputs: Optional[SiteInputs] = None) -> float:
    """Median seconds of one forward + backward of ``forward``/``backward`` for ``key``."""
    return measure_pairs(key, [pair_name(forward, backward)], warmup=warmup, repeats=repeats, inputs=inputs)[
        pair_name(forward, backward)]


# --- the cache -----------------------------------------------------------------------------
_MEMORY_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}  # cache file path -> {key: entry}, shared by the tuners of a process


def _read_file(path: str, *, warn: bool) -> dict:
    """The entries of a cache file; {} if missing, corrupt or of another schema (warned)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if warn:
            warnings.warn(f"runlora: ignoring corrupt timing cache {path} ({type(exc).__name__}: {exc}); "
                          "measuring again", stacklevel=3)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        if warn:
            warnings.warn(f"runlora: ignoring corrupt timing cache {path} (no 'entries' table); measuring again",
                          stacklevel=3)
        return {}
    if data.get("schema") != SCHEMA:
        if warn:
            warnings.warn(f"runlora: ignoring timing cache {path}: schema {data.get('schema')!r}, expected {SCHEMA}; "
                          "measuring again", stacklevel=3)
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("times_s"), dict)}


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock on ``path + ".lock"`` for the duration (no-op without fcntl)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _merge(into: dict, entries: dict) -> None:
    for key, entry in entries.items():
        old = into.get(key)
        if old is None:
            into[key] = entry
        else:
            into[key] = {**old, **entry, "times_s": {**old.get("times_s", {}), **entry["times_s"]}}


def _write_merged(path: str, entries: dict) -> dict:
    """Adds ``entries`` to the file at ``path`` atomically; returns the merged table."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _file_lock(path):
        merged = _read_file(path, warn=False)
        _merge(merged, entries)
        fd, tmp = tempfile.mkstemp(prefix=".timings.", suffix=".tmp", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": SCHEMA, "entries": merged}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return merged


# --- progress ------------------------------------------------------------------------------
class _Progress:
    """Progress of a tuning run on stderr; silent unless stderr is a terminal (or ``enabled``).

    One line rewritten in place; once the run has taken ``bar_after_s`` seconds, a tqdm bar
    instead when tqdm is importable (an optional dependency; without it the line goes on).
    """

    bar_after_s = 2.0

    def __init__(self, total: int, stream=None, enabled: Optional[bool] = None,
                 clock: Optional[Callable[[], float]] = None):
        self.stream = stream or sys.stderr
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = (is_tty if enabled is None else enabled) and total > 1
        self.total = total
        self.width = 0
        self.clock = clock or time.monotonic
        self.started = self.clock()
        self.bar = None
        self.tried_bar = False

    def update(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        if not self.tried_bar and self.clock() - self.started >= self.bar_after_s:
            self.tried_bar = True
            self.bar = _tqdm_bar(self.total, done, self.stream)
            if self.bar is not None:
                self._clear_line()
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(label, refresh=True)
            return
        line = f"runlora: tuning {done + 1}/{self.total}: {label}"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.total
            self.bar.close()
        elif self.enabled:
            self._clear_line()

    def _clear_line(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _tqdm_bar(total: int, done: int, stream):
    """A tqdm bar at ``done`` of ``total``, or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, file=stream, desc="runlora: tuning", unit="shape", leave=False)


# --- the tuner -----------------------------------------------------------------------------
class Autotuner:
    """Measures plan pairs per key, with the memory and disk caches and a time budget.

    Args:
        cache_dir: where ``timings.json`` lives (default: ``default_cache_dir()`` now).
        timer: ``timer(key, forward, backward) -> seconds``, called per pair (for tests, or
            your own measuring); default: ``measure_pairs``, all of a key's pairs round-robin.
        warmup, repeats: passed to the default timer (defaults 2 and 5; 10 repeats on CUDA).
        time_budget_s: stop measuring after this many seconds (None: no limit); keys not in
            the cache then fall back to the roofline.
        persist: write measurements to disk (memory only when False).
        progress: show the progress line (None: when stderr is a terminal).

    Attributes:
        measurements: pairs timed by this tuner (cache misses); 0 after a full hit.
        spent_s: wall seconds spent measuring.
        results: key string -> {"times_s", "best", "source": "cache"|"measured"} or
            {"times_s": None, "skipped": reason} for every key asked of this tuner.
    """

    def __init__(self, *, cache_dir: Optional[str] = None, timer: Optional[Timer] = None, warmup: Optional[int] = None,
                 repeats: Optional[int] = None, time_budget_s: Optional[float] = None, persist: bool = True,
                 progress: Optional[bool] = None):
        self.path = os.path.abspath(cache_path(cache_dir))
        self.timer = timer
        self.warmup = warmup
        self.repeats = repeats
        self.time_budget_s = time_budget_s
        self.persist = persist
        self.progress = progress
        self.measurements = 0
        self.spent_s = 0.0
        self.results: dict[str, dict] = {}

    # cache ----------------------------------------------------------------------------
    def _memory(self) -> dict:
        with _MEMORY_LOCK:
            table = _MEMORY.get(self.path)
            if table is None:
                table = _MEMORY[self.path] = _read_file(self.path, warn=True)
            return table

    def cached(self, key: TuneKey, pairs: Sequence[str]) -> Optional[dict]:
        """{pair: seconds} for ``pairs`` if every one is cached, else None."""
        entry = self._memory().get(str(key))
        if entry is None or not all(p in entry["times_s"] for p in pairs):
            return None
        return {p: float(entry["times_s"][p]) for p in pairs}

    @property
    def budget_spent(self) -> bool:
        return self.time_budget_s is not None and self.spent_s >= self.time_budget_s

    # measuring -------------------------------------------------------------------------
    def measure(self, key: TuneKey, pairs: Sequence[str]) -> Optional[dict]:
        """{pair: median seconds} for ``key``, from the cache or measured now.

        Returns None (and records why in ``results``) when the key is not cached and the
        budget is spent or measuring failed; the caller falls back to the roofline.
        """
        table = self.cached(key, pairs)
        if table is not None:
            fused.remember_configs(self._memory()[str(key)].get("kernel_configs"))
            self._record(key, table, "cache")
            return table
        if self.budget_spent:
            self._skip(key, f"time budget of {self.time_budget_s:g} s spent")
            return None
        old = self._memory().get(str(key)) or {}
        known = dict(old.get("times_s", {}))
        configs = dict(old.get("kernel_configs") or {})
        start = time.perf_counter()
        try:
            missing = [p for p in pairs if p not in known]
            if self.timer is None:
                known.update(self._measure_pairs(key, missing, configs))
            else:
                for pair in missing:
                    known[pair] = float(self.timer(key, *pair.split("/")))
            self.measurements += len(missing)
        except Exception as exc:  # noqa: BLE001 - a failed measurement falls back, never breaks a compile
            self.spent_s += time.perf_counter() - start
            warnings.warn(f"runlora: could not time {key.label} ({type(exc).__name__}: {exc}); using the roofline",
                          stacklevel=2)
            self._skip(key, f"measuring failed: {type(exc).__name__}")
            return None
        self.spent_s += time.perf_counter() - start
        entry = {"times_s": known, "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "warmup": self._warmup(key), "repeats": self._repeats(key)}
        if configs:
            entry["kernel_configs"] = configs
        self._store(str(key), entry)
        table = {p: known[p] for p in pairs}
        self._record(key, table, "measured")
        return table

    def measure_all(self, requests: Iterable[tuple]) -> None:
        """Measures each distinct (key, pairs) not cached yet, with a progress line."""
        todo, seen = [], set()
        for key, pairs in requests:
            if str(key) not in seen and self.cached(key, pairs) is None and len(pairs) > 1:
                seen.add(str(key))
                todo.append((key, pairs))
        progress = _Progress(len(todo), enabled=self.progress)
        try:
            for done, (key, pairs) in enumerate(todo):
                progress.update(done, key.label)
                self.measure(key, pairs)
        finally:
            progress.close()
        if todo:
            log.info("runlora: timed %d key(s), %d pair(s), %.1f s", len(todo), self.measurements, self.spent_s)

    def _measure_pairs(self, key: TuneKey, pairs: Sequence[str], configs: dict) -> dict:
        """The default timing, the fused pair's kernels tuned first; where they fail (a compile
        error on this device, say) the ATen pairs are timed alone and the fused pair is recorded
        as infinitely slow, so it is never chosen and not retried for this kernel source."""
        kw = dict(warmup=self._warmup(key), repeats=self._repeats(key))
        kernel_pairs = [p for p in pairs if "fused" in p.split("/")]
        if not kernel_pairs:
            return measure_pairs(key, pairs, **kw)
        try:
            configs.update(_tune_fused(key))
            return measure_pairs(key, pairs, **kw)
        except Exception as exc:  # noqa: BLE001 - the ATen pairs are still worth timing
            warnings.warn(f"runlora: the fused kernels failed at {key.label} ({type(exc).__name__}: {exc}); "
                          "timing the ATen pairs alone", stacklevel=3)
            rest = [p for p in pairs if p not in kernel_pairs]
            return {**(measure_pairs(key, rest, **kw) if rest else {}), **{p: math.inf for p in kernel_pairs}}

    def _warmup(self, key: TuneKey) -> int:
        return self.warmup if self.warmup is not None else 2

    def _repeats(self, key: TuneKey) -> int:
        if self.repeats is not None:
            return self.repeats
        return 10 if key.torch_device.startswith("cuda") else 5

    def _store(self, key: str, entry: dict) -> None:
        if self.persist:
            try:
                merged = _write_merged(self.path, {key: entry})
            except OSError as exc:
                warnings.warn(f"runlora: could not write timing cache {self.path} ({exc}); keeping it in memory",
                              stacklevel=3)
                merged = None
        else:
            merged = None
        with _MEMORY_LOCK:
            table = _MEMORY.setdefault(self.path, {})
            if merged is not None:
                _merge(table, merged)  # also picks up what other processes wrote meanwhile
            _merge(table, {key: entry})

    def _record(self, key: TuneKey, table: dict, source: str) -> None:
        old = self.results.get(str(key))
        if old is not None and old.get("source") == "measured":
            source = "measured"  # measured by this tuner, then read back: still "measured"
        self.results[str(key)] = {"times_s": dict(table), "best": min(table, key=table.get), "source": source}

    def _skip(self, key: TuneKey, reason: str) -> None:
        self.results[str(key)] = {"times_s": None, "best": None, "skipped": reason}


def _tune_fused(key: TuneKey) -> dict:
    """The fused kernels' block shapes tuned at ``key``'s sizes (``ops.fused.tune_site``)."""
    dtype = getattr(torch, key.dtype)
    adapter = getattr(torch, key.adapter_dtype) if key.adapter_dtype else None
    return fused.tune_site(key.n, key.i, key.o, key.r, dtype=dtype, adapter_dtype=adapter, bias=key.bias,
                           separate_lora_input=key.separate_lora_input, needs=key.needs, device=key.torch_device)


def forget_memory(cache_dir: Optional[str] = None) -> None:
    """Drops the in-memory copy of a cache file (all of them when ``cache_dir`` is None)."""
    with _MEMORY_LOCK:
        if cache_dir is None:
            _MEMORY.clear()
        else:
            _MEMORY.pop(os.path.abspath(cache_path(cache_dir)), None)


def tuner_for(options: RewriteOptions) -> RewriteOptions:
    """``options`` with an ``Autotuner`` (of its ``time_budget_s``) where ``criterion="time"`` has none."""
    if options.criterion != "time" or options.tuner is not None:
        return options
    return dataclasses.replace(options, tuner=Autotuner(time_budget_s=options.time_budget_s))
