"""prep_model on plain single-process models: filters, swap, MEASURE -> QUANTIZE, errors, save at exit."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ds_quant
from ds_quant.errors import MeasurementError
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics.scales import sqnr_db


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(32, 96), "down_proj": nn.Linear(96, 32, bias=False)})
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        x = x + self.attn(x)
        return self.norm(x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(32, 50)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


class MyLinear(nn.Linear):
    """Inherits nn.Linear.forward: a plain linear, patched."""


class GatedLinear(nn.Linear):
    """Overrides forward with other math: never matched by accident."""

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def tiny():
    torch.manual_seed(0)
    return Tiny().to(torch.bfloat16).eval()


def cfg(tmp_path, **kw):
    return {"method": "HOOKS", "dump_stats_path": str(tmp_path / "m" / "stats"), **kw}


def calibrate(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 7, 32, dtype=torch.bfloat16))


def linear_types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if "Linear" in type(m).__name__}


def test_measure_then_quantize_single_process(tmp_path):
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    ref = tiny()(x)
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    assert set(linear_types(measured).values()) == {"MeasuredLinear"} and len(linear_types(measured)) == 9
    with torch.no_grad():
        assert torch.equal(measured(x), ref), "MEASURE must compute exactly what the original computes"
    calibrate(measured)
    assert ds_quant.finish_measurements(measured) == str(tmp_path / "m" / "stats.json")
    assert (tmp_path / "m" / "stats_0_1.json").exists()
    doc = json.loads((tmp_path / "m" / "stats.json").read_text())
    rec = doc["layers"]["blocks.0.mlp.up_proj"]
    assert rec["samples"] == 3 * 4 * 7 + 2 * 5 and len(rec["input_channel_amax"]) == 32
    assert rec["output_amax"] is None  # HQT's default measure_exclude is OUTPUT

    quant = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="QUANTIZE"))
    assert set(linear_types(quant).values()) == {"Fp8Linear"}
    assert all(m.weight.dtype is torch.float8_e4m3fn for m in quant.modules() if isinstance(m, Fp8Linear))
    with torch.no_grad():
        y = quant(x)
    # 5 quantized GEMMs in series through residuals and LayerNorms; per-GEMM noise is ~26 dB (see
    # test_scales), and accumulating it over depth costs a few dB: 18 dB still fails on any scale bug.
    assert y.dtype is torch.bfloat16 and sqnr_db(ref.float(), y.float()) > 18


def test_what_ds_quant_keeps_on_a_model_is_one_prepared_state(tmp_path):
    """One attribute on the user's model (state_of reads it): config, MEASURE's run id, whether it finished."""
    from ds_quant.layers.state import STATE_ATTR, state_of

    assert state_of(tiny()) is None
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    state = state_of(measured)
    assert state.config.mode.value == "MEASURE" and len(state.run) == 16 and not state.finished
    calibrate(measured)
    ds_quant.finish_measurements(measured)
    assert state_of(measured).finished
    ours = [k for k in vars(measured) if "ds_quant" in k]
    assert ours == [STATE_ATTR], ours
    quant = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="QUANTIZE"))
    assert state_of(quant).config.mode.value == "QUANTIZE" and state_of(quant).run is None


def test_allowlist_blocklist_by_type_and_regex(tmp_path):
    model = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE", allowlist={"names": [r"blocks\.\d+\.mlp"]},
                                            blocklist={"names": [r"down_proj$"]}))
    patched = {n for n, t in linear_types(model).items() if t == "MeasuredLinear"}
    assert patched == {"blocks.0.mlp.up_proj", "blocks.1.mlp.up_proj"}
    model = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE", blocklist={"names": ["lm_head"]}))
    assert linear_types(model)["lm_head"] == "Linear" and len(
        [t for t in linear_types(model).values() if t == "MeasuredLinear"]) == 8
    model = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE", allowlist={"types": ["LinearAllreduce"]}))
    assert "MeasuredLinear" not in linear_types(model).values()  # plain model: no DeepSpeed layers to allow


def test_subclasses_are_matched_by_behaviour_not_by_accident(tmp_path):
    model = nn.Sequential(GatedLinear(8, 8), MyLinear(8, 8), nn.Linear(8, 8))
    ds_quant.prep_model(model, cfg(tmp_path, mode="MEASURE"))
    assert [type(m).__name__ for m in model] == ["GatedLinear", "MeasuredLinear", "MeasuredLinear"]


class FusedExperts(nn.Module):
    """3-D weights in a module that is no linear, without the fused-experts pair ds_quant patches."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 8))


