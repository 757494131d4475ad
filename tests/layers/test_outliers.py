"""`outlier_channels`: each linear's K input channels of largest measured max-abs stay in high precision
(weight columns and activations, LLM.int8()-style), the rest is FP8 with a scale from the other channels."""

from unittest import mock

import pytest
import torch
from torch import nn

from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import sqnr_db
from ds_quant.parallel.tp import TPLayout
from tests.layers.test_linear import build

layers = pytest.importorskip("deepspeed.module_inject.layers")
OUTLIERS = [3, 17, 40, 150]


def features(tokens=64, width=256, seed=0):
    """Gaussian activations whose OUTLIERS channels are 50x larger in every token: the persistent outlier
    features of LLM hidden states (SmolLM2's q/k/v inputs: max channel ~27x the median)."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, width)
    x[:, OUTLIERS] *= 50
    return x.bfloat16()


def _same(t):
    return t


def record_of(module, x):
    twin = MeasuredLinear.from_original(module, "l", resolve(QuantConfig(mode="MEASURE", measure_exclude="NONE"), "l"))
    with torch.no_grad():
        twin(x)
    return twin.stats()


def quantized(module, record, k, method="act_maxabs_pow2_weights_pcs_opt_pow2"):
    return Fp8Linear.from_original(module, "l", resolve(QuantConfig(scale_method=method, outlier_channels=k), "l"), record)


def test_outlier_channels_stay_high_precision_and_lift_the_output_sqnr():
    """Measured: 29.3 dB without, 44.3 dB with the 4 outlier channels in bf16. Why >= 10 dB better: the outlier
    channels carry ~97 % of the output energy (4 x 50^2 against 252 x 1); kept exact, the error is the FP8 error
    of the rest alone, ~15 dB below the total signal. The FP8 weight is zero in those columns, and the input
    scale comes from the other channels (50x smaller)."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 128, bias=False).bfloat16()
    x = features()
    rec = record_of(lin, x)
    ref = x.double() @ lin.weight.double().t()
    plain, split = quantized(lin, rec, 0), quantized(lin, rec, 4)
    assert plain.outlier_index is None
    assert split.outlier_index.tolist() == OUTLIERS
    assert torch.equal(split.outlier_weight, lin.weight[:, OUTLIERS])
    assert (split.weight[:, OUTLIERS].float() == 0).all()
    assert float(plain.input_scale) / float(split.input_scale) >= 16
    with torch.no_grad():
        db_plain, db_split = sqnr_db(ref, plain(x)), sqnr_db(ref, split(x))
    assert db_split >= db_plain + 10, (db_plain, db_split)
    assert "4 outlier channel(s) high precision" in repr(split)


def test_outlier_channels_are_chosen_model_level_so_every_tp_size_keeps_the_same():
    """A row-parallel layer at TP=2: each rank keeps the outlier channels inside its input slice, and together
    they are the TP=1 layer's, with the same weight columns and the same (model-level) input scale."""
    x = features(width=192)  # LinearAllreduce case: in_features 192
    # No process group here: the ranks' weight-statistics reductions become identities (only the outlier choice,
    # which comes from the record, is under test; scales across ranks are test_tp_invariance's business).
    with mock.patch.object(layers.pg_utils, "is_parallel", lambda group: False), \
            mock.patch.object(TPLayout, "reducers", lambda self, per_channel: (_same, _same)):
        whole = build("LinearAllreduce", 0, 1)
        rec = record_of(whole, x)  # the model-level record (a TP=2 merge equals it: test_ds_layers)
        ref = quantized(whole, rec, 4)
        ranks = [quantized(build("LinearAllreduce", r, 2), rec, 4) for r in range(2)]
    picked = []
    for twin in ranks:
        start = twin.layout.input_slice().start
        picked += (twin.outlier_index + start).tolist()
        assert torch.equal(twin.outlier_weight, whole.weight[:, twin.outlier_index + start])
        assert torch.equal(twin.input_scale, ref.input_scale)
    assert sorted(picked) == ref.outlier_index.tolist() == OUTLIERS


def test_dynamic_methods_and_missing_channel_statistics_keep_every_channel_fp8():
    lin = nn.Linear(256, 32, bias=False).bfloat16()
    rec = record_of(lin, features())
    assert quantized(lin, {**rec, "input_channel_amax": None}, 4).outlier_index is None
    dyn = Fp8Linear.from_original(lin, "l", resolve(QuantConfig(scale_method="act_dynamic_per_token_weights_pcs",
                                                                outlier_channels=4), "l"), None)
    assert dyn.outlier_index is None


@pytest.mark.parametrize("value", [-1, 1.5, True, 1000, "8"])
def test_outlier_channels_config_errors_name_the_key(value):
    with pytest.raises(ConfigError, match="key 'outlier_channels'"):
        QuantConfig.from_dict({"method": "HOOKS", "outlier_channels": value})
