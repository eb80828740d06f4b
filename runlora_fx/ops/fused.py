"""The fused plan's Triton kernels: LoRA inside the base GEMMs (after LoRAFusion), as torch.library ops.

On a GPU a LoRA site's cost at small rank is bytes and launches, not FLOPs: the thin GEMMs
each read an n×i or n×o operand. The ``fused`` plans (``plans/catalogue.py``) read each big
operand once where the math allows, with two kernels::

    runlora::mm_lowrank(a, b, bias, u, v, s, out_dtype)       C = a·b + bias + s·(u·v)
        K1, forward:   Y  = X·Wᵀ + b + s·S·Bᵀ       S = X_l·Aᵀ (n×r) by torch.mm beforehand
        K3, backward:  dX = dY·W + s·Z·A            Z from K2
      one tiled GEMM; the K = r product is one more tl.dot added to the tile's accumulator,
      then the bias, then a single store: the LoRA term is never written as an n×o tensor.

    runlora::lowrank_grads(dY, B, S, s, need_z, need_db)     (Z, dB) = (dY·B, s·dYᵀ·S)
        K2, backward: one pass over dY. A program owns BLOCK_M rows of dY and walks all of o,
      so Z's reduction (over o) finishes in its registers and Z (n×r) is written once; dB
      reduces over n, across programs: each adds its BLOCK_N×r partial into one o×r fp32
      buffer with atomic adds (o·r·4 bytes, L2-resident), cast to B's dtype after. Under
      ``torch.use_deterministic_algorithms(True)`` each program writes its own partial
      instead (n/BLOCK_M × o × r fp32) and one sum reduces them in a fixed order. One
      kernel for both is the design; the price is that reduction (two tiny launches: the
      buffer's zero fill and the cast) instead of a second read of dY.

dA = s·Zᵀ·X_l stays on cuBLAS (torch.mm). Casts follow the op's contract: the base product in
W's dtype (dY is cast tile by tile inside K3, never as a tensor), the LoRA products in the
adapters' (dY cast inside K2); every accumulation is fp32 and the result is rounded once, where
eager rounds the base GEMM's output first (fp16, bf16 and fp32 operands; fp64 is not taken).

Registration: ``torch.library.triton_op`` with ``wrap_triton`` launches, so torch.compile and
AOTAutograd trace the kernels themselves (inductor calls them without the dispatcher) and
torch.export keeps the op. Under ``TRITON_INTERPRET=1`` (the CPU tests) torch's ``wrap_triton``
returns the interpreted kernel, which fake tensors cannot trace, so the same launchers are
registered as plain ``custom_op``s with their fake kernels: opaque to the compiler, the same
kernels when run. Without Triton (no wheel for the platform) nothing is registered and
``unavailable_reason`` says so; the rest of runlora_fx is unaffected.

Block sizes are chosen per (kernel, dtypes, N, K, r), never per n: ``tune_site`` times a few
candidates on the device (called by ``criterion="time"``'s tuner, at compile time, never
inside CUDA-graph capture) and remembers the fastest; elsewhere a fixed default is used. The
launch itself never benchmarks, so a captured or compiled call never autotunes.
``SOURCE_HASH`` (this file and Triton's version) keys the timings cached on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import pathlib
import statistics
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._compat import detect_fake_mode

try:  # Triton has no wheel for some platforms: the fused plans are then unavailable, nothing else
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = [
    "CANDIDATES",
    "INTERPRETED",
    "KernelConfig",
    "SOURCE_HASH",
    "SUPPORTED_DTYPES",
    "config_for",
    "forget_configs",
    "remember_configs",
    "tune_site",
    "unavailable_reason",
]

log = logging.getLogger("runlora_fx.ops.fused")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # every accumulation is fp32
MAX_RANK = 128  # Z's and the dB partials' tiles (BLOCK_M×r, BLOCK_N×r) live in registers

SOURCE_HASH = hashlib.sha256(
    pathlib.Path(__file__).read_bytes() + (triton.__version__ if triton is not None else "none").encode()
).hexdigest()[:16]


# --- kernels --------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _mm_lowrank_kernel(
        a_ptr, b_ptr, bias_ptr, u_ptr, v_ptr, c_ptr, M, N, K, R, scaling,
        stride_am, stride_ak, stride_bk, stride_bn, stride_um, stride_ur, stride_vr, stride_vn, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C[M, N] = a·b + bias + scaling·(u·v): K1 (forward) and K3 (dX); see the module docstring."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n  # grouped order: GROUP_M row blocks share each b panel in L2
        first_m = (pid // in_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_in = rm < M
        n_in = rn < N
        a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=m_in[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & n_in[None, :], other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)  # the base product in b's (W's) dtype
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        # The LoRA term: one more dot with K = r, added to the tile before its only store.
        rr = tl.arange(0, BLOCK_R)
        r_in = rr < R
        u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, mask=m_in[:, None] & r_in[None, :],
                    other=0.0)
        v = tl.load(v_ptr + rr[:, None] * stride_vr + rn[None, :] * stride_vn, mask=r_in[:, None] & n_in[None, :],
                    other=0.0)
        acc += tl.dot(u.to(v.dtype), v, input_precision=PRECISION) * scaling
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])

    @triton.jit
    def _lowrank_grads_kernel(
        g_ptr, b_ptr, s_ptr, z_ptr, db_ptr, M, N, R, scaling,
        stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_sr, stride_zm, stride_zr,
        stride_dp, stride_dn, stride_dr,
        COMPUTE_Z: tl.constexpr, COMPUTE_DB: tl.constexpr, SPLIT_REDUCE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """Z = G·B (M×R) and dB = scaling·Gᵀ·S (N×R) in one pass over G (K2); see the module docstring."""
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        m_in = rm < M
        r_in = rr < R
        if COMPUTE_DB:
            s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=m_in[:, None] & r_in[None, :],
                        other=0.0)
        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        db_ptr += pid * stride_dp  # a program's own slot when split (stride 0 otherwise)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_in = rn < N
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=m_in[:, None] & n_in[None, :],
                        other=0.0)
            if COMPUTE_Z:
                b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                            mask=n_in[:, None] & r_in[None, :], other=0.0)
                z = tl.dot(g.to(b.dtype), b, z, input_precision=PRECISION)
            if COMPUTE_DB:
                part = tl.dot(tl.trans(g.to(s.dtype)), s, input_precision=PRECISION) * scaling
                db_ptrs = db_ptr + rn[:, None] * stride_dn + rr[None, :] * stride_dr
                if SPLIT_REDUCE:
                    tl.store(db_ptrs, part, mask=n_in[:, None] & r_in[None, :])
                else:
                    tl.atomic_add(db_ptrs, part, mask=n_in[:, None] & r_in[None, :])
        if COMPUTE_Z:
            tl.store(z_ptr + rm[:, None] * stride_zm + rr[None, :] * stride_zr, z.to(z_ptr.dtype.element_ty),
                     mask=m_in[:, None] & r_in[None, :])

    INTERPRETED = not isinstance(_mm_lowrank_kernel, triton.runtime.jit.JITFunction)
else:  # pragma: no cover
    INTERPRETED = False


# --- block sizes ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One kernel's launch parameters (block_k and group_m: mm_lowrank only)."""

    block_m: int
    block_n: int
    block_k: int = 0
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


