"""`ds-quant convert` (issue 14): the folder's format (compressed-tensors float-quantized, fused experts as
per-expert linears), what it refuses and what a failure leaves, the CLI, interop with HF + compressed-tensors.

Numerics: interop with HF's own loader (it dequantizes to bf16 and runs bf16 GEMMs, so only FP8-level
agreement is expected): logits SQNR against ours >= 20 dB and >= 2 dB above ours-vs-bf16 (measured: 23.8 dB
against ours, 20.7 dB ours-vs-bf16, on this random tiny Llama; a wrong scale or layout gives < 0 dB).
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import ds_quant
from ds_quant.config import QuantConfig
from ds_quant.errors import CheckpointError, ConfigError, MeasurementError
from ds_quant.files.checkpoint import Fp8Folder
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows.convert import convert
from tests.launcher import ROOT
from tests.workflows.fp8_folders import HAS_CT, from_folder, logits, same


# -- the folder's format ---------------------------------------------------------------------------------------
def test_convert_writes_compressed_tensors_float_quantized(work):
    from safetensors import safe_open

    w, cases = work
    folder = w / "fp8_llama_hw"
    files = sorted(p.name for p in folder.iterdir())
    assert "tokenizer.json" in files and "model.safetensors" in files  # tokenizer carried over
    assert not any(p.name.startswith(".") for p in w.iterdir()), "no temp dir left behind"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == []
    g = qc["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"] and g["weights"]["strategy"] == "tensor" and g["weights"]["type"] == "float"
    assert g["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                      "strategy": "tensor", "dynamic": False, "observer": "static_minmax"}
    assert qc["ds_quant"]["scale_method"] == "maxabs_hw" and qc["ds_quant"]["act_limit"] == 448.0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{q}.weight").shape == (128, 128)  # full, unsharded
        assert f.get_tensor(f"{q}.weight_scale").shape == (1,) and f.get_tensor(f"{q}.input_scale").shape == (1,)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # non-linear: untouched
    # per-channel weights and a dynamic lm_head: two groups naming their layers
    qc = json.loads((w / "fp8_llama_pcs" / "config.json").read_text())["quantization_config"]
    groups = {json.dumps(g["input_activations"]["strategy"]): g for g in qc["config_groups"].values()}
    assert groups['"token"']["targets"] == ["lm_head"] and groups['"token"']["input_activations"]["dynamic"]
    assert all(g["weights"]["strategy"] == "channel" for g in groups.values())
    f = Fp8Folder(w / "fp8_llama_pcs")
    assert f.shape("lm_head.weight_scale") == (320, 1) and not f.has("lm_head.input_scale")
    # a blocked layer stays bf16 and is `ignore`d
    qc = json.loads((w / "fp8_neox_block_head" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and Fp8Folder(w / "fp8_neox_block_head").meta["embed_out.weight"][0] == "BF16"


def test_convert_writes_fused_experts_as_per_expert_fp8_linears(work):
    """The layout the ecosystem reads (llm-compressor writes it, vLLM and HF + compressed-tensors load it, and
    transformers 5 saves bf16 experts so): per expert e, `experts.{e}.w1/w3/w2` (Mixtral) with `weight` (FP8),
    `weight_scale`, `input_scale`. Gate and up carry their fused slice's scale (the same one: in-memory QUANTIZE
    scales the fused [gate; up] slice); the router stays bf16 and is `ignore`d."""
    from ds_quant.layers.experts import expert_input_scales, quantize_expert, record_name
    from ds_quant.numerics.layer_spec import resolve

    w, cases = work
    src, config = cases["mixtral_hw"]
    f = Fp8Folder(w / "fp8_mixtral_hw")
    block = "model.layers.1.block_sparse_moe"  # the file's own naming (transformers 4.x), kept
    assert f.meta[f"{block}.experts.2.w1.weight"] == ("F8_E4M3", (256, 128))
    assert f.meta[f"{block}.experts.2.w2.weight"] == ("F8_E4M3", (128, 256))
    assert f.meta[f"{block}.gate.weight"][0] == "BF16" and not f.has(f"{block}.gate.weight_scale")
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in f.meta)
    qc = json.loads((w / "fp8_mixtral_hw" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["ignore"] == [f"model.layers.{i}.block_sparse_moe.gate" for i in (0, 1)]
    # the numbers: what in-memory QUANTIZE computes for expert 2 of layer 1 (experts.quantize_expert)
    from safetensors.torch import load_file

    bf16 = load_file(src / "model.safetensors")
    spec = resolve(ds_quant.config.resolve_config(config), "model.layers.1.mlp.experts", "experts")
    fused = torch.cat([bf16[f"{block}.experts.2.w1.weight"], bf16[f"{block}.experts.2.w3.weight"]])
    w_fp8, scale = quantize_expert(fused, spec)
    assert same(f.read(f"{block}.experts.2.w1.weight"), w_fp8[:256])
    assert same(f.read(f"{block}.experts.2.w3.weight"), w_fp8[256:])
    assert f.layers[f"{block}.experts.2.w1"].weight_scale == scale
    assert f.layers[f"{block}.experts.2.w3"].weight_scale == scale
    layers = ds_quant.files.shards.read_local(config["dump_stats_path"])[0]["layers"]
    assert layers[record_name("model.layers.1.mlp.experts", "gate_up_proj", 2)]["samples"] > 0
    ins = expert_input_scales("model.layers.1.mlp.experts", "gate_up_proj", 4, spec, layers)
    assert f.layers[f"{block}.experts.2.w1"].input_scale == ins[2] == f.layers[f"{block}.experts.2.w3"].input_scale
    # per channel, a dynamic lm_head, blocked experts: the groups name their per-expert linears, not the blocked
    # experts' nor the routers
    qc = json.loads((w / "fp8_qwen3_moe_pcs" / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert "model.layers.0.mlp.experts.3.up_proj" in targets and "lm_head" in targets
    assert not any(t.startswith("model.layers.1.mlp.experts.") or t.endswith("mlp.gate") for t in targets)
    f = Fp8Folder(w / "fp8_qwen3_moe_pcs")
    assert f.shape("model.layers.0.mlp.experts.3.up_proj.weight_scale") == (128, 1)
    assert f.meta["model.layers.1.mlp.experts.3.up_proj.weight"][0] == "BF16"


def test_convert_failure_leaves_nothing_at_out_dir(work, tmp_path):
    w, cases = work
    src, config = cases["llama_hw"]
    broken = tmp_path / "src"
    shutil.copytree(src, broken)
    from safetensors.torch import load_file, save_file

    t = load_file(broken / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"] *= 4  # weights grew beyond the measured max-abs
    save_file(t, broken / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(MeasurementError, match=r"layer 'model\.layers\.1\.mlp\.down_proj': weight max-abs .* "
                                              "exceeds the measured"):
        convert(broken, out, config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT_DIR, no temp dir
    (out / "x").parent.mkdir()
    (out / "x").write_text("")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        convert(src, out, config, progress=False)


def test_convert_cli(work, tmp_path):
    w, cases = work
    src, config = cases["llama_hw"]
    (tmp_path / "q.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "ds_quant.cli", "convert", str(src), str(tmp_path / "o"), "--quant-config",
           str(tmp_path / "q.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "wrote FP8 checkpoint" in r.stdout, r.stderr[-2000:]
    assert "ds-quant convert" in r.stderr  # the progress bar
    (tmp_path / "m.json").write_text(json.dumps({**config, "mode": "MEASURE"}))
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "m.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1 and "convert needs a QUANTIZE config" in r.stderr


# -- interop with HF transformers + compressed-tensors ------------------------------------------------------
@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
def test_hf_with_compressed_tensors_loads_our_folder(work):
    from transformers import AutoModelForCausalLM

    w, cases = work
    src, config = cases["llama_hw"]
    ours = logits(from_folder(w / "fp8_llama_hw", config))
    from transformers import LlamaForCausalLM

    hf_own = LlamaForCausalLM.from_pretrained.__func__.__wrapped__  # HF's loader, under ds_quant's patch
    hf = hf_own(LlamaForCausalLM, w / "fp8_llama_hw", dtype=torch.bfloat16).eval()
    q = hf.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1,)  # compressed, as we wrote it
    # The trap: such a model must not reach prep_model (AutoTP would cut FP8 weights apart from their scales).
    with pytest.raises(CheckpointError, match=r"layer .model\.layers\.0\.self_attn\.q_proj. .* holds an FP8 weight"):
        ds_quant.prep_model(hf, config)
    theirs = logits(hf)
    bf16 = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval())
    s, s_bf16 = sqnr_db(ours, theirs), sqnr_db(ours, bf16)
    print(f"HF+compressed-tensors vs ds_quant logits SQNR {s:.1f} dB; vs bf16: ds_quant {s_bf16:.1f} dB, "
          f"HF {sqnr_db(bf16, theirs):.1f} dB")
    # HF runs the same FP8 weights (dequantized) with bf16 GEMMs: closer to ours than the bf16 model is, and
    # at least FP8 level (a wrong scale or a transposed weight gives < 0 dB).
    assert s >= 20 and s >= s_bf16 + 2


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
def test_hf_with_compressed_tensors_loads_our_moe_folder(work):
    """HF transformers 5 + compressed-tensors reads the per-expert FP8 linears, dequantizes them and merges them
    into its fused experts: bitwise our FP8 weights times our per-expert scales (the layout and scales are right).
    Logits (measured: 23.0 dB against ours, 22.2 dB ours-vs-bf16): HF runs bf16 activations (it ignores input
    scales), and a token whose router picks another expert under FP8 differs a lot, so the margin over bf16 is
    smaller than for the Llama; >= 20 dB (a wrong scale gives < 0 dB)."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    w, cases = work
    src, config = cases["mixtral_hw"]
    m = from_folder(w / "fp8_mixtral_hw", config)
    hf_own = MixtralForCausalLM.from_pretrained.__func__.__wrapped__  # HF's loader, under ds_quant's patch
    hf = hf_own(MixtralForCausalLM, w / "fp8_mixtral_hw", dtype=torch.bfloat16).eval()
    for i in (0, 1):
        ours, theirs = m.model.layers[i].mlp.experts, hf.model.layers[i].mlp.experts
        for p in ("gate_up_proj", "down_proj"):
            scale = getattr(ours, f"{p}_scale")
            assert torch.equal((getattr(ours, p).float() * scale[:, None, None]).bfloat16(), getattr(theirs, p))
    ours, theirs = logits(m), logits(hf)
    bf16 = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval())
    print(f"MoE: HF+compressed-tensors vs ds_quant logits SQNR {sqnr_db(ours, theirs):.1f} dB; ds_quant vs bf16 "
          f"{sqnr_db(ours, bf16):.1f} dB")
    assert sqnr_db(ours, theirs) >= 20


@pytest.mark.parametrize("extra, message", [
    ({"mode": "MEASURE"}, "convert needs a QUANTIZE config"),
    ({"fp8_config": "E5M2"}, "compressed-tensors checkpoints hold"),
    ({"act_scope": "rank"}, "act_scope 'rank' gives each rank its own input scale"),
    ({"smooth_alpha": 0.5}, "key 'smooth_alpha': convert writes the model's own weights"),
    ({"outlier_channels": 16}, "key 'outlier_channels' (16): a compressed-tensors checkpoint has no place"),
])
def test_convert_refuses_configs_a_checkpoint_cannot_hold(tmp_path, extra, message):
    """Refused before anything is read or written: one line naming the key, and nothing at OUT_DIR."""
    cfg = QuantConfig.from_dict({"method": "HOOKS", "mode": "QUANTIZE", "dump_stats_path": str(tmp_path / "m"),
                                 **extra})
    with pytest.raises(ConfigError, match=re.escape(message)):
        convert(tmp_path / "no-model-read", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
