"""Under `deepspeed --num_gpus N`: load the HF folder MODEL, split it with AutoTP, MEASURE with MEASURE_CFG (a JSON
path with `gptq`: the Hessian file is written beside the measurements) on seeded token ids, then load a fresh
copy, QUANTIZE it with QUANT_CFG (`gptq` too) and write OUT_{rank}.pt: every FP8 linear's local codes (uint8),
scales, outlier channels and layout, and the logits on other seeded ids.

Usage: gptq_tp.py MODEL MEASURE_CFG QUANT_CFG OUT_PREFIX [--local_rank N]"""

import os
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

import ds_quant
from ds_quant.layers.linear import Fp8Linear

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
path, measure_cfg, quant_cfg, out = args
world, rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
calib = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(7))  # as tests/numerics/test_gptq.py
evals = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(8))


def load():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


model = ds_quant.prep_model(load(), measure_cfg)
with torch.no_grad():
    model(calib)
ds_quant.finish_measurements(model)
del model
model = ds_quant.prep_model(load(), quant_cfg)
layers = {}
for name, m in model.named_modules():
    if isinstance(m, Fp8Linear):
        part = m.layout.input_slice()
        layers[name] = {"codes": m.weight.detach().view(torch.uint8).clone(), "scale": m.weight_scale.clone(),
                        "kind": m.layout.kind.value, "in_start": None if part is None else part.start,
                        "out_start": m.layout.shard_offset if m.layout.spec.partitioned_dim == 0 else None,
                        "outlier_index": None if m.outlier_index is None else m.outlier_index.clone(),
                        "outlier_weight": None if m.outlier_weight is None else m.outlier_weight.clone()}
with torch.no_grad():
    logits = model(evals).logits.float()
torch.save({"world": world, "layers": layers, "logits": logits}, f"{out}_{rank}.pt")
ds_quant.shutdown()
