"""Write a tiny, seeded Llama as an HF model directory (config, safetensors, byte-level tokenizer).

    python tests/scripts/make_tiny_hf_model.py OUT_DIR

Written without `save_pretrained`, so transformers 4.x and 5.x both load it the same way.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = {"<s>": 256, "</s>": 257, "<pad>": 258}  # ids the tiny config names as bos / eos / pad


def build(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "tiny_llama" / "config.json", out / "config.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    # Byte-level BPE without merges: one token per byte, ids 0-255, as the tiny model's vocabulary expects.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(sorted(alphabet, key=_byte_of), range(256), strict=True)}
    vocab = {c: i for c, i in byte_to_char.items()} | SPECIALS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 256, "model_input_names": ["input_ids", "attention_mask"]}, indent=1))
    return out


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to `char`."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs, strict=True))[char]


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
