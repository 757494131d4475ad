"""`smooth_alpha`: SmoothQuant-style smoothing folded into norms / up_proj before QUANTIZE (ds_quant/workflows/smooth.py).

The factors are powers of two, so a folded bf16 model computes bit for bit what the original does (tolerance:
none); they come from the model-level file and maxima of weights, so TP=1 and TP=2 fold the same ones."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ds_quant
from ds_quant import errors
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError
from ds_quant.files import measurements, shards
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows import hf_model, smooth
from tests.launcher import ROOT, deepspeed

OUTLIERS = [3, 17, 40]
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(7))  # as tests/scripts/smooth_tp.py


# -- the math ----------------------------------------------------------------------------------------------------
def test_factors_are_the_power_of_two_nearest_x_to_the_a_over_w_to_the_1_minus_a():
    x, w = torch.tensor([4.0, 1.0, 16.0, 3.0, 1.0]), torch.tensor([1.0, 4.0, 1.0, 1.0, 1.5])
    assert smooth.smooth_factors(x, w, 0.5).tolist() == [2.0, 0.5, 4.0, 2.0, 1.0]  # sqrt(3)=1.73 -> 2; 0.82 -> 1
    assert smooth.smooth_factors(x, w, 1.0).tolist() == [4.0, 1.0, 16.0, 4.0, 1.0]  # all of x moves
    s = smooth.smooth_factors(torch.rand(1000) * 100 + 0.01, torch.rand(1000) + 1e-3, 0.7)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # exact powers of two


def test_factors_are_one_where_a_statistic_is_zero_or_not_finite_and_stay_within_2_to_the_20():
    x = torch.tensor([0.0, 5.0, math.inf, math.nan, 1e30])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1e-30])
    assert smooth.smooth_factors(x, w, 0.5).tolist() == [1.0, 1.0, 1.0, 1.0, 2.0 ** smooth.MAX_LOG2]


def test_smoothing_lifts_a_per_tensor_fp8_linear_only_where_outliers_push_the_rest_into_subnormals():
    """FP8 has an exponent: at 50x outlier channels the other channels keep their ~3 mantissa bits and smoothing
    changes the output SQNR by < 0.5 dB (measured 28.64 -> 28.27 dB at alpha 0.5); at 2000x outliers with
    2000x smaller weight columns (SmoothQuant's case) the rest falls into E4M3's subnormals under a per-tensor
    input scale and smoothing recovers it: measured 26.9 -> 28.6 dB, asserted >= +1 dB."""
    def sqnr(outlier, alpha):
        torch.manual_seed(0)
        x = torch.randn(64, 256)
        x[:, OUTLIERS] *= outlier
        x = x.bfloat16()
        lin = nn.Linear(256, 512, bias=False).bfloat16().requires_grad_(False)
        lin.weight[:, OUTLIERS] /= outlier
        twin = MeasuredLinear.from_original(lin, "l", resolve(QuantConfig(mode="MEASURE", measure_exclude="NONE"), "l"))
        twin(x)
        record, reference = twin.stats(), x.float() @ lin.weight.float().t()
        if alpha:
            s = smooth.smooth_factors(torch.as_tensor(record["input_channel_amax"]), lin.weight.abs().amax(0), alpha)
            lin.weight.mul_(s.bfloat16())
            x = x / s.bfloat16()
            record = {**smooth.smoothed_record(record, s), "weight_amax": float(lin.weight.abs().max())}
        q = Fp8Linear.from_original(lin, "l", resolve(QuantConfig(scale_method="maxabs_hw"), "l"), record)
        return float(sqnr_db(reference, q(x).float()))

    with torch.no_grad():
        assert abs(sqnr(50, 0.5) - sqnr(50, None)) < 0.5
        assert sqnr(2000, 0.5) >= sqnr(2000, None) + 1.0


# -- folding into a real (tiny) Llama ------------------------------------------------------------------------------
def outlier_llama(path):
    """The tiny Llama with OUTLIERS channels of every norm 30x larger (its own norms are all 1, which would
    leave nothing to smooth)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIERS] *= 30
            layer.post_attention_layernorm.weight[OUTLIERS] *= 30
    return model


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    """(the outlier model as an HF folder, the merged measurement file's prefix), MEASURE at TP=1."""
    work = tmp_path_factory.mktemp("smooth")
    model = outlier_llama(tiny_model)
    model.save_pretrained(work / "model")
    prefix = str(work / "stats")
    model = ds_quant.prep_model(model, {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": prefix})
    with torch.no_grad():
        model(IDS)
    ds_quant.finish_measurements(model)
    return work / "model", prefix


def _doc(prefix):
    return measurements.load(shards.merged_path(prefix))


def test_folding_leaves_the_bf16_model_bit_identical_and_smooths_the_records(measured):
    from transformers import AutoModelForCausalLM

    path, prefix = measured
    layers = _doc(prefix)["layers"]
    before = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    out, factors = smooth.fold(model, layers, 0.5)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before(IDS).logits)  # exact: power-of-two factors
    assert len(factors) == 3 * 4  # 2 norms and up_proj in each of 4 layers
    s = factors["model.layers.0.input_layernorm"]
    assert (s != 1).sum() > 10 and s[OUTLIERS].min() > 1  # not a no-op: the outlier channels move into W
    # Independently: x = max over q/k/v's measured channels, w = max over every row of q, k and v.
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    x = torch.as_tensor(np.max([layers[n]["input_channel_amax"] for n in names], 0))
    w = torch.cat([dict(before.named_modules())[n].weight.abs() for n in names]).amax(0).float()
    assert torch.equal(s, torch.exp2(torch.round(0.5 * torch.log2(x) - 0.5 * torch.log2(w))))
    norm0, q0 = before.model.layers[0].input_layernorm, before.model.layers[0].self_attn.q_proj
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm0.weight / s.bfloat16())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q0.weight * s.bfloat16())
    rec, old = out[names[0]], layers[names[0]]
    np.testing.assert_array_equal(rec["input_channel_amax"], np.asarray(old["input_channel_amax"]) / s.numpy())
    assert rec["input_amax"] == float(rec["input_channel_amax"].max()) < old["input_amax"]
    assert rec["weight_amax"] == float(model.model.layers[0].self_attn.q_proj.weight.detach().abs().max())
    # up_proj -> down_proj: up's rows / s, down's columns * s
    s_up = factors["model.layers.1.mlp.up_proj"]
    up, down = before.model.layers[1].mlp.up_proj, before.model.layers[1].mlp.down_proj
    s_post = factors["model.layers.1.post_attention_layernorm"]
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       up.weight * s_post.bfloat16() / s_up.bfloat16()[:, None])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, down.weight * s_up.bfloat16())
    assert out["model.layers.1.mlp.up_proj"]["output_amax"] is None  # no longer what was measured


