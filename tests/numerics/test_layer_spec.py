"""Config becomes numbers once (issue 13 item 3): `layer_spec.resolve` gives each layer its numbers, and the FP8
twins (QUANTIZE), the statistics workbook and `ds-quant inspect --quant-config` all take them from it.

The agreement tests compare floats with `==`: the three paths compute the same float32 formula from the same
measured max-abs, so any difference at all means one of them used other numbers (the bug this fixes was a factor
4, from `input_backoff` 1.0 ignored by the workbook and inspect)."""

import json
import re
from dataclasses import replace

import pytest
import torch
from openpyxl import load_workbook

import ds_quant
from ds_quant.cli import main
from ds_quant.config import ActScope, QuantConfig, ScaleMethod
from ds_quant.files.tables import layer_table, workbook_rows
from ds_quant.layers.experts import Fp8Experts
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics import layer_spec
from ds_quant.numerics.layer_spec import Kind, record_scales, record_spec, resolve

OVERRIDE = r"mlp\.down_proj"  # these layers use maxabs_pow2; every other layer the default maxabs_hw


def settings(tmp_path, **extra) -> dict:
    return {"method": "HOOKS", "mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m" / "stats"),
            "scale_params": {"input_backoff": 1.0, "weight_backoff": 0.5},
            "scale_method_overrides": {OVERRIDE: "maxabs_pow2"}, **extra}


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    """MEASURE the tiny Llama once with the config's numbers (and its workbook): (tmp dir, merged file)."""
    tmp = tmp_path_factory.mktemp("spec")
    cfg = settings(tmp, mode="MEASURE", dump_stats_xlsx_path=str(tmp / "stats.xlsx"))
    model = ds_quant.prep_model(load(tiny_model), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, 256, (2, 24)))
    return tmp, ds_quant.finish_measurements(model)