# A few shapes known to do well for Hopper-class GEMMs; each compile costs ~1 s, so few.
CANDIDATES = {
    "mm_lowrank": (KernelConfig(128, 128, 64, 8, 4, 4), KernelConfig(128, 256, 64, 8, 8, 3),
                   KernelConfig(64, 128, 64, 8, 4, 4), KernelConfig(128, 128, 32, 8, 4, 3)),
    # dB's atomic adds scale as n/BLOCK_M · o · r: taller row blocks add fewer
    "lowrank_grads": (KernelConfig(64, 128, num_warps=4), KernelConfig(128, 64, num_warps=4),
                      KernelConfig(256, 64, num_warps=8), KernelConfig(32, 128, num_warps=4)),
}
_TUNED: dict = {}  # key string -> KernelConfig, filled by tune_site / remember_configs


def _default(kernel: str, element_size: int) -> KernelConfig:
    if INTERPRETED:  # numpy per block: fewer, larger blocks run faster; >= 16 for tl.dot
        return KernelConfig(32, 32, 32, 2) if kernel == "mm_lowrank" else KernelConfig(32, 32)
    if kernel == "lowrank_grads":
        return KernelConfig(64, 128 if element_size <= 2 else 64)
    # shared memory per stage: (BLOCK_M + BLOCK_N)·BLOCK_K elements
    return {2: KernelConfig(128, 128, 64, 8, 4, 3), 4: KernelConfig(128, 128, 32, 8, 4, 3)}.get(
        element_size, KernelConfig(64, 64, 32, 8, 4, 2))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(int(r)))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mm_key(a: Tensor, b: Tensor, v: Tensor, out_dtype: torch.dtype, r: int) -> str:
    layout = "bT" if b.stride(0) == 1 and b.shape[0] > 1 else "b"  # Wᵀ (forward) or W (dX)
    return (f"mm_lowrank|{_name(a.dtype)},{_name(b.dtype)},{_name(v.dtype)}->{_name(out_dtype)}|{layout}|"
            f"N={int(b.shape[1])} K={int(b.shape[0])} R={_block_r(r)}")


