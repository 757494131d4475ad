"""An ordinary from_pretrained + init_inference script, timed: rank 0 writes to OUT (JSON) load_s and, per rank,
rss_mb (peak RSS, the first forward included), base_mb (peak RSS after the imports, transformers' modeling code included, before from_pretrained) and
load_rss_mb (peak RSS at the end of init_inference), cuda_peak_mb; first_forward_s (slowest rank; a lazily
mapped load, as HF's bf16 one, pays its reads there). Run under launch/run.py (or plain, for bf16). Usage: ckpt_user.py MODEL_DIR OUT [--local_rank N]"""

import json
import os
import resource
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
import transformers.modeling_utils  # noqa: F401  (from_pretrained imports it anyway: ~120 MB of the base RSS)
from transformers import AutoModelForCausalLM

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
ws, rank = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # after importing torch, transformers, deepspeed
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args[0], dtype=torch.bfloat16).eval()
model = deepspeed.init_inference(model, tensor_parallel={"tp_size": ws}, dtype=torch.bfloat16,
                                 replace_with_kernel_inject=False).module
load_s = time.perf_counter() - t0
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # peak up to the end of the load
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
t1 = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits.float()
first_s = time.perf_counter() - t1  # a lazily mapped load pays its reads here
rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, load_s, base, load_rss, first_s])
if dist.is_initialized():
    allr = [torch.zeros(5) for _ in range(dist.get_world_size())]
    dist.all_gather(allr, rss)
    rss = torch.stack(allr)
else:
    rss = rss[None]
cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
if rank == 0:
    with open(args[1], "w") as f:
        json.dump({"rss_mb": rss[:, 0].tolist(), "load_s": float(rss[:, 1].max()), "base_mb": rss[:, 2].tolist(),
                   "first_forward_s": float(rss[:, 4].max()),
                   "load_rss_mb": rss[:, 3].tolist(), "cuda_peak_mb": cuda,
                   "logits_sum": float(logits.sum())}, f)
