"""The FP8 linear as a free function (and the FP8 de-quantization). Layers hold data; this module computes, and
picks how when called.

    fp8_linear(x_hp, w_fp8, w_scale, x_scale, out_dtype, bias)   activation cast -> fp8_mm -> + bias
    fp8_mm(x_fp8, w_fp8, scale_a, scale_b, out_dtype)           (M, K) x (N, K) -> (M, N), one backend:

    backend          where                              what it runs
    cuda_scaled_mm   CUDA, compute capability >= 8.9    torch._scaled_mm (K, N padded to multiples of 16 here)
    cpu_gemv         CPU, small M (decode)              compiled kernel: FP8 bytes widened in registers, fp32 FMA
    cpu_dp           CPU with avx512_bf16, medium M     compiled kernel: weight rows widened once to bf16 (exact),
                                                        vdpbf16ps (fp32 accumulation)
    cpu_blocked      CPU, larger M (prefill)            compiled kernel: weight blocks widened exactly to the
                                                        native GEMM dtype (bf16 with bf16 hardware, else fp32)
    reference        anywhere else / no compiler        FP8 values in float32, matmul, scales: the same numbers
    cpu_scaled_mm    CPU, only with DS_QUANT_CPU_BACKEND=scaled_mm (slower than bf16 on every CPU measured)

Every backend computes what an FP8 GEMM computes: FP8 operands, exact products, float32 accumulation,
`scale_a` (per tensor () or per token (M, 1)) and `scale_b` (per tensor () or per output channel (N,)) applied
to the accumulator, one rounding to `out_dtype`. They differ only in accumulation order (and cpu_blocked on
bf16 hardware rounds the accumulator to bf16 once before scaling).

The choice depends on the device the tensors are on *now* (a layer built on `meta` picks its backend once
materialised), the CPU, and M; it is cached per (device, M class, shape). The compiled CPU kernel
(`csrc/fp8_gemm_cpu.cpp`, torch.library ops `ds_quant::fp8_gemm_*`) is built and loaded by `kernels.py`, with
the other CPU kernels; `DS_QUANT_CPU_KERNEL=0` or a failed build selects the reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import cpu_kernel  # ops.cpu_kernel: what the tests and the bench ask for
from .scales import per_token_scale, to_fp8_saturated

# Up to CPU_GEMV_MAX_M the GEMM is memory-bound and the fused GEMV (one byte per weight) wins; above it the
# GEMM is compute-bound: the bf16 dot-product kernel up to CPU_DP_MAX_M (where the CPU has avx512_bf16), the
# blocked path (the native GEMM on widened blocks) beyond. Measured per CPU kind by `bench/run.py`.
CPU_GEMV_MAX_M = {"bf16": 2, "fp32": 4}
CPU_DP_MAX_M = 8
CPU_BLOCK_N = 256  # weight rows a thread widens per native GEMM call: 2 MB of bf16 at K=4096 (fastest of 256-2048 here)


# -- the entry points ---------------------------------------------------------------------------------------------
def fp8_linear(x_hp: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
               out_dtype: torch.dtype, bias: torch.Tensor | None = None, act_limit: float | None = None
               ) -> torch.Tensor:
    """y = x @ W.T (+ bias) with W in FP8: `x_hp` (..., K) is cast to FP8 with the static per-tensor
    `x_scale`, or per token when it is None (saturating at +-`act_limit`), then multiplied in FP8."""
    lead = x_hp.shape[:-1]
    x_2d = x_hp.reshape(lead.numel(), x_hp.shape[-1])  # (M, K); K may be 0 (empty shard)
    limit = act_limit or float(torch.finfo(w_fp8.dtype).max)
    scale_a = per_token_scale(x_2d, limit) if x_scale is None else x_scale
    backend = choose_backend(x_2d.device, x_2d.shape[0], w_fp8.shape[0], x_2d.shape[1],
                             rowwise=scale_a.numel() > 1 or w_scale.numel() > 1)
    if backend.name in _COMPILED:  # the kernel's one-pass cast: the same bytes as to_fp8_saturated
        x_fp8 = torch.ops.ds_quant.quantize_fp8(x_2d, scale_a, limit, w_fp8.dtype)
    else:
        x_fp8 = to_fp8_saturated(x_2d, scale_a, w_fp8.dtype, limit)
    y = _RUN[backend.name](x_fp8, w_fp8, scale_a, w_scale, out_dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w_fp8.shape[0])


def fp8_mm(x_fp8: torch.Tensor, w_fp8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) FP8 x (N, K) FP8 -> (M, N) `out_dtype`, scales applied to the float32 accumulator."""
    (m, k), n = x_fp8.shape, w_fp8.shape[0]
    backend = choose_backend(x_fp8.device, m, n, k, rowwise=scale_a.numel() > 1 or scale_b.numel() > 1)
    return _RUN[backend.name](x_fp8, w_fp8, scale_a, scale_b, out_dtype)


