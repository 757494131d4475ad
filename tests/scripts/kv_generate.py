"""A generate script that knows nothing of ds_quant (run under launch/run.py), for tests/layers/test_kv_cache.py.

    deepspeed --num_gpus 2 launch/run.py --quant-config CFG kv_generate.py OUT_PREFIX

A seeded tiny Llama (4 KV heads, 2 layers) at TP = world size: greedy generate, beam search, and a second
generate() that continues the first one's cache. Each rank writes OUT_PREFIX_{rank}.json: what holds the returned
caches (layer types, tensor dtypes and shapes, the scales of FP8 layers) and the generated lengths.
"""

import json
import os
import sys

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

out_prefix = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
world, rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=1024)
model = LlamaForCausalLM(config).eval()
model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                 replace_with_kernel_inject=False)
prompts = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))


def held(cache):
    """Every tensor of each cache layer (walks the layer's attributes), and FP8 layers' scales."""
    layers = []
    for layer in cache.layers:
        tensors = [t for v in vars(layer).values() for t in (v if isinstance(v, tuple) else (v,))
                   if isinstance(t, torch.Tensor) and t.numel()]
        layers.append({"type": type(layer).__name__, "dtypes": sorted({str(t.dtype) for t in tensors}),
                       "shapes": [list(t.shape) for t in tensors],
                       "scales": [q[1] for q in (getattr(layer, "_quantized_keys", None),
                                                 getattr(layer, "_quantized_values", None)) if q is not None]})
    return layers


with torch.no_grad():
    greedy = model.generate(prompts, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    greedy_held = held(greedy.past_key_values)  # before the reuse below extends that cache in place
    # DeepSpeed's engine.generate refuses num_beams > 1; the HF model it wraps does beam search
    beam = model.module.generate(prompts, max_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True)
    more = model.generate(greedy.sequences, max_new_tokens=4, do_sample=False, past_key_values=greedy.past_key_values,
                          return_dict_in_generate=True)
report = {"greedy": greedy_held, "greedy_len": greedy.sequences.shape[1],
          "greedy_tokens": greedy.sequences.tolist(), "beam": held(beam.past_key_values),
          "beam_len": beam.sequences.shape[1], "reused": held(more.past_key_values), "reused_len": more.sequences.shape[1],
          "reused_cache_len": more.past_key_values.get_seq_length(),
          "attn_implementation": model.module.config._attn_implementation}
attn = sys.modules.get("ds_quant.layers.attention")  # present when run under launch/run.py; the script does not import it
if attn is not None:
    report["kv_attention_calls"] = attn.attention_calls(model.module)
with open(f"{out_prefix}_{rank}.json", "w") as f:
    json.dump(report, f)