def _grads_key(grad_y: Tensor, lora_B: Tensor, need_z: bool, need_db: bool) -> str:
    return (f"lowrank_grads|{_name(grad_y.dtype)},{_name(lora_B.dtype)}|z={int(need_z)} db={int(need_db)}|"
            f"N={int(lora_B.shape[0])} R={_block_r(lora_B.shape[1])}")


def config_for(key: str, element_size: int) -> KernelConfig:
    """The tuned config for a key, else the default (never benchmarks: safe under capture)."""
    return _TUNED.get(key) or _default(key.split("|", 1)[0], element_size)


def remember_configs(configs: dict) -> None:
    """Loads ``{key: config fields}`` (``tune_site``'s result, e.g. from the timing cache)."""
    for key, fields in (configs or {}).items():
        _TUNED[key] = KernelConfig(**fields)


def forget_configs() -> None:
    """Drops every tuned config (the defaults apply again)."""
    _TUNED.clear()


# --- launchers ------------------------------------------------------------------------------
def _precision(*dtypes: torch.dtype) -> str:
    # fp32 operands: IEEE products, as torch's default fp32 matmul precision ("highest"); TF32
    # only where torch itself allows it. Other dtypes ignore the setting.
    if torch.float32 in dtypes and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _check_device(t: Tensor, where: str) -> None:
    # a traced call (fake tensors) only records the kernels: a CPU trace is checked when it runs
    if t.device.type != "cuda" and not INTERPRETED and detect_fake_mode((t,)) is None:
        raise RuntimeError(f"runlora.{where}: the fused plan's Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                           f"set before triton is imported); got {t.device}")


