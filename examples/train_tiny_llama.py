"""Train the tiny byte-level Llama in `examples/tiny_llama_trained/` on text every CPython ships.

    python examples/train_tiny_llama.py                 # ~3 min on 2 CPU cores; rewrites the weights
    python examples/train_tiny_llama.py --steps 50 --out /tmp/t   # a smoke run

Recipe (seeded, so a rerun on the same Python and torch gives the same weights):
- data: `pydoc_data/topics.py` (the Python language reference, ~750 kB of English + code), as UTF-8
  bytes. Topics sorted by name and joined; every 10th 4 kB block is held out (`split_corpus`), the rest is
  training text.
- tokens: bytes 0-255, 256 bos, 257 eos, 258 pad (`examples/run.py`'s `ByteTokenizer`).
- model: `examples/tiny_llama/config.json` (4 layers, hidden 128, 4 heads / 2 KV heads, ~0.8 M params),
  so TP=2 splits every projection evenly.
- optimisation: float32, AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), 40 warm-up steps then
  cosine decay to 10 %, batch 16 random crops of 128 bytes, gradient clipping at 1.0, 700 steps.
- saved in bfloat16 (safetensors, ~1.7 MB) with `training.json` (recipe, losses, held-out perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "tiny_llama" / "config.json"
OUT = HERE / "tiny_llama_trained"
BOS, EOS = 256, 257
BLOCK = 4096  # held-out unit: every 10th 4 kB block of the corpus


def split_corpus() -> tuple[bytes, bytes]:
    """(training bytes, held-out bytes) from the Python docs that CPython ships."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics)).encode()
    blocks = [text[i:i + BLOCK] for i in range(0, len(text), BLOCK)]
    held = b"".join(b for i, b in enumerate(blocks) if i % 10 == 9)
    return b"".join(b for i, b in enumerate(blocks) if i % 10 != 9), held


def batch(data: torch.Tensor, size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """`size` random crops of `length` bytes, each behind a bos token: (size, length + 1)."""
    starts = torch.randint(0, len(data) - length, (size,), generator=gen)
    crops = torch.stack([data[s:s + length] for s in starts.tolist()])
    return torch.cat([torch.full((size, 1), BOS, dtype=torch.long), crops], dim=1)


@torch.no_grad()
def perplexity(model, data: bytes, length: int = 128, max_windows: int | None = None) -> float:
    """exp(mean next-byte loss) over consecutive `length`-byte windows of `data`, each behind bos."""
    ids = torch.tensor(list(data), dtype=torch.long)
    n = len(ids) // length if max_windows is None else min(len(ids) // length, max_windows)
    windows = ids[: n * length].reshape(n, length)
    windows = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), windows], dim=1)
    total, count = 0.0, 0
    for chunk in windows.split(32):
        logits = model(chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def train(steps: int, seed: int, out: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_bytes, held_bytes = split_corpus()
    data = torch.tensor(list(train_bytes), dtype=torch.long)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG)).float().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    warmup = 40

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses, t0 = [], time.time()
    for step in range(steps):
        x = batch(data, 16, 128, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model = model.eval().to(torch.bfloat16)
    ppl = perplexity(model, held_bytes, max_windows=64)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    summary = {"recipe": "examples/train_tiny_llama.py", "seed": seed, "steps": steps,
               "torch": torch.__version__, "corpus": "pydoc_data/topics.py", "train_bytes": len(train_bytes),
               "held_out_bytes": len(held_bytes), "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
               "held_out_ppl_bf16_first_64_windows": ppl, "seconds": round(time.time() - t0)}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    train(args.steps, args.seed, args.out)


if __name__ == "__main__":
    main()
