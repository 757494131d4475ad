"""FP8 KV cache (ds_quant/layers/kv_cache.py): selection by HQT's lists, the cache layers, kv records, generate().

One launch per mode through the real deepspeed launcher at TP=2 runs tests/scripts/kv_generate.py unmodified."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import ds_quant
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError, MeasurementError
from ds_quant.files import measurements
from ds_quant.layers import attention, kv_cache
from ds_quant.numerics import kernels, ops
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows import kv_attention
from tests.launcher import ROOT, deepspeed

TF4 = ROOT / ".venv" / "transformers4"


def tiny_llama(layers=2, heads=8, kv_heads=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=1024)
    return LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


def cfg(mode, path, **kw):
    return QuantConfig.from_dict({"method": "HOOKS", "mode": mode, "dump_stats_path": str(path), **kw})


PROMPTS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))


# -- selection: HQT's allow/block semantics ------------------------------------------------------------------------
@pytest.mark.parametrize("lists, picked", [
    ({}, [0, 1]),                                                      # empty allowlist: every supported type
    ({"allowlist": {"types": ["KVCache"]}}, [0, 1]),
    ({"allowlist": {"types": ["Linear"]}}, []),                        # a non-empty allowlist without KVCache
    ({"allowlist": {"names": ["layers\\.1\\."]}}, [1]),
    ({"blocklist": {"types": ["KVCache"]}}, []),
    ({"blocklist": {"names": ["layers\\.0\\.self_attn\\.kv_cache"]}}, [1]),
])
def test_selection_follows_hqt_lists(tmp_path, lists, picked):
    model = tiny_llama()
    plan = kv_attention.kv_plan(model, cfg("MEASURE", tmp_path / "m", **lists))
    assert (sorted(plan.names) if plan else []) == picked
    assert kv_cache.kv_names(model)[0] == "model.layers.0.self_attn.kv_cache"


def test_kvcache_type_accepted_in_allowlist_and_blocklist():
    QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["KVCache", "Linear"]}})
    QuantConfig.from_dict({"method": "HOOKS", "blocklist": {"types": ["KVCache"]}})
    with pytest.raises(ConfigError, match="'FusedSDPA' is not a module type ds_quant can quantize"):
        QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["FusedSDPA"]}})


# -- the layer: storage, round trip, saturation ------------------------------------------------------------------------
def filled_layer(fp8, k, v, scale_k, scale_v):
    limit = float(torch.finfo(fp8).max)
    layer = kv_cache.fp8_layer_class()(scale_k, scale_v, fp8, limit, 0.25)
    first_k, first_v = layer.update(k[:, :, :-1], v[:, :, :-1])  # the prompt comes back as it came
    assert torch.equal(first_k, k[:, :, :-1])
    return layer, layer.update(k[:, :, -1:], v[:, :, -1:])  # a decode step reads the whole cache de-quantized


@pytest.mark.parametrize("fmt, fp8, min_db", [("E4M3", torch.float8_e4m3fn, 28.0), ("E5M2", torch.float8_e5m2, 22.0)])
def test_fp8_layer_round_trip_sqnr_and_dtype(fmt, fp8, min_db):
    """Gaussian keys/values, heads of different magnitude, scale = amax / (fp8_max * 0.25). E4M3 rounds to 3
    mantissa bits (relative error <= 2^-4, ~31 dB when nothing is subnormal), E5M2 to 2 (~25 dB); the thresholds
    leave 3 dB for the values the quarter-range backoff pushes into subnormals."""
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(2, 4, 65, 64, generator=g) * torch.tensor([0.1, 1, 3, 10]).view(1, 4, 1, 1)).bfloat16()
    v = torch.randn(2, 4, 65, 64, generator=g).bfloat16()
    fmax = float(torch.finfo(fp8).max)
    sk, sv = (float(t.abs().amax()) / (fmax * 0.25) for t in (k, v))
    layer, (k_out, v_out) = filled_layer(fp8, k, v, sk, sv)
    assert type(layer).__name__ == "Fp8KVLayer" and layer.get_seq_length() == 65
    assert layer._quantized_keys[0].dtype == fp8 and layer._quantized_values[0].dtype == fp8
    assert layer.keys.numel() == 0 and layer.values.numel() == 0  # nothing kept in bf16
    assert k_out.dtype == torch.bfloat16 and k_out.shape == k.shape
    assert sqnr_db(k.float(), k_out.float()) > min_db and sqnr_db(v.float(), v_out.float()) > min_db
    held = kv_cache.describe(type("C", (), {"layers": [layer]})())
    assert held["held_bytes"] == k.numel() + v.numel()  # one byte per element
    assert held["bytes"] == held["held_bytes"] * (65 + kv_cache.GROW_TOKENS) // 65  # room for 64 more tokens


def test_fp8_layer_saturates_beyond_the_measured_range():
    k = torch.ones(1, 2, 3, 8, dtype=torch.bfloat16)
    k[0, 0, 2] = 1e4  # a decode token far beyond calibration: clamps to +-448 * scale, never inf/NaN
    layer, (k_out, _) = filled_layer(torch.float8_e4m3fn, k, k, 0.01, 0.01)
    assert torch.isfinite(k_out).all() and float(k_out.max()) == pytest.approx(448 * 0.01, rel=1e-2)


def test_fp8_layer_beam_ops_and_crop():
    k = torch.randn(3, 2, 5, 8).bfloat16()
    layer, _ = filled_layer(torch.float8_e4m3fn, k, k, 0.01, 0.01)
    q = layer._quantized_keys[0].clone()
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(layer._quantized_keys[0].view(torch.uint8), q[[2, 2, 0]].view(torch.uint8))
    layer.batch_repeat_interleave(2)
    assert layer._quantized_keys[0].shape[0] == 6
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and layer._quantized_values[0].shape[2] == 3


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler: the kernel is not built")
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cpu_kernel_is_bit_exact(fp8):
    """Every FP8 byte (lengths not a multiple of the vector width), several scales, every output dtype."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    x = codes[torch.isfinite(codes.float())].repeat(3)[:-5]
    for scale in (1.0, 0.0123, 3.7e-5, 17.3):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got, want = ops.dequantize_fp8(x, scale, dtype), ops.dequantize_fp8_reference(x, scale, dtype)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (scale, dtype)


