"""`ds-quant` command line: thin layers over the library."""

from __future__ import annotations

import argparse
import sys

from .config import QuantConfig
from .errors import ConfigError, DsQuantError
from .files import hqt_import, shards, tables
from .files import measurements as ms
from .numerics.layer_spec import table_specs
from .report import command
from .workflows.convert import convert


def check_config(args: argparse.Namespace) -> int:
    QuantConfig.from_json(args.file)
    print("ok")
    return 0


# -- measurement files (merge / inspect / import-hqt) -----------------------------------------------------
def merge_cmd(args: argparse.Namespace) -> int:
    out = shards.merge_files(args.prefix, args.world_size, args.out)
    doc = ms.load(out)
    print(f"merged {doc['world_size']} shard(s), {len(doc['layers'])} layers -> {out}")
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    import json

    flags = {"--scale-method": args.scale_method, "--device-for-scales": args.device_for_scales, "--fp8": args.fp8}
    doc = ms.load(args.file)
    if args.quant_config:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise ConfigError(f"ds-quant inspect: {', '.join(given)} and --quant-config both set the scales; "
                              "drop the flag (the config's scale_method, device_for_scales and fp8_config apply)")

        cfg = QuantConfig.from_json(args.quant_config)
        rows = tables.layer_table(doc, specs=table_specs(doc, cfg))
        what = (f"scales QUANTIZE uses with {args.quant_config} (scale_method {cfg.scale_method.value}"
                + (f", {len(cfg.scale_method_overrides)} override(s)" if cfg.scale_method_overrides else "")
                + f", input_backoff {cfg.input_backoff:g}, weight_backoff {cfg.weight_backoff:g}, "
                f"{cfg.device_for_scales.value}, {cfg.fp8_config.value}"
                + (f", {cfg.outlier_channels} outlier channel(s)" if cfg.outlier_channels else "")
                + (f", act_scope {cfg.act_scope.value}" if cfg.act_scope.value != "global" else "") + ")")
        method = cfg.scale_method.value
    else:
        method = args.scale_method or "maxabs_hw"
        device, fp8 = args.device_for_scales or "cuda", args.fp8 or "E4M3"
        rows = tables.layer_table(doc, method, device, fp8)
        what = f"scales for {method} ({device}, {fp8})"
    if args.json:
        head = {k: v for k, v in doc.items() if k != "layers"}
        extra = {"quant_config": args.quant_config} if args.quant_config else {}
        print(json.dumps({**head, "scale_method": method, **extra, "layers": rows}, indent=1))
    else:
        print(f"{args.file}: {doc['kind']}, world size {doc['world_size']}, observer {doc['observer']}, "
              f"dtype {doc['dtype']}, fingerprint {doc['fingerprint']}, {len(rows)} layers; {what}")
        print(tables.format_table(rows))
    return 0


def import_hqt_cmd(args: argparse.Namespace) -> int:
    shapes = hqt_import.model_shapes(args.model) if args.model else None
    doc, skipped = hqt_import.import_hqt(args.files, shapes, args.allow_pickle)
    out = shards.merged_path(args.out)
    ms.atomic_write_json(out, doc)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    print(f"imported {len(doc['layers'])} linear(s) from {len(args.files)} HQT file(s), skipped {len(skipped)} "
          f"-> {out}")
    return 0


# -- report (per-layer FP8 error; issue 6) ---------------------------------------------------------------------
def report_cmd(args: argparse.Namespace) -> int:
    return command(args.model, args.quant_config, args.text, args.max_length, args.json)


# -- convert (FP8 checkpoint; issue 14) ---------------------------------------------------------------------------
def convert_cmd(args: argparse.Namespace) -> int:
    import torch

    out = convert(args.model_dir, args.out_dir, args.quant_config, getattr(torch, args.dtype))
    print(f"wrote FP8 checkpoint {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-quant", description="FP8 quantization for DeepSpeed AutoTP models")
    # deepspeed's launcher passes --local_rank to whatever it starts (`deepspeed --module ds_quant.cli report`)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a quantization config: prints 'ok' or what to fix")
    p.add_argument("file")
    p.set_defaults(func=check_config)
    p = sub.add_parser("merge", help="merge the shard files PREFIX_{rank}_{world}.json into PREFIX.json")
    p.add_argument("prefix", help="the dump_stats_path of the MEASURE run")
    p.add_argument("--world-size", type=int, help="which run's shards, when several world sizes are on disk")
    p.add_argument("--out", help="output file (default: PREFIX.json)")
    p.set_defaults(func=merge_cmd)
    p = sub.add_parser("inspect", help="a table of a measurement file, with the scales a scale method would give")
    p.add_argument("file")
    p.add_argument("--scale-method", help="default maxabs_hw (HQT's default backoffs)")
    p.add_argument("--device-for-scales", help="default cuda")
    p.add_argument("--fp8", help="E4M3 (default) or E5M2")
    p.add_argument("--quant-config", metavar="CFG", help="print the scales QUANTIZE uses with this config, layer by "
                   "layer (its scale_method, scale_method_overrides, scale_params, device, fp8 and outlier channels)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=inspect_cmd)
    p = sub.add_parser("import-hqt", help="convert HQT/INC measurement files (one per rank) into PREFIX.json")
    p.add_argument("files", nargs="+", help="*_hooks_maxabs_{rank}_{world}.json or .npz")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json (use it as dump_stats_path)")
    p.add_argument("--model", help="HF model directory or config: gives layer shapes, places per-channel vectors")
    p.add_argument("--allow-pickle", action="store_true", help=".npz files from HQT hold pickled dicts")
    p.set_defaults(func=import_hqt_cmd)
    # -- report (issue 6) --
    p = sub.add_parser("report", help="per-layer FP8 output SQNR on calibration texts (QUANTIZE config), "
                       "or calibrate (MEASURE config); at TP=N: `deepspeed --num_gpus N --module ds_quant.cli report ...`")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--quant-config", required=True, metavar="FILE")
    p.add_argument("--text", metavar="FILE", help="calibration texts, separated by blank lines (default: 3 built in)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text, at most")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=report_cmd)
    # -- end report --
    p = sub.add_parser("convert", help="write an FP8 HF folder (compressed-tensors float-quantized) from a bf16 "
                       "safetensors folder and the merged measurements; any TP size loads it")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="must not exist (or be empty); written atomically")
    p.add_argument("--quant-config", required=True, metavar="CFG", help="the QUANTIZE config (scale method, "
                   "dump_stats_path of the measurements)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the dtype the model runs in (weights are cast to it before quantizing, as in-memory QUANTIZE sees them)")
    p.set_defaults(func=convert_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Our errors, in every command, end here: one line on stderr, exit 1 (no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DsQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