def test_unhandled_3d_weights_are_named_and_counted_not_skipped_silently(tmp_path):
    from ds_quant.layers.patch import format_skipped, skipped_tp_layers

    model = nn.ModuleDict({"experts": FusedExperts(), "conv": nn.Conv1d(2, 2, 3), "lin": nn.Linear(8, 8)})
    ds_quant.prep_model(model, cfg(tmp_path, mode="MEASURE"))
    assert type(model["lin"]) is MeasuredLinear
    skipped = skipped_tp_layers(model)
    assert [(n, c) for n, c, _ in skipped] == [("experts", "FusedExperts"), ("conv", "Conv1d")]
    assert skipped[0][2].startswith("holds 3-D weights (gate_up_proj 4x16x8): no 3-D gate_up_proj and down_proj "
                                    "pair")
    assert "a convolution" in skipped[1][2]
    assert format_skipped(skipped) == "2 layer(s): 1 Conv1d, 1 FusedExperts"


def test_model_that_is_a_linear(tmp_path):
    model = ds_quant.prep_model(nn.Linear(8, 4), cfg(tmp_path, mode="MEASURE"))
    assert isinstance(model, MeasuredLinear)


def test_unit_scale_needs_no_measurements(tmp_path):
    model = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="QUANTIZE", scale_method="unit_scale"))
    assert all(m.input_scale.item() == 1.0 for m in model.modules() if isinstance(m, Fp8Linear))


def test_missing_measurements_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(MeasurementError, match=r"no measurements at .*stats\.json .*run MEASURE first"):
        ds_quant.prep_model(tiny(), cfg(tmp_path, mode="QUANTIZE"))


def test_layers_without_measurements_are_named_and_model_is_untouched(tmp_path):
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE", blocklist={"names": ["lm_head"]}))
    calibrate(measured)
    ds_quant.finish_measurements(measured)
    model = tiny()
    with pytest.raises(MeasurementError, match=r"no measurements for layers \['lm_head'\]"):
        ds_quant.prep_model(model, cfg(tmp_path, mode="QUANTIZE"))
    assert "Fp8Linear" not in linear_types(model).values()


def test_shape_mismatch_is_named(tmp_path):
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    calibrate(measured)
    ds_quant.finish_measurements(measured)
    other = tiny()
    other.lm_head = nn.Linear(32, 60)
    with pytest.raises(MeasurementError, match=r"lm_head: measured 50x32, model 60x32"):
        ds_quant.prep_model(other, cfg(tmp_path, mode="QUANTIZE"))


def test_changed_weights_are_caught(tmp_path):
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    calibrate(measured)
    ds_quant.finish_measurements(measured)
    other = tiny()
    with torch.no_grad():
        other.lm_head.weight.mul_(10)
    with pytest.raises(ValueError, match="layer 'lm_head': weight max-abs .* weights changed since MEASURE"):
        ds_quant.prep_model(other, cfg(tmp_path, mode="QUANTIZE"))