# -- kv records: merge over ranks, TP-invariant scales, old files ------------------------------------------------------
def kv_record(k, v, layer_idx=0, model_heads=4):
    s = kv_cache.KVStats()
    s.add(k, v)
    return {"kind": "kv", "layer_idx": layer_idx, "model_heads": model_heads, "heads": k.shape[1],
            "key_head_amax": s.key.tolist(), "value_head_amax": s.value.tolist(), "samples": s.tokens}


def test_kv_records_merge_in_rank_order_and_scales_are_tp_invariant(tmp_path):
    """AutoTP gives rank r the KV heads [r*H/N, (r+1)*H/N): the shards' per-head vectors concatenate to what one
    process measures; the per-layer scale (max over heads) is then the same at TP=1 and TP=2."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 4, 16, 8, generator=g) * torch.tensor([1, 2, 3, 4.0]).view(1, 4, 1, 1)
    v = torch.randn(2, 4, 16, 8, generator=g)
    name = "model.layers.0.self_attn.kv_cache"
    whole = measurements.merge([measurements.make_shard({}, 0, 1, "maxabs", "bfloat16", {name: kv_record(k, v)})])
    shards = [measurements.make_shard({}, r, 2, "maxabs", "bfloat16", {name: kv_record(k[:, 2 * r:2 * r + 2],
                                                                                       v[:, 2 * r:2 * r + 2])})
              for r in (1, 0)]  # any order
    split = measurements.merge(shards)
    assert split["kv"][name]["key_head_amax"] == whole["kv"][name]["key_head_amax"]
    assert whole["kv"][name]["key_head_amax"] == sorted(whole["kv"][name]["key_head_amax"])  # head order kept
    measurements.atomic_write_json(tmp_path / "m.json", split)
    doc = measurements.load(tmp_path / "m.json")
    assert '"kind": "kv"' in (tmp_path / "m.json").read_text()
    model = tiny_llama(layers=1, heads=4, kv_heads=4)
    config = cfg("QUANTIZE", tmp_path / "m", allowlist={"types": ["KVCache"]})
    scales = kv_attention.kv_plan(model, config, lambda: (doc, "m.json")).scales
    one = kv_attention.kv_plan(model, config, lambda: (whole, "whole")).scales
    assert scales == one and scales[0][0] == pytest.approx(float(k.abs().amax()) / (448 * 0.25), rel=1e-6)


def test_old_files_load_and_keep_the_bf16_cache_unless_kvcache_is_named(tmp_path, caplog_ds):
    old = measurements.merge([measurements.make_shard({}, 0, 1, "maxabs", "bfloat16")])
    assert "kv" not in old
    measurements.atomic_write_json(tmp_path / "old.json", old)
    measurements.load(tmp_path / "old.json")
    model = tiny_llama(layers=1)
    with caplog_ds.at_level(logging.INFO, logger="ds_quant"):
        assert kv_attention.kv_plan(model, cfg("QUANTIZE", tmp_path / "old"), lambda: (old, "old.json")) is None
    assert "KV cache stays in high precision: old.json has no KV-cache records" in caplog_ds.text
    with pytest.raises(MeasurementError, match="no KV-cache measurements for"):
        kv_attention.kv_plan(model, cfg("QUANTIZE", tmp_path / "old", allowlist={"types": ["KVCache"]}),
                             lambda: (old, "old.json"))


def test_kv_record_validation(tmp_path):
    rec = kv_record(torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2))
    doc = measurements.merge([measurements.make_shard({}, 0, 1, "maxabs", "bfloat16", {"a.kv_cache": rec})])
    doc["kv"]["a.kv_cache"]["key_head_amax"][1] = -1.0
    measurements.atomic_write_json(tmp_path / "bad.json", doc)
    with pytest.raises(MeasurementError, match="key_head_amax must be 4 finite numbers >= 0"):
        measurements.load(tmp_path / "bad.json")
    with pytest.raises(MeasurementError, match="ranks hold \\[4, 4, 2\\] heads"):
        measurements.merge_kv("a", [rec, rec, {**rec, "heads": 2}])


# -- generate(): the default cache, beam search, reuse, accuracy -----------------------------------------------------
def test_generate_measure_then_quantize_single_process(tmp_path):
    """Only the KV cache in FP8 (allowlist KVCache): teacher-forced decode logits against the bf16 cache. The
    threshold (25 dB) sits below E4M3's ~31 dB per element: attention averages many rounded keys and values."""
    lists = {"allowlist": {"types": ["KVCache"]}}
    measured = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "m", **lists))
    with torch.no_grad():
        ref = measured.generate(PROMPTS, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert kv_cache.describe(ref.past_key_values)["layer_types"] == ["MeasuredKVLayer"] * 2
    assert kv_cache.describe(ref.past_key_values)["dtypes"] == ["bfloat16"]
    ds_quant.finish_measurements(measured)
    quant = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", **lists))
    with torch.no_grad():
        out = quant.generate(PROMPTS, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        info = kv_cache.describe(out.past_key_values)
        assert info["layer_types"] == ["Fp8KVLayer"] * 2 and info["dtypes"] == ["float8_e4m3fn"]
        assert info["held_bytes"] * 2 == kv_cache.describe(ref.past_key_values)["held_bytes"]  # half of bf16
        beam = quant.generate(PROMPTS, max_new_tokens=5, num_beams=3, do_sample=False, return_dict_in_generate=True)
        assert beam.sequences.shape == (2, 29) and kv_cache.describe(beam.past_key_values)["dtypes"] == ["float8_e4m3fn"]
        more = quant.generate(out.sequences, max_new_tokens=3, do_sample=False, past_key_values=out.past_key_values,
                              return_dict_in_generate=True)
        assert more.past_key_values is out.past_key_values and more.past_key_values.get_seq_length() == 34
        bf16, fp8 = (teacher_forced(quant, make(), ref.sequences) for make in
                     (lambda: None, lambda: kv_cache.make_kv_cache(quant)))
    assert sqnr_db(bf16, fp8) > 25
    assert quant.config._attn_implementation == "ds_quant_kv" and attention.attention_calls(quant)["fused"] > 0


# -- decode attention straight from the FP8 cache ------------------------------------------------------------------
def attention_reference(q, k8, ks, v8, vs, mask, scaling):
    """float64 attention over the exact FP8 values times their scales; (B, 1, Hq, D) like the kernel."""
    k, v = (t.double() * s for t, s in ((k8, ks), (v8, vs)))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.nan_to_num(s.softmax(-1), nan=0.0) @ v


@pytest.mark.parametrize("b, hq, hkv, s, d, fp8", [
    (1, 16, 8, 300, 64, torch.float8_e4m3fn), (2, 8, 2, 37, 128, torch.float8_e4m3fn),
    (1, 4, 4, 5, 48, torch.float8_e5m2), (3, 6, 3, 17, 20, torch.float8_e4m3fn), (1, 2, 1, 1, 16, torch.float8_e4m3fn),
    (1, 3, 1, 70, 64, torch.float8_e5m2), (2, 12, 4, 129, 128, torch.float8_e4m3fn)])
def test_decode_attention_kernel_matches_float64(b, hq, hkv, s, d, fp8):
    """GQA, head dims 64 / 128 (the blocked AVX-512 path, with lengths that leave partial 64-row blocks and partial
    groups of 4) and others (the generic path, scalar tails), E5M2, a single key, masks none / bool per batch row /
    additive, on views of a buffer with room for more tokens (the cache's layout). Bound: 45 dB, below the ~55 dB
    of rounding the bf16 output alone; a fully masked row gives zeros (not NaN)."""
    if not kernels.available():
        pytest.skip("no C++ compiler: the KV-cache kernel is not built")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    kb, vb = torch.randn(b, hkv, s + 9, d, generator=g) * 3, torch.randn(b, hkv, s + 9, d, generator=g)
    ks, vs = float(kb.abs().max() / 448), float(vb.abs().max() / 448)
    k8, v8 = (kb / ks).to(fp8)[:, :, :s], (vb / vs).to(fp8)[:, :, :s]
    bool_mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
    bool_mask[:, ..., 0] = True
    for mask in (None, bool_mask, torch.randn(1, 1, 1, s, generator=g)):
        out = torch.ops.ds_quant.decode_attention(q, k8, ks, v8, vs, mask, 0.125)
        assert out.shape == (b, 1, hq, d) and out.dtype == torch.bfloat16
        assert sqnr_db(attention_reference(q, k8, ks, v8, vs, mask, 0.125).transpose(1, 2), out) > 45
    none = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    assert torch.equal(torch.ops.ds_quant.decode_attention(q, k8, ks, v8, vs, none, 0.125),
                       torch.zeros(b, 1, hq, d, dtype=torch.bfloat16))


KV_VARIANT_CHECK = r"""
import torch
from ds_quant.numerics import kernels, ops
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows import kv_attention
from tests.layers.test_kv_cache import attention_reference
assert kernels.available()
print("ISA", kernels.cpu_kernel().isa)
g = torch.Generator().manual_seed(0)
for b, hq, hkv, s, d, fp8 in ((1, 8, 4, 300, 64, torch.float8_e4m3fn), (2, 6, 2, 67, 40, torch.float8_e5m2),
                              (1, 4, 1, 9, 128, torch.float8_e4m3fn)):
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    k8 = (torch.randn(b, hkv, s + 5, d, generator=g) * 40).to(fp8)[:, :, :s]
    v8 = (torch.randn(b, hkv, s + 5, d, generator=g) * 40).to(fp8)[:, :, :s]
    mask = torch.rand(b, 1, 1, s, generator=g) > 0.2
    mask[..., 0] = True
    for m in (None, mask):
        out = torch.ops.ds_quant.decode_attention(q, k8, 0.01, v8, 0.02, m, 0.1)
        ref = attention_reference(q, k8, 0.01, v8, 0.02, m, 0.1).transpose(1, 2)
        assert sqnr_db(ref, out) > 45, (b, hq, hkv, s, d, fp8, sqnr_db(ref, out))
    x = ops.dequantize_fp8(k8, 0.01, torch.bfloat16)
    assert torch.equal(x, ops.dequantize_fp8_reference(k8, 0.01, torch.bfloat16))
print("KV VARIANT OK")
"""


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 with AVX2 only")
@pytest.mark.parametrize("march,isa", [("haswell", "avx2"), ("x86-64", "portable")])
def test_kv_kernel_other_isa_builds_match_definition(tmp_path, march, isa):
    """The AVX2 (F16C widening, vectorised blocks) and portable builds of the KV kernel, built here with their own
    -march: decode attention within 45 dB of float64, de-quantization bit-exact."""
    env = {**os.environ, "DS_QUANT_CPU_KERNEL_MARCH": march, "DS_QUANT_KERNEL_CACHE": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KV_VARIANT_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "KV VARIANT OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert f"ISA {isa}\n" in proc.stdout


def test_fp8_kv_tensor_is_its_dequantized_tensor_to_any_other_code():
    """What other code (a model's own attention, eager math, printing) sees: the de-quantized cache, exactly."""
    x8 = (torch.randn(1, 2, 9, 16) * 4).to(torch.float8_e4m3fn)[:, :, :7]
    t = attention.Fp8KVTensor(x8, 0.5, torch.bfloat16)
    plain = ops.dequantize_fp8(x8, 0.5, torch.bfloat16)
    assert t.shape == (1, 2, 7, 16) and t.dtype == torch.bfloat16 and "Fp8KVTensor" in repr(t)
    assert torch.equal(t + 0, plain) and torch.equal(t.transpose(-1, -2) @ plain, plain.transpose(-1, -2) @ plain)
    assert type(t * 1) is torch.Tensor


def test_behaviour_switches_are_boolean_config_keys():
    """`kv_cache_attention` (default true) and `quantize_on_load` (default false): JSON booleans, named in the
    unknown-key message; anything else is one error naming the key."""
    base = {"method": "HOOKS", "dump_stats_path": "unused"}
    assert QuantConfig.from_dict(base).kv_cache_attention and not QuantConfig.from_dict(base).quantize_on_load
    assert not QuantConfig.from_dict({**base, "kv_cache_attention": False}).kv_cache_attention
    for key in ("kv_cache_attention", "quantize_on_load"):
        with pytest.raises(ConfigError, match=f"key '{key}': 'no' must be true or false"):
            QuantConfig.from_dict({**base, key: "no"})
    with pytest.raises(ConfigError, match="unknown key 'kv_cache_atention'.*: .*quantize_on_load, kv_cache_attention"):
        QuantConfig.from_dict({**base, "kv_cache_atention": False})


def test_decode_reads_the_fp8_cache_directly_and_falls_back_where_it_cannot(tmp_path, monkeypatch):
    """One query token runs the kernel on the FP8 bytes; several query tokens (a second prompt chunk) run sdpa on
    the de-quantized cache. Against "kv_cache_attention": false (every read de-quantized, then sdpa), on the same
    measurements: the chunk logits are bitwise equal (the same path), the decode logits within 35 dB (the kernel
    takes k = fp8 x scale in float32, where de-quantizing rounds it to bf16 first). DS_QUANT_KV_ATTENTION overrides
    the key either way."""
    lists = {"allowlist": {"types": ["KVCache"]}}
    measured = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "m", **lists))
    with torch.no_grad():
        measured.generate(PROMPTS, max_new_tokens=4, do_sample=False)
    ds_quant.finish_measurements(measured)
    monkeypatch.delenv(kv_attention.KV_ATTENTION_ENV, raising=False)
    plain = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", kv_cache_attention=False, **lists))
    assert plain.config._attn_implementation == "sdpa" and not kv_cache.plan_of(plain).fused
    fused = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", **lists))  # the default: true
    assert fused.config._attn_implementation == "ds_quant_kv" and kv_cache.plan_of(fused).fused
    for env, key, want in (("0", True, "sdpa"), ("1", False, "ds_quant_kv")):  # the env var overrides the key
        monkeypatch.setenv(kv_attention.KV_ATTENTION_ENV, env)
        other = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", kv_cache_attention=key, **lists))
        assert other.config._attn_implementation == want and kv_cache.plan_of(other).fused == (want != "sdpa")
    monkeypatch.delenv(kv_attention.KV_ATTENTION_ENV)
    out = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("fused", fused)):
            cache = kv_cache.make_kv_cache(model)
            first = model(PROMPTS[:, :16], past_key_values=cache).logits
            chunk = model(PROMPTS[:, 16:20], past_key_values=cache).logits  # 4 query tokens: sdpa
            steps = [model(PROMPTS[:, t:t + 1], past_key_values=cache).logits for t in range(20, 24)]
            out[name] = first, chunk, torch.cat(steps, 1)
    assert torch.equal(out["plain"][0], out["fused"][0]) and torch.equal(out["plain"][1], out["fused"][1])
    assert sqnr_db(out["plain"][2].float(), out["fused"][2].float()) > 35
    assert attention.attention_calls(fused) == {"fused": 2 * 4, "fallback": 2 * 2}  # 2 layers
    assert attention.attention_calls(plain) == {"fused": 0, "fallback": 0}  # not routed through ds_quant_kv


