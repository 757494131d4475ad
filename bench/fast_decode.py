"""A faster CPU decode GEMM for FP8 weights (proposal for `Fp8Linear.gemm`), and its micro-benchmark.

At M=1 a GEMM is a GEMV: it reads every weight once and does one multiply-add per weight, so its time is
the time to stream the weight. `torch._scaled_mm` on CPU (oneDNN) and dequantize-then-matmul both first
expand the whole FP8 weight to a wider type, element by element, on every call: 5-15x slower than the
bf16 GEMV. Writing the GEMV as a reduction and compiling it with Inductor fuses the FP8 -> float32
conversion into the multiply-add loop (vectorised `at::vec` FP8 loads): one pass over 1 byte per weight,
no temporary, no extra memory. Same numerics as the dequantize fallback (FP8 x FP8 products
accumulated in float32, times both scales).
"""

from __future__ import annotations

import statistics
import time

import torch

from ds_quant.scales import to_fp8_saturated


def fp8_gemv(x_fp8: torch.Tensor, w_fp8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) fp8 x (N, K) fp8 -> (M, N), for small M; a reduction that Inductor compiles to one loop.
    `scale_a`: () or (M, 1); `scale_b`: () or (1, N) (per-output-channel weights)."""
    acc = (x_fp8.float()[:, None, :] * w_fp8.float()[None, :, :]).sum(-1)  # (M, N), float32 accumulation
    return (acc * scale_a * scale_b).to(out_dtype)


DECODE_MAX_ROWS = 4  # up to here the GEMV form wins; beyond, the GEMM is compute-bound (use _scaled_mm)


def fused_decode_gemm(layer, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The proposed small-M branch of `Fp8Linear.gemm` (None: not applicable, use the existing path)."""
    x_2d = x_local.reshape(-1, x_local.shape[-1])
    if x_2d.shape[0] > DECODE_MAX_ROWS or x_2d.device.type != "cpu" or layer.input_scale is None:
        return None
    x_fp8 = to_fp8_saturated(x_2d, layer.input_scale, layer.weight.dtype, getattr(layer, "act_limit", None))
    scale_b = layer.weight_scale if layer.weight_scale.dim() == 0 else layer.weight_scale.reshape(1, -1)
    y = compiled_fp8_gemv()(x_fp8, layer.weight, layer.input_scale, scale_b, layer.out_dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x_local.shape[:-1], layer.out_features)


def use_fused_decode(model) -> int:
    """Bench only: give every Fp8Linear the fused decode branch (a subclass; the library would put the
    branch in `Fp8Linear.gemm` itself). Returns how many layers changed."""
    from ds_quant.modules import Fp8Linear

    class FusedDecodeFp8Linear(Fp8Linear):
        def gemm(self, x_local, bias):
            y = fused_decode_gemm(self, x_local, bias)
            return super().gemm(x_local, bias) if y is None else y

    layers = [m for m in model.modules() if type(m) is Fp8Linear]
    for m in layers:
        m.__class__ = FusedDecodeFp8Linear
    return len(layers)


_compiled = {}


def compiled_fp8_gemv():
    """The compiled GEMV (one compile per weight shape; ~10-20 s each on 2 CPU cores)."""
    if "fn" not in _compiled:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)  # one per shape
        _compiled["fn"] = torch.compile(fp8_gemv, dynamic=False)
    return _compiled["fn"]


def _median_s(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_table(shapes, reps: int, fused: bool) -> dict:
    """{"MxNxK": {bf16_s, scaled_mm_s, dequant_s[, fused_gemv_s], *_over_bf16}} on CPU."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for m, n, k in shapes:
        w_hp = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        x_hp = torch.randn(m, k, generator=g).to(torch.bfloat16)
        sw = w_hp.float().abs().amax() / 224
        sx = x_hp.float().abs().amax() / 112
        w8, x8 = to_fp8_saturated(w_hp, sw, torch.float8_e4m3fn), to_fp8_saturated(x_hp, sx, torch.float8_e4m3fn)
        row = {"bf16_s": _median_s(lambda x=x_hp, w=w_hp: torch.matmul(x, w.t()), reps),
               "scaled_mm_s": _median_s(lambda x=x8, w=w8, sx=sx, sw=sw: torch._scaled_mm(
                   x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16), reps),
               "dequant_s": _median_s(lambda x=x8, w=w8, s=sx * sw: (torch.matmul(x.float(), w.float().t()) * s
                                                                     ).bfloat16(), reps)}
        if fused and m <= 4:
            fn = compiled_fp8_gemv()
            y = fn(x8, w8, sx, sw, torch.bfloat16)
            ref = (torch.matmul(x8.double(), w8.double().t()) * float(sx * sw))
            row["fused_gemv_max_rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max())
            row["fused_gemv_s"] = _median_s(lambda f=fn, x=x8, w=w8, a=sx, b=sw: f(x, w, a, b, torch.bfloat16), reps)
        for key in ("scaled_mm_s", "dequant_s", "fused_gemv_s"):
            if key in row:
                row[key.replace("_s", "_speed_vs_bf16")] = row["bf16_s"] / row[key]
        out[f"{m}x{n}x{k}"] = row
    return out


def cuda_gemm_fp8_over_bf16(shapes=((1, 8192, 8192), (2048, 8192, 8192)), reps: int = 20) -> dict:
    """bf16 time / `_scaled_mm` FP8 time per shape on the current CUDA device (needs FP8 tensor cores)."""
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
            torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            torch.cuda.synchronize()

        out[f"{m}x{n}x{k}"] = _median_s(run_bf16, reps) / _median_s(run_fp8, reps)
    return out
