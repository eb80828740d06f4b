"""A roofline cost model: FLOPs, bytes moved and kernel launches of every plan.

FLOPs alone (``choose/flops.py``) miss what decides the LoRA branch at small rank on a GPU: its
matmuls are thin (one side r = 8..64), so they are bound by the bytes they move, and each
is one more kernel launch (BENCHMARKS.md: ~148 µs of LoRA overhead per site per step on an
H200 against ~6 µs of FLOPs). This model prices each plan as the kernels its ATen chain in
``plans/catalogue.py`` actually issues, one record per kernel::

    time(plan) = Σ_kernels [ max(FLOPs_k ÷ peak(dtype_k), bytes_k ÷ bandwidth) + launch_s ]

Per kernel, not per plan: a plan mixes compute-bound GEMMs (X·Wᵀ) with memory-bound ones
(X·Aᵀ, the merge W + sBA) and elementwise kernels (casts, ·s, +=); a per-plan max would let
the big GEMM's compute hide the thin kernels' traffic, which is exactly what this model is
for. It ignores caches (every operand is read from and written to HBM/DRAM once per kernel)
and overlap between kernels, and uses datasheet peaks: good for ranking plans, not for
predicting milliseconds (``criterion="time"`` measures those).

Bytes are sympy expressions in n, i, o, r and the element sizes ``e_x`` (x, W, bias and the
base GEMMs), ``e_a`` (the adapter dtype: A, B, X_l, X·Aᵀ, Z, T) and ``e_y`` (the op's output
and dY: the promotion of the two), plus ``has_bias`` (0 or 1). Each kernel's FLOPs are the
matmul terms of ``plans/catalogue.py`` (elementwise kernels count 0), so a plan's kernel FLOPs sum to
its FLOPs expression there (checked in tests).

Device constants (``DEVICE_MODELS``) come from datasheets; pick by device name or pass your
own ``DeviceModel``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
from typing import Optional, Sequence, Union

import sympy
import torch

from ..plans import BACKWARD_PLANS, FORWARD_PLANS, BackwardPlan, Needs, PiecewisePlan, e_a, e_x, e_y, i, n, o, r
from ..plans.catalogue import FUSED_BACKWARD_PLANS, FUSED_FORWARD_PLANS
from .flops import applicable_plans
from .measure import seconds_once

__all__ = [
    "DEVICE_MODELS",
    "DeviceModel",
    "Kernel",
    "KERNELS",
    "Layout",
    "backward_kernels",
    "choose_roofline",
    "calibrate",
    "device_model_for",
    "forward_kernels",
    "plan_time",
    "e_x",
    "e_a",
    "e_y",
    "has_bias",
]

log = logging.getLogger("runlora_fx.roofline")

has_bias = sympy.Symbol("has_bias", nonnegative=True, integer=True)


# --- devices -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """What the roofline needs to know about a device.

    Attributes:
        name: a label for reports.
        peak_flops: dense matmul FLOP/s per dtype name ("float32", "bfloat16", ...). fp32 is
            the non-tensor-core rate: torch's default fp32 matmul precision ("highest") does
            not use TF32.
        bandwidth: memory bytes/s.
        launch_s: seconds of fixed cost per kernel (launch and dispatch).
    """

    name: str
    peak_flops: dict
    bandwidth: float
    launch_s: float

    def peak(self, dtype: torch.dtype) -> float:
        """FLOP/s for matmuls in ``dtype``; an error names the dtypes known."""
        key = str(dtype).replace("torch.", "")
        try:
            return float(self.peak_flops[key])
        except KeyError:
            raise ValueError(f"runlora: device model {self.name!r} has no peak rate for {key}; "
                             f"known: {sorted(self.peak_flops)}") from None


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceModel":
        """From ``to_dict()``'s form (e.g. the JSON ``runlora-fx calibrate --json`` writes)."""
        missing = {f.name for f in dataclasses.fields(cls)} - set(data)
        if missing:
            raise ValueError(f"runlora: device model is missing {sorted(missing)}; got keys {sorted(data)}")
        return cls(name=str(data["name"]), peak_flops={k: float(v) for k, v in data["peak_flops"].items()},
                   bandwidth=float(data["bandwidth"]), launch_s=float(data["launch_s"]))


