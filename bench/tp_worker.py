"""The TP=2 half of `bench/run.py`, run by it under `deepspeed --num_gpus 2` (rank 0 writes --out).

Times, on a random-init Llama large enough that GEMMs dominate, split by `deepspeed.init_inference`:
the plain bf16 forward, the MEASURE forward (same prompt), FP8 and bf16 prefill (one forward of
`--prefill` tokens) and decode (one token on a KV cache), and each rank's weight bytes. Then runs
`examples/accuracy.py`'s MiniLM and tiny-Llama evaluation in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import ds_quant
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics import ops


def llama(hidden: int, inter: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # same weights on every rank
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def tp(model, world: int):
    import deepspeed

    return deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


def paired(fa, fb, reps: int) -> tuple[float, float, float]:
    """Median seconds of `fa` and of `fb`, and the median of the per-pair ratios time(fa) / time(fb).
    Calls alternate (a, b, a, b, ...) after one warm-up each, so a load change on a shared machine hits
    both sides alike; ranks stay in step through the allreduces inside each forward."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def decode_step(model, prompt: torch.Tensor):
    """A closure running one decode step (1 token on a KV cache of 64 positions, growing by one a call)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(prompt[:, :64], past_key_values=cache, use_cache=True)
    token = prompt[:, 64:65]
    return lambda: model(token, past_key_values=cache, use_cache=True)


def weight_bytes(model, cls) -> int:
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, cls)
               for t in (m.weight, getattr(m, "weight_scale", None), getattr(m, "input_scale", None))
               if t is not None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One rank per core share: N ranks x all-cores threads oversubscribe the CPU and time the contention.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    work = Path(args.workdir)
    prompt = torch.randint(0, 256, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    base = {"method": "HOOKS", "scale_method": "maxabs_hw", "dump_stats_path": str(work / "bench" / "stats")}
    out = {"tp_size": world}

    def build():
        return tp(llama(args.hidden, args.inter, args.layers), world)

    def prefill(model):
        return lambda: model(prompt, use_cache=False)

    with torch.no_grad():
        plain = build()
        measured = ds_quant.prep_model(build(), {**base, "mode": "MEASURE"})
        out["measure_forward_s"], out["plain_forward_s"], out["measure_overhead"] = paired(
            prefill(measured), prefill(plain), args.reps)
        ds_quant.finish_measurements(measured)
        out["bf16_weight_bytes_rank0"] = weight_bytes(measured, MeasuredLinear)
        del measured
        fp8 = ds_quant.prep_model(build(), {**base, "mode": "QUANTIZE"})
        out["fp8_weight_bytes_rank0"] = weight_bytes(fp8, Fp8Linear)
        out["fp8_paths"] = sorted({ops.describe(m.weight.device, *m.weight.shape, rowwise=m.rowwise)
                                   for m in fp8.modules() if isinstance(m, Fp8Linear)})
        out["bf16_prefill_s"], out["fp8_prefill_s"], out["prefill_speedup"] = paired(
            prefill(plain), prefill(fp8), args.reps)
        out["bf16_decode_s"], out["fp8_decode_s"], out["decode_speedup"] = paired(
            decode_step(plain, prompt), decode_step(fp8, prompt), max(4 * args.reps, 8))
        out["threads_per_rank"] = torch.get_num_threads()
        del plain, fp8
    out["weight_bytes_ratio"] = out["fp8_weight_bytes_rank0"] / out["bf16_weight_bytes_rank0"]

    from accuracy import run as accuracy

    out["timing_s"] = time.perf_counter() - t_start
    acc = accuracy(work / "accuracy", args.windows)
    out["accuracy"] = acc
    out["accuracy_s"] = time.perf_counter() - t_start - out["timing_s"]
    out["minilm_cosine"] = acc["minilm"]["mean_cosine"]
    out["tinylm_ppl_bf16"] = acc["tinylm"]["ppl_bf16"]
    out["tinylm_ppl_fp8"] = acc["tinylm"]["ppl_fp8"]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
    ds_quant.shutdown()  # barrier, unlink this rank's shm buffer, destroy the process group: a clean exit