# -- the choice -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    name: str
    reason: str = ""  # why this one (shown in logs and extra_repr)


def choose_backend(device: torch.device, m: int, n: int, k: int, rowwise: bool = False) -> Backend:
    env = os.environ
    key = (device, _m_class(m), n, k, rowwise, env.get("DS_QUANT_CPU_BACKEND", ""), env.get("DS_QUANT_CPU_GEMV_MAX_M"))
    backend = _CHOSEN.get(key)  # per call on the decode path: a dict lookup, not the whole decision
    if backend is None:
        forced = key[5] if device.type == "cpu" else ""
        backend = _CHOSEN[key] = _choose(device.type, device.index, key[1], n, k, rowwise, forced, cpu_gemv_max_m())
    return backend


_CHOSEN: dict[tuple, Backend] = {}


def _m_class(m: int) -> int:
    """M rounded up to a power of two: every M in a class takes the same path (the thresholds are powers of 2)."""
    return 1 << max(m - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def _choose(device_type: str, index: int | None, m_class: int, n: int, k: int, rowwise: bool, forced: str,
            gemv_max_m: int) -> Backend:
    if k == 0 or n == 0:
        return Backend("reference", "empty shard (DeepSpeed gave this rank no channels)")
    if device_type == "cuda":
        capability = torch.cuda.get_device_capability(index)
        if capability < (8, 9):
            return Backend("reference", "this GPU has no FP8 GEMM (needs compute capability 8.9+)")
        if rowwise and capability < (9, 0):
            return Backend("reference", "rowwise scales need compute capability 9.0+")
        return Backend("cuda_scaled_mm", "padded to multiples of 16" if k % 16 or n % 16 else "")
    if device_type != "cpu":
        return Backend("reference", f"no FP8 GEMM on device type {device_type}")
    if forced == "scaled_mm":
        return Backend("cpu_scaled_mm", "DS_QUANT_CPU_BACKEND=scaled_mm")
    if forced == "reference":
        return Backend("reference", "DS_QUANT_CPU_BACKEND=reference")
    if forced not in ("", "gemv", "dp", "blocked"):
        raise ValueError(f"DS_QUANT_CPU_BACKEND={forced!r}: accepted values are gemv, dp, blocked, scaled_mm, "
                         "reference (or unset: chosen per M)")
    kernel = cpu_kernel()
    if kernel.isa is None:
        return Backend("reference", kernel.reason)
    if forced == "dp" and not kernel.has_dp:
        raise ValueError(f"DS_QUANT_CPU_BACKEND=dp needs avx512_bf16; this CPU kernel is {kernel.isa}")
    if forced:
        return Backend(f"cpu_{forced}", f"DS_QUANT_CPU_BACKEND={forced}")
    if m_class <= gemv_max_m:
        return Backend("cpu_gemv", f"{kernel.isa}, M <= {gemv_max_m}")
    if kernel.has_dp and m_class <= CPU_DP_MAX_M:
        return Backend("cpu_dp", f"{kernel.isa}, M <= {CPU_DP_MAX_M}")
    return Backend("cpu_blocked", f"{kernel.isa}, {native_gemm_dtype()} GEMM")


def describe(device: torch.device, n: int, k: int, rowwise: bool = False) -> str:
    """Which backend serves a layer of this shape, per M: for extra_repr, the logs and the bench."""
    plan = []  # (first M, backend) at each change of backend over M = 1, 2, 4, ..., 4096
    for m in (1 << i for i in range(13)):
        b = choose_backend(device, m, n, k, rowwise)
        if not plan or plan[-1][1].name != b.name:
            plan.append((m, b))
    if len(plan) == 1:
        b = plan[0][1]
        return b.name + (f" ({b.reason})" if b.reason else "")
    return ", ".join(f"{b.name} M>={m // 2 + 1}" if m > 1 else f"{b.name} M=1" for m, b in plan) + \
        f" ({plan[-1][1].reason})"


def fallback_reason(device: torch.device, n: int, k: int, rowwise: bool = False) -> str | None:
    """Why a layer of this shape runs the slow reference here (None: a fast backend serves it)."""
    b = choose_backend(device, 1, n, k, rowwise)
    return b.reason if b.name == "reference" else None


@functools.lru_cache(maxsize=1)
def native_gemm_dtype() -> str:
    """bf16 where oneDNN has bf16 hardware (avx512_bf16, AMX: its bf16 GEMM beats fp32); fp32 where bf16 is
    emulated (avx2-only: MKL's fp32 GEMM runs ~6x its bf16 one)."""
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else "fp32"


def cpu_gemv_max_m() -> int:
    env = os.environ.get("DS_QUANT_CPU_GEMV_MAX_M")
    if env:
        if not env.isdigit():
            raise ValueError(f"DS_QUANT_CPU_GEMV_MAX_M={env!r}: expected a whole number (the largest M the GEMV "
                             "path serves)")
        return int(env)
    return CPU_GEMV_MAX_M[native_gemm_dtype()]


# -- backends -----------------------------------------------------------------------------------------------------
def fp8_mm_reference(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    """The definition, in plain torch: FP8 values as float32 (exact), float32 accumulation, then the scales."""
    acc = torch.matmul(x_fp8.float(), w_fp8.float().t())
    return (acc * scale_a.float().reshape(-1, 1) * scale_b.float().reshape(1, -1)).to(out_dtype)


def _scaled_mm(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    """torch._scaled_mm on (M, K) x (N, K); rowwise scales materialised as (M, 1) and (1, N) (the rowwise
    kernel's stride requirements)."""
    m, n = x_fp8.shape[0], w_fp8.shape[0]
    sa, sb = scale_a.float(), scale_b.float()
    if scale_a.numel() > 1 or scale_b.numel() > 1:
        sa, sb = sa.reshape(-1, 1).expand(m, 1).contiguous(), sb.reshape(1, -1).expand(1, n).contiguous()
    # mat2 must be column-major: weight is (N, K) row-major, so .t() is (K, N) column-major.
    return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _cuda_scaled_mm(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    k, n = x_fp8.shape[1], w_fp8.shape[0]
    kp, np_ = -k % 16, -n % 16
    if kp or np_:  # _scaled_mm needs K and N in multiples of 16: zero padding changes no sum
        x_fp8 = F.pad(x_fp8.view(torch.uint8), (0, kp)).view(x_fp8.dtype)
        w_fp8 = F.pad(w_fp8.view(torch.uint8), (0, kp, 0, np_)).view(w_fp8.dtype)
        if scale_b.numel() > 1:
            scale_b = F.pad(scale_b.float().reshape(-1), (0, np_), value=1.0)
    y = _scaled_mm(x_fp8, w_fp8, scale_a, scale_b, out_dtype)
    return y[:, :n] if np_ else y


def _cpu_gemv(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    return torch.ops.ds_quant.fp8_gemm_gemv(x_fp8, w_fp8, scale_a, scale_b, out_dtype)


def _cpu_dp(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    return torch.ops.ds_quant.fp8_gemm_dp(x_fp8, w_fp8, scale_a, scale_b, out_dtype)


def _cpu_blocked(x_fp8, w_fp8, scale_a, scale_b, out_dtype):
    dtype = torch.bfloat16 if native_gemm_dtype() == "bf16" else torch.float32
    return torch.ops.ds_quant.fp8_gemm_blocked(x_fp8, w_fp8, scale_a, scale_b, out_dtype, dtype, CPU_BLOCK_N)


_COMPILED = frozenset({"cpu_gemv", "cpu_dp", "cpu_blocked"})
_RUN = {"reference": fp8_mm_reference, "cuda_scaled_mm": _cuda_scaled_mm, "cpu_scaled_mm": _scaled_mm,
        "cpu_gemv": _cpu_gemv, "cpu_dp": _cpu_dp, "cpu_blocked": _cpu_blocked}


# -- de-quantization ----------------------------------------------------------------------------------------------
def dequantize_fp8(x_fp8: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(x_fp8.float() * scale).to(dtype), bit for bit: the compiled kernel on CPU (torch's FP8 conversion is slow
    there: ~4.5 ns per element), plain torch elsewhere. The FP8 KV cache reads through it."""
    if x_fp8.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16, torch.float32) and cpu_kernel():
        return torch.ops.ds_quant.dequantize_fp8(x_fp8, scale, dtype)
    return dequantize_fp8_reference(x_fp8, scale, dtype)


def dequantize_fp8_reference(x_fp8: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x_fp8.float() * torch.tensor(scale, dtype=torch.float32, device=x_fp8.device)).to(dtype)