def _gpu(name, bf16, fp32, fp64, bandwidth, launch_s=4e-6):
    return DeviceModel(name, {"bfloat16": bf16, "float16": bf16, "float32": fp32, "float64": fp64}, bandwidth, launch_s)


# Datasheet figures (dense, no sparsity), SXM parts. launch_s: the usual 3-5 µs between
# back-to-back small kernels issued from eager PyTorch.
DEVICE_MODELS: dict[str, DeviceModel] = {
    "H200": _gpu("H200", 989e12, 67e12, 67e12, 4.8e12),
    "H100": _gpu("H100", 989e12, 67e12, 67e12, 3.35e12),
    "A100": _gpu("A100", 312e12, 19.5e12, 19.5e12, 2.039e12),
    # A few server cores with AVX-512 (this project's 2-core CI measures ~0.2-0.25 TFLOP/s
    # fp32 on large GEMMs, BENCHMARKS.md), DDR bandwidth, ATen's per-op overhead.
    "cpu": DeviceModel("cpu", {"float32": 2e11, "float64": 1e11, "bfloat16": 1e11, "float16": 5e10}, 2e10, 5e-6),
}


def device_model_for(device: Union[str, torch.device, None] = None, name: Optional[str] = None) -> DeviceModel:
    """The table entry for a device (``"cuda:0"``, ``"cpu"``) or a device name ("NVIDIA H200").

    An unknown GPU gets the H100's figures with a log warning; pass ``device_model=`` to
    ``rewrite``/``make_backend`` to set your own.
    """
    if name is None:
        dev = torch.device(device if device is not None else "cpu")
        if dev.type == "cpu":
            return DEVICE_MODELS["cpu"]
        name = _cuda_name(dev) if dev.type == "cuda" else dev.type
    for key in ("H200", "H100", "A100"):
        if key.lower() in name.lower():
            return DEVICE_MODELS[key]
    if name.lower() in ("cpu", "generic cpu"):
        return DEVICE_MODELS["cpu"]
    _warn_unknown(name)
    return dataclasses.replace(DEVICE_MODELS["H100"], name=f"{name} (as H100)")


def resolve_device_model(device_model, device) -> DeviceModel:
    """``device_model`` as given (a DeviceModel, a table name, a ``.json`` file from
    ``calibrate``) or looked up from ``device``."""
    if isinstance(device_model, DeviceModel):
        return device_model
    if isinstance(device_model, str) and device_model.endswith(".json"):
        return _load_json(device_model)
    if isinstance(device_model, str):
        if device_model in DEVICE_MODELS:
            return DEVICE_MODELS[device_model]
        return device_model_for(name=device_model)
    if device_model is not None:
        raise TypeError(f"runlora: device_model must be a DeviceModel or a name; got {type(device_model).__name__}")
    return device_model_for(device)


@functools.lru_cache(maxsize=None)
def _load_json(path: str) -> DeviceModel:
    import json

    with open(path) as f:
        return DeviceModel.from_dict(json.load(f))


def _cuda_name(dev: torch.device) -> str:
    if not torch.cuda.is_available():
        return "cuda"
    return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _warn_unknown(name: str) -> None:
    log.warning("runlora: no roofline figures for device %r; using the H100's (pass device_model= to set them)", name)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    return statistics.median(seconds_once(fn, device) for _ in range(repeats))


