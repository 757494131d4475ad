"""Tables of a measurement file, for people: `ds-quant inspect`'s layer table and the statistics workbook
(`dump_stats_xlsx_path`). Both take each layer's scales from its `layer_spec.LayerSpec`, so they show what
QUANTIZE uses.

The workbook: one sheet for the merged, model-level statistics and one per rank's shard: layer, kind, shapes,
input/output/weight max-abs, samples, the layer's scale method and the input and weight scale QUANTIZE gives it
with the config (its `layer_spec.LayerSpec`), and the input and weight scale every scale method would give.
Cells that stand out are filled: a layer whose max-abs is far above the model's median for that column,
and a layer whose input has outlier channels (max over median channel max-abs). The header row and
the layer column are frozen.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config import QuantConfig, ScaleMethod
from ..numerics.layer_spec import default_spec, record_scales, scaling_records, table_specs
from . import measurements, shards
from .atomic import atomic_write

# A layer's max-abs this many times the median over layers, or an input channel this many times the
# layer's median channel, is an outlier: a per-tensor scale set by it leaves the other values few FP8 steps.
OUTLIER_FACTOR = 10.0

_BASE_COLUMNS = ("layer", "kind", "out_features", "in_features", "local_in_features", "input_amax",
                 "input_channel_outlier", "output_amax", "weight_amax", "samples")
_AMAX_COLUMNS = ("input_amax", "output_amax", "weight_amax")


def workbook_rows(doc: Mapping, config: QuantConfig) -> tuple[list[str], list[list]]:
    """Header and one row per layer of a merged file or shard (no openpyxl). `scale_method`, `input_scale` and
    `weight_scale` are what QUANTIZE gives the layer with this config (its LayerSpec: scale_method_overrides,
    scale_params, outlier channels ...), the same numbers as `ds-quant inspect --quant-config`; then the scales
    every method would give with the config's other settings, the configured method first."""
    specs = table_specs(doc, config)
    scaled = scaling_records(doc)  # an expert unseen in calibration: scaled as QUANTIZE fills it
    methods = [config.scale_method] + [m for m in ScaleMethod if m is not config.scale_method]
    header = list(_BASE_COLUMNS) + ["scale_method", "input_scale", "weight_scale"]
    for m in methods:
        header += [f"input_scale[{m.value}]", f"weight_scale[{m.value}]"]
    out = []
    for name, rec in doc["layers"].items():
        channels = rec.get("input_channel_amax")  # a list, or a float32 array from the companion binary
        channels = [] if channels is None else channels
        spec = specs[name]
        row = [name, rec["kind"], rec["out_features"], rec["in_features"], rec.get("local_in_features", rec["in_features"]),
               rec["input_amax"], channel_outlier_ratio(channels), rec.get("output_amax"), rec.get("weight_amax"),
               rec["samples"], spec.method.value, *record_scales(spec, scaled[name])]
        for m in methods:
            row += list(record_scales(spec.with_method(m), scaled[name]))
        out.append(row)
    return header, out


def channel_outlier_ratio(channels: Sequence[float]) -> float | None:
    """max / median of the per-input-channel max-abs (None when not measured)."""
    if len(channels) == 0:
        return None
    med = statistics.median(channels)
    return float("inf") if med == 0 and max(channels) > 0 else (max(channels) / med if med else 1.0)


def outlier_cells(header: Sequence[str], table: Sequence[Sequence]) -> set[tuple[int, int]]:
    """(row, column) indices (0-based, into `table`) of the values to highlight."""
    cells = set()
    for col in _AMAX_COLUMNS:
        j = header.index(col)
        values = [r[j] for r in table if r[j] is not None]
        if not values:
            continue
        med = statistics.median(values)
        cells |= {(i, j) for i, r in enumerate(table) if r[j] is not None and med > 0 and r[j] > OUTLIER_FACTOR * med}
    j = header.index("input_channel_outlier")
    cells |= {(i, j) for i, r in enumerate(table) if r[j] is not None and r[j] > OUTLIER_FACTOR}
    return cells


