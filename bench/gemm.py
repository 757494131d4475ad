"""FP8 GEMM timings per backend against bf16, side by side in one process (part of `bench/run.py`).

For each (M, N, K): the bf16 matmul (what the model does without ds_quant), each CPU backend of `ds_quant.numerics.ops`
forced in turn, and `auto` (what ops picks for that M). Ratios are bf16_time / backend_time (> 1: FP8 faster).
`torch._scaled_mm` and the pure-torch reference are timed once when a single call takes over 20x bf16 (they are
there to show why they are not the default), otherwise like the others.

Every timed call takes the next of several copies of its weight, as many as make the copies twice the size of
the last-level cache (at least 64 MB), so each call reads its weight from DRAM, as a model's layers do: timed on one
weight in a loop, a 16 MB FP8 weight stays in a 32 MB L3 while the 32 MB bf16 one does not, and M = 1 looks 3.4x
faster than it is in a model (measured on a 32 MiB-L3 EPYC).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from ds_quant.numerics import ops
from ds_quant.numerics.scales import to_fp8_saturated

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


def llc_bytes() -> int:
    """Size of the largest CPU cache Linux reports (the L3 on x86), 32 MiB when it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


def _copies(bytes_each: int) -> int:
    """How many copies of a weight make a rotation that no cache holds (>= 2x the LLC, >= 64 MB)."""
    return max(1, -(-max(2 * llc_bytes(), 64 << 20) // max(bytes_each, 1)))


class _Rotation:
    """Calls `fn(weight)` on the next of `copies` weights each time: every call reads its weight from DRAM."""

    def __init__(self, fn, weights):
        self.fn, self.weights, self.i = fn, weights, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.weights)
        return self.fn(self.weights[self.i])


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
    """{"MxNxK": {"bf16_s", "<backend>_s", "<backend>_speed_vs_bf16", "auto_backend", "weight_copies"}} on CPU;
    weights rotate through copies larger than the LLC (see the module docstring)."""
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
        copies_hp, copies_8 = _copies(w_hp.numel() * 2), _copies(w8.numel())
        ws_hp = [w_hp] + [w_hp.clone() for _ in range(copies_hp - 1)]
        ws_8 = [w8] + [w8.clone() for _ in range(copies_8 - 1)]
        bf16_s = _median_s(_Rotation(lambda w, x=x_hp: torch.matmul(x, w.t()), ws_hp), reps)
        row = {"bf16_s": bf16_s, "auto_backend": ops.choose_backend(torch.device("cpu"), m, n, k).name,
               "weight_copies": {"bf16": copies_hp, "fp8": copies_8}}
        for b in backends:
            slow = 20 * bf16_s if b in ("reference", "scaled_mm") else None
            with _Forced(b):
                row[f"{b}_s"] = _median_s(_Rotation(lambda w, x=x8, a=sx, s=sw: ops.fp8_mm(x, w, a, s, torch.bfloat16),
                                                    ws_8), reps, slow_after=slow)
            row[f"{b}_speed_vs_bf16"] = bf16_s / row[f"{b}_s"]
        del ws_hp, ws_8
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