def calibrate(device: Union[str, torch.device] = "cuda", dtypes: Sequence[str] = ("bfloat16", "float32"), *,
              matmul_size: Optional[int] = None, copy_bytes: Optional[int] = None, repeats: int = 10) -> DeviceModel:
    """Measures this device's roofline constants: the table entry with what was measured.

    * peak per dtype: a square matmul (8192 on a GPU, 1024 on a CPU) on random data;
    * bandwidth: a device-to-device copy (1 GiB GPU, 128 MiB CPU), bytes read plus written;
    * launch_s: 2,000 back-to-back in-place adds on a one-element tensor, per add (eager
      dispatch plus launch: what each extra kernel of a plan costs).

    Dtypes not in ``dtypes`` keep the table's figure. Pass the result (or its ``to_dict()``
    saved as JSON) as ``device_model=``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runlora: calibrate(device='cuda') but CUDA is not available")
    base = device_model_for(dev)
    gpu = dev.type == "cuda"
    size = matmul_size or (8192 if gpu else 1024)
    peaks = dict(base.peak_flops)
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(size, size, device=dev, dtype=dtype, generator=gen)
        b = torch.randn(size, size, device=dev, dtype=dtype, generator=gen)
        peaks[name] = 2 * size**3 / _median_seconds(lambda: torch.mm(a, b), dev, repeats)
    nbytes = copy_bytes or (2**30 if gpu else 2**27)
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    bandwidth = 2 * nbytes / _median_seconds(lambda: dst.copy_(src), dev, repeats)
    one = torch.zeros(1, device=dev)
    adds = 2000

    def many_adds():
        for _ in range(adds):
            one.add_(1.0)

    launch_s = _median_seconds(many_adds, dev, max(3, repeats // 3)) / adds
    label = torch.cuda.get_device_name(dev) if gpu else "cpu"
    return DeviceModel(f"{label} (calibrated)", peaks, bandwidth, launch_s)


# --- kernels -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel a plan issues.

    Attributes:
        name: what it computes, in the plans' notation (G = dY).
        flops: matmul FLOPs (sympy; 0 for elementwise kernels).
        bytes: bytes read plus bytes written (sympy).
        dtype: "base" or "adapter": whose matmul peak bounds it.
    """

    name: str
    flops: sympy.Expr
    bytes: sympy.Expr
    dtype: str = "adapter"


def _k(name, flops, bytes_, dtype="adapter"):
    return name, Kernel(name, sympy.sympify(flops), sympy.sympify(bytes_), dtype)


