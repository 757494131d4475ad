"""A DeepSpeed script that measures and just exits: no finish_measurements, no wrapper.

    QUANT_CONFIG=measure.json deepspeed --num_gpus 2 tests/scripts/measure_without_finish.py
"""

import os
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ds_quant

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama" / "config.json"

ds_quant.install()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG)).to(torch.bfloat16).eval()
engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": int(os.environ["WORLD_SIZE"])},
                                  dtype=torch.bfloat16, replace_with_kernel_inject=False)
with torch.no_grad():
    engine.module(torch.arange(1, 17).reshape(1, 16))