def _mm_lowrank(a: Tensor, b: Tensor, bias: Optional[Tensor], u: Tensor, v: Tensor, scaling: float,
                out_dtype: torch.dtype, config: Optional[KernelConfig] = None) -> Tensor:
    _check_device(a, "mm_lowrank")
    M, K = a.shape
    N = b.shape[1]
    R = u.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    cfg = config or config_for(_mm_key(a, b, v, out_dtype, R), b.element_size())
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    torch.library.wrap_triton(_mm_lowrank_kernel)[grid](
        a, b, a if bias is None else bias.contiguous(), u, v, c, M, N, K, R, scaling,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(b.dtype, v.dtype), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(R), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return c


def _lowrank_grads(grad_y: Tensor, lora_B: Tensor, lora_product: Optional[Tensor], scaling: float, need_z: bool,
                   need_db: bool, config: Optional[KernelConfig] = None) -> tuple[Tensor, Tensor]:
    _check_device(grad_y, "lowrank_grads")
    M, N = grad_y.shape
    R = lora_B.shape[1]
    if need_db and lora_product is None:
        raise ValueError("runlora.lowrank_grads: need_db=True needs lora_product (X_l·Aᵀ, n×r); got None")
    z = torch.empty((M, R) if need_z else (0,), device=grad_y.device, dtype=lora_B.dtype)
    if not (need_z or need_db):
        return z, torch.empty((0,), device=grad_y.device, dtype=lora_B.dtype)
    cfg = config or config_for(_grads_key(grad_y, lora_B, need_z, need_db), lora_B.element_size())
    programs = triton.cdiv(M, cfg.block_m)
    split = need_db and torch.are_deterministic_algorithms_enabled()
    if split:  # a slot per program, each written whole by its program: no fill
        db = torch.empty((programs, N, R), device=grad_y.device, dtype=torch.float32)
        db_strides = db.stride()
    else:  # atomics into one o×r buffer, zeroed (unused without dB)
        db = torch.zeros((N, R) if need_db else (0, 0), device=grad_y.device, dtype=torch.float32)
        db_strides = (0, *db.stride())
    s = lora_product if need_db else lora_B
    torch.library.wrap_triton(_lowrank_grads_kernel)[(programs,)](
        grad_y, lora_B, s, z if need_z else lora_B, db, M, N, R, scaling,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        z.stride(0) if need_z else 0, z.stride(1) if need_z else 0, *db_strides,
        COMPUTE_Z=need_z, COMPUTE_DB=need_db, SPLIT_REDUCE=split,
        PRECISION=_precision(lora_B.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=_block_r(R),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not need_db:
        return z, torch.empty((0,), device=grad_y.device, dtype=lora_B.dtype)
    return z, (db.sum(0) if split else db).to(lora_B.dtype)


def _mm_lowrank_fake(a, b, bias, u, v, scaling, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _lowrank_grads_fake(grad_y, lora_B, lora_product, scaling, need_z, need_db):
    z = grad_y.new_empty((grad_y.shape[0], lora_B.shape[1]) if need_z else (0,), dtype=lora_B.dtype)
    return z, lora_B.new_empty(tuple(lora_B.shape) if need_db else (0,))


def mm_lowrank(a: Tensor, b: Tensor, bias: Optional[Tensor], u: Tensor, v: Tensor, scaling: float,
               out_dtype: torch.dtype) -> Tensor:
    """C = a·b + bias + scaling·(u·v) in one Triton GEMM, rounded once to ``out_dtype`` (K1, K3)."""
    return _mm_lowrank(a, b, bias, u, v, scaling, out_dtype)


def lowrank_grads(grad_y: Tensor, lora_B: Tensor, lora_product: Optional[Tensor], scaling: float, need_z: bool,
                  need_db: bool) -> tuple[Tensor, Tensor]:
    """(Z, dB) = (dY·B, scaling·dYᵀ·lora_product) in one pass over dY (K2); empty where not needed."""
    return _lowrank_grads(grad_y, lora_B, lora_product, scaling, need_z, need_db)


def _register() -> None:
    """torch.ops.runlora.mm_lowrank / lowrank_grads: triton ops, or opaque ops under the interpreter."""
    for name, fn, fake in (("mm_lowrank", mm_lowrank, _mm_lowrank_fake),
                           ("lowrank_grads", lowrank_grads, _lowrank_grads_fake)):
        if INTERPRETED:
            op = torch.library.custom_op(f"runlora::{name}", fn, mutates_args=())
            op.register_fake(fake)
        else:
            torch.library.triton_op(f"runlora::{name}", fn, mutates_args=())

    @register_flop_formula(torch.ops.runlora.mm_lowrank)
    def _mm_lowrank_flops(a_shape, b_shape, bias_shape, u_shape, v_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1] + 2 * a_shape[0] * u_shape[1] * b_shape[1]

    @register_flop_formula(torch.ops.runlora.lowrank_grads)
    def _lowrank_grads_flops(g_shape, b_shape, s_shape, scaling, need_z, need_db, *args, **kwargs):
        return 2 * g_shape[0] * g_shape[1] * b_shape[1] * (int(need_z) + int(need_db))


if triton is not None:
    _register()


# --- legality and tuning --------------------------------------------------------------------
def unavailable_reason(device, dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None,
                       r: Optional[int] = None) -> Optional[str]:
    """Why the fused kernels cannot run a site on ``device`` with these dtypes and rank, or None."""
    if triton is None:
        return "Triton is not installed (the fused plan's kernels are Triton)"
    dev = torch.device(device)
    if dev.type != "cuda" and not INTERPRETED:
        return f"the fused plan's Triton kernels run on CUDA; the site is on {dev.type}"
    for what, dt in (("x/W", dtype), ("adapter", adapter_dtype)):
        if dt is not None and dt not in SUPPORTED_DTYPES:
            return f"{what} dtype {dt} is not one the kernels take ({', '.join(map(_name, SUPPORTED_DTYPES))})"
    if r is not None and r > MAX_RANK:
        return f"rank {r} > {MAX_RANK}: Z's tile would not fit in registers"
    return None


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 10) -> float:
    """Median seconds per call: ``calls`` back-to-back calls per sample, so the GPU never waits
    on the host between them (a small kernel's own time, not its launch latency)."""
    fn()  # compile and warm up
    if device.type != "cuda":
        return 0.0  # the interpreter: any candidate that runs will do; the first is kept
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def _tune(key: str, kernel: str, call: Callable[[], object], device: torch.device, repeats: int,
          candidates) -> Optional[KernelConfig]:
    """Installs each candidate for ``key`` in turn and times ``call`` (the registered op, as the
    plans call it); keeps the fastest, or restores what was there when none runs."""
    before = _TUNED.get(key)
    best, best_s = None, math.inf
    for cfg in candidates or CANDIDATES[kernel]:
        _TUNED[key] = cfg
        try:
            seconds = _seconds(call, device, repeats)
        except Exception as exc:  # noqa: BLE001 - e.g. a candidate needs more shared memory than the device has
            log.debug("runlora: %s: config %s failed (%s: %s)", key, cfg, type(exc).__name__, exc)
            continue
        if seconds < best_s:
            best, best_s = cfg, seconds
    if best is not None:
        _TUNED[key] = best
    elif before is not None:
        _TUNED[key] = before
    else:
        _TUNED.pop(key, None)
    return best


def tune_site(n: int, i: int, o: int, r: int, *, dtype: torch.dtype, adapter_dtype: Optional[torch.dtype] = None,
              bias: bool = False, separate_lora_input: bool = False, needs=(True, True, True), device="cuda",
              repeats: int = 5, candidates: Optional[dict] = None) -> dict:
    """Times each candidate block shape of K1, K2 and K3 at one site's sizes and keeps the fastest.

    Runs the kernels on random data; outside CUDA-graph capture only (inside, it returns {}
    and the defaults stay). Returns ``{key: config fields}`` for every kernel tuned, the form
    ``remember_configs`` loads and the timing cache stores.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        log.warning("runlora: not tuning the fused kernels inside CUDA-graph capture; the default blocks stay")
        return {}
    lora_dtype = adapter_dtype or dtype
    out_dtype = torch.promote_types(dtype, lora_dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    x, w = rand(n, i, dt=dtype), rand(o, i, dt=dtype) * i ** -0.5
    b_vec = rand(o, dt=dtype) if bias else None
    lora_a, lora_b = rand(r, i, dt=lora_dtype), rand(o, r, dt=lora_dtype)
    s_prod, z, g = rand(n, r, dt=lora_dtype), rand(n, r, dt=lora_dtype), rand(n, o, dt=out_dtype)
    need_x, need_a, need_b = (bool(v) for v in needs)
    cands = candidates or {}
    tuned = {}
    ops = torch.ops.runlora
    jobs = [(_mm_key(x, w.t(), lora_b.t(), out_dtype, r), "mm_lowrank",
             lambda: ops.mm_lowrank(x, w.t(), b_vec, s_prod, lora_b.t(), 2.0, out_dtype))]
    need_z = need_x or need_a
    if need_z or need_b:
        jobs.append((_grads_key(g, lora_b, need_z, need_b), "lowrank_grads",
                     lambda: ops.lowrank_grads(g, lora_b, s_prod if need_b else None, 2.0, need_z, need_b)))
    if need_x and not separate_lora_input:
        jobs.append((_mm_key(g, w, lora_a, dtype, r), "mm_lowrank",
                     lambda: ops.mm_lowrank(g, w, None, z, lora_a, 2.0, dtype)))
    for key, kernel, call in jobs:
        best = _tune(key, kernel, call, dev, repeats, cands.get(kernel))
        if best is not None:
            tuned[key] = dataclasses.asdict(best)
    return tuned
