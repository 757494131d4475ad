"""FP8 KV cache at TP=2: bytes per token and decode speed against the bf16 cache, side by side in one run.

    python bench/kv_cache.py [--quick] [--json FILE]     # launches itself under `deepspeed --num_gpus 2`

A random-init Llama whose decode time at long context is mostly attention (16 heads, 8 KV heads of 64, split 4 + 4
KV heads per rank by AutoTP), linears left in bf16 (allowlist `KVCache` only) so only the cache differs. MEASURE
records the KV statistics with one generate(), then per context length (1k, 8k tokens): one bf16 prefill fills a
`DynamicCache`; the same states go into ds_quant's FP8 cache (twice: as QUANTIZE runs it, decode attention reading the
FP8 bytes through `ds_quant_kv`, and with every read de-quantized first, the `DS_QUANT_KV_ATTENTION=0` path) and into
transformers' `QuantizedCache(backend="fp8")`; then decode steps (one token, on rank-local caches) alternate between
the four caches, and the median step times are compared. Bytes per token: every tensor each cache holds, per rank, divided by the tokens in it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {False: {"contexts": (1024, 8192), "steps": 12}, True: {"contexts": (1024, 4096), "steps": 6}}


def cache_bytes(cache) -> int:
    """Bytes allocated by every tensor the cache's layers hold (walks their attributes: FP8 buffers with their room
    for more tokens, scales, the empty bf16 slots), each storage counted once."""
    storages = {}
    for layer in cache.layers:
        for v in vars(layer).values():
            for t in (v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def worker(out: str, contexts: tuple[int, ...], steps: int, workdir: str) -> None:
    import deepspeed
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

    import ds_quant
    from ds_quant.layers import kv_cache

    torch.set_num_threads(1)  # two ranks on two cores
    rank, world = int(os.getenv("RANK", "0")), int(os.getenv("WORLD_SIZE", "1"))
    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=2048, max_position_embeddings=max(contexts) + 64)

    def model():
        torch.manual_seed(0)
        m = LlamaForCausalLM(config).eval()
        return deepspeed.init_inference(m, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                        replace_with_kernel_inject=False).module

    base = {"method": "HOOKS", "allowlist": {"types": ["KVCache"]}, "dump_stats_path": f"{workdir}/kv/m"}
    measured = ds_quant.prep_model(model(), {**base, "mode": "MEASURE"})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        measured.generate(torch.randint(0, 2048, (1, 256), generator=g), max_new_tokens=16, do_sample=False)
    ds_quant.finish_measurements(measured)
    del measured
    quant = ds_quant.prep_model(model(), {**base, "mode": "QUANTIZE"})
    res = {"threads_per_rank": 1, "kv_heads_per_rank": config.num_key_value_heads // world, "contexts": {}}
    with torch.no_grad():
        for ctx in contexts:
            prompt = torch.randint(0, 2048, (1, ctx), generator=g)
            bf16 = DynamicCache(config=quant.config)
            logits = quant(prompt, past_key_values=bf16).logits[:, -1]
            fp8, hf_fp8 = kv_cache.make_kv_cache(quant), QuantizedCache(backend="fp8", config=quant.config)
            fp8_deq = kv_cache.make_kv_cache(quant)
            for layer in fp8_deq.layers:
                layer.fused = False  # every read de-quantized, then sdpa: what DS_QUANT_KV_ATTENTION=0 runs
            for cache in (fp8, fp8_deq, hf_fp8):  # the same prompt states
                for i, layer in enumerate(bf16.layers):
                    cache.update(layer.keys, layer.values, i)
            token = logits.argmax(-1, keepdim=True)
            times = {"bf16": [], "fp8": [], "fp8_dequantized": [], "hf_fp8": []}
            for _ in range(steps):
                for name, cache in (("bf16", bf16), ("fp8", fp8), ("fp8_dequantized", fp8_deq), ("hf_fp8", hf_fp8)):
                    t0 = time.perf_counter()
                    quant(token, past_key_values=cache)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step warms up
            sizes = {name: cache_bytes(c) / c.get_seq_length() for name, c in  # after decoding: growth room counted
                     (("bf16", bf16), ("fp8", fp8), ("hf_fp8", hf_fp8))}
            res["contexts"][str(ctx)] = {
                "bytes_per_token": sizes, "fp8_bytes_ratio": sizes["fp8"] / sizes["bf16"],
                "decode_s": med, "fp8_decode_speed_vs_bf16": med["bf16"] / med["fp8"],
                "hf_fp8_decode_speed_vs_bf16": med["bf16"] / med["hf_fp8"],
                "fp8_dequantized_decode_speed_vs_bf16": med["bf16"] / med["fp8_dequantized"],
                "attn_implementation": quant.config._attn_implementation,
                "layer_types": kv_cache.describe(fp8)["layer_types"], "dtypes": kv_cache.describe(fp8)["dtypes"]}
    if rank == 0:
        Path(out).write_text(json.dumps(res, indent=1))
    ds_quant.shutdown()  # an orderly exit: no gloo thread left to abort at interpreter shutdown


def kv_figures(quick: bool = False, work: Path | None = None) -> dict:
    """Launch the worker at TP=2 and return its figures (for `bench/run.py` too)."""
    with tempfile.TemporaryDirectory(prefix="ds_quant_kv_", dir=work) as tmp:
        out = Path(tmp) / "kv.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        size = SIZES[quick]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               __file__, "--worker", "--out", str(out), "--workdir", tmp, "--steps", str(size["steps"]),
               "--contexts", ",".join(map(str, size["contexts"]))]
        env = {**os.environ, "DS_QUANT_LOG_LEVEL": "WARNING"}
        env.pop("QUANT_CONFIG", None)
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        finally:  # DeepSpeed's CPU shm allreduce never unlinks its buffers: remove this launch's (by its port) only
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
                os.unlink(path)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
        return json.loads(out.read_text())


def table(res: dict, cpu: str) -> str:
    lines = [f"FP8 KV cache, TP=2 ({res['kv_heads_per_rank']} KV heads of 64 per rank, {res['threads_per_rank']} "
             f"thread per rank), {cpu}"]
    for ctx, r in res["contexts"].items():
        b, d = r["bytes_per_token"], r["decode_s"]
        lines.append(f"  {ctx:>5} tokens: bytes/token/rank bf16 {b['bf16']:.0f}, FP8 {b['fp8']:.0f} "
                     f"({r['fp8_bytes_ratio']:.3f}x); decode step bf16 {d['bf16'] * 1e3:.1f} ms, FP8 {d['fp8'] * 1e3:.1f} "
                     f"ms (speed {r['fp8_decode_speed_vs_bf16']:.2f}x of bf16; {r['attn_implementation']}), FP8 "
                     f"de-quantized on read {d['fp8_dequantized'] * 1e3:.1f} ms "
                     f"({r['fp8_dequantized_decode_speed_vs_bf16']:.2f}x), transformers' fp8 QuantizedCache "
                     f"{d['hf_fp8'] * 1e3:.1f} ms ({r['hf_fp8_decode_speed_vs_bf16']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1k and 4k tokens, fewer steps")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--contexts", default="1024,8192", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.out, tuple(int(c) for c in args.contexts.split(",")), args.steps, args.workdir)
        return 0
    from gemm import cpu_info  # bench/ is sys.path[0] when run as a script

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    res = {"cpu": cpu, "cores": os.cpu_count(), "isa_flags": cpu_info()["isa_flags"], **kv_figures(args.quick)}
    print(table(res, f"{cpu} x{os.cpu_count()}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