# Every kernel a plan can issue, as ``plans/catalogue.py`` runs it. Reads + writes per kernel.
KERNELS: dict[str, Kernel] = dict([
    # forward
    _k("Y0 = X·Wᵀ + b", 2 * n * i * o, (n * i + o * i + has_bias * o + n * o) * e_x, "base"),
    _k("X_l = cast(X)", 0, n * i * (e_x + e_a)),
    _k("XA = X_l·Aᵀ", 2 * n * i * r, (n * i + r * i + n * r) * e_a),
    _k("Y0 = cast(Y0)", 0, n * o * (e_x + e_y)),
    _k("Y = Y0 + s·XA·Bᵀ", 2 * n * r * o, 2 * n * o * e_y + (n * r + o * r) * e_a),
    _k("W' = W + s·B·A", 2 * o * r * i, (2 * o * i + o * r + r * i) * e_x, "base"),
    _k("Y = X·W'ᵀ + b", 2 * n * i * o, (n * i + o * i + has_bias * o + n * o) * e_x, "base"),
    # backward
    _k("G_l = cast(G)", 0, n * o * (e_y + e_a)),
    _k("G_b = cast(G)", 0, n * o * (e_y + e_x)),
    _k("Z = G·B", 2 * n * o * r, (n * o + o * r + n * r) * e_a),
    _k("T = X_lᵀ·G", 2 * i * n * o, (n * i + n * o + i * o) * e_a),
    _k("dX = G·W'", 2 * n * o * i, (n * o + o * i + n * i) * e_x, "base"),
    _k("dX = G·W", 2 * n * o * i, (n * o + o * i + n * i) * e_x, "base"),
    _k("dX_l = sZ·A", 2 * n * r * i, (n * r + r * i + n * i) * e_a),
    _k("dX_l = cast(dX_l)", 0, n * i * (e_a + e_x)),
    _k("dX += dX_l", 0, 3 * n * i * e_x),
    _k("dX = addmm(dX, Z, A, alpha=s)", 2 * n * r * i, (n * r + r * i) * e_a + 2 * n * i * e_x),
    _k("dA = s·Zᵀ·X_l", 2 * r * n * i, (n * r + n * i + r * i) * e_a),
    _k("dA = s·Bᵀ·Tᵀ", 2 * r * o * i, (o * r + i * o + r * i) * e_a),
    _k("sA", 0, 2 * r * i * e_a),
    _k("sXA = X_l·(sA)ᵀ (recomputed)", 2 * n * i * r, (n * i + r * i + n * r) * e_a),
    _k("dB = Gᵀ·sXA", 2 * o * n * r, (n * o + n * r + o * r) * e_a),
    _k("dB = s·Gᵀ·XA (kept)", 2 * o * n * r, (n * o + n * r + o * r) * e_a),
    _k("dB = s·Tᵀ·Aᵀ", 2 * o * i * r, (i * o + i * r + o * r) * e_a),
    # the fused plan (ops/fused.py): dY is read in its own dtype and cast inside the kernels
    _k("Y = X·Wᵀ + b + s·XA·Bᵀ (fused)", 2 * n * i * o + 2 * n * r * o,
       (n * i + o * i + has_bias * o) * e_x + (n * r + o * r) * e_a + n * o * e_y, "base"),
    _k("Z, dB = G·B, s·Gᵀ·XA (fused)", 4 * n * o * r, n * o * e_y + (2 * n * r + o * r) * e_a + 2 * o * r * 4),
    _k("Z = G·B (fused)", 2 * n * o * r, n * o * e_y + (n * r + o * r) * e_a),
    _k("dB = s·Gᵀ·XA (fused)", 2 * n * o * r, n * o * e_y + n * r * e_a + 2 * o * r * 4),
    _k("dB: zero fp32 buffer", 0, o * r * 4),
    _k("dB = cast(dB)", 0, o * r * (4 + e_a)),
    _k("dX = G·W + s·Z·A (fused)", 2 * n * o * i + 2 * n * r * i,
       n * o * e_y + (o * i + n * i) * e_x + (n * r + r * i) * e_a, "base"),
    _k("XA = X_l·Aᵀ (recomputed)", 2 * n * i * r, (n * i + r * i + n * r) * e_a),
])


@dataclasses.dataclass(frozen=True)
class Layout:
    """The dtypes and inputs of a site, which decide the casts a plan issues.

    Attributes:
        dtype: x's, W's and bias's dtype.
        adapter_dtype: the LoRA branch's compute dtype (None: ``dtype``).
        separate_lora_input: the LoRA branch reads its own input (dropout).
        bias: the base layer has a bias.
    """

    dtype: torch.dtype = torch.float32
    adapter_dtype: Optional[torch.dtype] = None
    separate_lora_input: bool = False
    bias: bool = False

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.adapter_dtype or self.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, self.lora_dtype)

    def element_sizes(self) -> dict:
        size = lambda d: torch.empty((), dtype=d).element_size()  # noqa: E731
        return {e_x: size(self.dtype), e_a: size(self.lora_dtype), e_y: size(self.out_dtype),
                has_bias: int(self.bias)}


def forward_kernels(plan: str, layout: Layout = Layout()) -> list[Kernel]:
    """The kernels of a forward plan, in order (see ``plans._forward1`` / ``_forward2`` / ``_forward_fused``)."""
    if plan in FUSED_FORWARD_PLANS:
        names = ["X_l = cast(X)"] if layout.lora_dtype != layout.dtype else []
        return [KERNELS[k] for k in names + ["XA = X_l·Aᵀ", "Y = X·Wᵀ + b + s·XA·Bᵀ (fused)"]]
    if FORWARD_PLANS[plan].merged:
        names = ["W' = W + s·B·A", "Y = X·W'ᵀ + b"]
    else:
        names = ["Y0 = X·Wᵀ + b"]
        names += ["X_l = cast(X)"] if layout.lora_dtype != layout.dtype else []
        names += ["XA = X_l·Aᵀ"]
        names += ["Y0 = cast(Y0)"] if layout.out_dtype != layout.dtype else []
        names += ["Y = Y0 + s·XA·Bᵀ"]
    return [KERNELS[k] for k in names]


