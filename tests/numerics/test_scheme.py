"""Schemes in compressed-tensors' terms: both ways against compressed-tensors' own classes, the `scheme` config key
(presets, role and per-name overrides, one-line refusals), and a LayerSpec's scheme giving its recipe back."""

import dataclasses

import pytest
import torch

from ds_quant.config import METHOD_SCHEMES, SCHEME_PRESETS, SCHEME_PRESETS_LATER, QuantConfig, ScaleMethod
from ds_quant.errors import ConfigError
from ds_quant.numerics import layer_spec
from ds_quant.numerics.scales import RECIPES
from ds_quant.numerics.scheme import _HQT_FIELDS, PRESETS, QuantArgs, QuantScheme, _fp8, recipe_of

ct = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402


# -- helpers: the two tables the `scheme` key and the recipes are made from, compared below ----------------------
def method_of(scheme: QuantScheme) -> ScaleMethod:
    """The HQT scale method that quantizes as `scheme` says (its recipe's)."""
    recipe = recipe_of(scheme)
    return next(m for m, r in RECIPES.items() if r == recipe)


def config_method_scheme(method: ScaleMethod) -> QuantScheme:
    """The scheme config.METHOD_SCHEMES (the words config key `scheme` is resolved with) gives `method`."""
    (ws, wr, wo), (ins, dyn, ir) = METHOD_SCHEMES[ScaleMethod(method)]
    return QuantScheme(_fp8(ws, observer=wo, rounding=wr), _fp8(ins, dynamic=dyn, rounding=ir))


def without_hqt(scheme: QuantScheme) -> QuantScheme:
    """The scheme with HQT's fields cleared (what compressed-tensors sees)."""
    def clear(a):
        return None if a is None else dataclasses.replace(a, **dict.fromkeys(_HQT_FIELDS))
    return QuantScheme(clear(scheme.weights), clear(scheme.input_activations), clear(scheme.output_activations),
                       scheme.format)


def cfg(**kw):
    return QuantConfig.from_dict({"method": "HOOKS", **kw})


# -- one to one with compressed-tensors ---------------------------------------------------------------------------
def test_quant_args_fields_are_compressed_tensors_fields_plus_hqts():
    ours = [f.name for f in dataclasses.fields(QuantArgs)]
    assert ours[:len(ct.QuantizationArgs.model_fields)] == list(ct.QuantizationArgs.model_fields)
    assert ours[len(ct.QuantizationArgs.model_fields):] == ["rounding", "backoff", "fp8_format", "device"]
    assert [f.name for f in dataclasses.fields(QuantScheme)] == [
        k for k in ct.QuantizationScheme.model_fields if k != "targets"]


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_every_compressed_tensors_preset_converts_both_ways(name):
    theirs = ct.preset_name_to_scheme(name, ["Linear"])
    ours = QuantScheme.from_ct(theirs)
    assert ct.QuantizationScheme(targets=["Linear"], **ours.to_ct()) == theirs
    assert QuantScheme.from_ct(ours.to_ct()) == ours  # and from the plain dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_our_presets_are_compressed_tensors_presets(name):
    theirs = ct.preset_name_to_scheme(name, ["Linear"])
    assert ct.QuantizationScheme(targets=["Linear"], **PRESETS[name].to_ct()) == theirs


def test_a_changed_field_does_not_compare_equal():  # the comparisons above can fail
    theirs = ct.preset_name_to_scheme("FP8", ["Linear"])
    changed = dataclasses.replace(PRESETS["FP8"], weights=dataclasses.replace(PRESETS["FP8"].weights,
                                                                             strategy="channel"))
    assert ct.QuantizationScheme(targets=["Linear"], **changed.to_ct()) != theirs


def test_every_preset_name_is_implemented_or_refused():
    assert set(SCHEME_PRESETS) | set(SCHEME_PRESETS_LATER) == set(PRESET_SCHEMES)
    assert set(PRESETS) >= set(SCHEME_PRESETS)


# -- HQT's methods as schemes: config's table and the recipes agree --------------------------------------------------
@pytest.mark.parametrize("method", list(ScaleMethod))
def test_config_table_and_recipes_agree(method):
    assert recipe_of(config_method_scheme(method)) == RECIPES[method]
    assert method_of(config_method_scheme(method)) is method
    assert set(METHOD_SCHEMES) == set(ScaleMethod)


@pytest.mark.parametrize("method", list(ScaleMethod))
@pytest.mark.parametrize("device", ["cuda", "gaudi2"])
def test_layer_spec_scheme_gives_its_recipe_back(method, device):
    spec = layer_spec.resolve(cfg(scale_method=method.value, device_for_scales=device,
                                  scale_params={"input_backoff": 0.5, "weight_backoff": 0.25}), "x")
    s = spec.scheme
    assert recipe_of(s) == spec.recipe
    assert (s.weights.backoff, s.weights.device.value, s.weights.fp8_format.value) == (0.25, device, "E4M3")
    assert s.input_activations.backoff == (None if spec.recipe.act.value == "dynamic" else 0.5)
    ct.QuantizationScheme(targets=["Linear"], **s.to_ct())  # compressed-tensors accepts it


@pytest.mark.parametrize("preset", sorted(SCHEME_PRESETS))
def test_implemented_presets_are_their_methods(preset):
    spec = layer_spec.resolve(cfg(scheme=preset), "x")
    assert spec.method is SCHEME_PRESETS[preset]
    assert recipe_of(PRESETS[preset]) == spec.recipe
    assert without_hqt(spec.scheme).weights == without_hqt(PRESETS[preset]).weights


