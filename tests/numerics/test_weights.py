"""The one weight path (numerics/weights.py): a whole weight, row blocks and kept columns give the same numbers, and
every producer (the twin, convert's quantize_linear, a bf16 folder read in row blocks, the experts) raises the same
MeasurementError when the weights changed since MEASURE."""

import pytest
import torch
from torch import nn

from ds_quant.config import QuantConfig, ScaleMethod
from ds_quant.errors import MeasurementError
from ds_quant.layers.experts import quantize_expert
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics import scales
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.weights import RowBlocks, cast_rows, input_scale, quantize_weight
from ds_quant.workflows.quantize import quantize_linear

STREAMABLE = [m for m in ScaleMethod if not scales.RECIPES[m].weight_opt]


def spec_for(method, **kw):
    return resolve(QuantConfig.from_dict({"method": "HOOKS", "scale_method": method.value, **kw}), "layer")


def weight(n=48, k=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3).to(torch.bfloat16)


def rows_of(w, step):
    return RowBlocks(lambda: iter(w.split(step)), tuple(w.shape))


def same(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("method", STREAMABLE)
def test_row_blocks_give_the_whole_weights_numbers_bitwise(method):
    # bitwise: maxima are exact in any grouping and the cast is elementwise, so no tolerance is needed
    spec, w = spec_for(method), weight()
    record = {"input_amax": 5.0, "weight_amax": float(w.float().abs().max())}
    whole = quantize_weight(w, spec, record)
    for step in (1, 7, 48):
        q = quantize_weight(rows_of(w, step), spec, record)
        assert q.w_q is None and torch.equal(q.w_scale, whole.w_scale)
        assert (q.input_scale is None and whole.input_scale is None) or torch.equal(q.input_scale, whole.input_scale)
        cast = torch.cat([cast_rows(b, q.w_scale, i * step, spec) for i, b in enumerate(w.split(step))])
        assert same(cast, whole.w_q)
        out = torch.empty(w.shape, dtype=spec.fp8_dtype)
        assert same(quantize_weight(rows_of(w, step), spec, record, out=out).w_q, whole.w_q)


@pytest.mark.parametrize("method", list(ScaleMethod))
def test_whole_weight_is_scales_quantize_weight_and_the_input_scale_the_specs(method):
    spec, w = spec_for(method), weight(seed=1)
    q = quantize_weight(w, spec, {"input_amax": 2.5})
    w_ref, s_ref = scales.quantize_weight(w, spec.recipe, spec.fp8_dtype, spec.profile, spec.weight_backoff)
    assert same(q.w_q, w_ref) and torch.equal(q.w_scale, s_ref.float())
    ref = spec.input_scale(2.5)
    assert (q.input_scale is None) == (ref is None) and (ref is None or torch.equal(q.input_scale, ref))
    assert input_scale(spec, None) is None or float(input_scale(spec, None)) > 0  # no record: a unit range, not 0


def test_kept_columns_are_zero_and_left_out_of_the_scale():
    spec, w = spec_for(ScaleMethod.MAXABS_ARBITRARY), weight(seed=2)
    keep = torch.tensor([3, 17])
    w[:, 17] = 1000  # an outlier column: with it kept out the scale is the rest's
    q = quantize_weight(w, spec, None, keep=keep)
    rest = w.clone()
    rest[:, keep] = 0
    assert same(q.w_q, quantize_weight(rest, spec).w_q) and torch.equal(q.w_scale, quantize_weight(rest, spec).w_scale)
    assert not q.w_q[:, keep].float().any() and w[0, 17] == 1000  # the caller's weight untouched


def test_row_blocks_refuse_what_needs_the_whole_weight():
    spec = spec_for(ScaleMethod.MAXABS_HW_OPT_WEIGHT)
    with pytest.raises(ValueError, match="layer 'layer': the weight search, GPTQ and kept columns need the whole"):
        quantize_weight(rows_of(weight(), 8), spec)


def test_changed_weights_are_one_measurement_error_on_every_producer():
    w = weight(seed=3)
    record = {"input_amax": 1.0, "weight_amax": float(w.float().abs().max()) / 2}
    spec = spec_for(ScaleMethod.MAXABS_HW)
    msg = r"layer 'layer': weight max-abs .* exceeds the measured .*; the weights changed since MEASURE. Measure again"
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    producers = [lambda: quantize_weight(w, spec, record),
                 lambda: quantize_weight(rows_of(w, 5), spec, record),
                 lambda: quantize_linear("layer", w, spec, record),
                 lambda: Fp8Linear.from_original(lin, "layer", spec, record),
                 lambda: quantize_expert(w, resolve(QuantConfig.from_dict({"method": "HOOKS"}), "layer", "experts"),
                                         record, "layer")]
    for make in producers:
        with pytest.raises(MeasurementError, match=msg):
            make()
    quantize_weight(w, spec, {**record, "weight_amax": float(w.float().abs().max())})  # the measured weight: fine