def test_quantize_with_smooth_alpha_folds_then_quantizes_from_the_smoothed_statistics(measured, caplog_ds):
    """End to end through prep_model at TP=1: FP8 logits track bf16 (>= 15 dB: the same model quantized without
    smoothing measures ~16 dB here, a random-weight model whose logits are all small) and the input scale of
    q_proj comes from the smoothed statistics."""
    from transformers import AutoModelForCausalLM

    path, prefix = measured
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cfg = {"method": "HOOKS", "dump_stats_path": prefix, "scale_method": "act_maxabs_hw_weights_pcs_opt_pow2",
           "smooth_alpha": 0.5}
    model = ds_quant.prep_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), cfg)
    with torch.no_grad():
        db = float(sqnr_db(reference(IDS).logits.float(), model(IDS).logits.float()))
    assert db >= 15, db
    assert "smooth_alpha 0.5: folded into 12 norm(s)/linear(s)" in caplog_ds.text
    q = model.model.layers[0].self_attn.q_proj
    unsmoothed = Fp8Linear.from_original(reference.model.layers[0].self_attn.q_proj, "q", resolve(QuantConfig(
        scale_method="act_maxabs_hw_weights_pcs_opt_pow2"), "q"), _doc(prefix)["layers"]["model.layers.0.self_attn.q_proj"])
    assert isinstance(q, Fp8Linear) and float(q.input_scale) < float(unsmoothed.input_scale) / 2


def outlier_llama_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


@pytest.mark.distributed
def test_tp2_folds_the_same_factors_and_records_as_tp1(measured, tmp_path):
    """One launch of tests/scripts/smooth_tp.py at TP=2 (AutoTP-split q/k/v/gate/up by rows, down by columns)
    against the same fold at TP=1: factors and smoothed records identical (a max is exact whatever the split),
    on both ranks; each rank folded its own slices, so the split bf16 model's logits are bit-identical before
    and after folding. The QUANTIZEd logits differ from TP=1's by the order of TP's sums and the FP8 roundings
    that flips: measured 24.7 dB on both ranks, asserted >= 20 dB."""
    path, prefix = measured
    config = tmp_path / "quant.json"
    config.write_text(json.dumps({"method": "HOOKS", "dump_stats_path": prefix, "smooth_alpha": 0.5,
                                  "scale_method": "act_maxabs_hw_weights_pcs_opt_pow2", "outlier_channels": 4}))
    deepspeed(2, ROOT / "tests" / "scripts" / "smooth_tp.py", str(path), prefix, "0.5", str(config),
              str(tmp_path / "tp2"), cwd=tmp_path, timeout=600)
    layers, factors = smooth.fold(outlier_llama_from(path), _doc(prefix)["layers"], 0.5)
    tp1 = ds_quant.prep_model(outlier_llama_from(path), str(config))
    with torch.no_grad():
        logits = tp1(IDS).logits.float()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"tp2_{rank}.pt")
        assert got["world"] == 2 and got["bf16_unchanged"] and got["factors"].keys() == factors.keys()
        for name, s in factors.items():
            assert torch.equal(got["factors"][name], s), name
        for name, rec in got["records"].items():
            assert rec["input_amax"] == layers[name]["input_amax"] and rec["weight_amax"] == layers[name]["weight_amax"]
            assert torch.equal(rec["input_channel_amax"], torch.as_tensor(layers[name]["input_channel_amax"])), name
        db = float(sqnr_db(logits, got["logits"]))
        assert db >= 20, db


