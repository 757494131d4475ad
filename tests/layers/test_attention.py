"""FP8 attention matmuls and softmax (HQT's Matmul / Softmax) through transformers' attention interface.

Single process here; tests/layers/test_kv_cache.py's TP=2 launch runs them through the real launcher (records merged
over both ranks, FP8 attention routed on every rank)."""

import json

import pytest
import torch

import ds_quant
from ds_quant.config import Mode, QuantConfig
from ds_quant.errors import ConfigError, MeasurementError
from ds_quant.files import measurements
from ds_quant.layers import attention, kv_cache
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics import kernels
from ds_quant.numerics.scales import sqnr_db
from ds_quant.workflows import kv_attention
from ds_quant.workflows.quantize import load_measurements


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def cfg(mode, path, **kw):
    return QuantConfig.from_dict({"method": "HOOKS", "mode": mode, "dump_stats_path": str(path), **kw})


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("attn") / "m"
    model = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", path, allowlist={"types": ["Matmul"]}))
    with torch.no_grad():
        logits = model(IDS).logits.float()
    ds_quant.finish_measurements(model)
    return path, logits


def logits_of(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_types_are_accepted_and_opt_in():
    assert QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["Matmul", "Softmax"]}})
    assert QuantConfig.from_dict({"method": "HOOKS", "blocklist": {"types": ["Softmax"]}})
    with pytest.raises(ConfigError, match="Matmull"):
        QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["Matmull"]}})
    plain = ds_quant.prep_model(tiny_llama(), {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": "unused"})
    assert attention.sites_of(plain) == {} and plain.config._attn_implementation != attention.IMPL


def test_measure_records_every_attention_module_and_keeps_the_math(measured, tmp_path):
    path, logits = measured
    doc = measurements.load(f"{path}.json")
    assert sorted(doc["attention"]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for rec in doc["attention"].values():
        assert rec["kind"] == "attention" and rec["samples"] == 1
        assert 0 < rec["q_amax"] < 100 and 0 < rec["k_amax"] and 0 < rec["v_amax"] and 0 < rec["p_amax"] <= 1
    # "Matmul" alone does not narrow the allowlist: every linear was measured too
    assert len(doc["layers"]) == 15
    # MEASURE computes the eager math in float32: against the model's own eager attention, only bf16 rounding
    # differs (>= 35 dB; FP8 would be ~20 dB).
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    assert sqnr_db(logits_of(eager), logits) > 35


def test_quantize_runs_fp8_operands_and_respects_the_blocklist(measured):
    path, _ = measured
    ref = logits_of(tiny_llama())
    linears_only = logits_of(ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", path)))
    both = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", path, allowlist={"types": ["Matmul", "Softmax"]},
                                                 blocklist={"names": [r"layers\.1\.self_attn\.matmul_qk"]}))
    assert both.config._attn_implementation == attention.IMPL
    assert all(isinstance(both.model.layers[i].self_attn.q_proj, Fp8Linear) for i in (0, 1))
    sites = attention.sites_of(both)
    s0, s1 = sites["model.layers.0.self_attn"], sites["model.layers.1.self_attn"]
    assert (s0.matmul_qk, s0.matmul_av, s0.softmax) == (True, True, True)
    assert (s1.matmul_qk, s1.matmul_av, s1.softmax) == (False, True, True)
    assert all(s > 0 and s == s for s in s0.scales.values())
    out = logits_of(both)
    # FP8 attention operands on top of FP8 linears: still a close model (>= 15 dB against bf16, the linears alone are
    # ~22 dB on this random model), and not the linears-only result (the attention path changed).
    assert sqnr_db(ref, out) > 15 and not torch.equal(out, linears_only)
    assert torch.isfinite(out).all()


def test_fp8_operands_are_exactly_what_the_function_multiplies():
    """The quantized path = the eager math on operands rounded to FP8 with the static scales (float32 products)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 16) * 3).bfloat16(), torch.randn(1, 2, 5, 16).bfloat16(), \
        torch.randn(1, 2, 5, 16).bfloat16()
    scales = {"q": 0.02, "k": 0.01, "v": 0.01, "p": 1 / 448}
    site = attention.AttentionSite("a", Mode.QUANTIZE, True, True, True, "sdpa", scales=scales)
    module = torch.nn.Module()
    module._ds_quant_attention = site
    out, p = attention.attention_forward(module, q, k, v, None, scaling=0.25)

    def r(x, s):  # FP8 rounding with saturation, by hand
        return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s

    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    pp = r(torch.softmax(r(q, 0.02) @ r(kk, 0.01).transpose(2, 3) * 0.25, dim=-1), 1 / 448)
    want = (pp @ r(vv, 0.01)).bfloat16().transpose(1, 2)
    assert torch.equal(out, want)
    # q beyond its measured range (|q| up to ~12 > 448 * 0.02 = 8.96) saturates instead of overflowing
    assert torch.isfinite(out).all()


def test_quantize_without_attention_records_names_the_fix(tmp_path):
    model = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "m"))
    logits_of(model)
    ds_quant.finish_measurements(model)
    with pytest.raises(MeasurementError, match=r"no attention measurements .*'Matmul'"):
        ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", allowlist={"types": ["Matmul"]}))


def test_generate_with_fp8_attention_and_fp8_kv_cache(tmp_path):
    model = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "m", allowlist={"types": ["Matmul"]}))
    with torch.no_grad():
        model.generate(IDS, max_new_tokens=4, do_sample=False)
    ds_quant.finish_measurements(model)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["kv"] and doc["attention"]
    q = ds_quant.prep_model(tiny_llama(), cfg("QUANTIZE", tmp_path / "m", allowlist={"types": ["Matmul"]}))
    with torch.no_grad():
        out = q.generate(IDS, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 30)
    assert type(out.past_key_values.layers[0]).__name__ == "Fp8KVLayer"


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler: ds_quant_kv needs the CPU kernels")
def test_fp8_attention_and_fp8_cache_get_the_same_implementation_in_either_install_order(tmp_path):
    """attention.choose decides from what was installed, not from the order the KV cache and attention are
    installed in: FP8 attention in layer 0 (layer 1's matmuls blocked) and the FP8 KV cache give the config
    `ds_quant_fp8` either way, and every module's fallback `ds_quant_kv`, so layer 1 decodes from the FP8 bytes."""
    model = ds_quant.prep_model(tiny_llama(), cfg("MEASURE", tmp_path / "m", allowlist={"types": ["Matmul"]}))
    with torch.no_grad():
        model.generate(IDS, max_new_tokens=4, do_sample=False)
    ds_quant.finish_measurements(model)
    c = cfg("QUANTIZE", tmp_path / "m", allowlist={"types": ["Matmul"]},
            blocklist={"names": ["model.layers.1.self_attn.matmul_qk", "model.layers.1.self_attn.matmul_av"]})
    chosen = []
    for order in ((kv_attention.install_kv_cache, kv_attention.install_attention),
                  (kv_attention.install_attention, kv_attention.install_kv_cache)):
        m = tiny_llama()
        for install in order:
            install(m, c, lambda m=m: load_measurements(c, m))
        chosen.append((m.config._attn_implementation, kv_cache.plan_of(m).fused, sorted(attention.sites_of(m)),
                       {n: getattr(a, attention._FALLBACK_ATTR) for n, a in attention.attention_modules(m).items()}))
    assert chosen[0] == chosen[1] == (attention.IMPL, True, ["model.layers.0.self_attn"],
                                      dict.fromkeys(["model.layers.0.self_attn", "model.layers.1.self_attn"],
                                                    attention.KV_IMPL))
    q = ds_quant.prep_model(tiny_llama(), c)
    with torch.no_grad():
        q.generate(IDS, max_new_tokens=4, do_sample=False)
    assert attention.attention_calls(q)["fused"] == 3  # layer 1's decode steps (the prompt comes as it was)


def test_attention_records_validate_and_merge_by_max(tmp_path):
    rec = {"kind": "attention", "q_amax": 1.0, "k_amax": 2.0, "v_amax": 3.0, "p_amax": 1.0, "samples": 4}
    layers = {"l": {"kind": "column", "in_features": 4, "out_features": 4, "input_amax": 1.0, "samples": 1}}
    shards = [measurements.make_shard(layers, r, 2, "maxabs", "bfloat16", run="x",
                                      attention={"a": {**rec, "q_amax": 1.0 + r, "samples": 4 + r}})
              for r in (0, 1)]
    merged = measurements.merge(shards)
    assert merged["attention"]["a"] == {**rec, "q_amax": 2.0, "samples": 5}
    bad = {**merged, "attention": {"a": {**rec, "k_amax": -1.0}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(MeasurementError, match=r"attention 'a': k_amax is -1.0"):
        measurements.load(path)
    path.write_text(json.dumps({**merged, "attention": {"a": {"kind": "attention", "q_amax": 1.0}}}))
    with pytest.raises(MeasurementError, match=r"attention 'a' has no 'k_amax'"):
        measurements.load(path)
    with pytest.raises(MeasurementError, match="shard of rank 1 has other attention records than rank 0"):
        measurements.merge([shards[0], {**shards[1], "attention": {}}])
