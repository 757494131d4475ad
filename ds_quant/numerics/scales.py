"""Scale math, pure: amax -> scale -> saturating FP8 cast, for every scale method.

Convention (the one `torch._scaled_mm` uses): `x_fp8 = saturate(x_hp / scale)` and `x_hp ~= x_fp8 * scale`,
with `scale = amax / (fp8_max * backoff)` rounded per method. A scale is never zero, inf or NaN.

Collectives stay outside: functions that need statistics over a tensor-parallel group take
`reduce_max` / `reduce_sum` callables (identity in a single process).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..config import DeviceForScales, Fp8Format, ScaleMethod

# HQT's defaults (also QuantConfig's): activations map their max-abs to a quarter of the FP8 range
# (headroom for values beyond the calibration set), weights to half of it.
INPUT_BACKOFF = 0.25
WEIGHT_BACKOFF = 0.5
# opt methods try scale, scale/2, scale/4, scale/8 (scale = the maxabs one, with its backoff headroom). FP8
# rounding is relative, so clipping only pays for elements clipped by a little: on Gaussian, Student-t and
# Cauchy weights, per tensor and per channel, the least-MSE shift was never beyond 2 of 8 tried.
OPT_CANDIDATES = 4

_FP8_DTYPES = {Fp8Format.E4M3: torch.float8_e4m3fn, Fp8Format.E5M2: torch.float8_e5m2}
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# -- device profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """What the FP8 hardware can do: its E4M3 maximum and the scales its GEMM takes for free."""
    name: str
    e4m3_max: float  # Gaudi2's E4M3 stops at 240; CUDA's float8_e4m3fn at 448
    hw_scales: tuple[float, ...] | None = None  # an explicit set (Gaudi2)
    pow2_range: tuple[int, int] | None = None  # any power of two 2^lo..2^hi (Gaudi3); neither: any float32

    def fp8_max(self, dtype: torch.dtype) -> float:
        return self.e4m3_max if dtype is torch.float8_e4m3fn else float(torch.finfo(dtype).max)


PROFILES = {
    DeviceForScales.CUDA: DeviceProfile("cuda", 448.0),
    DeviceForScales.GAUDI2: DeviceProfile("gaudi2", 240.0, hw_scales=(2.0**4, 2.0**0, 2.0**-4, 2.0**-8)),
    DeviceForScales.GAUDI3: DeviceProfile("gaudi3", 448.0, pow2_range=(-55, 7)),
}


# -- recipes: what each method does to activations and weights ------------------------------------------------
class Rounding(str, enum.Enum):
    NONE = "none"
    POW2 = "pow2"
    HW = "hw"


class Act(str, enum.Enum):
    UNIT = "unit"
    STATIC = "static"  # per tensor, from the measurements
    DYNAMIC = "dynamic"  # per token, computed at run time


@dataclass(frozen=True)
class Recipe:
    act: Act
    act_rounding: Rounding
    weight_unit: bool = False
    weight_per_channel: bool = False
    weight_rounding: Rounding = Rounding.NONE
    weight_opt: bool = False

    @property
    def needs_measurements(self) -> bool:
        return self.act is Act.STATIC


_M = ScaleMethod
RECIPES = {
    _M.UNIT_SCALE: Recipe(Act.UNIT, Rounding.NONE, weight_unit=True),
    _M.MAXABS_HW: Recipe(Act.STATIC, Rounding.HW, weight_rounding=Rounding.HW),
    _M.MAXABS_POW2: Recipe(Act.STATIC, Rounding.POW2, weight_rounding=Rounding.POW2),
    _M.MAXABS_ARBITRARY: Recipe(Act.STATIC, Rounding.NONE),
    _M.MAXABS_HW_OPT_WEIGHT: Recipe(Act.STATIC, Rounding.HW, weight_rounding=Rounding.HW, weight_opt=True),
    _M.MAXABS_POW2_OPT_WEIGHT: Recipe(Act.STATIC, Rounding.POW2, weight_rounding=Rounding.POW2, weight_opt=True),
    _M.ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2: Recipe(Act.STATIC, Rounding.HW, weight_per_channel=True,
                                                     weight_rounding=Rounding.POW2),
    _M.ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2: Recipe(Act.STATIC, Rounding.HW, weight_per_channel=True,
                                                  weight_rounding=Rounding.POW2, weight_opt=True),
    _M.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2: Recipe(Act.STATIC, Rounding.POW2, weight_per_channel=True,
                                                       weight_rounding=Rounding.POW2),
    _M.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2: Recipe(Act.STATIC, Rounding.POW2, weight_per_channel=True,
                                                    weight_rounding=Rounding.POW2, weight_opt=True),
    _M.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS: Recipe(Act.DYNAMIC, Rounding.NONE, weight_per_channel=True),
}


# -- basics -------------------------------------------------------------------------------------------------
def fp8_dtype(fmt: Fp8Format) -> torch.dtype:
    return _FP8_DTYPES[fmt]


def fp8_max(dtype: torch.dtype, profile: DeviceProfile = PROFILES[DeviceForScales.CUDA]) -> float:
    return profile.fp8_max(dtype)


def tensor_to_amax(x_hp: torch.Tensor) -> torch.Tensor:
    """Max-abs of a tensor as a float32 scalar; 0 for an empty tensor."""
    if x_hp.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x_hp.device)
    return x_hp.detach().abs().amax().float()


def channel_amax(x_hp: torch.Tensor) -> torch.Tensor:
    """Max-abs per last-dim channel, float32 of shape (x.shape[-1],)."""
    flat = x_hp.detach().reshape(x_hp.shape[:-1].numel(), x_hp.shape[-1])  # last dim may be 0 (empty shard)
    if flat.shape[0] == 0:
        return torch.zeros(x_hp.shape[-1], dtype=torch.float32, device=x_hp.device)
    return flat.abs().amax(dim=0).float()


def row_amax(w_hp: torch.Tensor) -> torch.Tensor:
    """Max-abs per output channel (row) of a (N, K) weight, float32 (N,); 0 for K == 0."""
    if w_hp.shape[1] == 0:
        return torch.zeros(w_hp.shape[0], dtype=torch.float32, device=w_hp.device)
    return w_hp.detach().abs().amax(dim=1).float()


def sanitize_amax(amax: torch.Tensor) -> torch.Tensor:
    """Zero, negative or non-finite amax gives no usable range: fall back to a unit range.

    A zero amax means the tensor was all zeros (any scale encodes it exactly); an inf/NaN amax means
    the high-precision tensor itself overflowed, and no finite scale can represent it.
    """
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax, torch.ones_like(amax))


# Keep scales in float32's normal range: a subnormal scale loses precision and 1/scale overflows.
_SCALE_MIN = torch.finfo(torch.float32).tiny * 2**24
_SCALE_MAX = torch.finfo(torch.float32).max / 2**24


def amax_to_scale(amax: torch.Tensor, fp8_max: float, backoff: float, rounding: Rounding = Rounding.NONE,
                  profile: DeviceProfile = PROFILES[DeviceForScales.CUDA]) -> torch.Tensor:
    """float32 scale(s) that map `amax` (scalar or per channel) to `fp8_max * backoff`, then rounded."""
    raw = (sanitize_amax(amax) / (fp8_max * backoff)).clamp(min=_SCALE_MIN, max=_SCALE_MAX)
    return round_scale(raw, rounding, profile)


def round_scale(scale: torch.Tensor, rounding: Rounding, profile: DeviceProfile) -> torch.Tensor:
    if rounding is Rounding.NONE:
        return scale
    if rounding is Rounding.POW2:
        return round_up_pow2(scale)
    if profile.hw_scales is not None:
        return round_to_hw(scale, profile.hw_scales)
    if profile.pow2_range is not None:
        lo, hi = profile.pow2_range
        return round_up_pow2(scale).clamp(min=2.0**lo, max=2.0**hi)
    return scale  # CUDA: `_scaled_mm` takes any float32 scale


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale: the measured range still fits, and the scaling is exact."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def round_to_hw(scale: torch.Tensor, hw_scales: tuple[float, ...]) -> torch.Tensor:
    """Smallest hardware-supported scale >= scale (the largest if none is big enough)."""
    table = torch.tensor(sorted(hw_scales), dtype=torch.float32, device=scale.device)
    idx = torch.searchsorted(table, scale.contiguous()).clamp(max=len(table) - 1)
    return table[idx]


def to_fp8_saturated(x_hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     limit: float | None = None) -> torch.Tensor:
    """Cast `x_hp / scale` to FP8, clamping to +-limit (default: the dtype's max) first, so out-of-range
    values saturate instead of becoming inf/NaN. `scale` broadcasts (scalar, (N, 1) rows, (M, 1) tokens)."""
    limit = float(torch.finfo(dtype).max) if limit is None else limit
    return (x_hp.float() / scale).clamp_(-limit, limit).to(dtype)


# -- weights --------------------------------------------------------------------------------------------------
def quantize_weight(w_hp: torch.Tensor, recipe: Recipe, dtype: torch.dtype, profile: DeviceProfile,
                    backoff: float = WEIGHT_BACKOFF, reduce_max: Reduce = _identity,
                    reduce_sum: Reduce = _identity) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8, scale): the FP8 weight and its float32 scale, () per tensor or (N,) per output channel.

    `reduce_max` / `reduce_sum` combine statistics over the ranks that hold the rest of the same
    tensor (per tensor) or of the same rows (per channel), so every TP size picks the same scales.
    """
    per_channel = recipe.weight_per_channel
    fmax = profile.fp8_max(dtype)
    if recipe.weight_unit:
        scale = torch.ones((w_hp.shape[0],) if per_channel else (), dtype=torch.float32, device=w_hp.device)
        return _cast_in_row_chunks(w_hp, scale, dtype, fmax), scale
    if not recipe.weight_opt:  # maxima and casts in row blocks: no float32 copy of the whole weight
        return quantize_weight_blocks(lambda: _row_chunks(w_hp), tuple(w_hp.shape), recipe, dtype, profile,
                                      backoff, reduce_max, w_hp.device)[:2]
    amax = reduce_max(row_amax(w_hp) if per_channel else tensor_to_amax(w_hp))
    base = amax_to_scale(amax, fmax, backoff, recipe.weight_rounding, profile)
    rows = base[:, None] if per_channel else base
    shifts = candidate_shifts(base, recipe.weight_rounding, profile)
    # the weight in units of the maxabs scale (|v| <= fmax * backoff); copy=True: never the caller's tensor
    v = w_hp.to(torch.float32, copy=True).div_(rows)
    err, q_fp8 = _shift_search(v, shifts, dtype, fmax, clamp=bool((amax / base > fmax).any()))
    err = reduce_sum(err if per_channel else err.sum(dim=0))
    best = shifts.to(base.device)[err.argmin(dim=-1)]  # ties go to the first candidate: the maxabs scale itself
    if not best.any():
        return q_fp8, base  # the search already cast the maxabs candidate
    factor = torch.exp2(best.float())  # the chosen scale is base / factor
    v.mul_(factor[:, None] if per_channel else factor)
    return v.clamp_(-fmax, fmax).to(dtype), base / factor


_CHUNK_ELEMS = 1 << 20  # 4 MB of float32 per step (bigger blocks: glibc keeps more of the freed ones)


def _row_chunks(w_hp: torch.Tensor) -> list[torch.Tensor]:
    """Row blocks of a (N, K) weight of about _CHUNK_ELEMS elements each (views, no copies)."""
    if w_hp.dim() != 2 or w_hp.numel() <= _CHUNK_ELEMS or w_hp.shape[0] < 2:
        return [w_hp]
    step = max(1, _CHUNK_ELEMS // max(1, w_hp.shape[1]))
    return list(w_hp.split(step, dim=0))


def weight_scale_blocks(blocks: Iterable[torch.Tensor], n_rows: int, recipe: Recipe, dtype: torch.dtype,
                        profile: DeviceProfile, backoff: float = WEIGHT_BACKOFF, reduce_max: Reduce = _identity,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(scale, local max-abs) of a (N, K) weight given as its consecutive row blocks (at least one, possibly
    empty): `quantize_weight`'s scale, bitwise (maxima are exact in any grouping), with one block in memory at
    a time. Recipes without the weight search only (it needs the whole weight)."""
    if recipe.weight_opt:
        raise ValueError("weight_scale_blocks: the weight search needs the whole weight; use quantize_weight")
    per_channel = recipe.weight_per_channel
    maxima = [row_amax(c) if per_channel else tensor_to_amax(c) for c in blocks]
    local = (torch.cat(maxima) if per_channel else torch.stack(maxima).amax()) if len(maxima) > 1 else maxima[0]
    top = float(local.max()) if local.numel() else 0.0
    if recipe.weight_unit:
        return torch.ones((n_rows,) if per_channel else (), dtype=torch.float32, device=device), top
    return amax_to_scale(reduce_max(local), profile.fp8_max(dtype), backoff, recipe.weight_rounding, profile), top


def cast_weight_block(block: torch.Tensor, scale: torch.Tensor, first_row: int, dtype: torch.dtype,
                      profile: DeviceProfile) -> torch.Tensor:
    """FP8 of rows first_row.. of a weight (any of its columns) under the whole weight's `scale` (() or (N,)):
    elementwise, so bitwise the same elements as the whole weight's cast."""
    s = scale[first_row:first_row + block.shape[0], None] if scale.dim() == 1 else scale
    return to_fp8_saturated(block, s, dtype, profile.fp8_max(dtype))


def quantize_weight_blocks(blocks: Callable[[], Iterable[torch.Tensor]], shape: tuple[int, int], recipe: Recipe,
                           dtype: torch.dtype, profile: DeviceProfile, backoff: float = WEIGHT_BACKOFF,
                           reduce_max: Reduce = _identity, device: torch.device | str = "cpu",
                           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`quantize_weight` of a (N, K) weight given as row blocks: `blocks()` yields its consecutive row blocks
    and is called twice (maxima, then casts). Bitwise `quantize_weight`'s result. Returns (w_fp8, scale, the
    local max-abs of the whole weight). `out`: the (N, K) FP8 tensor to write into (default: a new one)."""
    scale, top = weight_scale_blocks(blocks(), shape[0], recipe, dtype, profile, backoff, reduce_max, device)
    out = torch.empty(shape, dtype=dtype, device=device) if out is None else out
    at = 0
    for c in blocks():
        out[at:at + c.shape[0]] = cast_weight_block(c, scale, at, dtype, profile)
        at += c.shape[0]
    if at != shape[0]:
        raise ValueError(f"quantize_weight_blocks: the blocks hold {at} rows, the weight {shape[0]}")
    return out, scale, top


def _cast_in_row_chunks(w_hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    """`to_fp8_saturated(w_hp, scale, dtype, fmax)`, bitwise, a row block at a time (each element's cast depends
    on it and its row's scale only), so only one block's float32 copy exists at once."""
    chunks = _row_chunks(w_hp)
    if len(chunks) == 1:
        return to_fp8_saturated(w_hp, scale, dtype, fmax)
    out = torch.empty(w_hp.shape, dtype=dtype, device=w_hp.device)
    at = 0
    for c in chunks:
        s = scale[at:at + c.shape[0]] if scale.dim() == 2 else scale
        out[at:at + c.shape[0]] = to_fp8_saturated(c, s, dtype, fmax)
        at += c.shape[0]
    return out


def weight_to_scale(w_hp: torch.Tensor, recipe: Recipe, dtype: torch.dtype, profile: DeviceProfile,
                    backoff: float = WEIGHT_BACKOFF, reduce_max: Reduce = _identity,
                    reduce_sum: Reduce = _identity) -> torch.Tensor:
    """Only the scale of `quantize_weight`."""
    return quantize_weight(w_hp, recipe, dtype, profile, backoff, reduce_max, reduce_sum)[1]


def candidate_shifts(base: torch.Tensor, rounding: Rounding, profile: DeviceProfile) -> torch.Tensor:
    """Exponents k >= 0 of the candidates base * 2^-k that the method's rounding allows (k = 0 first)."""
    ks = torch.arange(OPT_CANDIDATES)
    if rounding is Rounding.HW and profile.hw_scales is not None:
        # Gaudi2: only the hardware set; its members are powers of two 2^4 apart.
        steps = sorted({round(math.log2(a) - math.log2(b)) for a in profile.hw_scales for b in profile.hw_scales
                        if a >= b})
        ks = torch.tensor([k for k in steps if k < 4 * OPT_CANDIDATES])
        # ... and never below its smallest member: base is in the set, so base * 2^-k is too while it stays >=
        # the smallest scale (checked on the smallest base: per-channel rows share the candidates)
        lowest = min(profile.hw_scales)
        ks = ks[(float(base.min()) * torch.exp2(-ks.double()) >= lowest * (1 - 1e-9)) | (ks == 0)]
    if rounding is Rounding.HW and profile.pow2_range is not None:
        lowest = 2.0 ** profile.pow2_range[0]
        ks = ks[: max(1, int(torch.log2(base.min() / lowest).floor().clamp(min=0).item()) + 1)]
    return ks


def shifted_scale_sq_error(v: torch.Tensor, shifts: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    """Sum of squared FP8 quantization errors of each row of `v` (N, K) under scales 2^-k, k in `shifts`:
    float64 (N, S), in the units of `v`. Exact (equal to one saturating cast per candidate).

    Vectorised over all candidates in a handful of passes over `v`, instead of one cast per candidate:
    FP8 rounding is invariant under power-of-two scaling inside the normal range, so an element's error is
    its error at k = 0 (R) unless it clips under candidate k (|v| > fmax * 2^-k), where it is (|v| - M_k)^2.
    Clipping thresholds are powers of two apart and lie on the bucket edges of `bits >> drop` (float32
    exponent plus the top mantissa bits of fmax), so per-(row, bucket) sums of |v|, v^2, R and counts give
    every candidate's error. Elements that are subnormal at k = 0 break the invariance (they are exactly
    where a smaller scale pays), so they are cast once per candidate: few for ordinary weights, and
    processed in chunks.
    """
    return _shift_search(v.float(), shifts, dtype, fmax, clamp=True, with_total=True)[0]


def _shift_search(v: torch.Tensor, shifts: torch.Tensor, dtype: torch.dtype, fmax: float, clamp: bool,
                  with_total: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(errors (N, S) float64, the k = 0 cast of `v` to FP8). `clamp=False` when no |v| exceeds fmax.

    Every element's error at k = 0 is the same for all candidates of a row, so it cancels in the argmin:
    without `with_total` it is left out, and only elements that can clip or are subnormal are looked at."""
    n_rows = v.shape[0]
    q_fp8 = (v.clamp(-fmax, fmax) if clamp else v).to(dtype)
    a = v.abs()
    drop = 23 - _mantissa_bits(fmax)
    thresholds = fmax * torch.exp2(-shifts.double())  # M_k, (S,)
    t_keys = (thresholds.float().view(torch.int32) >> drop).long()  # bucket where clipping starts
    lo, hi = int(t_keys.min()), int(t_keys.max())
    n_buckets = hi - lo + 1
    # Only elements at or above the smallest threshold can clip: bucket those alone (a minority of a weight).
    rows, cols = (a >= float(thresholds.min())).nonzero(as_tuple=True)
    a_big, r_big = a[rows, cols], _k0_error(q_fp8, v, rows, cols)
    # int32 all the way (in place): int64 keys cost ~5x more than the rest of the search
    key = a_big.view(torch.int32) >> drop
    key.sub_(lo).clamp_(0, n_buckets - 1)
    key += rows.to(torch.int32) * n_buckets
    size = n_rows * n_buckets

    def per_bucket(weights: torch.Tensor | None) -> torch.Tensor:
        return torch.bincount(key, weights=weights, minlength=size).double().reshape(n_rows, n_buckets)

    count, s1, s2, sr = per_bucket(None), per_bucket(a_big), per_bucket(a_big * a_big), per_bucket(r_big)

    def from_bucket(t: torch.Tensor) -> torch.Tensor:  # suffix sums: everything at or above a bucket
        return t.flip(-1).cumsum(-1).flip(-1)

    total_r = q_fp8.float().sub_(v).square_().sum(dim=1, keepdim=True).double() if with_total else 0.0
    start = (t_keys - lo).to(v.device)
    c, s1, s2, sr = (from_bucket(t)[:, start] for t in (count, s1, s2, sr))
    m = thresholds.to(v.device)
    clip = s2 - 2 * m * s1 + m * m * c - sr  # sum over clipped elements of (|v| - M_k)^2 - R
    return total_r + clip + _subnormal_correction(v, a, q_fp8, shifts, dtype, fmax), q_fp8


def _k0_error(q_fp8: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared error at k = 0 of the elements (rows, cols)."""
    return (q_fp8[rows, cols].float() - v[rows, cols]).square_()


def _subnormal_correction(v: torch.Tensor, a: torch.Tensor, q_fp8: torch.Tensor, shifts: torch.Tensor,
                          dtype: torch.dtype, fmax: float, chunk: int = 1 << 22) -> torch.Tensor:
    """(N, S): for elements subnormal at k = 0, their true error under each candidate minus their k = 0 error."""
    rows, cols = (a < torch.finfo(dtype).smallest_normal).nonzero(as_tuple=True)
    out = torch.zeros(v.shape[0], len(shifts), dtype=torch.float64, device=v.device)
    factors = torch.exp2(shifts.to(v.device).float())  # (S,)
    step = max(1, chunk // len(shifts))
    for i in range(0, len(rows), step):  # chunks of elements, all candidates at once
        rr, cc = rows[i:i + step], cols[i:i + step]
        vs = v[rr, cc][:, None]  # (n, 1)
        err = ((vs * factors).clamp_(-fmax, fmax).to(dtype).float() / factors - vs).square_()  # (n, S)
        out.index_add_(0, rr, (err - _k0_error(q_fp8, v, rr, cc)[:, None]).double())
    return out


def _mantissa_bits(fmax: float) -> int:
    """Mantissa bits fmax needs in float32 (448 = 1.75 * 2^8: 2; 240 = 1.875 * 2^7: 3)."""
    mantissa = torch.tensor(fmax, dtype=torch.float32).view(torch.int32).item() & 0x7FFFFF
    bits = 0
    while mantissa & ((1 << (23 - bits)) - 1):
        bits += 1
    return bits


# -- activations ---------------------------------------------------------------------------------------------
def input_to_scale(amax: torch.Tensor, recipe: Recipe, dtype: torch.dtype, profile: DeviceProfile,
                   backoff: float = INPUT_BACKOFF) -> torch.Tensor:
    """Static per-tensor input scale from a measured max-abs."""
    if recipe.act is Act.UNIT:
        return torch.ones((), dtype=torch.float32, device=amax.device)
    return amax_to_scale(amax, profile.fp8_max(dtype), backoff, recipe.act_rounding, profile)


def per_token_scale(x_2d: torch.Tensor, fmax: float) -> torch.Tensor:
    """Dynamic scales, one per row (token), float32 (M, 1): the whole range, no backoff needed."""
    amax = x_2d.abs().amax(dim=-1, keepdim=True).float() if x_2d.shape[-1] else \
        torch.zeros(x_2d.shape[0], 1, device=x_2d.device)
    return (sanitize_amax(amax) / fmax).clamp_(min=_SCALE_MIN, max=_SCALE_MAX)


# -- checks -----------------------------------------------------------------------------------------------------
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
