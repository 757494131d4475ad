"""Scale math and the FP8 linear's numerics against a float reference."""

import math

import pytest
import torch
from torch import nn

from ds_quant.config import Fp8Format, QuantConfig, ScaleMethod
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import (
    INPUT_BACKOFF,
    WEIGHT_BACKOFF,
    Rounding,
    amax_to_scale,
    fp8_dtype,
    fp8_max,
    is_pow2,
    round_to_hw,
    sqnr_db,
    to_fp8_saturated,
)

E4M3 = torch.float8_e4m3fn


def test_fp8_maxima():
    assert fp8_max(fp8_dtype(Fp8Format.E4M3)) == 448.0
    assert fp8_max(fp8_dtype(Fp8Format.E5M2)) == 57344.0


@pytest.mark.parametrize("rounding", [Rounding.NONE, Rounding.HW])  # HW on the CUDA profile: any float32
def test_arbitrary_scale_is_the_formula(rounding):
    amax = torch.tensor(3.7)
    assert amax_to_scale(amax, 448, 0.25, rounding).item() == pytest.approx(3.7 / (448 * 0.25), rel=1e-6)


def test_pow2_scale_is_smallest_power_of_two_that_fits():
    amax = torch.tensor([3.7, 112.0, 1e-3, 5e4])
    scale = amax_to_scale(amax, 448, 0.25, Rounding.POW2)
    raw = amax / 112.0
    assert is_pow2(scale)
    assert torch.all(scale >= raw) and torch.all(scale < 2 * raw)
    assert scale[1].item() == 1.0  # exactly representable range: no rounding up


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("amax", [0.0, -1.0, 1e-45, 1e-30, 1e30, 3e38, math.inf, -math.inf, math.nan])
def test_scale_never_zero_or_non_finite(rounding, amax):
    scale = amax_to_scale(torch.tensor(amax), 448, INPUT_BACKOFF, rounding)
    assert torch.isfinite(scale) and scale > 0
    assert torch.isfinite(1 / scale)


def test_hw_rounding_picks_smallest_supported_scale_that_fits():
    gaudi2 = (2.0**4, 1.0, 2.0**-4, 2.0**-8)
    got = round_to_hw(torch.tensor([0.5, 1.0, 0.001, 100.0]), gaudi2)
    assert got.tolist() == [1.0, 1.0, 2.0**-8, 16.0]  # 100 exceeds the set: the largest one


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_saturation_instead_of_inf(dtype):
    limit = fp8_max(dtype)
    x = torch.tensor([0.0, 100.0, limit, 10 * limit, -1e30, math.inf, -math.inf])
    q = to_fp8_saturated(x, torch.tensor(1.0), dtype).float()
    assert q[2:].tolist() == [limit, limit, -limit, limit, -limit]
    assert torch.isfinite(q).all()


def test_plain_e5m2_cast_overflows_which_is_why_we_clamp():
    assert torch.isinf(torch.tensor([1e6]).to(torch.float8_e5m2).float()).all()


def float_reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double()).float()


def make_fp8(layer: nn.Linear, x: torch.Tensor, method=ScaleMethod.MAXABS_HW) -> Fp8Linear:
    cfg = QuantConfig(scale_method=method)
    record = {"input_amax": float(x.abs().max()), "weight_amax": float(layer.weight.detach().abs().max())}
    return Fp8Linear.from_original(layer, "layer", resolve(cfg, "layer"), record)


def test_fp8_linear_against_float_reference():
    """SQNR threshold 25 dB: E4M3 keeps 3 mantissa bits, so each operand carries ~29 dB of rounding noise for
    values in the normal range; with both operands quantized the product's noise adds up to ~26 dB. 25 dB
    leaves margin for the random draw and still fails on any wrong scale (a scale off by 2x saturates or
    drops to subnormals and costs more than 6 dB)."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    fp8 = make_fp8(layer, x)
    y = fp8(x)
    assert fp8.weight.dtype is E4M3 and y.dtype is torch.bfloat16 and fp8.fallback_reason is None
    assert fp8.weight_scale.dtype is torch.float32 and fp8.input_scale.dtype is torch.float32
    assert not fp8.weight.requires_grad
    sqnr = sqnr_db(float_reference(layer, x), y.float())
    assert sqnr > 25, sqnr
    # A wrong input scale (as if the measurement were 16x too small) must show up in the same metric.
    fp8.input_scale.mul_(1 / 16)
    assert sqnr_db(float_reference(layer, x), fp8(x).float()) < 20


def test_fp8_linear_scales_follow_method_and_backoff():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    fp8 = make_fp8(layer, x, ScaleMethod.MAXABS_ARBITRARY)
    assert fp8.input_scale.item() == pytest.approx(x.abs().max().item() / (448 * INPUT_BACKOFF), rel=1e-6)
    assert fp8.weight_scale.item() == pytest.approx(layer.weight.abs().max().item() / (448 * WEIGHT_BACKOFF),
                                                    rel=1e-6)


def test_fp8_linear_saturates_beyond_measured_range():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    fp8 = make_fp8(layer, x)
    y = fp8(x * 1000)  # far beyond the calibrated range: values clamp, nothing becomes inf/NaN
    assert torch.isfinite(y).all()


def test_e5m2_weights():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    cfg = QuantConfig(fp8_config=Fp8Format.E5M2)
    fp8 = Fp8Linear.from_original(layer, "l", resolve(cfg, "l"), {"input_amax": 4.0, "weight_amax": None})
    assert fp8.weight.dtype is torch.float8_e5m2
    # E5M2 keeps 2 mantissa bits: ~23 dB per operand, ~20 dB for the product; 18 dB leaves margin.
    x = torch.randn(16, 64).clamp(-4, 4)
    assert sqnr_db(float_reference(layer, x), fp8(x).float()) > 18


def test_gaudi2_opt_weight_scales_stay_in_the_hardware_set():
    """A weight whose maxabs scale is already Gaudi2's smallest (2^-8): the opt search may not go below it
    (it picked 2^-12 and 2^-16 before: on small weights a smaller scale wins on MSE)."""
    from ds_quant.config import DeviceForScales
    from ds_quant.numerics.scales import PROFILES, RECIPES, quantize_weight

    torch.manual_seed(0)
    profile = PROFILES[DeviceForScales.GAUDI2]
    for amax in (0.06, 0.002):  # amax / (240 * 0.5) <= 2^-11: rounds up to 2^-8, the smallest hardware scale
        w = torch.randn(32, 256) * 1e-4
        w[:, 0] = amax
        _, scale = quantize_weight(w, RECIPES[ScaleMethod.MAXABS_HW_OPT_WEIGHT], torch.float8_e4m3fn, profile)
        assert scale.item() == 2.0**-8, (amax, scale)
