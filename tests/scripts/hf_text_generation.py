"""A text-generation script written like the common HF/DeepSpeed examples; it knows nothing of ds_quant.

    deepspeed --num_gpus 2 hf_text_generation.py --model DIR [--max_new_tokens 8]

The tests run it, unmodified, under launch/run.py. Besides generating, it writes what a test needs to
check (module types, its own argv) to --report.
"""

import argparse
import json
import os
import sys

import deepspeed
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="HF model directory")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
parser.add_argument("--local_rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")), help="set by deepspeed")
parser.add_argument("--max_new_tokens", type=int, default=8)
parser.add_argument("--batch_size", type=int, default=2)
parser.add_argument("--tp_style", choices=["mp_size", "tensor_parallel"], default="mp_size")
parser.add_argument("--init_distributed", action="store_true", help="call deepspeed.init_distributed() first")
parser.add_argument("--exit_with_sys_exit", action="store_true", help="end with sys.exit(0)")
# A flag of the script's own that happens to share the wrapper's name: it must stay the script's.
parser.add_argument("--quant-config", dest="unrelated_quant_config", default=None)
parser.add_argument("--report", default=None, help="append one JSON line per run; '{rank}' -> rank")
parser.add_argument("--kill_rank", type=int, default=None, help="this rank SIGKILLs itself after generating")
args = parser.parse_args()

world_size = int(os.getenv("WORLD_SIZE", "1"))
rank = int(os.getenv("RANK", "0"))
if args.init_distributed:
    deepspeed.init_distributed()

dtype = getattr(torch, args.dtype)
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval()
if args.tp_style == "mp_size":
    engine = deepspeed.init_inference(model, mp_size=world_size, dtype=dtype, replace_with_kernel_inject=False)
else:
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                      replace_with_kernel_inject=False)
model = engine.module

prompts = ["DeepSpeed is", "Tensor parallel inference in FP8", "The quick brown fox", "Hello"][: args.batch_size]
tokenizer.padding_side = "left"
inputs = tokenizer(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    outputs = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
if rank == 0:
    for text in texts:
        print(f"generated: {text!r}", flush=True)

if args.report:
    report = {
        "transformers": transformers.__version__, "argv": sys.argv, "name": __name__, "sys_path0": sys.path[0], "world_size": world_size,
        "local_rank": args.local_rank, "unrelated_quant_config": args.unrelated_quant_config,
        "quant_config_env": os.getenv("QUANT_CONFIG"), "dist_initialized": torch.distributed.is_initialized(),
        "module_types": {n: type(m).__name__ for n, m in model.named_modules() if "Linear" in type(m).__name__},
        "weight_dtypes": sorted({str(m.weight.dtype) for m in model.modules() if "Linear" in type(m).__name__}),
        "new_tokens": int(outputs.shape[1] - inputs["input_ids"].shape[1]),
    }
    path = args.report.replace("{rank}", str(rank))
    with open(path, "a") as f:
        f.write(json.dumps(report) + "\n")

if args.kill_rank == rank:  # a rank lost mid-MEASURE: before anything is saved
    import signal

    os.kill(os.getpid(), signal.SIGKILL)

if args.exit_with_sys_exit:
    sys.exit(0)