def twins_scales(model_dir, cfg) -> dict:
    model = ds_quant.prep_model(load(model_dir), cfg)
    return {n: (float(m.input_scale), m.weight_scale) for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def inspect_rows(merged, cfg_path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", merged, "--json", "--quant-config", str(cfg_path)]) == 0
    return {r["layer"]: r for r in json.loads(capsys.readouterr().out)["layers"]}


def book_rows(doc, cfg) -> dict:
    header, table = workbook_rows(doc, cfg)
    return {r[0]: dict(zip(header, r, strict=True)) for r in table}


def three_views(measured, tiny_model, capsys, name="quant.json", **extra):
    """One config's scales as the FP8 twins, `inspect --quant-config` and the workbook rows give them."""
    tmp, merged = measured
    cfg_path = tmp / name
    cfg_path.write_text(json.dumps(settings(tmp, **extra)))
    cfg = QuantConfig.from_json(cfg_path)
    doc = json.loads(open(merged).read())
    return cfg, cfg_path, doc, twins_scales(tiny_model, cfg), inspect_rows(merged, cfg_path, capsys), \
        book_rows(doc, cfg)


def sheet_rows(path, sheet="model") -> dict:
    ws = load_workbook(path)[sheet]
    header = [c.value for c in ws[1]]
    return {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}


def test_twins_workbook_and_inspect_agree_layer_by_layer(measured, tiny_model, capsys):
    tmp, merged = measured
    cfg, _, doc, twins, shown, book = three_views(measured, tiny_model, capsys)
    # The workbook MEASURE wrote from the same settings. openpyxl writes a number as 16 significant digits
    # ('%.16g'), so a float64 read back from the file may differ in the 17th digit: compared to 1e-15 relative.
    cells = sheet_rows(tmp / "stats.xlsx")
    assert set(twins) == set(shown) == set(book) == set(cells) == set(doc["layers"]) and len(twins) == 4 * 7 + 1
    overridden = [n for n in twins if re.search(OVERRIDE, n)]
    assert len(overridden) == 4
    for name, (in_scale, w_scale) in twins.items():
        method = "maxabs_pow2" if name in overridden else "maxabs_hw"
        assert shown[name]["scale_method"] == book[name]["scale_method"] == cells[name]["scale_method"] == method
        assert shown[name]["input_scale"] == book[name]["input_scale"] == in_scale, name
        assert shown[name]["weight_scale"] == book[name]["weight_scale"] == float(w_scale), name
        assert cells[name]["input_scale"] == pytest.approx(in_scale, rel=1e-15, abs=0), name
        assert cells[name]["weight_scale"] == pytest.approx(float(w_scale), rel=1e-15, abs=0), name
        rec = doc["layers"][name]
        if method == "maxabs_hw":  # CUDA takes any scale: amax / (448 * backoff), input_backoff 1.0 as configured
            assert in_scale == pytest.approx(rec["input_amax"] / 448, rel=1e-6), name
            assert float(w_scale) == pytest.approx(rec["weight_amax"] / (448 * 0.5), rel=1e-6), name
        else:  # pow2 rounds up: within a factor 2 above the exact scale
            assert in_scale == 2.0 ** round(torch.log2(torch.tensor(in_scale)).item()), name
            assert rec["input_amax"] / 448 <= in_scale < 2 * rec["input_amax"] / 448, name
    # Without --quant-config inspect keeps HQT's default backoffs: a quarter of the range, 4x the scale.
    capsys.readouterr()
    assert main(["inspect", merged, "--json", "--scale-method", "maxabs_hw"]) == 0
    fixed = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    plain = next(n for n in twins if n not in overridden)
    assert fixed[plain]["input_scale"] == pytest.approx(4 * twins[plain][0], rel=1e-6)
    assert "scale_method" not in fixed[plain]


def test_outlier_channels_agree_on_the_input_scale(measured, tiny_model, capsys):
    cfg, _, doc, twins, shown, book = three_views(measured, tiny_model, capsys, "quant_outliers.json",
                                                  outlier_channels=4)
    lowered = 0
    for name, (in_scale, w_scale) in twins.items():
        assert shown[name]["input_scale"] == book[name]["input_scale"] == in_scale, name
        # the weight without its outlier columns: only its upper bound is known without the weights
        bound = float(re.fullmatch(r"<= (\S+) \(outliers\)", shown[name]["weight_scale"])[1])
        assert float(w_scale) <= bound * (1 + 1e-5), name
        lowered += in_scale < float(record_scales(resolve(cfg, name).with_method(cfg.method_for(name)),
                                                  {**doc["layers"][name], "input_channel_amax": None})[0])
    assert lowered > 0  # the outlier channels did set some layers' input max-abs: the test compares something


def test_every_consumer_takes_its_numbers_from_the_spec(measured, tiny_model, capsys, monkeypatch):
    """Divergence: one layer's spec is changed behind the config's back (input backoff halved, weight backoff
    halved). A consumer that reads the config itself instead of the spec keeps the old numbers and fails here."""
    _, merged = measured
    cfg, cfg_path, doc, before_twins, before_shown, before_book = three_views(measured, tiny_model, capsys)
    target = "model.layers.1.self_attn.k_proj"
    real = layer_spec.resolve

    def patched(config, name, kind=Kind.LINEAR):
        spec = real(config, name, kind)
        if name == target:
            return replace(spec, input_backoff=spec.input_backoff / 2, weight_backoff=spec.weight_backoff / 2)
        return spec

    monkeypatch.setattr(layer_spec, "resolve", patched)
    after_twins = twins_scales(tiny_model, cfg)
    after_shown = inspect_rows(merged, cfg_path, capsys)
    after_book = book_rows(doc, cfg)
    for name in before_twins:
        factor = 2.0 if name == target else 1.0  # maxabs_hw on CUDA: exact, so exactly doubled
        assert after_twins[name][0] == factor * before_twins[name][0], name
        assert float(after_twins[name][1]) == factor * float(before_twins[name][1]), name
        for before, after in ((before_shown, after_shown), (before_book, after_book)):
            assert after[name]["input_scale"] == factor * before[name]["input_scale"], name
            assert after[name]["weight_scale"] == factor * before[name]["weight_scale"], name
    assert after_shown[target]["input_scale"] == after_book[target]["input_scale"] == after_twins[target][0]


def test_resolve_applies_overrides_backoffs_and_kind():
    cfg = QuantConfig.from_dict({"method": "HOOKS", "scale_params": {"input_backoff": 1.0, "weight_backoff": 0.25},
                                 "scale_method_overrides": {"lm_head": "maxabs_pow2"}, "fp8_config": "E5M2",
                                 "device_for_scales": "gaudi2", "act_scope": "rank", "outlier_channels": 3})
    head, other = resolve(cfg, "lm_head"), resolve(cfg, "model.layers.0.mlp.up_proj")
    assert head.method is ScaleMethod.MAXABS_POW2 and other.method is ScaleMethod.MAXABS_HW
    assert (head.input_backoff, head.weight_backoff) == (1.0, 0.25)
    assert head.fp8_dtype is torch.float8_e5m2 and other.fp8_max == float(torch.finfo(torch.float8_e5m2).max)
    assert head.act_scope is ActScope.RANK and head.outlier_channels == 3
    experts = resolve(cfg, "model.layers.0.mlp.experts", "experts")
    assert experts.outlier_channels == 0 and experts.act_scope is ActScope.GLOBAL  # whole on every rank
    # an expert's record resolves to its block
    assert record_spec(cfg, "model.layers.0.mlp.experts.down_proj.3") == experts
    assert record_spec(cfg, "model.layers.0.mlp.experts.3.down_proj").kind is Kind.LINEAR
    assert resolve(QuantConfig(), "x").input_backoff == 0.25  # HQT's default


def test_record_scales_formulas():
    spec = resolve(QuantConfig(scale_method="maxabs_arbitrary"), "l")
    rec = {"input_amax": 448.0, "weight_amax": 448.0, "in_features": 4, "kind": "plain"}
    assert record_scales(spec, rec) == (4.0, 2.0)  # 448 / (448 * 0.25), 448 / (448 * 0.5)
    assert record_scales(spec.with_method("act_dynamic_per_token_weights_pcs"), rec) == ("dynamic", "per-channel")
    assert record_scales(spec.with_method("maxabs_hw_opt_weight"), rec)[1] == "<= 2 (opt)"
    rank = replace(spec, act_scope=ActScope.RANK)
    assert record_scales(rank, {**rec, "kind": "row"})[0] == "per-rank"
    assert record_scales(rank, rec)[0] == 4.0  # a plain layer's input is whole on every rank
    assert record_scales(spec, {**rec, "input_amax": None, "weight_amax": None}) == (None, None)


def test_twins_refuse_a_config_with_the_fix():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"layer_spec.resolve\(config, name\)"):
        Fp8Linear.from_original(lin, "l", QuantConfig(scale_method="unit_scale"), None)
    with pytest.raises(TypeError, match="LayerSpec"):
        MeasuredLinear.from_original(lin, "l", QuantConfig(mode="MEASURE"))
    with pytest.raises(TypeError, match="LayerSpec"):
        Fp8Experts.from_original(lin, "e", QuantConfig(), None)


def test_inspect_quant_config_text_and_flag_conflict(measured, capsys):
    tmp, merged = measured
    cfg_path = tmp / "quant.json"
    cfg_path.write_text(json.dumps(settings(tmp)))
    capsys.readouterr()
    assert main(["inspect", merged, "--quant-config", str(cfg_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "scales QUANTIZE uses with" in out[0] and "input_backoff 1, weight_backoff 0.5" in out[0]
    assert "1 override(s)" in out[0] and out[1].split()[-1] == "method"
    down = next(line for line in out if line.startswith("model.layers.0.mlp.down_proj"))
    assert down.split()[-1] == "maxabs_pow2"
    assert main(["inspect", merged, "--quant-config", str(cfg_path), "--fp8", "E5M2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ds-quant inspect: --fp8 and --quant-config both set the scales; drop the flag")
    assert main(["inspect", merged, "--quant-config", str(tmp / "nope.json")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_layer_table_with_specs_equals_the_fixed_table_for_default_settings(measured):
    _, merged = measured
    doc = json.loads(open(merged).read())
    cfg = QuantConfig(scale_method="maxabs_pow2")
    with_specs = layer_table(doc, specs=layer_spec.table_specs(doc, cfg))
    fixed = layer_table(doc, "maxabs_pow2")
    assert [{k: v for k, v in r.items() if k != "scale_method"} for r in with_specs] == fixed


def test_experts_twin_agrees_with_the_tables_through_the_blocks_spec(tmp_path, capsys):
    """Fused experts: each expert projection's record resolves to its block's spec (`experts$` matches the block's
    name, not the records'), so inspect, the workbook and the FP8 experts' per-expert scales agree; expert 3, never
    routed in calibration, takes its block's largest input max-abs in all three."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    n_experts, hidden = 4, 32

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = mixtral.MixtralConfig(hidden_size=hidden, intermediate_size=48, num_local_experts=n_experts,
                                           num_experts_per_tok=2)
            config._experts_implementation = "eager"
            torch.manual_seed(0)
            self.experts = mixtral.MixtralExperts(config)
            torch.nn.init.normal_(self.experts.gate_up_proj, std=0.1)
            torch.nn.init.normal_(self.experts.down_proj, std=0.1)
            self.experts.to(torch.bfloat16)

        def forward(self, x, idx, w):
            return self.experts(x, idx, w)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, hidden, generator=g).bfloat16()
    scores = torch.rand(64, n_experts, generator=g)
    scores[:, 3] = -1  # the router never picks expert 3; 64 tokens reach every other one
    w, idx = scores.topk(2, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).bfloat16()
    base = {**settings(tmp_path), "scale_method_overrides": {"experts$": "maxabs_pow2"}}
    with torch.no_grad():
        block = ds_quant.prep_model(Block(), {**base, "mode": "MEASURE"})
        block(x, idx, w)
        merged = ds_quant.finish_measurements(block)
    cfg_path = tmp_path / "quant.json"
    cfg_path.write_text(json.dumps(base))
    cfg = QuantConfig.from_json(cfg_path)
    fp8 = ds_quant.prep_model(Block(), cfg).experts
    assert isinstance(fp8, Fp8Experts)
    shown = inspect_rows(merged, cfg_path, capsys)
    doc = json.loads(open(merged).read())
    header, table = workbook_rows(doc, cfg)
    book = {r[0]: dict(zip(header, r, strict=True)) for r in table}
    assert len(shown) == 2 * n_experts
    for proj in ("gate_up_proj", "down_proj"):
        for e in range(n_experts):
            name = f"experts.{proj}.{e}"
            assert (doc["layers"][name]["samples"] == 0) == (e == 3), name
            in_scale = float(getattr(fp8, f"{proj}_input_scale")[e])
            w_scale = float(getattr(fp8, f"{proj}_scale")[e])
            assert shown[name]["scale_method"] == book[name]["scale_method"] == "maxabs_pow2", name
            assert shown[name]["input_scale"] == book[name]["input_scale"] == in_scale, name
            assert shown[name]["weight_scale"] == book[name]["weight_scale"] == w_scale, name
            assert in_scale >= doc["layers"][name]["input_amax"] / 448  # input_backoff 1.0, rounded up to 2^k
        top = max(float(getattr(fp8, f"{proj}_input_scale")[e]) for e in range(n_experts))
        assert float(getattr(fp8, f"{proj}_input_scale")[3]) == top > 0  # the unseen expert: the largest


def test_convert_gives_the_same_scales_as_the_twins(measured, tiny_model):
    """`ds-quant convert` (convert.quantize_linear: the one weight path, numerics/weights.py, with each linear's
    spec) lands on the same numbers as the twins for this config: exact equality, same float32 formulas on the
    same weights."""
    from ds_quant.workflows.quantize import quantize_linear

    tmp, merged = measured
    cfg = QuantConfig.from_dict(settings(tmp))
    twins = twins_scales(tiny_model, cfg)
    doc = json.loads(open(merged).read())
    weights = {n: m.weight.detach() for n, m in load(tiny_model).named_modules() if n in twins}
    for name, (in_scale, w_scale) in twins.items():
        layer, _ = quantize_linear(name, weights[name], resolve(cfg, name), doc["layers"][name])
        assert float(layer.input_scale) == in_scale and float(layer.weight_scale) == float(w_scale), name