# -- the config key ------------------------------------------------------------------------------------------------
def test_fp8_dynamic_is_the_dynamic_method_and_fp8_hqts_default():
    assert cfg(scheme="FP8_DYNAMIC").scale_method is ScaleMethod.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS
    assert cfg(scheme="fp8").scale_method is cfg().scale_method is ScaleMethod.MAXABS_HW
    assert cfg().scheme is None  # absent: HQT's keys as they are


def test_role_overrides_pick_the_method_they_describe():
    c = cfg(scheme={"preset": "FP8", "weights": {"strategy": "channel", "rounding": "pow2", "observer": "mse"}})
    assert c.scale_method is ScaleMethod.ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2
    assert c.scheme.weights == (("strategy", "channel"), ("rounding", "pow2"), ("observer", "mse"))
    c = cfg(scheme={"preset": "FP8", "weights": {"rounding": "none"}, "input_activations": {"rounding": "none"}})
    assert c.scale_method is ScaleMethod.MAXABS_ARBITRARY


def test_per_name_overrides_in_hqts_style():
    c = cfg(scheme="FP8", scheme_overrides={"lm_head": "FP8_DYNAMIC", r"\.down_proj": {
        "preset": "FP8", "weights": {"observer": "mse"}}})
    assert c.method_for("model.lm_head") is ScaleMethod.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS
    assert c.method_for("layers.0.mlp.down_proj") is ScaleMethod.MAXABS_HW_OPT_WEIGHT
    assert c.method_for("layers.0.mlp.up_proj") is ScaleMethod.MAXABS_HW
    spec = layer_spec.resolve(c, "model.lm_head")
    assert spec.scheme.input_activations.strategy == "token" and spec.scheme.input_activations.dynamic is True


@pytest.mark.parametrize("name", ["W8A8", "W4A16", "FP8_BLOCK", "W8A16", "W4A16_ASYM", "w8a8"])
def test_other_presets_are_refused_in_one_line(name):
    with pytest.raises(ConfigError) as e:
        cfg(scheme=name)
    assert str(e.value) == f"<dict>: key 'scheme': {name.upper()}: not implemented yet; implemented: FP8, FP8_DYNAMIC"


@pytest.mark.parametrize("scheme, match", [
    ("FP9", r"key 'scheme': preset 'FP9' is not one of: FP8, FP8_DYNAMIC .*did you mean 'FP8'"),
    (7, r"key 'scheme' must be a preset name"),
    ({"preset": "FP8", "weight": {}}, r"unknown key 'scheme.weight' \(did you mean 'weights'\?\); accepted: preset"),
    ({"preset": "FP8", "weights": {"bits": 4}}, r"unknown key 'scheme.weights.bits'.*accepted: num_bits"),
    ({"preset": "FP8", "weights": {"num_bits": 4}}, r"key 'scheme.weights.num_bits': 4 is not implemented yet"),
    ({"preset": "FP8", "weights": {"type": "int"}}, r"key 'scheme.weights.type': 'int' is not implemented yet"),
    ({"preset": "FP8", "weights": {"strategy": "row"}}, r"key 'scheme.weights.strategy': 'row' is not one of: "
                                                        "tensor, channel"),
    ({"preset": "FP8", "weights": {"strategy": "group", "group_size": 128}}, r"group_size': 128 is not implemented"),
    ({"preset": "FP8", "weights": {"strategy": "channel"}},
     r"key 'scheme': weights channel/hw with inputs tensor/static/hw is not implemented; implemented: unit_scale = "),
    ({"preset": "FP8", "input_activations": {"observer": "mse"}}, r"input_activations.observer': 'mse' is not impl"),
    ({"preset": "FP8", "weights": {"rounding": "round"}}, r"'scheme.weights.rounding': 'round' is not one of: none"),
    ({"preset": "FP8", "input_activations": {"dynamic": "yes"}}, r"dynamic': 'yes' must be true or false"),
])
def test_bad_scheme_values_fail_in_one_line_naming_key_and_accepted(scheme, match):
    with pytest.raises(ConfigError, match=match) as e:
        cfg(scheme=scheme)
    assert "\n" not in str(e.value)


def test_scheme_and_the_hqt_key_it_replaces_conflict():
    with pytest.raises(ConfigError, match="keys 'scheme' and 'scale_method' both choose"):
        cfg(scheme="FP8", scale_method="maxabs_pow2")
    with pytest.raises(ConfigError, match="keys 'scheme_overrides' and 'scale_method_overrides' both"):
        cfg(scheme_overrides={"a": "FP8"}, scale_method_overrides={"b": "maxabs_pow2"})
    with pytest.raises(ConfigError, match=r"key 'scheme_overrides': '\(' is not a valid regex"):
        cfg(scheme_overrides={"(": "FP8"})
    with pytest.raises(ConfigError, match=r"key 'scheme_overrides.lm_head': W8A8: not implemented yet"):
        cfg(scheme_overrides={"lm_head": "W8A8"})



def test_a_scheme_config_quantizes_bitwise_as_its_method():
    from ds_quant.numerics.weights import quantize_weight
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    record = {"input_amax": 3.0, "weight_amax": float(w.abs().max())}
    for preset, method in SCHEME_PRESETS.items():
        a = quantize_weight(w, layer_spec.resolve(cfg(scheme=preset), "x"), record)
        b = quantize_weight(w, layer_spec.resolve(cfg(scale_method=method.value), "x"), record)
        assert torch.equal(a.w_q.view(torch.uint8), b.w_q.view(torch.uint8)) and torch.equal(a.w_scale, b.w_scale)
        assert (a.input_scale is None) == (b.input_scale is None) == (preset == "FP8_DYNAMIC")
