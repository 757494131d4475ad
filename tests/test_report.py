"""The statistics workbook, the per-layer SQNR report, auto-blocklist and `ds-quant report` (single process)."""

import json
import math

import pytest
import torch
from openpyxl import load_workbook
from torch import nn

import ds_quant
from ds_quant import cli
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics.scales import sqnr_db
from ds_quant.report import quantize_with_report


class Net(nn.Module):
    """Four linears whose FP8 errors differ: `spiky` has one weight 2e4x the rest, on an input channel that
    is always 0 (`up` has a zero row there), so the spike sets the per-tensor scale but carries no signal:
    most other weights fall to FP8 subnormals (low SQNR); the others are Gaussian (~29 dB)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.spiky = nn.Linear(64, 64, bias=False)
        self.mid = nn.Linear(64, 48)
        self.head = nn.Linear(48, 40, bias=False)
        with torch.no_grad():
            self.up.weight[5].zero_()
            self.up.bias[5] = -1.0  # relu(-1) = 0: spiky's input channel 5 is always 0
            self.spiky.weight[3, 5] = 2e4 * self.spiky.weight.abs().max()

    def forward(self, x):
        x = torch.relu(self.up(x))
        x = x + 0.01 * self.spiky(x)
        return self.head(torch.relu(self.mid(x)))


def net():
    torch.manual_seed(0)
    return Net().to(torch.bfloat16).eval()


def batches(n=3, outlier_channel=None):
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(4, 9, 32, generator=g).to(torch.bfloat16) for _ in range(n)]
    if outlier_channel is not None:
        out[0][0, 0, outlier_channel] = 300.0
    return out


def measure(tmp_path, **extra):
    cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "m" / "stats"), **extra}
    model = ds_quant.prep_model(net(), cfg)
    with torch.no_grad():
        for b in batches(outlier_channel=7):
            model(b)
    return ds_quant.finish_measurements(model)


def quant_cfg(tmp_path, **extra) -> QuantConfig:
    return QuantConfig.from_dict({"method": "HOOKS", "mode": "QUANTIZE", "scale_method": "maxabs_arbitrary",
                                  "dump_stats_path": str(tmp_path / "m" / "stats"), **extra})


def test_workbook_holds_every_patched_layer_with_scales_and_highlights(tmp_path):
    xlsx = tmp_path / "out" / "stats.xlsx"
    merged = measure(tmp_path, dump_stats_xlsx_path=str(xlsx))
    wb = load_workbook(xlsx)
    assert wb.sheetnames == ["model", "rank 0", "about"]
    ws = wb["model"]
    header = [c.value for c in ws[1]]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    assert set(rows) == {"up", "spiky", "mid", "head"}
    assert ws.freeze_panes == "B2"
    doc = json.loads(open(merged).read())
    for name, rec in doc["layers"].items():
        assert rows[name]["input_amax"] == pytest.approx(rec["input_amax"])
        assert rows[name]["out_features"] == rec["out_features"] and rows[name]["samples"] == 3 * 4 * 9
    # maxabs_arbitrary: scale = amax / (448 * backoff), 0.25 for inputs and 0.5 for weights.
    up = rows["up"]
    assert up["input_scale[maxabs_arbitrary]"] == pytest.approx(up["input_amax"] / (448 * 0.25), rel=1e-6)
    assert up["weight_scale[maxabs_arbitrary]"] == pytest.approx(up["weight_amax"] / (448 * 0.5), rel=1e-6)
    # The layer's QUANTIZE method and scales (its LayerSpec) come first, then the configured method's columns.
    assert header[10:14] == ["scale_method", "input_scale", "weight_scale", "input_scale[maxabs_hw]"]
    assert up["scale_method"] == "maxabs_hw" and up["input_scale"] == up["input_scale[maxabs_hw]"]
    # Channel 7 of `up`'s input got 300 against ~3 elsewhere: its outlier ratio cell is highlighted;
    # `spiky`'s weight max-abs is far above the other layers'.
    col = {h: i + 1 for i, h in enumerate(header)}
    line = {name: i + 2 for i, name in enumerate(rows)}
    filled = {(r, c) for r in range(2, ws.max_row + 1) for c in range(1, ws.max_column + 1)
              if ws.cell(r, c).fill.fill_type == "solid"}
    assert (line["up"], col["input_channel_outlier"]) in filled
    assert (line["spiky"], col["weight_amax"]) in filled
    assert (line["mid"], col["weight_amax"]) not in filled


def test_report_sqnr_matches_a_direct_computation(tmp_path):
    measure(tmp_path)
    cfg = quant_cfg(tmp_path)
    reference = net()
    data = batches()
    model, report = quantize_with_report(net(), cfg, data)
    # Direct: each layer's high-precision input, through a separately built FP8 layer.
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, y, n=n: inputs.setdefault(n, []).append((a[0], y)))
             for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref_out = [reference(b) for b in data]
    for h in hooks:
        h.remove()
    direct = ds_quant.prep_model(net(), cfg)
    fp8 = {n: m for n, m in direct.named_modules() if isinstance(m, Fp8Linear)}
    by_name = {e.name: e for e in report.layers}
    with torch.no_grad():
        for name, pairs in inputs.items():
            y_hp = torch.cat([y.float().flatten() for _, y in pairs])
            y_q = torch.cat([fp8[name](x).float().flatten() for x, _ in pairs])
            assert by_name[name].sqnr_db == pytest.approx(sqnr_db(y_hp, y_q), abs=1e-6)
        out = torch.cat([model(b).float().flatten() for b in data])
    assert report.output_sqnr_db == pytest.approx(sqnr_db(torch.cat([r.float().flatten() for r in ref_out]), out),
                                                  abs=1e-6)
    assert [e.sqnr_db for e in report.layers] == sorted(e.sqnr_db for e in report.layers)
    assert report.layers[0].name == "spiky" and report.layers[0].sqnr_db < report.layers[1].sqnr_db - 5
    assert not report.blocked and "spiky" in report.format()


def test_auto_blocklist_leaves_exactly_the_layers_below_the_threshold_in_bf16(tmp_path):
    measure(tmp_path)
    _, first = quantize_with_report(net(), quant_cfg(tmp_path), batches())
    values = sorted(e.sqnr_db for e in first.layers)
    threshold = (values[1] + values[2]) / 2  # two layers below, two above
    model, report = quantize_with_report(net(), quant_cfg(tmp_path, auto_blocklist_sqnr_db=threshold), batches())
    below = {e.name for e in first.layers if e.sqnr_db < threshold}
    assert len(below) == 2 and set(report.blocked) == below
    kinds = {n: type(m) for n, m in model.named_modules() if n in ("up", "spiky", "mid", "head")}
    assert {n for n, t in kinds.items() if t is nn.Linear} == below
    assert {n for n, t in kinds.items() if t is Fp8Linear} == {"up", "spiky", "mid", "head"} - below
    assert "kept in high precision" in report.format()
    # Keeping the worst layers in high precision can only bring the output closer to the reference.
    assert report.output_sqnr_db > first.output_sqnr_db


@pytest.mark.parametrize("value", ["20", True, -1, math.inf])
def test_auto_blocklist_sqnr_db_is_validated(value):
    with pytest.raises(ConfigError, match="auto_blocklist_sqnr_db"):
        QuantConfig.from_dict({"method": "HOOKS", "auto_blocklist_sqnr_db": value})


def test_report_command_on_the_trained_tiny_llama(tmp_path, capsys):
    """`ds-quant report` end to end on real (trained) weights, single process."""
    from pathlib import Path

    model_dir = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_trained"
    texts = tmp_path / "calib.txt"
    texts.write_text("def f(x):\n    return x + 1\n\nThe for statement iterates over a sequence.\n\n"
                     "Exceptions are raised with the raise statement.\n")
    base = {"method": "HOOKS", "dump_stats_path": str(tmp_path / "tl" / "stats")}
    (tmp_path / "measure.json").write_text(json.dumps({**base, "mode": "MEASURE"}))
    (tmp_path / "quant.json").write_text(json.dumps({**base, "mode": "QUANTIZE", "auto_blocklist_sqnr_db": 25}))
    common = ["--model", str(model_dir), "--text", str(texts)]
    assert cli.main(["report", *common, "--quant-config", str(tmp_path / "measure.json")]) == 0
    assert cli.main(["report", *common, "--quant-config", str(tmp_path / "quant.json"),
                     "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["layers"]) == 29 and "lm_head" in printed
    assert rep["blocked"] == sorted(e["name"] for e in rep["layers"] if e["sqnr_db"] < 25)
    assert rep["output_sqnr_db"] > 15  # 4 trained decoder layers + lm_head in FP8 (measured ~25 dB)