def backward_kernels(plan: str, needs: Needs = Needs(), layout: Layout = Layout(), *,
                     keeps_lora_product: bool = False) -> list[Kernel]:
    """The kernels of a backward plan for the needed gradients (see ``plans._run_backward``).

    ``keeps_lora_product``: X_l·Aᵀ comes from the forward (``CHAIN_RECORDS["keep_lora_product"]``).
    """
    if plan in FUSED_BACKWARD_PLANS:
        return _fused_backward_kernels(needs, layout, keeps_lora_product)
    p: BackwardPlan = BACKWARD_PLANS[plan]
    uses_z = (needs.x and p.dx == "split") or (needs.lora_A and p.da == "z")
    uses_t = (needs.lora_A and p.da == "t") or (needs.lora_B and p.db == "t")
    names = []
    names += ["X_l = cast(X)"] if layout.lora_dtype != layout.dtype else []
    names += ["G_l = cast(G)"] if layout.out_dtype != layout.lora_dtype else []
    names += ["Z = G·B"] if uses_z else []
    names += ["T = X_lᵀ·G"] if uses_t else []
    if needs.x:
        names += ["G_b = cast(G)"] if layout.out_dtype != layout.dtype else []
        if p.dx == "merged":
            names += ["W' = W + s·B·A", "dX = G·W'"]
        else:
            names += ["dX = G·W"]
            if layout.separate_lora_input:  # dX_l returned apart
                names += ["dX_l = sZ·A"] + (["dX_l = cast(dX_l)"] if layout.lora_dtype != layout.dtype else [])
            elif layout.lora_dtype != layout.dtype:
                names += ["dX_l = sZ·A", "dX_l = cast(dX_l)", "dX += dX_l"]
            else:
                names += ["dX = addmm(dX, Z, A, alpha=s)"]  # accumulate_in_gemm
    if needs.lora_A:
        names += ["dA = s·Zᵀ·X_l"] if p.da == "z" else ["dA = s·Bᵀ·Tᵀ"]
    if needs.lora_B:
        if p.db == "xa":
            names += (["dB = s·Gᵀ·XA (kept)"] if keeps_lora_product
                      else ["sA", "sXA = X_l·(sA)ᵀ (recomputed)", "dB = Gᵀ·sXA"])
        else:
            names += ["dB = s·Tᵀ·Aᵀ"]
    return [KERNELS[k] for k in names]


def _fused_backward_kernels(needs: Needs, layout: Layout, keeps_lora_product: bool) -> list[Kernel]:
    """The fused backward's kernels (``plans.catalogue._run_backward_fused``): K2, K3 and dA's mm.

    dB's atomic reduction adds its fp32 buffer's zero fill and the cast to B's dtype (two tiny
    launches); with a separate x_lora, dX = G·W and dX_l = s·Z·A are ATen calls as in backward1.
    """
    uses_z = needs.x or needs.lora_A
    names = []
    if needs.lora_A or (needs.lora_B and not keeps_lora_product):
        names += ["X_l = cast(X)"] if layout.lora_dtype != layout.dtype else []
    if needs.lora_B and not keeps_lora_product:
        names += ["XA = X_l·Aᵀ (recomputed)"]
    if needs.lora_B:
        names += ["dB: zero fp32 buffer"]
        names += ["Z, dB = G·B, s·Gᵀ·XA (fused)"] if uses_z else ["dB = s·Gᵀ·XA (fused)"]
        names += ["dB = cast(dB)"]
    elif uses_z:
        names += ["Z = G·B (fused)"]
    if needs.x:
        if layout.separate_lora_input:
            names += ["G_b = cast(G)"] if layout.out_dtype != layout.dtype else []
            names += ["dX = G·W", "dX_l = sZ·A"] + (["dX_l = cast(dX_l)"] if layout.lora_dtype != layout.dtype else [])
        else:
            names += ["dX = G·W + s·Z·A (fused)"]
    if needs.lora_A:
        names += ["dA = s·Zᵀ·X_l"]
    return [KERNELS[k] for k in names]


