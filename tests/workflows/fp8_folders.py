"""The FP8 folders the checkpoint tests share: tiny models (Llama, GPT-NeoX, two MoE), measured once, converted
for six configs; and the ways to run one (in-memory QUANTIZE, a load from the folder, the logits of fixed ids).

Used by tests/workflows/test_convert.py and test_load.py through the package-scoped `work` fixture
(tests/workflows/conftest.py, so the folders are built once for both), and by tests/numerics/test_gptq.py."""

import importlib.util
from pathlib import Path

import torch

import ds_quant
from ds_quant.workflows import hf_model
from ds_quant.workflows.convert import convert
from tests.scripts.make_tiny_hf_model import build as build_tiny_llama

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(5))
HAS_CT = importlib.util.find_spec("compressed_tensors") is not None


def cfg(mode: str, stats: Path, **extra) -> dict:
    return {"method": "HOOKS", "mode": mode, "dump_stats_path": str(stats), **extra}


def measure(model_dir: Path, stats: Path) -> None:
    """Single-process MEASURE (measurements are model-level: any TP size quantizes from them)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    m = ds_quant.prep_model(m, cfg("MEASURE", stats))
    with torch.no_grad():
        for seed in range(3):
            m(torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(seed)))
    ds_quant.finish_measurements(m)


def build_neox(out: Path) -> Path:
    """A tiny GPT-NeoX: fused qkv (DeepSpeed's fused_LinearLayer at TP=2), biases everywhere."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    c = AutoConfig.for_model("gpt_neox", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=512, max_position_embeddings=128, rotary_pct=0.5,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(c).to(torch.bfloat16).save_pretrained(out)
    return out


MOE = {  # transformers 5 holds their experts fused (3-D); save_pretrained writes them per expert (2-D linears)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": dict(moe_intermediate_size=128, head_dim=32, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[]),
}


def build_moe(out: Path, arch: str) -> Path:
    """A tiny random MoE model (2 layers, 4 experts, top-2), saved by save_pretrained: per-expert `w1`/`w3`/`w2`
    (Mixtral, under `block_sparse_moe.`) or `gate_proj`/`up_proj`/`down_proj` (Qwen3-MoE) linears on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    c = AutoConfig.for_model(arch, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **MOE[arch])
    AutoModelForCausalLM.from_config(c).to(torch.bfloat16).save_pretrained(out)
    return out


def folders(w: Path):
    """Four models (two MoE), measured once, and FP8 folders for six configs."""
    llama, neox = build_tiny_llama(w / "llama"), build_neox(w / "neox")
    mixtral, qwen_moe = build_moe(w / "mixtral", "mixtral"), build_moe(w / "qwen3_moe", "qwen3_moe")
    for name, src in (("llama", llama), ("neox", neox), ("mixtral", mixtral), ("qwen3_moe", qwen_moe)):
        measure(src, w / f"meas_{name}" / "m")
    cases = {
        "llama_hw": (llama, cfg("QUANTIZE", w / "meas_llama" / "m")),
        "llama_pcs": (llama, cfg("QUANTIZE", w / "meas_llama" / "m",
                                 scale_method="act_maxabs_hw_weights_pcs_maxabs_pow2",
                                 scale_method_overrides={"lm_head": "act_dynamic_per_token_weights_pcs"})),
        "neox_block_head": (neox, cfg("QUANTIZE", w / "meas_neox" / "m", blocklist={"names": ["lm_head"]})),
        "mixtral_hw": (mixtral, cfg("QUANTIZE", w / "meas_mixtral" / "m")),
        # per expert and channel, a dynamic lm_head (two config groups), the layer-1 experts left in bf16
        "qwen3_moe_pcs": (qwen_moe, cfg("QUANTIZE", w / "meas_qwen3_moe" / "m",
                                        scale_method="act_maxabs_hw_weights_pcs_maxabs_pow2",
                                        scale_method_overrides={"lm_head": "act_dynamic_per_token_weights_pcs"},
                                        blocklist={"names": [r"layers\.1\.mlp\.experts$"]})),
    }
    for name, (src, c) in cases.items():
        convert(src, w / f"fp8_{name}", c, progress=False)
    return w, cases


def in_memory(src: Path, config: dict):
    from transformers import AutoModelForCausalLM

    hf_model.install_from_pretrained(lambda: None)  # no config in force: a plain bf16 load (not quantize-on-load)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    return ds_quant.prep_model(m, config)


def from_folder(folder: Path, config: dict):
    """What the wrapper does at TP=1 without DeepSpeed: from_pretrained on meta, then prep_model fills it."""
    from transformers import AutoModelForCausalLM

    hf_model.install_from_pretrained(lambda: ds_quant.config.resolve_config(config))
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for p in m.parameters()), "from_pretrained must build on meta"
    return ds_quant.prep_model(m, config)


def logits(m):
    with torch.no_grad():
        return m(IDS).logits.float()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, dtype and shape included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))
