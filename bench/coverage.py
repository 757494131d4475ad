"""Architecture coverage matrix: tiny seeded HF models at TP=2 through the real `deepspeed` launcher.

    python bench/coverage.py                       # every architecture below, one launch; prints the README table
    python bench/coverage.py --archs llama,bloom --json out/coverage.json

One launch runs every architecture (a launch costs 20-40 s on 2 cores). Per architecture, every rank builds the
same seeded model (2 layers, hidden 128, vocab 512) and reports: the DeepSpeed classes AutoTP created, the share
of GEMM weight elements in FP8 on each rank (every floating tensor of >= 2 dims of a module that is not an
embedding or a norm: linears, fused 3-D MoE experts, whatever holds them, so a silent hole shows), logits SQNR
FP8 vs bf16 at TP=2 (MEASURE then QUANTIZE, `maxabs_hw`) and at TP=1 (the same model in one process, no
DeepSpeed), whether the measured twins reproduce DeepSpeed's bf16 logits bit for bit, and whether DeepSpeed's
own bf16 TP=2 forward runs at all. Run under the launcher this file is the worker (`--worker`).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

H, L, NH, KV, FF, V, P = 128, 2, 4, 2, 256, 512, 128
TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Sizes are multiples of 128 so DeepSpeed's tp_grain_size (64) splits every MLP / lm_head dim evenly at TP=2.
ARCHS = {
    "llama": ("llama", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                            num_key_value_heads=KV, vocab_size=V, max_position_embeddings=P,
                            tie_word_embeddings=False)),
    "mistral": ("mistral", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                                num_key_value_heads=KV, vocab_size=V, max_position_embeddings=P, sliding_window=None)),
    "qwen2": ("qwen2", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                            num_key_value_heads=KV, vocab_size=V, max_position_embeddings=P, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                            num_key_value_heads=KV, head_dim=32, vocab_size=V, max_position_embeddings=P,
                            tie_word_embeddings=True)),
    "phi3": ("phi3", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                          num_key_value_heads=KV, vocab_size=V, max_position_embeddings=P,
                          original_max_position_embeddings=P)),
    "falcon-new": ("falcon", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, num_kv_heads=KV,
                                  new_decoder_architecture=True, ffn_hidden_size=2 * FF, vocab_size=V,
                                  max_position_embeddings=P, bias=False, alibi=False)),
    "falcon-old-mha": ("falcon", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                      new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                      ffn_hidden_size=2 * FF, vocab_size=V, max_position_embeddings=P, bias=True,
                                      alibi=False)),
    "falcon-old-mqa": ("falcon", dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                      new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                      ffn_hidden_size=2 * FF, vocab_size=V, max_position_embeddings=P, bias=False,
                                      alibi=False)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                                  vocab_size=V, max_position_embeddings=P, rotary_pct=0.5,
                                  tie_word_embeddings=False)),
    "gpt2": ("gpt2", dict(n_embd=H, n_inner=FF, n_layer=L, n_head=NH, vocab_size=V, n_positions=P)),
    "bloom": ("bloom", dict(hidden_size=H, n_layer=L, n_head=NH, vocab_size=V)),
    "opt": ("opt", dict(hidden_size=H, ffn_dim=FF, num_hidden_layers=L, num_attention_heads=NH, vocab_size=V,
                        max_position_embeddings=P, word_embed_proj_dim=H)),
    "gptj": ("gptj", dict(n_embd=H, n_inner=FF, n_layer=L, n_head=NH, rotary_dim=16, vocab_size=V, n_positions=P)),
    "gemma2": ("gemma2", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                              num_key_value_heads=KV, head_dim=32, query_pre_attn_scalar=32, vocab_size=V,
                              max_position_embeddings=P, sliding_window=64)),
    "mixtral": ("mixtral", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                                num_key_value_heads=KV, num_local_experts=4, num_experts_per_tok=2, vocab_size=V,
                                max_position_embeddings=P, sliding_window=None)),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=H, intermediate_size=FF, moe_intermediate_size=128,
                                    num_hidden_layers=L, num_attention_heads=NH, num_key_value_heads=KV, head_dim=32,
                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                    vocab_size=V, max_position_embeddings=P)),
}


# -- the worker (one process per rank, under the launcher) -----------------------------------------------------
def build(arch: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = ARCHS[arch]
    torch.manual_seed(0)  # the same weights on every rank
    config = AutoConfig.for_model(model_type, **kwargs, **TOK)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


def token_ids(seed: int, shape: tuple[int, int]):
    import torch

    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def sqnr(ref, test) -> float:
    err = (ref - test).pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(ref.pow(2).sum().item() / err)


def gemm_weights(model) -> tuple[float, dict[str, int]]:
    """(FP8 share of GEMM weight elements on this rank, {class: share} of what is not FP8). Counted: every
    floating tensor of >= 2 dims (parameter or buffer, not a scale) of a module that is not an embedding or a
    norm, whatever ds_quant thinks of it."""
    import torch

    fp8_types = {torch.float8_e4m3fn, torch.float8_e5m2}
    tot = fp8 = 0
    high = Counter()
    for m in model.modules():
        cls = type(m).__name__
        if "Embedding" in cls or "Norm" in cls:
            continue
        for pname, w in list(m._parameters.items()) + list(m._buffers.items()):
            if w is None or w.dim() < 2 or "scale" in pname or not (w.dtype.is_floating_point or w.dtype in fp8_types):
                continue
            tot += w.numel()
            if w.dtype in fp8_types:
                fp8 += w.numel()
            else:
                high[cls] += w.numel()
    return fp8 / max(tot, 1), {c: n / tot for c, n in high.most_common()}


def ds_classes(model) -> dict[str, int]:
    layers = sys.modules["deepspeed.module_inject.layers"]
    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, layers.TensorParallel_Layer)))


def tp2_model(arch: str, world: int):
    import deepspeed
    import torch

    return deepspeed.init_inference(build(arch), tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


def run_arch(arch: str, work: Path, rank: int, world: int) -> dict:
    import torch.distributed as dist

    import ds_quant
    from ds_quant.layers.linear import Fp8Linear
    from ds_quant.layers.patch import skipped_tp_layers

    calib, ids = token_ids(1, (4, 32)), token_ids(3, (2, 24))

    def cfg(mode: str, stats: Path) -> dict:
        return {"method": "HOOKS", "mode": mode, "observer": "maxabs", "scale_method": "maxabs_hw",
                "dump_stats_path": str(stats)}

    res: dict = {"arch": arch}
    if rank == 0:  # TP=1: the same model in one process, no DeepSpeed (the accuracy TP must not lose)
        m1 = build(arch)
        ref1 = logits(m1, ids)
        ds_quant.prep_model(m1, cfg("MEASURE", work / arch / "tp1"))
        logits(m1, calib)
        ds_quant.finish_measurements(m1)
        q1 = ds_quant.prep_model(build(arch), cfg("QUANTIZE", work / arch / "tp1"))
        res["sqnr_tp1"] = sqnr(ref1, logits(q1, ids))
        res["share_tp1"], res["bf16_tp1"] = gemm_weights(q1)
    try:
        model = tp2_model(arch, world)
        ref = logits(model, ids)
    except Exception as e:  # every rank fails the same way (same model, same shapes), so none waits in a collective
        res["bf16_tp2"] = f"fails in DeepSpeed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return res
    res["bf16_tp2"] = "ok"
    res["ds_classes"] = ds_classes(model)
    stats = work / arch / "tp2"
    ds_quant.prep_model(model, cfg("MEASURE", stats))
    logits(model, calib)
    ds_quant.finish_measurements(model)
    res["measure_exact"] = bool((logits(model, ids) == ref).all())  # measured twins compute DeepSpeed's math
    quant = ds_quant.prep_model(tp2_model(arch, world), cfg("QUANTIZE", stats))
    res["sqnr_tp2"] = sqnr(ref, logits(quant, ids))
    res["fp8_layers"] = sum(isinstance(m, Fp8Linear) for m in quant.modules())
    res["high_precision"] = [f"{name}: {cls}" for name, cls, _ in skipped_tp_layers(quant)]
    share, res["bf16_share"] = gemm_weights(quant)  # rank 0's; the same classes on every rank
    shares = [None] * world
    dist.all_gather_object(shares, share)
    res["share_tp2"] = shares
    return res


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(args.work)
    results = [run_arch(a, work, rank, world) for a in args.archs.split(",")]
    if rank == 0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    import ds_quant

    ds_quant.shutdown()  # barrier, unlink the shm buffers, destroy the group: an orderly exit (rc 0)


# -- the driver ------------------------------------------------------------------------------------------------
def launch_command(archs: list[str], out_json: str, work: str, port: int, ranks: int = 2) -> list[str]:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), str(Path(__file__).resolve()),
            "--worker", "--archs", ",".join(archs), "--json", out_json, "--work", work]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: list[dict]) -> str:
    def f(x):
        return "–" if x is None else ("inf" if x == math.inf else f"{x:.1f}")

    rows = ["| arch | DeepSpeed bf16 TP=2 | DeepSpeed classes created | FP8 share per rank (TP=1) | logits SQNR "
            "TP=2 / TP=1 (dB) | stays bf16 (share of GEMM weights) |", "|---|---|---|---|---|---|"]
    for r in results:
        ok = r["bf16_tp2"] == "ok"
        classes = ", ".join(f"{c} ×{n}" for c, n in sorted(r.get("ds_classes", {}).items())) or "–"
        share = "/".join(f"{s:.2f}" for s in r["share_tp2"]) if ok else "–"
        share += f" ({r['share_tp1']:.2f})" if "share_tp1" in r else ""
        high = r.get("bf16_share") if ok else r.get("bf16_tp1")
        hp = ", ".join(f"{c} {x:.2f}" for c, x in high.items()) if high else "–"
        rows.append(f"| {r['arch']} | {'ok' if ok else r['bf16_tp2']} | {classes} | {share} | "
                    f"{f(r.get('sqnr_tp2'))} / {f(r.get('sqnr_tp1'))} | {hp}{'' if ok else ' (TP=1)'} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--json", default="out/coverage.json")
    p.add_argument("--work", default=None, help="(worker) scratch directory for measurement files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help="master port (default: a free one)")
    args = p.parse_args()
    unknown = [a for a in args.archs.split(",") if a not in ARCHS]
    if unknown:
        p.error(f"unknown architecture(s) {unknown}; known: {', '.join(ARCHS)}")
    if args.worker:
        return worker(args)
    port = args.port or free_port()
    shm = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(shm))
    try:
        with tempfile.TemporaryDirectory() as work:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(launch_command(args.archs.split(","), args.json, work, port), check=True, env=env)
    finally:
        for path in set(glob.glob(shm)) - before:  # DeepSpeed 0.19's CPU shm allreduce never unlinks its buffers
            os.unlink(path)
    print(table(json.loads(Path(args.json).read_text())))


if __name__ == "__main__":
    main()
