"""Config: HQT files load unchanged; malformed ones fail with one line naming key, value and the fix."""

import json

import pytest

from ds_quant import cli
from ds_quant.config import (
    Fp8Format,
    MeasureExclude,
    Mode,
    ModuleFilter,
    QuantConfig,
    ScaleMethod,
    config_path_from_argv,
    resolve_config,
)
from ds_quant.errors import ConfigError


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


HQT_MEASURE = {  # as HQT's examples ship it, legacy keys included
    "method": "HOOKS", "mode": "MEASURE", "observer": "maxabs",
    "whitelist": {"types": [], "names": []}, "blacklist": {"types": [], "names": []},
    "dump_stats_path": "./hqt_output/measure", "dump_stats_xlsx_path": "./hqt_output/measure/fp8stats.xlsx",
}
HQT_QUANT = {
    "method": "HOOKS", "mode": "QUANTIZE", "observer": "maxabs", "scale_method": "MAXABS_HW",
    "allowlist": {"types": [], "names": []}, "blocklist": {"types": ["Matmul", "Softmax"], "names": ["lm_head"]},
    "dump_stats_path": "./hqt_output/measure",
}


def test_hqt_measure_file_with_legacy_keys_loads(tmp_path):
    cfg = QuantConfig.from_json(write(tmp_path, HQT_MEASURE))
    assert cfg.mode is Mode.MEASURE
    assert cfg.allowlist == ModuleFilter() and cfg.blocklist == ModuleFilter()
    assert cfg.dump_stats_path == "./hqt_output/measure"
    assert cfg.dump_stats_xlsx_path.endswith("fp8stats.xlsx")
    assert not (tmp_path / "hqt_output").exists(), "loading must not create directories"


def test_hqt_quant_file_upper_case_method_loads(tmp_path):
    cfg = QuantConfig.from_json(write(tmp_path, HQT_QUANT))
    assert cfg.mode is Mode.QUANTIZE and cfg.scale_method is ScaleMethod.MAXABS_HW
    assert cfg.blocklist.types == ("Matmul", "Softmax") and cfg.blocklist.names == ("lm_head",)


def test_defaults_are_hqts():
    cfg = QuantConfig.from_dict({"method": "HOOKS"})
    assert (cfg.mode, cfg.scale_method, cfg.measure_exclude, cfg.fp8_config, cfg.dump_stats_path) == (
        Mode.QUANTIZE, ScaleMethod.MAXABS_HW, MeasureExclude.OUTPUT, Fp8Format.E4M3, "stats")


@pytest.mark.parametrize("value", ["maxabs_pow2", "MAXABS_POW2", "MaxAbs_Pow2"])
def test_enum_values_any_case(value):
    assert QuantConfig.from_dict({"method": "hooks", "scale_method": value}).scale_method is ScaleMethod.MAXABS_POW2