def write_workbook(path: str | os.PathLike, merged: Mapping, shards: Sequence[Mapping], config: QuantConfig) -> Path:
    """Write the workbook: sheet "model" (merged), then "rank N" per shard. Returns the path."""
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill

    fill = PatternFill("solid", start_color="FFC7CE", end_color="FFC7CE")
    bold = Font(bold=True)
    wb = Workbook()
    wb.remove(wb.active)
    for title, doc in [("model", merged)] + [(f"rank {s['rank']}", s) for s in sorted(shards, key=lambda s: s["rank"])]:
        ws = wb.create_sheet(title)
        header, table = workbook_rows(doc, config)
        ws.append(header)
        for cell in ws[1]:
            cell.font = bold
        for r in table:
            ws.append(r)
        for i, j in outlier_cells(header, table):
            ws.cell(row=i + 2, column=j + 1).fill = fill
        ws.freeze_panes = "B2"  # header row and layer column stay visible
        ws.column_dimensions["A"].width = max([len(str(r[0])) for r in table] + [8]) + 2
    info = wb.create_sheet("about")
    for k in ("format", "version", "kind", "observer", "dtype", "world_size", "fingerprint"):
        info.append([k, str(merged.get(k))])
    info.append(["scale_method (configured)", config.scale_method.value])
    info.append(["scale_method_overrides", ", ".join(f"{p} -> {m.value}" for p, m in config.scale_method_overrides)
                 or "none"])
    info.append(["input_backoff", config.input_backoff])
    info.append(["weight_backoff", config.weight_backoff])
    info.append(["device_for_scales", config.device_for_scales.value])
    info.append(["fp8_config", config.fp8_config.value])
    info.append(["highlighted", f"max-abs > {OUTLIER_FACTOR:g}x the median over layers; input channel max-abs "
                                f"> {OUTLIER_FACTOR:g}x the layer's median channel"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, wb.save)  # readers never see half a workbook
    return path


def write_workbook_from_files(path: str | os.PathLike, merged_path: str, config: QuantConfig) -> Path:
    """The workbook from the merged file and the shards readable here (rank 0 after MEASURE; on several
    hosts without a shared filesystem, other hosts' shards are missing and their sheets are left out)."""
    merged = measurements.load(merged_path)
    paths = [shards.shard_path(config.dump_stats_path, r, merged["world_size"]) for r in range(merged["world_size"])]
    return write_workbook(path, merged, [measurements.load(f) for f in paths if Path(f).exists()], config)


# -- inspect (`ds-quant inspect FILE`) ----------------------------------------------------------------------
def layer_table(doc: Mapping, scale_method: str = "maxabs_hw", device_for_scales: str = "cuda",
                fp8_config: str = "E4M3", specs: Mapping | None = None) -> list[dict]:
    """One row per layer: kind, full shape, max-abs values and the scales `scale_method` would give
    (per-tensor; per-channel weight scales and opt-weight choices need the weights: shown as such), with HQT's
    default backoffs. `specs` ({record name: LayerSpec}, `layer_spec.table_specs(doc, config)`): each layer's own
    spec instead (a config's scale_params, scale_method_overrides, outlier channels ...), the method in each row."""
    fixed = None if specs is not None else default_spec("", scale_method, device_for_scales, fp8_config)
    scaled = scaling_records(doc) if specs is not None else doc["layers"]  # unseen experts: as QUANTIZE fills them
    rows = []
    for name, rec in doc["layers"].items():
        spec = fixed if specs is None else specs[name]
        in_scale, w_scale = record_scales(spec, scaled[name])
        row = {"layer": name, "kind": rec["kind"], "out_features": rec["out_features"],
               "in_features": rec["in_features"], "input_amax": rec["input_amax"],
               "output_amax": rec.get("output_amax"), "weight_amax": rec.get("weight_amax"), "samples": rec["samples"],
               "input_scale": in_scale, "weight_scale": w_scale}
        if specs is not None:
            row["scale_method"] = spec.method.value
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = [("layer", "layer"), ("kind", "kind"), ("shape", None), ("input_amax", "in amax"),
            ("output_amax", "out amax"), ("weight_amax", "w amax"), ("input_scale", "in scale"),
            ("weight_scale", "w scale"), ("samples", "samples")]
    if rows and "scale_method" in rows[0]:  # per-layer specs (`inspect --quant-config`): each row's method
        cols.append(("scale_method", "method"))
    body = [[r["layer"], r["kind"], f"{cell(r['out_features'])}x{cell(r['in_features'])}",
             *(cell(r[k]) for k, _ in cols[3:])] for r in rows]
    head = [label or "out x in" for _, label in cols]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])
