"""FP8 GEMM timings per backend against bf16, side by side in one process (part of `bench/run.py`).

For each (M, N, K): the bf16 matmul (what the model does without ds_quant), each CPU backend of `ds_quant.ops`
forced in turn, and `auto` (what ops picks for that M). Ratios are bf16_time / backend_time (> 1: FP8 faster).
`torch._scaled_mm` and the pure-torch reference are timed once when a single call takes over 20x bf16 (they are
there to show why they are not the default), otherwise like the others.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from ds_quant import ops
from ds_quant.scales import to_fp8_saturated

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_info() -> dict:
    """CPU model and the ISA flags that decide which path is fastest, plus what ops made of them."""
    model, flags = "", set()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = ln.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    kernel = ops.cpu_kernel()
    return {"cpu": model, "isa_flags": [f for f in ISA_FLAGS if f in flags], "kernel_isa": kernel.isa,
            "kernel_reason": kernel.reason, "native_gemm_dtype": ops.native_gemm_dtype(),
            "gemv_max_m": ops.cpu_gemv_max_m(), "threads": torch.get_num_threads()}


def _median_s(fn, reps: int, slow_after: float | None = None) -> float:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if slow_after is not None and first > slow_after:
        return first  # hopeless: one run says enough
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Forced:
    """DS_QUANT_CPU_BACKEND set to one backend ("auto": unset) for the duration of a timing."""

    def __init__(self, backend: str):
        self.backend, self.old = backend, None

    def __enter__(self):
        self.old = os.environ.pop("DS_QUANT_CPU_BACKEND", None)
        if self.backend != "auto":
            os.environ["DS_QUANT_CPU_BACKEND"] = self.backend

    def __exit__(self, *exc):
        os.environ.pop("DS_QUANT_CPU_BACKEND", None)
        if self.old is not None:
            os.environ["DS_QUANT_CPU_BACKEND"] = self.old


def gemm_table(shapes, reps: int, slow_backends: bool = True) -> dict:
    """{"MxNxK": {"bf16_s", "<backend>_s", "<backend>_speed_vs_bf16", "auto_backend"}} on CPU."""
    out = {}
    g = torch.Generator().manual_seed(0)
    kernel = ops.cpu_kernel()
    backends = (["auto", "gemv"] + (["dp"] if kernel.has_dp else []) + ["blocked"]) if kernel.isa else ["auto"]
    if slow_backends:
        backends += ["reference", "scaled_mm"]
    for m, n, k in shapes:
        w_hp = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        x_hp = torch.randn(m, k, generator=g).to(torch.bfloat16)
        sw, sx = w_hp.float().abs().amax() / 224, x_hp.float().abs().amax() / 112
        w8, x8 = to_fp8_saturated(w_hp, sw, torch.float8_e4m3fn), to_fp8_saturated(x_hp, sx, torch.float8_e4m3fn)
        bf16_s = _median_s(lambda x=x_hp, w=w_hp: torch.matmul(x, w.t()), reps)
        row = {"bf16_s": bf16_s, "auto_backend": ops.choose_backend(torch.device("cpu"), m, n, k).name}
        for b in backends:
            slow = 20 * bf16_s if b in ("reference", "scaled_mm") else None
            with _Forced(b):
                row[f"{b}_s"] = _median_s(lambda x=x8, w=w8, a=sx, s=sw: ops.fp8_mm(x, w, a, s, torch.bfloat16), reps,
                                          slow_after=slow)
            row[f"{b}_speed_vs_bf16"] = bf16_s / row[f"{b}_s"]
        out[f"{m}x{n}x{k}"] = row
    return out


def cuda_gemm_fp8_over_bf16(shapes=((1, 8192, 8192), (2048, 8192, 8192)), reps: int = 20) -> dict:
    """bf16 time / ops.fp8_mm (torch._scaled_mm) time per shape on the current CUDA device."""
    out = {}
    for m, n, k in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")

        def run_bf16(a=a, b=b):
            torch.matmul(a, b.t())
            torch.cuda.synchronize()

        def run_fp8(a8=a8, b8=b8, one=one):
            ops.fp8_mm(a8, b8, one, one, torch.bfloat16)
            torch.cuda.synchronize()

        out[f"{m}x{n}x{k}"] = _median_s(run_bf16, reps) / _median_s(run_fp8, reps)
    return out