# --- pricing -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Line:
    """One kernel at fixed i, o, r: FLOPs and bytes linear in n, already divided by the rates."""

    compute: tuple  # (seconds per token, seconds) of the FLOPs at peak
    memory: tuple  # the same for the bytes at the bandwidth
    launch: float

    def at(self, tokens: float) -> float:
        return max(self.compute[0] * tokens + self.compute[1], self.memory[0] * tokens + self.memory[1]) + self.launch

    def kink(self) -> Optional[float]:
        """The token count where the kernel turns from memory- to compute-bound (or back)."""
        slope = self.compute[0] - self.memory[0]
        if slope == 0:
            return None
        return (self.memory[1] - self.compute[1]) / slope


def _lines(kernels: Sequence[Kernel], sizes: dict, layout: Layout, model: DeviceModel) -> list[_Line]:
    subs = tuple({i: sizes["i"], o: sizes["o"], r: sizes["r"], **layout.element_sizes()}.items())
    peak = {"base": model.peak(layout.dtype), "adapter": model.peak(layout.lora_dtype)}
    out = []
    for k in kernels:
        f1, f0, b1, b0 = _coefficients(k, subs)
        out.append(_Line((f1 / peak[k.dtype], f0 / peak[k.dtype]), (b1 / model.bandwidth, b0 / model.bandwidth),
                         model.launch_s))
    return out


@functools.lru_cache(maxsize=8192)
def _coefficients(kernel: Kernel, subs: tuple) -> tuple:
    """(FLOPs per token, FLOPs, bytes per token, bytes) of a kernel at fixed i, o, r, element sizes.

    Cached: a model repeats a few layer shapes over many sites, and sympy is slow.
    """
    values = dict(subs)
    out = []
    for expr in (kernel.flops, kernel.bytes):
        poly = sympy.Poly(expr.xreplace(values), n)
        out += [float(poly.coeff_monomial(n)), float(poly.coeff_monomial(1))]
    return tuple(out)


def plan_time(kind: str, plan: str, n_: int, i_: int, o_: int, r_: int, *, model: DeviceModel,
              needs: Needs = Needs(), layout: Layout = Layout()) -> float:
    """Estimated seconds of one plan at concrete sizes.

    Args:
        kind: "forward" or "backward".
        plan: its name.
        n_, i_, o_, r_: tokens, in, out, rank.
        model: the device.
        needs: the gradients the backward produces.
        layout: dtypes, separate LoRA input, bias.
    """
    kernels = forward_kernels(plan, layout) if kind == "forward" else backward_kernels(plan, needs, layout)
    return sum(line.at(n_) for line in _lines(kernels, {"i": i_, "o": o_, "r": r_}, layout, model))


