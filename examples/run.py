"""Calibrate, then run FP8 inference, on an HF causal LM under DeepSpeed AutoTP.

    deepspeed --num_gpus 2 examples/run.py --quant-config examples/configs/maxabs_measure.json
    deepspeed --num_gpus 2 examples/run.py --quant-config examples/configs/maxabs_quant.json

The script is an ordinary DeepSpeed inference script plus two lines: `ds_quant.install()` and
`ds_quant.add_quant_args(parser)`. With `--quant-config` (or QUANT_CONFIG), the module that
`deepspeed.init_inference` returns is already measured or quantized.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
from tqdm.auto import tqdm

import ds_quant
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics.scales import sqnr_db

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "tiny_llama" / "config.json"
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "DeepSpeed splits each linear layer across the ranks of a tensor-parallel group.",
    "FP8 stores every weight in a single byte, with one scale for the whole tensor.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Calibration runs a few representative prompts and records the largest magnitude seen.",
]
PROMPT = "Tensor parallel inference in FP8"
EVAL_TEXT = "Measure once, then serve at any tensor-parallel size; the scales come from the merged file."


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255), for the built-in tiny model that has no tokenizer files."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode()]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory, bf16 or an FP8 folder from `ds-quant convert` (default: a tiny seeded Llama, "
                   f"built from {DEFAULT_CONFIG.relative_to(HERE.parent)})")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--save-reference", metavar="FILE", help="save logits + generated ids (rank 0), to compare later")
    p.add_argument("--compare-to", metavar="FILE", help="compare this run's logits and tokens with a saved reference")
    p.add_argument("--report", metavar="FILE", help="write module types, dtypes and weight bytes as JSON; "
                   "'{rank}' in FILE is replaced by the rank (default: rank 0 only)")
    ds_quant.add_quant_args(p)
    return p.parse_args()


def load_model(path: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is None:
        torch.manual_seed(0)  # same weights on every rank and every run
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEFAULT_CONFIG))
        return model.to(torch.bfloat16).eval(), ByteTokenizer()
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    if not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return model, ByteTokenizer()  # e.g. examples/tiny_llama_trained: a byte-level model
    return model, AutoTokenizer.from_pretrained(path)


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.encode(text)
    return torch.tensor([ids], dtype=torch.long)


def linear_report(model: torch.nn.Module, world_size: int) -> dict:
    """What a test (or a curious user) needs to see that the swap happened."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (Fp8Linear, MeasuredLinear))}
    return {
        "world_size": world_size,
        "module_types": {n: type(m).__name__ for n, m in model.named_modules()
                         if "Linear" in type(m).__name__},
        "original_kinds": {n: m.layout.kind.value for n, m in layers.items()},
        "weight_dtypes": {n: str(m.weight.dtype) for n, m in layers.items()},
        # Bytes a rank holds for the patched layers' weights, scales included.
        "weight_bytes": sum(t.numel() * t.element_size() for m in layers.values()
                            for t in (m.weight, getattr(m, "weight_scale", None), getattr(m, "input_scale", None))
                            if t is not None),
    }


def main() -> None:
    args = parse_args()
    ds_quant.install()  # init_inference below comes back measured/quantized when --quant-config is given
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    model, tokenizer = load_model(args.model)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=torch.bfloat16,
                                      replace_with_kernel_inject=False)
    model = engine.module
    config = ds_quant.QuantConfig.from_env_or_args()
    fp8_folder = any(isinstance(m, Fp8Linear) for m in model.modules())  # --model FP8_DIR needs no config
    mode = config.mode.value if config else ("QUANTIZE" if fp8_folder else "bf16")
    label = "FP8" if mode == "QUANTIZE" else "bf16"  # MEASURE computes exactly what bf16 does

    with torch.no_grad():
        if mode == "MEASURE":
            for text in tqdm(CALIBRATION, desc="calibration", disable=not rank0):
                model(encode(tokenizer, text))
            ds_quant.finish_measurements(model)
        logits = model(encode(tokenizer, EVAL_TEXT)).logits.float()
        prompt = encode(tokenizer, PROMPT)
        out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                             min_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        generated = out[0, prompt.shape[1]:]

    if args.report and (rank0 or "{rank}" in args.report):
        report = Path(args.report.replace("{rank}", os.environ.get("RANK", "0")))
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(linear_report(model, world_size), indent=1))
    if not rank0:
        return
    print(f"[{mode}] generated: {PROMPT!r} -> {tokenizer.decode(generated.tolist())!r}", flush=True)
    if args.save_reference:
        Path(args.save_reference).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": logits, "generated": generated, "label": label}, args.save_reference)
    if args.compare_to:
        ref = torch.load(args.compare_to)
        agree = int((ref["generated"] == generated).sum())
        top1 = float((ref["logits"].argmax(-1) == logits.argmax(-1)).float().mean()) * 100
        print(f"{label} vs {ref['label']}: logits SQNR {sqnr_db(ref['logits'], logits):.1f} dB, "
              f"greedy tokens agree {agree}/{len(generated)}, next-token top-1 agreement {top1:.1f}% "
              f"over {logits.shape[1]} positions", flush=True)


if __name__ == "__main__":
    main()
    ds_quant.shutdown()  # barrier, unlink this rank's shm buffer, destroy the process group: a clean exit
