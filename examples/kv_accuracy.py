"""FP8 KV cache accuracy on a real model: FP8 weights + FP8 KV cache vs FP8 weights alone, at TP = world size.

    deepspeed --num_gpus 2 examples/kv_accuracy.py --model /tmp/dsq-smollm2 [--out FILE]

One process per rank does everything from one measurement: MEASURE (calibration text fed in 32-token chunks through
ds_quant's measuring cache, so keys/values are recorded as the cache stores them), then two QUANTIZE models with
`lm_head` in bf16: weights only (`KVCache` in the blocklist) and weights + KV cache. Perplexity is computed the way
decoding sees the cache: the held-out text goes through the model in 32-token chunks, each chunk attending to the
earlier ones through the cache (a single forward would attend to its own keys as they came and never read the FP8
cache). Greedy generations on demo prompts are compared too. Text: CPython's `pydoc_data.topics` (sorted by key),
calibration 4 x 256 tokens, evaluation the next 8 x 256 (disjoint).
"""

import argparse
import json
import math
import os
import tempfile

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import ds_quant
from ds_quant.layers import kv_cache

CHUNK, WINDOW, N_CAL, N_EVAL = 32, 256, 4, 8
PROMPTS = ["The Python language reference says that", "A dictionary in Python is", "def fibonacci(n):"]


def windows(tokenizer):
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), return_tensors="pt").input_ids[0]
    w = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(N_CAL + N_EVAL)]
    return torch.stack(w[:N_CAL]), torch.stack(w[N_CAL:])


def chunked_nll(model, tokens, make_cache) -> tuple[float, int]:
    """Sum of next-token NLL over `tokens` (B, T), fed CHUNK tokens at a time through one cache per batch."""
    cache, total, count = make_cache(), 0.0, 0
    for s in range(0, tokens.shape[1], CHUNK):
        logits = model(tokens[:, s:s + CHUNK], past_key_values=cache).logits.float()
        nxt = tokens[:, s + 1:s + CHUNK + 1]
        lp = torch.log_softmax(logits[:, :nxt.shape[1]], dim=-1)
        total -= float(lp.gather(-1, nxt.unsqueeze(-1)).sum())
        count += nxt.numel()
    return total, count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    world, rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    cal, evl = windows(tokenizer)

    def load():
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        return deepspeed.init_inference(m, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                        replace_with_kernel_inject=False).module

    tmp = tempfile.mkdtemp(prefix="kv_acc_") if rank == 0 else None
    holder = [tmp]
    if world > 1:
        deepspeed.init_distributed()
        torch.distributed.broadcast_object_list(holder, src=0)
    base = {"method": "HOOKS", "dump_stats_path": f"{holder[0]}/m", "blocklist": {"names": ["lm_head"]}}
    res = {}
    with torch.no_grad():
        measured = ds_quant.prep_model(load(), {**base, "mode": "MEASURE"})
        chunked_nll(measured, cal, lambda m=measured: kv_cache.make_kv_cache(m))
        ds_quant.finish_measurements(measured)
        models = {
            "bf16": (load(), None),
            "fp8_weights": (ds_quant.prep_model(load(), {**base, "mode": "QUANTIZE",
                                                         "blocklist": {"types": ["KVCache"], "names": ["lm_head"]}}),
                            None),
        }
        wk = ds_quant.prep_model(load(), {**base, "mode": "QUANTIZE"})
        models["fp8_weights_kv"] = (wk, lambda m=wk: kv_cache.make_kv_cache(m))
        gens = {}
        for name, (model, make) in models.items():
            nll, n = chunked_nll(model, evl, make or (lambda m=model: DynamicCache(config=m.config)))
            res[f"ppl_{name}"] = math.exp(nll / n)
            enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
            gens[name] = out.sequences[:, enc.input_ids.shape[1]:]
            if name == "fp8_weights_kv":
                res["kv_cache"] = {k: v for k, v in kv_cache.describe(out.past_key_values).items() if k != "scales"}
    res["kv_vs_weights_ppl_pct"] = 100 * (res["ppl_fp8_weights_kv"] / res["ppl_fp8_weights"] - 1)
    res["greedy_agree_kv_vs_weights"] = f"{int((gens['fp8_weights_kv'] == gens['fp8_weights']).sum())}/" \
                                        f"{gens['fp8_weights'].numel()}"
    res["greedy_prompts_identical"] = int((gens["fp8_weights_kv"] == gens["fp8_weights"]).all(dim=1).sum())
    # the scale of that figure: how far FP8 weights alone move the same generations from bf16
    res["greedy_agree_weights_vs_bf16"] = f"{int((gens['fp8_weights'] == gens['bf16']).sum())}/{gens['bf16'].numel()}"
    res["greedy_first_divergence"] = {  # generated position where each prompt first differs (24: never)
        pair: [int(r.nonzero()[0]) if r.any() else gens["bf16"].shape[1] for r in (gens[a] != gens[b])]
        for pair, (a, b) in {"kv_vs_weights": ("fp8_weights_kv", "fp8_weights"),
                             "weights_vs_bf16": ("fp8_weights", "bf16")}.items()}
    res["world_size"], res["eval_tokens"] = world, int(evl.numel())
    if rank == 0:
        print(json.dumps(res, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    ds_quant.shutdown()  # an orderly exit (rc 0, nothing left in /dev/shm)


if __name__ == "__main__":
    main()
