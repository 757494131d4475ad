"""Which FP8 layers of SmolLM2 cost the most: each one put back to bf16 alone, on calibration text only.

    python examples/smollm2_sensitivity.py --stats out/smollm2/c16/stats --config CFG.json --names k_proj v_proj

Single process (TP=1; measurements are model-level, so any TP size's file works). The model is quantized
with CFG (every matching layer FP8), then, for each FP8 layer whose name contains one of --names, that layer
alone is restored to bf16 and the mean KL divergence of the next-token distribution from bf16 is measured on
the calibration windows (never on the evaluation windows of smollm2_accuracy.py, so a blocklist chosen from
this ranking is not fitted to the text it is scored on). Prints the layers, most helpful first, and a
blocklist regex of the top --keep.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm2  # noqa: E402
import smollm2_accuracy as acc  # noqa: E402


@torch.no_grad()
def logprobs(model, wins: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(w).logits.float()[0, :-1], -1) for w in wins]


def kl(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Mean over positions of KL(bf16 || fp8)."""
    total = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got, strict=True))
    return total / sum(r.shape[0] for r in ref)


def main() -> None:
    from transformers import AutoTokenizer

    import ds_quant

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--stats", required=True, help="measurement file prefix")
    p.add_argument("--config", required=True, help="QUANTIZE config JSON (its dump_stats_path is replaced)")
    p.add_argument("--names", nargs="+", default=["k_proj"], help="substrings of the layers to try")
    p.add_argument("--calib", type=int, default=4, help="calibration windows to score on")
    p.add_argument("--keep", type=int, default=21, help="how many to put in the printed blocklist")
    p.add_argument("--out", default=None, help="JSON of the ranking")
    args = p.parse_args()
    model_dir = smollm2.ensure(args.model)
    wins, _ = acc.windows(AutoTokenizer.from_pretrained(model_dir), args.calib, 8)
    model = acc.load(model_dir, 1)
    ref = logprobs(model, wins)
    originals = dict(model.named_modules())
    cfg = {**json.loads(Path(args.config).read_text()), "mode": "QUANTIZE", "dump_stats_path": args.stats}
    model = ds_quant.prep_model(model, cfg)
    base = kl(ref, logprobs(model, wins))
    print(f"all FP8 per {args.config}: KL {base:.5f}", flush=True)
    gains = {}
    for name, fp8 in list(model.named_modules()):
        if type(fp8).__name__ != "Fp8Linear" or not any(s in name for s in args.names):
            continue
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, originals[name])
        gains[name] = base - kl(ref, logprobs(model, wins))
        setattr(holder, child, fp8)
        print(f"{name}: KL drop {gains[name]:+.5f} ({100 * gains[name] / base:+.1f} %)", flush=True)
    ranked = sorted(gains, key=gains.get, reverse=True)
    top = ranked[:args.keep]
    regex = "|".join(re.escape(n) for n in top)
    print(f"top {len(top)}: {', '.join(top)}\nblocklist regex: ^({regex})$")
    if args.out:
        Path(args.out).write_text(json.dumps({"base_kl": base, "gains": gains, "ranked": ranked}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
