"""Measurement-file benchmark: merge speed (64 shards x 1000 layers) and the size of a 70B-like file.

    .venv/bin/python bench/merge_bench.py [--shards 64] [--layers 1000] [--width 1024] [--no-70b]

`bench/run.py` takes its `merge_seconds_64x1000` from `ds_quant.testing.bench_merge()`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_quant import testing
from ds_quant.files import measurements as ms

# Llama-2-70B: hidden 8192, MLP 28672, 80 decoder layers, 8 kv heads, vocab 32000.
LLAMA_70B = {"hidden": 8192, "mlp": 28672, "layers": 80, "kv": 1024, "vocab": 32000}


def llama70b_merged() -> dict:
    h, f, kv = LLAMA_70B["hidden"], LLAMA_70B["mlp"], LLAMA_70B["kv"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    rng = np.random.default_rng(0)
    layers = {}

    def add(name, kind, out_f, in_f):
        vec = rng.lognormal(0.0, 1.0, in_f).astype(np.float32)  # activation max-abs: a few large channels
        layers[name] = {"kind": kind, "in_features": in_f, "out_features": out_f, "input_amax": float(vec.max()),
                        "input_channel_amax": vec.tolist(), "output_amax": 10.0, "weight_amax": 0.5,
                        "samples": 65536}

    for i in range(LLAMA_70B["layers"]):
        for proj, (out_f, in_f) in shapes.items():
            kind = "row" if proj in ("o_proj", "down_proj") else "column"
            add(f"model.layers.{i}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{proj}",
                kind, out_f, in_f)
    add("lm_head", "lm-head", LLAMA_70B["vocab"], h)
    doc = {**ms._header("merged", "maxabs", "bfloat16", 8, layers), "layers": layers}
    return doc


def file_sizes_70b() -> dict:
    doc = llama70b_merged()
    channels = sum(len(r["input_channel_amax"]) for r in doc["layers"].values())
    out = {"linears": len(doc["layers"]), "channels": channels}
    with tempfile.TemporaryDirectory() as tmp:
        for label, limit in (("json_only", 1 << 62), ("json_plus_f32", ms.INLINE_MAX_VALUES)):
            folder = Path(tmp) / label
            saved, ms.INLINE_MAX_VALUES = ms.INLINE_MAX_VALUES, limit
            try:
                t0 = time.perf_counter()
                ms.atomic_write_json(folder / "stats.json", doc)
                write_s = time.perf_counter() - t0
            finally:
                ms.INLINE_MAX_VALUES = saved
            t0 = time.perf_counter()
            ms.load(folder / "stats.json")
            load_s = time.perf_counter() - t0
            out[label] = {"bytes": {p.name: p.stat().st_size for p in folder.iterdir()},
                          "total_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1),
                          "write_s": round(write_s, 2), "load_s": round(load_s, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--layers", type=int, default=1000)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--no-70b", action="store_true", help="skip the 70B-like file sizes (~20 s)")
    args = p.parse_args()
    result = {"merge": testing.bench_merge(args.shards, args.layers, args.width)}
    if not args.no_70b:
        result["llama70b_merged_file"] = file_sizes_70b()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
