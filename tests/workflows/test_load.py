"""FP8 checkpoints (issue 14): `ds-quant convert`, the folder's format (compressed-tensors float-quantized),
loading on meta with each rank reading its slices, errors on bad folders, interop with HF + compressed-tensors.

Numerics: a checkpoint load must give logits *bitwise* equal to in-memory QUANTIZE at the same TP size (the
folder's FP8 weight is the same elementwise cast with the same model-level scale), so equality is exact, no
tolerance. Interop with HF's own loader (it dequantizes to bf16 and runs bf16 GEMMs, so only FP8-level
agreement is expected): logits SQNR against ours >= 20 dB and >= 2 dB above ours-vs-bf16 (measured: 23.8 dB
against ours, 20.7 dB ours-vs-bf16, on this random tiny Llama; a wrong scale or layout gives < 0 dB).
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds_quant
from ds_quant.config import QuantConfig
from ds_quant.errors import CheckpointError, ConfigError, MeasurementError
from ds_quant.files import safetensors as st_io
from ds_quant.files.checkpoint import Fp8Folder
from ds_quant.layers.experts import Fp8Experts
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows import hf_model
from ds_quant.workflows.convert import convert
from tests.launcher import ROOT, deepspeed
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


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Four models (two MoE), measured once, and FP8 folders for six configs."""
    w = tmp_path_factory.mktemp("ckpt")
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
    assert _same(f.read(f"{block}.experts.2.w1.weight"), w_fp8[:256])
    assert _same(f.read(f"{block}.experts.2.w3.weight"), w_fp8[256:])
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