MALFORMED = [
    # (config, fragments the one-line message must contain)
    ({"method": "HOOKS", "scale_methd": "maxabs_hw"}, ["unknown key 'scale_methd'", "did you mean 'scale_method'"]),
    ({"mode": "MEASURE"}, ["key 'method' is required", "HOOKS"]),
    ({"method": "HOOKZ"}, ["key 'method'", "'HOOKZ'", "HOOKS"]),
    ({"method": "HOOKS", "mode": "MEASUR"}, ["key 'mode'", "'MEASUR'", "MEASURE, QUANTIZE", "did you mean 'MEASURE'"]),
    ({"method": "HOOKS", "scale_method": "maxabs_hw2"}, ["key 'scale_method'", "'maxabs_hw2'", "maxabs_pow2"]),
    ({"method": "HOOKS", "fp8_config": "E4M4"}, ["key 'fp8_config'", "E4M3, E5M2"]),
    ({"method": "HOOKS", "measure_exclude": "OUTPUTS"}, ["key 'measure_exclude'", "did you mean 'OUTPUT'"]),
    ({"method": "HOOKS", "observer": "minmax"}, ["key 'observer'", "'minmax'", "maxabs"]),
    ({"method": "HOOKS", "mode": "LOAD"}, ["key 'mode'", "HQT value", "QUANTIZE"]),
    ({"method": "HOOKS", "allowlist": ["lm_head"]}, ["key 'allowlist' must be an object", "types", "names"]),
    ({"method": "HOOKS", "blocklist": {"name": ["lm_head"]}}, ["unknown key 'blocklist.name'", "did you mean 'names'"]),
    ({"method": "HOOKS", "blocklist": {"names": "lm_head"}}, ["key 'blocklist.names' must be a list of strings"]),
    ({"method": "HOOKS", "blocklist": {"names": ["lm_head("]}}, ["key 'blocklist.names'", "not a valid regex"]),
    ({"method": "HOOKS", "allowlist": {"types": ["Lienar"]}}, ["key 'allowlist.types'", "did you mean 'Linear'"]),
    ({"method": "HOOKS", "allowlist": {"types": ["FusedSDPA"]}}, ["key 'allowlist.types'", "'FusedSDPA'",
                                                               "not a module type ds_quant can quantize"]),
    ({"method": "HOOKS", "whitelist": {}, "allowlist": {}}, ["'whitelist' and 'allowlist'", "keep only 'allowlist'"]),
    ({"method": "HOOKS", "mode": "MEASURE", "measure_exclude": "ALL"}, ["key 'measure_exclude'", "'ALL'",
                                                                        "no inputs"]),
    ({"method": "HOOKS", "allowlist": {"types": ["Linear"]}, "blocklist": {"types": ["Linear"]}},
     ["both list ['Linear']"]),
    ({"method": "HOOKS", "dump_stats_path": "out/"}, ["key 'dump_stats_path'", "file prefix"]),
    ({"method": "HOOKS", "dump_stats_path": 3}, ["key 'dump_stats_path' must be a non-empty path string"]),
    ({"method": "HOOKS", "scale_method": "SMOOTHQUANT_OPT"}, ["key 'scale_method'", "SmoothQuant is not supported"]),
    ({"method": "HOOKS", "scale_params": {"input_backof": 0.5}}, ["unknown key 'scale_params.input_backof'",
                                                                  "did you mean 'input_backoff'"]),
    ({"method": "HOOKS", "scale_params": {"weight_backoff": 2}}, ["key 'scale_params.weight_backoff'", "(0, 1]"]),
    ({"method": "HOOKS", "device_for_scales": "gaudi"}, ["key 'device_for_scales'", "cuda, gaudi2, gaudi3"]),
    ({"method": "HOOKS", "scale_method_overrides": {"lm_head": "maxabs_pow3"}},
     ["key 'scale_method_overrides.lm_head'", "'maxabs_pow3'", "did you mean 'maxabs_pow2'"]),
    ({"method": "HOOKS", "act_scope": "local"}, ["key 'act_scope'", "global, rank"]),
]