# -- refusals ------------------------------------------------------------------------------------------------------
def test_an_architecture_without_a_known_pairing_is_refused_with_its_model_type():
    class Gemma(nn.Module):
        config = type("C", (), {"model_type": "gemma"})()

    with pytest.raises(errors.SmoothError, match=r"model_type 'gemma': which norm feeds which linear is not known "
                                                 r"for this architecture \(known: llama, mistral, qwen2, qwen3\); "
                                                 r"drop 'smooth_alpha'"):
        smooth.fold(Gemma(), {}, 0.5)
    with pytest.raises(errors.SmoothError, match=r"Sequential \(no config.model_type\)"):
        smooth.fold(nn.Sequential(nn.Linear(4, 4)), {}, 0.5)


def test_a_llama_missing_a_consumer_is_refused_naming_it():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.LayerNorm(4)
            self.self_attn = nn.Module()
            self.self_attn.q_proj = nn.Linear(4, 4)

    class Model(nn.Module):
        config = type("C", (), {"model_type": "llama"})()

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer()])

    with pytest.raises(errors.SmoothError, match=r"'layers.0.input_layernorm' has no consumer "
                                                 r"'layers.0.self_attn.k_proj'"):
        smooth.fold(Model(), {}, 0.5)


def test_statistics_of_another_width_are_refused_before_any_weight_changes(measured):
    path, prefix = measured
    layers = dict(_doc(prefix)["layers"])
    name = "model.layers.2.mlp.down_proj"
    layers[name] = {**layers[name], "input_channel_amax": np.ones(100, dtype=np.float32)}
    model = outlier_llama_from(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.SmoothError, match=r"layer 'model.layers.2.mlp.down_proj': its local weight has 352 "
                                                 r"input channels, the measured statistics 100"):
        smooth.fold(model, layers, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.5", True, math.nan, [0.5]])
def test_smooth_alpha_outside_0_1_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"key 'smooth_alpha': .* must be a number in \(0, 1\]"):
        QuantConfig.from_dict({"method": "HOOKS", "smooth_alpha": value})


def test_smooth_alpha_is_off_unless_given_and_refused_with_methods_that_read_no_statistics():
    assert QuantConfig.from_dict({"method": "HOOKS"}).smooth_alpha is None
    assert QuantConfig.from_dict({"method": "HOOKS", "smooth_alpha": 1}).smooth_alpha == 1.0
    for method in ("unit_scale", "act_dynamic_per_token_weights_pcs"):
        with pytest.raises(ConfigError, match=rf"key 'smooth_alpha' needs measured input statistics, which "
                                              rf"scale_method '{method}' does not read"):
            QuantConfig.from_dict({"method": "HOOKS", "smooth_alpha": 0.5, "scale_method": method})


def test_the_report_entry_point_which_has_no_model_refuses_smoothing(measured):
    from ds_quant.layers.patch import find, make_filter
    from ds_quant.workflows.quantize import fp8_maker

    path, prefix = measured
    cfg = QuantConfig.from_dict({"method": "HOOKS", "dump_stats_path": prefix, "smooth_alpha": 0.5})
    model = outlier_llama_from(path)
    with pytest.raises(ConfigError, match=r"key 'smooth_alpha': this entry point quantizes layers without the model"):
        fp8_maker(cfg, find(model, make_filter(functools.partial(cfg.selects, "linear"))))


def test_quantize_on_load_refuses_smoothing_instead_of_ignoring_it(measured, monkeypatch):
    """The meta-device load paths (FP8 folders, DS_QUANT_QUANTIZE_ON_LOAD) quantize layer by layer as they read,
    with no whole model to fold into: the key is refused, not silently dropped."""
    from transformers import AutoModelForCausalLM


    path, prefix = measured
    cfg = QuantConfig.from_dict({"method": "HOOKS", "dump_stats_path": prefix, "smooth_alpha": 0.5})
    monkeypatch.setenv(hf_model.QUANTIZE_ON_LOAD_ENV, "1")
    hf_model.install_from_pretrained(lambda: cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with pytest.raises(ConfigError, match=r"key 'smooth_alpha' applies to in-memory QUANTIZE of a bf16 model, "
                                              r"not to FP8 checkpoints or quantize-on-load"):
            ds_quant.prep_model(model, cfg)
    finally:
        hf_model.install_from_pretrained(lambda: None)