def test_nan_and_inf_in_calibration_are_counted_never_a_nan_or_zero_scale(tmp_path, caplog_ds):
    """An overflowed activation (Inf) or a NaN must not become the layer's max-abs: it is left out, counted per
    layer in the file and named in the log; the FP8 model's scales stay finite and non-zero."""
    measured = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    calibrate(measured)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    x[0, 0, 3], x[1, 2, 5], x[1, 3, 0] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        measured(x)
    with caplog_ds.at_level("WARNING"):
        ds_quant.finish_measurements(measured)
    doc = json.loads((tmp_path / "m" / "stats.json").read_text())
    first = next(iter(doc["layers"]))  # the layer that saw x as it is
    assert doc["layers"][first]["nonfinite_inputs"] == 3
    for rec in doc["layers"].values():
        assert all(v == v and v != float("inf") for v in rec["input_channel_amax"]) and rec["input_amax"] > 0
    # NaN spreads through the layers after the first: each is counted and named.
    bad = sum(1 for rec in doc["layers"].values() if rec["nonfinite_inputs"])
    assert f"MEASURE: {bad} layer(s) saw NaN/Inf inputs, left out of their statistics" in caplog_ds.text
    quantized = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="QUANTIZE"))
    for m in quantized.modules():
        if isinstance(m, Fp8Linear):
            for scale in (m.input_scale, m.weight_scale):
                assert torch.isfinite(scale).all() and (scale > 0).all(), m.name


def test_prepare_twice_is_refused(tmp_path):
    model = ds_quant.prep_model(tiny(), cfg(tmp_path, mode="MEASURE"))
    with pytest.raises(RuntimeError, match="already prepared"):
        ds_quant.prep_model(model, cfg(tmp_path, mode="MEASURE"))


def test_no_config_anywhere(monkeypatch):
    monkeypatch.delenv("QUANT_CONFIG", raising=False)
    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(ds_quant.ConfigError, match="no quantization config"):
        ds_quant.prep_model(tiny())


def test_patched_modules_table_with_quant_verbose(tmp_path):
    script = textwrap.dedent(f"""
        import torch, ds_quant
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        ds_quant.prep_model(model, {{"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": "{tmp_path}/s"}})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"QUANT_VERBOSE": "1", "PATH": "/usr/bin:/bin"})
    assert "Patched modules (2):" in out.stdout and "count: 2 Linear -> MeasuredLinear" in out.stdout
    assert "[ds_quant rank 0] INFO MEASURE: patched 2 linear layer(s)" in out.stderr


def test_measurements_saved_at_exit_without_finish(tmp_path):
    """A script that never calls finish_measurements (QUANT_CONFIG from the environment) still leaves files."""
    script = textwrap.dedent("""
        import torch, ds_quant
        model = ds_quant.prep_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        model(torch.ones(3, 4))
    """)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}))
    subprocess.run([sys.executable, "-c", script], check=True, env={"QUANT_CONFIG": str(config), "PATH": "/usr/bin"})
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["layers"]["0"]["samples"] == 3 and doc["layers"]["0"]["input_amax"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "s.json", "s_0_1.json"]  # no temp files


def test_import_does_not_import_deepspeed():
    code = "import sys, ds_quant; assert 'deepspeed' not in sys.modules, 'ds_quant imported deepspeed'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_patched_modules_table_names_the_fp8_gemm_backend(tmp_path, monkeypatch):
    """QUANTIZE's report and the log say which ops backend serves each FP8 layer (here: the reference, since
    the kernel is switched off, and why)."""
    monkeypatch.setenv("DS_QUANT_CPU_KERNEL", "0")
    script = textwrap.dedent("""
        import torch, ds_quant
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        ds_quant.prep_model(model, {"method": "HOOKS", "mode": "QUANTIZE",
                                    "scale_method": "act_dynamic_per_token_weights_pcs"})
    """)
    env = {"QUANT_VERBOSE": "1", "PATH": "/usr/bin:/bin", "DS_QUANT_CPU_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert "FP8 GEMM" in out.stdout.splitlines()[1]  # the column header
    assert out.stdout.count("reference (DS_QUANT_CPU_KERNEL=0: pure-torch reference)") == 2
    assert "2 layer(s) run the pure-torch reference FP8 GEMM (DS_QUANT_CPU_KERNEL=0" in out.stderr