@pytest.mark.parametrize("data,fragments", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_config_one_clear_line(tmp_path, data, fragments):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        QuantConfig.from_json(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": "), msg  # names the file
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


@pytest.mark.parametrize("text,fragment", [("{\"method\": \"HOOKS\",}", "not valid JSON at line 1"),
                                           ("[1, 2]", "must be a JSON object")])
def test_not_a_json_object(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        QuantConfig.from_json(write(tmp_path, text))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: config file not found"):
        QuantConfig.from_json(tmp_path / "nope.json")


def test_source_precedence_explicit_then_flag_then_env(tmp_path, monkeypatch):
    flag = write(tmp_path, {"method": "HOOKS", "mode": "MEASURE"}, "flag.json")
    env = write(tmp_path, {"method": "HOOKS", "mode": "QUANTIZE"}, "env.json")
    assert QuantConfig.from_env_or_args(["run.py", "--quant-config", str(flag)], {"QUANT_CONFIG": str(env)}).mode \
        is Mode.MEASURE
    assert QuantConfig.from_env_or_args(["run.py", f"--quant-config={flag}"], {}).mode is Mode.MEASURE
    assert QuantConfig.from_env_or_args(["run.py"], {"QUANT_CONFIG": str(env)}).mode is Mode.QUANTIZE
    assert QuantConfig.from_env_or_args(["run.py"], {}) is None
    monkeypatch.setattr("sys.argv", ["run.py", "--quant-config", str(flag)])
    monkeypatch.setenv("QUANT_CONFIG", str(env))
    assert resolve_config({"method": "HOOKS", "mode": "QUANTIZE"}).mode is Mode.QUANTIZE  # explicit wins
    assert resolve_config(None).mode is Mode.MEASURE
    assert resolve_config(env).mode is Mode.QUANTIZE


def test_flag_without_value():
    with pytest.raises(ConfigError, match="--quant-config needs a file path"):
        config_path_from_argv(["run.py", "--quant-config"])


def test_filter_matching():
    f = ModuleFilter(types=("LinearAllreduce",), names=(r"mlp\.(up|gate)_proj$",))
    assert f.matches("LinearAllreduce", "model.layers.0.self_attn.o_proj")
    assert f.matches("LinearLayer", "model.layers.3.mlp.up_proj")
    assert not f.matches("LinearLayer", "model.layers.3.mlp.up_proj_extra")
    assert not f.matches("LinearLayer", "model.layers.3.self_attn.q_proj")


def test_one_selection_rule_for_every_role():
    """QuantConfig.selects is the one copy of HQT's allow/block rule (patch filters, convert, KV cache, attention)."""
    def c(**lists):
        return QuantConfig.from_dict({"method": "HOOKS", **lists})

    q = "model.layers.0.self_attn.q_proj"
    kv = "model.layers.0.self_attn.kv_cache"
    qk = "model.layers.0.self_attn.matmul_qk"
    assert c().selects("linear", {"Linear"}, q) and c().selects("kv_cache", "KVCache", kv)  # empty: all supported
    assert not c().selects("attention", "Matmul", qk)  # attention is opt-in
    assert c(allowlist={"types": ["Matmul"]}).selects("attention", "Matmul", qk)
    assert c(allowlist={"types": ["Matmul"]}).selects("linear", {"Linear"}, q)  # Matmul alone narrows nothing else
    assert not c(allowlist={"types": ["Matmul"]}).selects("attention", "Softmax", "model.layers.0.self_attn.softmax")
    narrow = c(allowlist={"types": ["LinearAllreduce"], "names": [r"layers\.1\."]})
    assert narrow.selects("linear", {"Linear", "LinearAllreduce"}, q)  # any of its type names
    assert not narrow.selects("linear", {"Linear", "LinearLayer"}, q) and not narrow.selects("kv_cache", "KVCache", kv)
    assert narrow.selects("kv_cache", "KVCache", "model.layers.1.self_attn.kv_cache")  # by name
    blocked = c(allowlist={"types": ["Matmul"]}, blocklist={"names": ["layers\\.0\\."]})
    assert not blocked.selects("linear", {"Linear"}, q) and not blocked.selects("attention", "Matmul", qk)
    assert not c(blocklist={"types": ["MixtralExperts"]}).selects("experts", "MixtralExperts", "m.experts")
    with pytest.raises(ValueError, match="role 'conv'"):
        c().selects("conv", "Conv2d", "m")


def test_check_config_cli(tmp_path, capsys):
    assert cli.main(["check-config", str(write(tmp_path, HQT_QUANT))]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert cli.main(["check-config", str(write(tmp_path, {"method": "HOOKS", "mdoe": "MEASURE"}))]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown key 'mdoe'" in err and "did you mean 'mode'" in err and len(err.splitlines()) == 1
