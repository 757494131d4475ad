"""Scale math, pure: amax -> scale -> saturating FP8 cast.

Convention (the one `torch._scaled_mm` uses): `x_fp8 = saturate(x_hp / scale)` and `x_hp ~= x_fp8 * scale`,
with `scale = amax / (fp8_max * backoff)` rounded per method. A scale is never zero, inf or NaN.
"""

from __future__ import annotations

import math

import torch

from .config import Fp8Format, ScaleMethod

# HQT's defaults: activations use a quarter of the FP8 range (headroom for values beyond the
# calibration set), weights half of it (weights are known exactly, but rounding near the top of the
# range is coarse).
INPUT_BACKOFF = 0.25
WEIGHT_BACKOFF = 0.5

_FP8_DTYPES = {Fp8Format.E4M3: torch.float8_e4m3fn, Fp8Format.E5M2: torch.float8_e5m2}


def fp8_dtype(fmt: Fp8Format) -> torch.dtype:
    return _FP8_DTYPES[fmt]


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def tensor_to_amax(x_hp: torch.Tensor) -> torch.Tensor:
    """Max-abs of a tensor as a float32 scalar; 0 for an empty tensor."""
    if x_hp.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x_hp.device)
    return x_hp.detach().abs().amax().float()


def channel_amax(x_hp: torch.Tensor) -> torch.Tensor:
    """Max-abs per last-dim channel, float32 of shape (x.shape[-1],)."""
    flat = x_hp.detach().reshape(-1, x_hp.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(x_hp.shape[-1], dtype=torch.float32, device=x_hp.device)
    return flat.abs().amax(dim=0).float()


def sanitize_amax(amax: torch.Tensor) -> torch.Tensor:
    """Zero, negative or non-finite amax gives no usable range: fall back to a unit range.

    A zero amax means the tensor was all zeros (any scale encodes it exactly); an inf/NaN amax means
    the high-precision tensor itself overflowed, and no finite scale can represent it.
    """
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax, torch.ones_like(amax))


def amax_to_scale(amax: torch.Tensor, method: ScaleMethod, dtype: torch.dtype, backoff: float) -> torch.Tensor:
    """float32 scale(s) for `amax` (scalar or per-channel) under `method`."""
    if method is ScaleMethod.UNIT_SCALE:
        return torch.ones_like(amax, dtype=torch.float32)
    raw = sanitize_amax(amax) / (fp8_max(dtype) * backoff)
    # Keep scales in float32's normal range: a subnormal scale loses precision and 1/scale overflows.
    raw = raw.clamp(min=torch.finfo(torch.float32).tiny * 2**24, max=torch.finfo(torch.float32).max / 2**24)
    if method is ScaleMethod.MAXABS_ARBITRARY:
        return raw
    if method is ScaleMethod.MAXABS_POW2:
        return round_up_pow2(raw)
    if method is ScaleMethod.MAXABS_HW:
        return round_to_hw(raw, hw_scales=None)
    raise ValueError(f"scale method {method.value} is not implemented")


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale: the measured range still fits, and the scaling is exact."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def round_to_hw(scale: torch.Tensor, hw_scales: tuple[float, ...] | None) -> torch.Tensor:
    """Smallest hardware-supported scale >= scale (the largest if none is big enough).

    `hw_scales=None` is CUDA's profile: `_scaled_mm` takes any float32 scale, so nothing is rounded.
    """
    if hw_scales is None:
        return scale
    table = torch.tensor(sorted(hw_scales), dtype=torch.float32, device=scale.device)
    idx = torch.searchsorted(table, scale.contiguous()).clamp(max=len(table) - 1)
    return table[idx]


def to_fp8_saturated(x_hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast `x_hp / scale` to FP8, clamping to +-fp8_max first so out-of-range values never become inf/NaN."""
    limit = fp8_max(dtype)
    x = x_hp.float() / scale
    return x.clamp(-limit, limit).to(dtype)


def is_pow2(scale: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(scale.float())
    return bool(torch.all(mantissa == 0.5))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `reference`, in dB (inf when equal)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)