# -- the reader (pread, no mmap) and the streaming writer -------------------------------------------------
def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(37, 53, generator=g).to(torch.bfloat16),
            "q": torch.randn(11, 7, generator=g).to(torch.float8_e4m3fn), "v": torch.randn(5, generator=g),
            "m": torch.tensor([True, False, True]), "e": torch.empty(0, 4), "s": torch.tensor(3.0),
            "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "h": torch.randn(3, 4, 5, generator=g).half()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, dtype and shape included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def test_reader_reads_tensors_and_slices_bitwise(tmp_path, monkeypatch):
    """Whole tensors, row slices (one pread), column slices (rows read in chunks: the chunk is set to 300 bytes,
    so a slice spans several chunks), several row runs, every dtype the format holds: bitwise what safe_open
    gives."""
    from safetensors import safe_open
    from safetensors.torch import save_file


    ts = _sample_tensors()
    save_file(ts, tmp_path / "x.safetensors")
    monkeypatch.setattr(st_io, "_CHUNK_BYTES", 300)
    f = st_io.SafetensorsFile(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as ref:
        for k in ts:
            assert _same(f.read(k), ref.get_tensor(k)), k
        sl = ref.get_slice("w")
        for rows, cols in [(slice(3, 9), None), (None, slice(10, 20)), (slice(0, 37), slice(0, 53)),
                           ([slice(0, 2), slice(30, 37)], slice(5, 50)), ([slice(1, 3), slice(5, 6)], None),
                           (slice(4, 4), None)]:
            parts = rows if isinstance(rows, list) else [rows or slice(None)]
            want = torch.cat([sl[r] if cols is None else sl[r, cols] for r in parts])
            assert _same(f.read("w", rows, cols), want), (rows, cols)
        assert _same(f.read("v", slice(1, 3)), ref.get_slice("v")[1:3])
        assert _same(f.read("h", slice(1, 3), slice(2, 4)), ref.get_slice("h")[1:3, 2:4])
    f.close()


def test_reader_refuses_bad_headers_naming_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from ds_quant.files.safetensors import SafetensorsFile

    save_file(_sample_tensors(), tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def write(h: dict, data: bytes) -> Path:
        b = json.dumps(h).encode()
        (tmp_path / "bad.safetensors").write_bytes(len(b).to_bytes(8, "little") + b + data)
        return tmp_path / "bad.safetensors"

    data = raw[8 + n:]
    cases = [({**header, "w": {**header["w"], "dtype": "F4"}}, data, r"tensor 'w': bad header entry"),
             ({**header, "w": {**header["w"], "shape": [37, 54]}}, data, r"tensor 'w': BF16 \[37, 54\] needs 3996 "
              r"bytes, its offsets span 3922"),
             ({**header, "w": {**header["w"], "data_offsets": [0, -1]}}, data, r"tensor 'w': bad header entry"),
             (header, data[:-9], r"the header describes \d+ bytes of tensor data, the file holds \d+")]
    for h, d, msg in cases:
        with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors file \(" + msg +
                           r".*\); it is truncated or corrupt: convert again"):
            SafetensorsFile(write(h, d))
    (tmp_path / "bad.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*header length 1000000, file size 10"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*header is not JSON"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_reader_does_not_keep_file_pages_resident(tmp_path):
    """The point of pread: reading a file tensor by tensor (each freed after use) grows RSS by about one tensor,
    while safe_open's mmap keeps every touched page resident (+216 MB through safe_open here). Bound: two
    tensors. The tensors are 36 MB, above glibc's largest mmap threshold (32 MB), so each buffer is unmapped when
    freed; smaller ones come from the heap, which glibc keeps up to twice that threshold before trimming."""
    import gc

    import psutil
    from safetensors.torch import save_file

    from ds_quant.files.safetensors import SafetensorsFile

    n = 9 << 20
    save_file({f"t{i}": torch.full((n,), float(i)) for i in range(6)}, tmp_path / "big.safetensors")
    gc.collect()
    proc = psutil.Process()
    with SafetensorsFile(tmp_path / "big.safetensors") as f:
        r0, grew = proc.memory_info().rss, 0
        for i in range(6):
            t = f.read(f"t{i}")
            assert float(t.sum()) == float(i) * n  # every page touched
            del t
            grew = max(grew, proc.memory_info().rss - r0)
    assert grew < 72 * 2**20, f"RSS grew {grew / 2**20:.0f} MB reading 216 MB tensor by tensor"


def test_streaming_writer_writes_what_safetensors_reads(tmp_path):
    """The header is planned first, tensors written in any order: safe_open and load_file read it back
    bitwise; a tensor that does not match its plan, or one never written, is refused naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ds_quant.files.safetensors import SafetensorsWriter

    ts = _sample_tensors()
    w = SafetensorsWriter(tmp_path / "y.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in ts.items()},
                          {"format": "pt"})
    for k in reversed(list(ts)):
        w.write(k, ts[k])
    w.close()
    back = load_file(tmp_path / "y.safetensors")
    assert set(back) == set(ts) and all(_same(back[k], v) for k, v in ts.items())
    with safe_open(str(tmp_path / "y.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    w = SafetensorsWriter(tmp_path / "z.safetensors", {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))})
    with pytest.raises(CheckpointError, match=r"z\.safetensors: tensor 'a' is torch\.float32 \[3, 2\], planned as "
                                              r"torch\.float32 \[2, 3\]"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"z\.safetensors: tensors \['b'\] were planned but never written"):
        w.close()
    w.abort()


def test_weights_quantized_in_row_blocks_are_bitwise_the_whole_weights(monkeypatch):
    """quantize_weight casts (and takes maxima) in row blocks, and quantize-on-load feeds quantize_weight_blocks
    blocks read from the file: both bitwise equal to one pass over the whole weight, for every recipe and device
    profile (blocks of 1000 elements here, so every weight spans several; an inf, a zero row, an odd width)."""
    from ds_quant.numerics import scales

    g = torch.Generator().manual_seed(3)
    weights = [(torch.randn(300, 70, generator=g) * 3).to(torch.bfloat16), torch.randn(5, 1001, generator=g),
               torch.zeros(0, 16, dtype=torch.bfloat16)]
    weights[0][7] = 0
    weights[1][2, 3] = float("inf")
    fp8 = torch.float8_e4m3fn
    for w in weights:
        for method, recipe in scales.RECIPES.items():
            for profile in scales.PROFILES.values():
                monkeypatch.setattr(scales, "_CHUNK_ELEMS", 1 << 40)
                ref_q, ref_s = scales.quantize_weight(w, recipe, fp8, profile)
                monkeypatch.setattr(scales, "_CHUNK_ELEMS", 1000)
                q, s = scales.quantize_weight(w, recipe, fp8, profile)
                assert _same(q, ref_q) and _same(s, ref_s), (method, w.shape)
                if recipe.weight_opt:  # the weight search needs the whole weight
                    continue
                step = max(1, 1000 // w.shape[1])
                blocks = lambda w=w, step=step: (w[i:i + step] for i in range(0, max(1, w.shape[0]), step))  # noqa: E731
                q, s, top = scales.quantize_weight_blocks(blocks, tuple(w.shape), recipe, fp8, profile)
                assert _same(q, ref_q) and _same(s, ref_s), (method, w.shape)
                assert top == (float(w.abs().max()) if w.numel() else 0.0)


# -- loading at TP=1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama_hw", "llama_pcs", "neox_block_head"])
def test_fp8_folder_loads_bitwise_equal_to_in_memory_quantize(work, case):
    w, cases = work
    src, config = cases[case]
    ref = logits(in_memory(src, config))
    m = from_folder(w / f"fp8_{case}", config)
    fp8 = {n: x for n, x in m.named_modules() if isinstance(x, Fp8Linear)}
    assert len(fp8) == len(Fp8Folder(w / f"fp8_{case}").layers) > 0
    assert all(x.weight.dtype == torch.float8_e4m3fn for x in fp8.values())
    assert not any(p.device.type == "meta" for p in m.parameters())
    assert torch.equal(logits(m), ref)


@pytest.mark.parametrize("case", ["llama_pcs", "neox_block_head"])
def test_quantize_on_load_is_bitwise_equal_to_in_memory_quantize(work, case):
    """A bf16 folder + measurements on the same meta path ("quantize_on_load": true): each linear read, quantized,
    sliced, freed."""
    w, cases = work
    src, config = cases[case]
    ref = logits(in_memory(src, config))
    m = from_folder(src, {**config, "quantize_on_load": True})
    assert sum(isinstance(x, Fp8Linear) for x in m.modules()) == (29 if case.startswith("llama") else 8)
    assert torch.equal(logits(m), ref)


@pytest.mark.parametrize("case", ["mixtral_hw", "qwen3_moe_pcs"])
def test_moe_folder_and_quantize_on_load_are_bitwise_in_memory_quantize(work, case, monkeypatch):
    """Fused experts from an FP8 folder (Fp8Experts filled from the per-expert FP8 linears, no bf16 expert weight
    made) and by quantize-on-load (one expert's bf16 slice read, quantized, freed): the same modules, the same
    FP8 weights and scales bit for bit, the same logits as in-memory QUANTIZE. Routers stay bf16; Qwen3-MoE's
    layer-1 experts are blocked: bf16, assembled from their per-expert linears."""
    w, cases = work
    src, config = cases[case]
    ref_model = in_memory(src, config)
    ref = logits(ref_model)
    ref_experts = {n: x for n, x in ref_model.named_modules() if isinstance(x, Fp8Experts)}
    assert len(ref_experts) == (2 if case.startswith("mixtral") else 1)

    reads, read = [], st_io.SafetensorsFile.read

    def logged(self, key, *args, **kwargs):
        t = read(self, key, *args, **kwargs)
        reads.append((key, t.dtype, tuple(t.shape)))
        return t

    monkeypatch.setattr(st_io.SafetensorsFile, "read", logged)
    for how, path in (("folder", w / f"fp8_{case}"), ("quantize_on_load", src)):
        reads.clear()
        m = from_folder(path, {**config, "quantize_on_load": True} if how == "quantize_on_load" else config)
        # the quantized experts' weights: FP8 from a folder, one expert's bf16 linear at a time on quantize-on-load
        blocked = ".layers.1." if case.startswith("qwen3") else "-"  # Qwen3-MoE's blocked block: bf16, as stored
        expert_reads = [(k, d, s) for k, d, s in reads if ".experts." in k and k.endswith(".weight")
                        and blocked not in k]
        assert expert_reads and all(len(s) == 2 for _, _, s in expert_reads)
        assert all(d == (torch.float8_e4m3fn if how == "folder" else torch.bfloat16) for _, d, _ in expert_reads)
        assert not any(p.device.type == "meta" for p in m.parameters())
        got = {n: x for n, x in m.named_modules() if isinstance(x, Fp8Experts)}
        assert sorted(got) == sorted(ref_experts), how
        for n, x in got.items():
            assert x.gate_up_proj.dtype == x.down_proj.dtype == torch.float8_e4m3fn
            state, want = x.state_dict(), ref_experts[n].state_dict()
            assert sorted(state) == sorted(want) and all(_same(state[k], want[k]) for k in want), (how, n)
        per_channel = case.endswith("pcs")
        x = got["model.layers.0.mlp.experts"]
        assert x.gate_up_proj_scale.shape == ((4, x.gate_up_proj.shape[1]) if per_channel else (4,))
        assert x.gate_up_proj_input_scale.shape == (4,)
        router = m.model.layers[0].mlp.gate
        assert router.weight.dtype == torch.bfloat16 and "Router" in type(router).__name__
        if case.startswith("qwen3"):
            blocked = m.model.layers[1].mlp.experts
            assert type(blocked).__name__ == "Qwen3MoeExperts" and blocked.gate_up_proj.dtype == torch.bfloat16
            assert torch.equal(blocked.gate_up_proj, ref_model.model.layers[1].mlp.experts.gate_up_proj)
        assert sum(isinstance(y, Fp8Linear) for y in m.modules()) == \
            sum(isinstance(y, Fp8Linear) for y in ref_model.modules())
        assert torch.equal(logits(m), ref), how


# -- errors ----------------------------------------------------------------------------------------------------
def _copy(w: Path, name: str, src: str = "fp8_llama_hw") -> Path:
    dst = w / f"bad_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w / src, dst)
    return dst


def test_truncated_or_corrupt_folder_gives_one_error_naming_file_and_tensor(work):
    from safetensors.torch import load_file, save_file

    w, _ = work
    bad = _copy(w, "truncated")
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file .*truncated or corrupt"):
        Fp8Folder(bad)
    st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Fp8Folder(bad)
    bad = _copy(w, "zero_scale")
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight_scale"].zero_()
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight_scale' holds zero"):
        Fp8Folder(bad)
    t["model.layers.1.mlp.up_proj.weight_scale"].fill_(0.01)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is BF16 .*expected a 2-D F8_E4M3"):
        Fp8Folder(bad)


def test_wrapped_script_on_a_truncated_folder_ends_in_one_line(work, tmp_path):
    """`python -m ds_quant.run` with a script that loads a truncated FP8 folder: the CheckpointError (raised inside
    the user's from_pretrained) ends the run in one line naming the file, no traceback, a non-zero exit."""
    w, cases = work
    bad = _copy(w, "truncated_run")
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (tmp_path / "q.json").write_text(json.dumps(cases["llama_hw"][1]))
    script = tmp_path / "load.py"
    script.write_text("import sys\nfrom transformers import AutoModelForCausalLM\n"
                      "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-m", "ds_quant.run", "--quant-config", str(tmp_path / "q.json"), str(script),
                        str(bad)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    lines = [x for x in out.splitlines() if "model.safetensors" in x]
    assert len(lines) == 1 and "ERROR" in lines[0] and "not a readable safetensors file" in lines[0], out[-3000:]


def test_bad_expert_tensors_give_one_error_naming_file_and_tensor(work, monkeypatch):
    """An FP8 folder whose expert linear has the wrong shape, is not FP8, lacks its weight_scale or (alone among
    its block) its input_scale; a bf16 source for quantize-on-load with a wrong expert shape: one line naming the
    file and the tensor as the file spells it (`block_sparse_moe.`; the model says `mlp.`)."""
    from safetensors.torch import load_file, save_file

    w, cases = work
    config = cases["mixtral_hw"][1]
    e1 = "model.layers.0.block_sparse_moe.experts.1"
    file = r"bad_\w+/model\.safetensors: "
    # the file's name; where the folder is read for the model, also the model's
    named = re.escape(f"'{e1}.w3.weight'") + "(" + re.escape(" (the model's 'model.layers.0.mlp.experts.1.w3.weight')") + ")?"
    edits = [
        ("shape", lambda t: t.update({f"{e1}.w3.weight": t[f"{e1}.w3.weight"][:255].contiguous()}),
         file + "tensor " + named + r" is F8_E4M3 \[255, 128\], expected a 2-D F8_E4M3 weight \[256, 128\] \(expert 1 "
         r"of 'model\.layers\.0\.mlp\.experts\.gate_up_proj'\)"),
        ("bf16", lambda t: t.update({f"{e1}.w3.weight": t[f"{e1}.w3.weight"].to(torch.bfloat16)}),
         file + "tensor " + named + r" is BF16 \[256, 128\], expected a 2-D F8_E4M3"),
        ("no_scale", lambda t: t.pop(f"{e1}.w3.weight_scale"),
         file + "tensor " + named + " is F8_E4M3 but the file has no weight_scale beside it"),
        ("no_input_scale", lambda t: t.pop(f"{e1}.w3.input_scale"),
         file + "no input_scale beside tensor " + named + ", which the other experts of "
         r"'model\.layers\.0\.mlp\.experts' have"),
    ]
    for name, edit, message in edits:
        bad = _copy(w, f"moe_{name}", "fp8_mixtral_hw")
        t = load_file(bad / "model.safetensors")
        edit(t)
        save_file(t, bad / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            from_folder(bad, config)
    bad = w / "bad_moe_source"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(cases["mixtral_hw"][0], bad)
    t = load_file(bad / "model.safetensors")
    t[f"{e1}.w2.weight"] = t[f"{e1}.w2.weight"][:, :200].contiguous()
    save_file(t, bad / "model.safetensors")
    monkeypatch.setenv(hf_model.QUANTIZE_ON_LOAD_ENV, "1")  # the env override: quantize-on-load without the key
    with pytest.raises(CheckpointError, match=file + re.escape(f"tensor '{e1}.w2.weight' (the model's "
                                                               "'model.layers.0.mlp.experts.1.w2.weight') is BF16 "
                                                               "[128, 200], expected a 2-D float weight [128, 256]")):
        from_folder(bad, config)
    monkeypatch.delenv(hf_model.QUANTIZE_ON_LOAD_ENV)
    with pytest.raises(CheckpointError, match=file + re.escape(f"tensor '{e1}.w2.weight' (the model's")):
        convert(bad, w / "never_written", config, progress=False)
    assert not (w / "never_written").exists()


def test_folder_with_different_gate_and_up_scales_loads_with_per_row_scales(work, caplog_ds):
    """A folder written elsewhere (llm-compressor scales w1 and w3 apart): gate and up rows keep their own weight
    scales (per-row scales, the same dequantized weights), and differing gate / up input scales take the larger
    (they share one input), logged."""
    from safetensors.torch import load_file, save_file

    w, cases = work
    bad = _copy(w, "moe_split_scales", "fp8_mixtral_hw")
    t = load_file(bad / "model.safetensors")
    e1 = "model.layers.0.block_sparse_moe.experts.1"
    up_scale, up_input = t[f"{e1}.w3.weight_scale"] * 2, t[f"{e1}.w3.input_scale"] * 3
    t[f"{e1}.w3.weight_scale"], t[f"{e1}.w3.input_scale"] = up_scale, up_input
    save_file(t, bad / "model.safetensors")
    m = from_folder(bad, cases["mixtral_hw"][1])
    x = m.model.layers[0].mlp.experts
    assert x.gate_up_proj_scale.shape == (4, 512)  # per row: gate rows [0, 256), up rows [256, 512)
    assert torch.equal(x.gate_up_proj_scale[1, 256:], up_scale.expand(256))
    assert torch.equal(x.gate_up_proj_scale[1, :256], t[f"{e1}.w1.weight_scale"].expand(256))
    assert torch.equal(x.gate_up_proj_scale[2], t[f"{e1[:-1]}2.w1.weight_scale"].expand(512))
    assert x.gate_up_proj_input_scale[1] == up_input.max() > t[f"{e1}.w1.input_scale"].max()
    assert "model.layers.0.mlp.experts.gate_up_proj: expert 1's gate and up input scales differ" in caplog_ds.text
    assert m.model.layers[1].mlp.experts.gate_up_proj_scale.shape == (4,)  # the other layer: as written
    assert torch.isfinite(logits(m)).all()


def test_folder_of_another_model_is_refused_naming_the_layer(work):
    w, cases = work
    bad = _copy(w, "other_model")
    c = json.loads((bad / "config.json").read_text())
    c["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\.mlp\.gate_proj' is \[352, 128\] in the "
                                              r"checkpoint, \[256, 128\] in the model"):
        from_folder(bad, cases["llama_hw"][1])


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


# -- TP=2 through the real launcher ---------------------------------------------------------------------------
@pytest.mark.distributed
def test_fp8_folder_at_tp2_equals_in_memory_quantize(work):
    """One launch, five cases from FP8 folders and three quantize-on-load: column / row / lm-head slices (uneven
    MLP split in the tiny Llama: 352 rows), per-channel scales and a dynamic lm_head, GPT-NeoX's fused qkv (rows of
    three sub-parameters) with biases, a blocked lm_head read as bf16 slices; fused MoE experts (Mixtral per
    tensor, Qwen3-MoE per channel with a blocked block), which AutoTP leaves whole: every rank holds all experts."""
    w, cases = work
    plan = []
    for name, (src, config) in cases.items():
        (w / f"{name}.json").write_text(json.dumps(config))
        plan.append({"name": name, "bf16": str(src), "fp8": str(w / f"fp8_{name}"), "config": str(w / f"{name}.json")})
    for name in ("llama_pcs", "neox_block_head", "mixtral_hw"):  # quantize-on-load: the bf16 folder, same meta path
        (w / f"{name}_qol.json").write_text(json.dumps({**cases[name][1], "quantize_on_load": True}))
        plan.append({**plan[[p["name"] for p in plan].index(name)], "name": f"{name}_qol",
                     "fp8": str(cases[name][0]), "load_config": str(w / f"{name}_qol.json")})
    # rank 1 alone gets a folder of another model (its MLP shapes differ): every rank stops with the same one line
    other = _copy(w, "other_model_rank1")
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "intermediate_size": 256}))
    plan.append({**plan[0], "name": "other_model_on_rank1", "fp8_rank1": str(other)})
    (w / "plan.json").write_text(json.dumps(plan))
    deepspeed(2, ROOT / "tests" / "scripts" / "fp8_checkpoint_tp.py", str(w / "plan.json"), str(w / "tp2"),
              cwd=w, timeout=600)
    for rank in (0, 1):
        res = json.loads((w / f"tp2_{rank}.json").read_text())
        fault = res.pop("other_model_on_rank1")
        print(f"rank {rank} seconds per case:", {n: round(r["seconds"], 1) for n, r in res.items()})
        assert fault["error"] == "RankError" and fault["message"] == (
            "loading the FP8 checkpoint: rank 1: " + str(other) + ": layer 'model.layers.0.mlp.gate_proj' is "
            "[352, 128] in the checkpoint, [256, 128] in the model; the checkpoint is for another model"), fault
        for name, r in res.items():
            assert r["equal"], (rank, name, r["max_abs_diff"])
            assert r["params_on_meta_before_init_inference"] > 0 and r["params_on_meta_after"] == 0
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in r["fp8_layers"].values())
        llama = res["llama_hw"]["fp8_layers"]
        assert llama["model.layers.0.self_attn.o_proj"]["ds_class"] == "LinearAllreduce"
        assert llama["model.layers.0.self_attn.o_proj"]["shape"] == [128, 64]
        assert llama["lm_head"]["ds_class"] == "LmHeadLinearAllreduce"
        up = llama["model.layers.0.mlp.up_proj"]["shape"][0]
        assert 0 < up < 352 and len(llama) == 29
        neox = res["neox_block_head"]
        assert neox["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]["ds_class"] == "fused_LinearLayer"
        assert neox["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]["shape"] == [192, 128]
        assert neox["other_linears"]["lm_head"][1] == "torch.bfloat16"
        for name in ("mixtral_hw", "mixtral_hw_qol", "qwen3_moe_pcs"):
            experts = res[name]["experts"]
            fp8 = {n: x for n, x in experts.items() if x["type"] == "Fp8Experts"}
            assert len(fp8) == (1 if name.startswith("qwen3") else 2) and len(experts) == 2, (name, experts)
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in fp8.values())
            assert all(x["same_as_in_memory"] for x in experts.values()), (rank, name)
        whole = res["mixtral_hw"]["experts"]["model.layers.1.mlp.experts"]
        assert whole["shapes"] == [[4, 512, 128], [4, 128, 256]] and whole["scale_shape"] == [4]
        qwen = res["qwen3_moe_pcs"]["experts"]
        assert qwen["model.layers.0.mlp.experts"]["scale_shape"] == [4, 256]
        assert qwen["model.layers.1.mlp.experts"]["type"] == "Qwen3MoeExperts"
        assert qwen["model.layers.1.mlp.experts"]["dtype"] == "torch.bfloat16"


@pytest.mark.distributed
def test_fp8_folder_at_tp4_equals_in_memory_quantize(work):
    """The round trip at TP=4 (4 ranks on this machine's cores, ~25 s): GPT-NeoX (4 heads: one per rank; fused qkv
    rows of three sub-parameters, biases, a bf16 lm_head read as slices) and the tiny Llama per channel with a
    dynamic lm_head (2 KV heads over 4 ranks: DeepSpeed's own split), from their FP8 folders: logits bitwise equal
    to in-memory QUANTIZE at TP=4."""
    w, cases = work
    plan = [{"name": n, "bf16": str(cases[n][0]), "fp8": str(w / f"fp8_{n}"), "config": str(w / f"{n}.json")}
            for n in ("neox_block_head", "llama_pcs")]
    for n in ("neox_block_head", "llama_pcs"):
        (w / f"{n}.json").write_text(json.dumps(cases[n][1]))
    (w / "plan4.json").write_text(json.dumps(plan))
    deepspeed(4, ROOT / "tests" / "scripts" / "fp8_checkpoint_tp.py", str(w / "plan4.json"), str(w / "tp4"),
              cwd=w, timeout=600, OMP_NUM_THREADS="1")
    for rank in range(4):
        res = json.loads((w / f"tp4_{rank}.json").read_text())
        for name, r in res.items():
            assert r["equal"], (rank, name, r["max_abs_diff"])
            assert r["params_on_meta_before_init_inference"] > 0 and r["params_on_meta_after"] == 0
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in r["fp8_layers"].values())
        qkv = res["neox_block_head"]["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]
        assert qkv["shape"] == [96, 128]  # 3 x 128 rows over 4 ranks
        o_proj = res["llama_pcs"]["fp8_layers"]["model.layers.0.self_attn.o_proj"]
        assert o_proj["ds_class"] == "LinearAllreduce" and o_proj["shape"][0] == 128 and o_proj["shape"][1] < 128


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
