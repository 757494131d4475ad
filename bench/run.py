"""Every figure ds_quant reports, measured in one run: memory, speed, overhead and accuracy.

    python bench/run.py --json out/bench.json          # full: ~6-10 min on 2 CPU cores
    python bench/run.py --quick --json out/bench.json  # the same keys on smaller shapes, < 2 min

Single process: conversion speed (`convert_seconds_per_gb`), merging 64 shards of 1000 layers
(`merge_seconds_64x1000`), the CPU GEMM table of `bench/gemm.py` (bf16 vs every FP8 backend of
`ds_quant.numerics.ops`, M in {1, 8, 64, 512}), and on CUDA `gemm_fp8_over_bf16`. The CPU model and ISA flags are
printed and stored with the figures (they decide which path is fastest). Then one `deepspeed --num_gpus 2` launch of
`bench/tp_worker.py` for the TP=2 figures (weight bytes, MEASURE overhead, prefill/decode speedup) and
the accuracy of `examples/accuracy.py` (MiniLM cosine, tiny-Llama perplexity).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gemm import cpu_info, cuda_gemm_fp8_over_bf16, gemm_table  # bench/ is sys.path[0] when run as a script

from ds_quant.files import shards as sf

ROOT = Path(__file__).resolve().parent.parent

KEYS = ("weight_bytes_ratio", "measure_overhead", "prefill_speedup", "decode_speedup", "convert_seconds_per_gb",
        "merge_seconds_64x1000", "minilm_cosine", "tinylm_ppl_bf16", "tinylm_ppl_fp8")
# prefill/decode: the speed issue's CPU goals (bf16 time / FP8 time, TP=2); on GPUs decode >= 1.2
TARGETS = {"weight_bytes_ratio": "<= 0.505", "measure_overhead": "<= 1.10",
           "prefill_speedup": ">= 0.9 (native bf16) / >= 4 (emulated)", "decode_speedup": ">= 1.4", "minilm_cosine": ">= 0.999", "tinylm_ppl_fp8": "<= 1.01 x bf16"}
# (quick, full) sizes
SIZES = {
    "convert_layers": (4, 16),  # 4096 x 4096 bf16 linears: 128 MB / 512 MB
    "tp_model": ({"hidden": 2048, "inter": 5632, "layers": 1, "prefill": 512, "reps": 3, "windows": 16},
                 {"hidden": 4096, "inter": 11008, "layers": 2, "prefill": 512, "reps": 5, "windows": 64}),
    "gemm_shapes": (tuple((m, 2048, 2048) for m in (1, 8, 64, 512)),
                    tuple((m, d, d) for d in (4096, 8192) for m in (1, 8, 64, 512))),
}


def convert_seconds_per_gb(layers: int, work: Path) -> float:
    """Seconds to QUANTIZE (prep_model, measurements loaded) per GB of bf16 weights, single process."""
    import ds_quant

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(layers)]).to(torch.bfloat16)

    base = {"method": "HOOKS", "dump_stats_path": str(work / "convert" / "stats")}
    m = ds_quant.prep_model(model(), {**base, "mode": "MEASURE"})
    with torch.no_grad():
        m(torch.randn(2, 4096, dtype=torch.bfloat16))
    ds_quant.finish_measurements(m)
    m = model()
    gb = sum(p.numel() * p.element_size() for p in m.parameters()) / 1e9
    t0 = time.perf_counter()
    ds_quant.prep_model(m, {**base, "mode": "QUANTIZE"})
    return (time.perf_counter() - t0) / gb


def merge_seconds(world: int, layers: int, work: Path) -> tuple[float, dict]:
    """Seconds for `merge_files` (what `ds-quant merge` runs) on `world` shard files of `layers` linears:
    alternately column-parallel (in 1024, replicated input vectors) and row-parallel (in 4096 split)."""
    from ds_quant.files import measurements as ms

    prefix = str(work / "merge" / "stats")
    for rank in range(world):
        recs = {}
        for i in range(layers):
            row = i % 2 == 1
            in_f = 4096 if row else 1024
            local = in_f // world if row else in_f
            recs[f"layers.{i // 2}.{'down' if row else 'up'}_{i}"] = {
                "kind": "row" if row else "column", "in_features": in_f, "out_features": 1024,
                "local_in_features": local, "partition_sizes": [in_f // world] * world if row else [1024 // world] * world,
                "input_amax": 1.0 + rank, "input_channel_amax": [0.5 + (rank + j) % 7 for j in range(local)],
                "output_amax": 2.0, "weight_amax": 0.1, "samples": 512}
        ms.atomic_write_json(sf.shard_path(prefix, rank, world), ms.make_shard(recs, rank, world, "maxabs", "bfloat16"))
    t0 = time.perf_counter()
    sf.merge_files(prefix, world)
    return time.perf_counter() - t0, {"world": world, "layers": layers, "in_features": "1024 column / 4096 row"}


def tp_figures(sizes: dict, work: Path) -> dict:
    out = work / "tp.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "bench" / "tp_worker.py"), "--out", str(out), "--workdir", str(work)]
    cmd += [a for k, v in sizes.items() for a in (f"--{k}", str(v))]
    # tp_worker.py imports examples/accuracy.py, and this checkout's ds_quant (not another install)
    path = os.pathsep.join(filter(None, [str(ROOT / "examples"), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_QUANT_LOG_LEVEL": "WARNING", "PYTHONPATH": path}
    env.pop("QUANT_CONFIG", None)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(out.read_text())


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import deepspeed

    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), **cpu_info(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def table(res: dict) -> str:
    lines = [f"ds_quant bench ({'quick' if res['meta']['quick'] else 'full'}), {res['meta']['date']}, "
             f"{res['meta']['cpu']} x{res['meta']['cores']}" + (f", {res['meta']['gpu']}" if res["meta"]["gpu"] else ""),
             f"  ISA: {' '.join(res['meta']['isa_flags'])}; CPU kernel: {res['meta']['kernel_isa'] or res['meta']['kernel_reason']}, "
             f"native GEMM {res['meta']['native_gemm_dtype']}, GEMV up to M={res['meta']['gemv_max_m']}",
             f"  {'figure':<24} {'value':>10}  target"]
    for k in KEYS:
        lines.append(f"  {k:<24} {res[k]:>10.4g}  {TARGETS.get(k, '')}")
    tp = res.get("tp", {})
    if "bf16_decode_s" in tp:
        lines.append(f"  TP=2 decode: bf16 {1 / tp['bf16_decode_s']:.1f} tokens/s, FP8 {1 / tp['fp8_decode_s']:.1f} tokens/s; "
                     f"prefill of {res['meta']['tp_model']['prefill']} tokens: bf16 {tp['bf16_prefill_s']:.3f} s, "
                     f"FP8 {tp['fp8_prefill_s']:.3f} s ({tp['threads_per_rank']} thread(s) per rank)")
    for shape, row in res["cpu_gemm"].items():
        parts = [f"{k.replace('_speed_vs_bf16', '')} {v:.3g}x" for k, v in row.items() if k.endswith("_speed_vs_bf16")]
        lines.append(f"  CPU GEMM {shape:<14} bf16 {row['bf16_s'] * 1e3:8.2f} ms; FP8 speed vs bf16: " + ", ".join(parts)
                     + f" (auto = {row['auto_backend']})")
    if res.get("gemm_fp8_over_bf16"):
        lines += [f"  CUDA gemm_fp8_over_bf16 {s}: {v:.3g}" for s, v in res["gemm_fp8_over_bf16"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes, same keys (< 2 min on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--kv-cache", action="store_true", help="also the FP8 KV cache figures (bench/kv_cache.py, ~1 min)")
    args = p.parse_args(argv)
    q = 0 if args.quick else 1
    t_start = time.perf_counter()
    os.environ.setdefault("DS_QUANT_LOG_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory(prefix="ds_quant_bench_") as tmp:
        work = Path(tmp)
        res = {"meta": {**machine(), "quick": args.quick}}
        phase = {}
        t0 = time.perf_counter()
        res["convert_seconds_per_gb"] = convert_seconds_per_gb(SIZES["convert_layers"][q], work)
        phase["convert"] = time.perf_counter() - t0
        res["merge_seconds_64x1000"], res["meta"]["merge"] = merge_seconds(64, 1000, work)
        phase["merge"] = time.perf_counter() - t0 - sum(phase.values())
        res["cpu_gemm"] = gemm_table(SIZES["gemm_shapes"][q], reps=3 if args.quick else 5)
        phase["gemm"] = time.perf_counter() - t0 - sum(phase.values())
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
            res["gemm_fp8_over_bf16"] = cuda_gemm_fp8_over_bf16()
        res["meta"]["tp_model"] = SIZES["tp_model"][q]
        tp = tp_figures(SIZES["tp_model"][q], work)
        phase["tp_launch"] = time.perf_counter() - t0 - sum(phase.values())
        res["meta"]["phase_seconds"] = {k: round(v, 1) for k, v in phase.items()}
        res.update({k: tp[k] for k in ("weight_bytes_ratio", "measure_overhead", "prefill_speedup", "decode_speedup",
                                       "minilm_cosine", "tinylm_ppl_bf16", "tinylm_ppl_fp8")})
        res["tp"] = tp
        if args.kv_cache:
            from kv_cache import kv_figures

            res["kv_cache"] = kv_figures(args.quick, work)
    res["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    print(table(res))
    if "kv_cache" in res:
        from kv_cache import table as kv_table

        print(kv_table(res["kv_cache"], f"{res['meta']['cpu']} x{res['meta']['cores']}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
