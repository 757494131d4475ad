"""The compiled CPU kernels: one library built from every `csrc/*.cpp`, its ops in the torch.library namespace
`ds_quant`, a fake (meta) kernel for each.

    op (torch.ops.ds_quant.*)                        source                  caller
    fp8_gemm_gemv, fp8_gemm_dp, fp8_gemm_blocked     csrc/fp8_gemm_cpu.cpp   numerics/ops.py (the FP8 GEMM backends)
    quantize_fp8                                     csrc/fp8_gemm_cpu.cpp   numerics/ops.py (fp8_linear's cast)
    dequantize_fp8, decode_attention                 csrc/kv_cache_cpu.cpp   layers/kv_cache.py, layers/attention.py
    cpu_kernel_isa                                   csrc/fp8_gemm_cpu.cpp   here (which ISA the build found)

The sources share `csrc/fp8.h`: the ISA macros (DSQ_X86, DSQ_AVX512, DSQ_BF16DP) and the FP8 widening. The library
is built on first use (~30 s) with `-march=native` into one directory per CPU kind (`cpu_kernel_tag`) and march, and
loaded from there afterwards. A failed build (no compiler, no headers, a read-only cache) is logged once, and every
caller falls back to plain torch: the same numbers, slower.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..log import current_rank, get_logger

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(sorted(CSRC_DIR.glob("*.cpp")))
LIBRARY = "ds_quant_cpu"  # the shared object's name (cpp_extension); the ops' namespace is `ds_quant`

KERNEL_ENV = "DS_QUANT_CPU_KERNEL"
"""`0`: do not build or load the compiled CPU kernels; every op runs its plain-torch reference."""
MARCH_ENV = "DS_QUANT_CPU_KERNEL_MARCH"
"""The `-march` the CPU kernels are built for (default `native`); the tests build `haswell` and `x86-64` too."""
CACHE_ENV = "DS_QUANT_KERNEL_CACHE"
"""Where the built kernels are kept (default `$XDG_CACHE_HOME/ds_quant/kernels`, else `~/.cache/ds_quant/kernels`)."""


@dataclass(frozen=True)
class CpuKernel:
    isa: str | None  # "avx512_bf16", "avx512", "avx2", "portable"; None: not available
    reason: str = ""  # why not available
    build_dir: str = ""

    @property
    def has_dp(self) -> bool:
        return self.isa == "avx512_bf16"

    def __bool__(self) -> bool:
        return self.isa is not None


def cpu_kernel_tag() -> str:
    """The CPU kind a build is for: model name + ISA flags + torch, hashed (a shared home directory may
    serve machines of different kinds; each gets its own build)."""
    info = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(ln for ln in lines if ln.startswith(("model name", "flags", "Features")))[:8192]
    except OSError:
        info += platform.processor()
    return hashlib.sha1(f"{info}|{torch.__version__}".encode()).hexdigest()[:12]


def build_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ds_quant", "kernels")
    return os.path.join(root, f"cpu-{cpu_kernel_tag()}-{os.environ.get(MARCH_ENV, 'native')}")


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> CpuKernel:
    """Build (first use on this CPU kind) or load the CPU kernels; never raises (a falsy CpuKernel says why not)."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return CpuKernel(None, f"{KERNEL_ENV}=0: pure-torch reference")
    march = os.environ.get(MARCH_ENV, "native")
    where = build_dir()
    log = get_logger()
    try:
        from torch.utils import cpp_extension

        os.makedirs(where, exist_ok=True)
        if current_rank() == 0 and not any(f.endswith(".so") for f in os.listdir(where)):
            log.info(f"compiling ds_quant's CPU kernels for this CPU (first use, ~30 s) into {where}")
        # -fopenmp: at::parallel_for splits the work over the rank's threads (without it, one thread)
        cpp_extension.load(name=LIBRARY, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", f"-march={march}",
                           "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=where, is_python_module=False,
                           verbose=False)
        _register_fakes()
        return CpuKernel(str(torch.ops.ds_quant.cpu_kernel_isa()), "", where)
    except Exception as e:  # no compiler, no headers, a read-only cache: run, slower, and say why
        reason = f"CPU kernel unavailable ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e) else ''})"
        log.warning(f"{reason}; FP8 GEMMs on CPU use the pure-torch reference (slow), and the FP8 KV cache is "
                    f"de-quantized with plain torch. Set {KERNEL_ENV}=0 to silence this, or install a C++ compiler.")
        return CpuKernel(None, reason)


def available() -> bool:
    """The CPU kernels are built and loaded (building them on first call)."""
    return cpu_kernel().isa is not None


# -- fake kernels: shapes and dtypes for meta tensors and torch.compile -------------------------------------------
def _gemm(x, w, sa, sb, out_dtype, *_):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


def _quantize_fp8(x, scale, limit, dtype):
    return x.new_empty(x.shape, dtype=dtype)


def _dequantize_fp8(x, scale, out_dtype, out=None):
    return x.new_empty(x.shape, dtype=out_dtype)


def _decode_attention(q, k, k_scale, v, v_scale, mask, scaling):
    b, hq, _, d = q.shape
    return q.new_empty((b, 1, hq, d))


FAKES = {"fp8_gemm_gemv": _gemm, "fp8_gemm_dp": _gemm, "fp8_gemm_blocked": _gemm, "quantize_fp8": _quantize_fp8,
         "dequantize_fp8": _dequantize_fp8, "decode_attention": _decode_attention}
"""Every op of the library that takes tensors (cpu_kernel_isa takes none: it has no fake to give)."""


def _register_fakes() -> None:
    for name, fn in FAKES.items():
        try:
            torch.library.register_fake(f"ds_quant::{name}", fn)
        except RuntimeError:  # already registered (a second load in the same process)
            pass