def choose_roofline(
    n_: Union[int, sympy.Expr],
    i_: int,
    o_: int,
    r_: int,
    *,
    model: DeviceModel,
    layout: Layout = Layout(),
    needs: Needs = Needs(),
    separate_lora_input: bool = False,
    mixed_dtype: bool = False,
    allow_merged: bool = True,
    include_dominated: bool = False,
    n_hint: Optional[int] = None,
) -> tuple[PiecewisePlan, PiecewisePlan, Optional[dict]]:
    """The forward and backward plans with the least estimated time.

    With a symbolic n the choice is piecewise in n, exact at every integer: each plan's time
    is piecewise linear in n (a max per kernel), so the winner can change only at a kernel's
    compute/memory kink or where two plans' lines cross between kinks; both are solved and
    the winner is evaluated on the integers around each.

    Args:
        n_: tokens (int or sympy expression in one symbol); i_, o_, r_: ints.
        model: the device.
        layout: dtypes, bias (``separate_lora_input`` is taken from here too).
        needs, separate_lora_input, mixed_dtype, allow_merged, include_dominated: as for
            ``cost.choose_plan``.
        n_hint: the concrete n for the returned estimates when n is symbolic.

    Returns:
        (forward, backward, estimates): estimates is {"forward": {plan: s}, "backward":
        {plan: s}, "device": name, "n": the n they are for}, or None when n is symbolic and no
        hint is known.
    """
    if not all(isinstance(v, int) or (hasattr(v, "is_number") and v.is_number) for v in (i_, o_, r_)):
        raise ValueError(f"runlora: the roofline needs concrete i, o, r; got {i_}, {o_}, {r_}")
    i_, o_, r_ = int(i_), int(o_), int(r_)
    fwd_names, bwd_names = applicable_plans(separate_lora_input=separate_lora_input, mixed_dtype=mixed_dtype,
                                            allow_merged=allow_merged)
    if not include_dominated:
        bwd_names = [b for b in bwd_names if not BACKWARD_PLANS[b].dominated]
    sizes = {"i": i_, "o": o_, "r": r_}
    f_lines = {p: _lines(forward_kernels(p, layout), sizes, layout, model) for p in fwd_names}
    b_lines = {p: _lines(backward_kernels(p, needs, layout), sizes, layout, model) for p in bwd_names}
    n_expr = sympy.sympify(n_)
    concrete = None if n_expr.free_symbols else int(n_expr)
    at = concrete if concrete is not None else n_hint
    estimates = None
    if at is not None:
        estimates = {
            "forward": {p: sum(line.at(at) for line in ls) for p, ls in f_lines.items()},
            "backward": {p: sum(line.at(at) for line in ls) for p, ls in b_lines.items()},
            "device": model.name,
            "n": at,
        }
    if concrete is not None:
        return (PiecewisePlan(((0, _argmin(f_lines, concrete)),)), PiecewisePlan(((0, _argmin(b_lines, concrete)),)),
                estimates)
    # Pieces are in n itself: the op resolves a piecewise plan on its concrete token count.
    return _piecewise(f_lines), _piecewise(b_lines), estimates


def _total(lines: Sequence[_Line], tokens: float) -> float:
    return sum(line.at(tokens) for line in lines)


def _argmin(lines_of: dict, tokens: float) -> str:
    names = list(lines_of)
    best = names[0]
    best_t = _total(lines_of[best], tokens)
    for name in names[1:]:
        t = _total(lines_of[name], tokens)
        if t < best_t:
            best, best_t = name, t
    return best


def _piecewise(lines_of: dict) -> PiecewisePlan:
    """The argmin as pieces over integer n >= 1 (see ``choose_roofline``)."""
    kinks = sorted({k for ls in lines_of.values() for line in ls if (k := line.kink()) is not None and k > 1})
    bounds = [1.0] + kinks
    candidates = {1}
    names = list(lines_of)
    for idx, lo in enumerate(bounds):
        hi = bounds[idx + 1] if idx + 1 < len(bounds) else lo + 1e6  # beyond the last kink: one line each
        candidates |= {math.floor(lo), math.floor(lo) + 1}
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                d_lo = _total(lines_of[names[a]], lo) - _total(lines_of[names[b]], lo)
                d_hi = _total(lines_of[names[a]], hi) - _total(lines_of[names[b]], hi)
                if d_lo == d_hi:
                    continue
                root = lo - d_lo * (hi - lo) / (d_hi - d_lo)
                if lo <= root and (root <= hi or idx + 1 == len(bounds)):
                    f = math.floor(root)
                    candidates |= {f - 1, f, f + 1, f + 2}
    pieces: list[tuple[int, str]] = []
    for p in sorted(c for c in candidates if c >= 1):
        name = _argmin(lines_of, p)
        if not pieces or pieces[-1][1] != name:
            pieces.append((0 if not pieces else p, name))
    return PiecewisePlan(tuple(pieces))