def teacher_forced(model, cache, tokens, prompt_len=24):
    from transformers import DynamicCache

    cache = cache or DynamicCache(config=model.config)
    logits = [model(tokens[:, :prompt_len], past_key_values=cache).logits[:, -1]]
    for t in range(prompt_len, tokens.shape[1]):
        logits.append(model(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits).float()


@pytest.mark.skipif(not (TF4 / "transformers").is_dir(), reason="no transformers 4.x overlay: run `make setup`")
def test_generate_under_transformers4(tmp_path):
    """transformers 4.57 has no FP8 cache layer: ds_quant's own on its DynamicLayer, same checks as above."""
    code = f"""
import json, sys, torch, ds_quant, transformers
from ds_quant.layers import kv_cache
from tests.layers.test_kv_cache import tiny_llama, PROMPTS
base = {{"method": "HOOKS", "dump_stats_path": {str(tmp_path / "m")!r}}}
m = ds_quant.prep_model(tiny_llama(), {{**base, "mode": "MEASURE"}})
with torch.no_grad():
    m.generate(PROMPTS, max_new_tokens=4, do_sample=False)
ds_quant.finish_measurements(m)
q = ds_quant.prep_model(tiny_llama(), {{**base, "mode": "QUANTIZE"}})
with torch.no_grad():
    out = q.generate(PROMPTS, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    beam = q.generate(PROMPTS, max_new_tokens=4, num_beams=2, do_sample=False, return_dict_in_generate=True)
    more = q.generate(out.sequences, max_new_tokens=2, do_sample=False, past_key_values=out.past_key_values)
print(json.dumps({{"version": transformers.__version__, "greedy": kv_cache.describe(out.past_key_values),
                  "beam": kv_cache.describe(beam.past_key_values), "more": more.shape[1]}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TF4), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.")
    for key in ("greedy", "beam"):
        assert got[key]["layer_types"] == ["Fp8KVLayer"] * 2 and got[key]["dtypes"] == ["float8_e4m3fn"]
    assert got["more"] == 24 + 4 + 2


# -- the real launcher, TP=2 ---------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_tp2_wrapped_generate_script_measure_then_quantize(tmp_path):
    """The unmodified script under launch/run.py: MEASURE records each rank's 2 of the 4 KV heads, merged in rank
    order (checked against a single-process MEASURE); QUANTIZE holds the returned caches (greedy, beam search,
    reused) in FP8, with the same scales on both ranks and in a TP=1 QUANTIZE from the same file.
    MEASURE names `Matmul` (HQT's attention type: opt-in, and it does not narrow the allowlist) so it records the
    attention operands too; a third run, QUANTIZE_ATTN, runs FP8 attention matmuls + softmax beside the FP8 cache."""
    script = str(ROOT / "tests" / "scripts" / "kv_generate.py")
    runs = {}
    lists = {"MEASURE": {"allowlist": {"types": ["Matmul"]}}, "QUANTIZE": {},
             "QUANTIZE_ATTN": {"allowlist": {"types": ["Matmul", "Softmax"]}}}
    for mode in ("MEASURE", "QUANTIZE", "QUANTIZE_ATTN"):
        path = tmp_path / f"{mode}.json"
        path.write_text(json.dumps({"method": "HOOKS", "mode": mode.split("_")[0],
                                    "dump_stats_path": str(tmp_path / "meas/m"), **lists[mode]}))
        deepspeed(2, str(ROOT / "launch" / "run.py"), "--quant-config", str(path), script, str(tmp_path / mode),
                  cwd=tmp_path, timeout=300)
        runs[mode] = [json.loads((tmp_path / f"{mode}_{r}.json").read_text()) for r in (0, 1)]
    merged = json.loads((tmp_path / "meas" / "m.json").read_text())
    assert sorted(merged["kv"]) == [f"model.layers.{i}.self_attn.kv_cache" for i in (0, 1)]
    # attention: one record per attention module, the max over both ranks' heads; routed only where selected
    assert sorted(merged["attention"]) == [f"model.layers.{i}.self_attn" for i in (0, 1)]
    assert all(0 < r["q_amax"] and 0 < r["p_amax"] <= 1 for r in merged["attention"].values())
    assert [r["attn_implementation"] for r in runs["QUANTIZE_ATTN"]] == ["ds_quant_fp8"] * 2
    # QUANTIZE: decode attention reads the FP8 cache directly (one query token), prompts fall back to sdpa
    assert [r["attn_implementation"] for r in runs["QUANTIZE"]] == ["ds_quant_kv"] * 2
    assert all(r["kv_attention_calls"]["fused"] > 0 and r["kv_attention_calls"]["fallback"] > 0
               for r in runs["QUANTIZE"])
    attn = runs["QUANTIZE_ATTN"]
    assert attn[0]["greedy_tokens"] == attn[1]["greedy_tokens"] and attn[0]["greedy_len"] == 32
    assert all(x["dtypes"] == ["torch.float8_e4m3fn"] for r in attn for x in r["greedy"])
    for rank in (0, 1):
        m, q = runs["MEASURE"][rank], runs["QUANTIZE"][rank]
        assert [x["type"] for x in m["greedy"]] == ["MeasuredKVLayer"] * 2 and m["greedy"][0]["dtypes"] == [
            "torch.bfloat16"]
        for key in ("greedy", "beam", "reused"):
            assert [x["type"] for x in q[key]] == ["Fp8KVLayer"] * 2, key
            assert all(x["dtypes"] == ["torch.float8_e4m3fn"] for x in q[key]), key
        assert q["greedy"][0]["shapes"][0] == [2, 2, 31, 32]  # (batch, this rank's 2 of 4 KV heads, tokens, dim)
        assert (q["greedy_len"], q["beam_len"], q["reused_len"], q["reused_cache_len"]) == (32, 30, 36, 35)
    scales = [[x["scales"] for x in r["greedy"]] for r in runs["QUANTIZE"]]
    assert scales[0] == scales[1]
    one = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "meas/m", allowlist={"types": ["KVCache"]}))
    assert [list(kv_cache.plan_of(one).scales[i]) for i in (0, 1)] == scales[0]
    # Per-head statistics in rank order = one process's (layer 0 sees the same bf16 GEMM inputs; layer 1 comes after
    # a bf16 allreduce, so allow its rounding).
    single = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "single/m"))
    with torch.no_grad():  # what the script generates
        greedy = single.generate(PROMPTS, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        single.generate(PROMPTS, max_new_tokens=6, num_beams=3, do_sample=False)
        single.generate(greedy.sequences, max_new_tokens=4, do_sample=False, past_key_values=greedy.past_key_values)
    for name, rec in kv_cache.records(single).items():
        for key in ("key_head_amax", "value_head_amax"):
            assert merged["kv"][name][key] == pytest.approx(rec[key], rel=0.05), (name, key)
    single_attn = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "single_attn/m",
                                                        allowlist={"types": ["Matmul"]}))
    with torch.no_grad():  # what the script generates
        greedy = single_attn.generate(PROMPTS, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        single_attn.generate(PROMPTS, max_new_tokens=6, num_beams=3, do_sample=False)
        single_attn.generate(greedy.sequences, max_new_tokens=4, do_sample=False,
                             past_key_values=greedy.past_key_values)
    for name, rec in attention.records(single_attn).items():
        for key in ("q_amax", "k_amax", "v_amax", "p_amax"):  # same rounding allowance as the KV heads above
            assert merged["attention"][name][key] == pytest.approx(rec[key], rel=0.05), (name, key)
