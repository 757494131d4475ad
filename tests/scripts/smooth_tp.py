"""Under `deepspeed --num_gpus N`: load the HF folder MODEL, split it with AutoTP, fold smooth_alpha ALPHA's factors
from the merged measurement file STATS into it, and write OUT_{rank}.pt: the factors, the smoothed records of
a few layers, whether the split bf16 model's logits are bit-identical before and after folding, and the logits of the same model QUANTIZEd with CONFIG (a JSON path, smoothing included) on
seeded token ids.

Usage: smooth_tp.py MODEL STATS ALPHA CONFIG OUT_PREFIX [--local_rank N]"""

import os
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

import ds_quant
from ds_quant.files import measurements, shards
from ds_quant.layers.patch import model_tp
from ds_quant.workflows import smooth

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
path, stats, alpha, config, out = args[0], args[1], float(args[2]), args[3], args[4]
world, rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(7))
RECORDS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj")


def load():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


model = load()
_, _, group = model_tp(model)
with torch.no_grad():
    before = model(ids).logits
layers, factors = smooth.fold(model, measurements.load(shards.merged_path(stats))["layers"], alpha, group)
with torch.no_grad():
    unchanged = bool(torch.equal(model(ids).logits, before))
records = {n: {"input_amax": layers[n]["input_amax"], "weight_amax": layers[n]["weight_amax"],
               "input_channel_amax": torch.as_tensor(layers[n]["input_channel_amax"])} for n in RECORDS}
quantized = ds_quant.prep_model(load(), config)
with torch.no_grad():
    logits = quantized(ids).logits.float()
torch.save({"factors": factors, "records": records, "logits": logits, "world": world, "bf16_unchanged": unchanged}, f"{out}_{rank}.pt")
ds_quant.shutdown()
