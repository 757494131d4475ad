"""Fused MoE experts (transformers 5's MixtralExperts layout): measured and FP8 twins in one process."""


import pytest
import torch

import ds_quant
from ds_quant.layers.experts import Fp8Experts, MeasuredExperts, record_name
from ds_quant.numerics.scales import sqnr_db

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

E, H, FF, T, K = 4, 64, 96, 40, 2


def experts(seed=0):
    config = mixtral.MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "eager"  # transformers' reference dispatch
    torch.manual_seed(seed)
    m = mixtral.MixtralExperts(config)
    torch.nn.init.normal_(m.gate_up_proj, std=0.1)
    torch.nn.init.normal_(m.down_proj, std=0.1)
    return m.to(torch.bfloat16)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = experts()

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


def routing(seed, skip=None):
    """Tokens, top-k expert ids (never `skip`: an expert the router never picks) and normalised weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    scores = torch.rand(T, E, generator=g)
    if skip is not None:
        scores[:, skip] = -1
    w, idx = scores.topk(K, dim=-1)
    return x, idx, (w / w.sum(-1, keepdim=True)).bfloat16()


def test_experts_measure_then_quantize_per_expert(tmp_path, caplog_ds):
    """Expert 3 never routed in calibration: its input scale falls back to the layer's largest (logged), never
    zero. Thresholds: MEASURE vs transformers' eager dispatch > 40 dB (same bf16 GEMMs; the top-k sum is in float32
    here, in bf16 there: rounding only); FP8 > 22 dB: two FP8 GEMMs in series (~28 dB each on Gaussian data, see
    the README's numerics table) around a SiLU gate; a wrong expert's scale or weight falls far below."""
    cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}
    calib, test = routing(1, skip=3), routing(2)
    with torch.no_grad():
        ref = Block()(*test)
        check = ds_quant.prep_model(Block(), {**cfg, "dump_stats_path": str(tmp_path / "check")})
        assert type(check.experts) is MeasuredExperts
        assert sqnr_db(ref.float(), check(*test).float()) > 40
        block = ds_quant.prep_model(Block(), cfg)
        block(*calib)
        path = ds_quant.finish_measurements(block)
    layers = ds_quant.files.measurements.load(path)["layers"]
    assert sorted(layers) == sorted(record_name("experts", p, e) for p in ("gate_up_proj", "down_proj") for e in range(E))
    rec = layers[record_name("experts", "gate_up_proj", 0)]
    assert (rec["kind"], rec["out_features"], rec["in_features"]) == ("plain", 2 * FF, H)
    assert sum(layers[record_name("experts", "down_proj", e)]["samples"] for e in range(E)) == T * K
    assert layers[record_name("experts", "down_proj", 3)]["samples"] == 0

    quant = ds_quant.prep_model(Block(), {**cfg, "mode": "QUANTIZE"})
    q = quant.experts
    assert type(q) is Fp8Experts
    assert q.gate_up_proj.dtype == torch.float8_e4m3fn and q.gate_up_proj.shape == (E, 2 * FF, H)
    assert q.down_proj.dtype == torch.float8_e4m3fn and q.down_proj.shape == (E, H, FF)
    assert q.gate_up_proj_scale.shape == (E,) and q.down_proj_input_scale.shape == (E,)
    assert all(not p.requires_grad for p in q.parameters())
    s = q.down_proj_input_scale
    assert torch.isfinite(s).all() and (s > 0).all() and s[3] == s[:3].max()
    assert "experts.down_proj: expert(s) [3] saw no calibration token" in caplog_ds.text
    with torch.no_grad():
        y = quant(*test)
    assert y.dtype == torch.bfloat16 and sqnr_db(ref.float(), y.float()) > 22


@pytest.mark.parametrize("method", ["act_maxabs_hw_weights_pcs_maxabs_pow2", "act_dynamic_per_token_weights_pcs"])
def test_experts_per_channel_and_dynamic(tmp_path, method):
    cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}
    test = routing(2)
    with torch.no_grad():
        ref = Block()(*test)
        block = ds_quant.prep_model(Block(), cfg)
        block(*routing(1))
        ds_quant.finish_measurements(block)
        quant = ds_quant.prep_model(Block(), {**cfg, "mode": "QUANTIZE", "scale_method": method})
        assert quant.experts.gate_up_proj_scale.shape == (E, 2 * FF)  # per expert and output channel
        assert (quant.experts.gate_up_proj_input_scale is None) == ("dynamic" in method)
        assert sqnr_db(ref.float(), quant(*test).float()) > 22


def test_experts_can_be_blocked_by_type(tmp_path):
    cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s"),
           "blocklist": {"types": ["MixtralExperts"], "names": []}}
    block = ds_quant.prep_model(Block(), cfg)
    assert type(block.experts) is mixtral.MixtralExperts


def test_transformers4_experts_are_linears_and_the_router_stays_high_precision(tmp_path):
    """transformers 4.x: experts are nn.Linear (quantized per expert as linears); the router `gate` (one output
    per expert) is not quantized, named in the log instead."""
    from ds_quant.layers.patch import skipped_tp_layers

    class MoeBlock(torch.nn.Module):  # the 4.x MixtralSparseMoeBlock layout
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(H, E, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(H, FF) for _ in range(E))

    model = torch.nn.ModuleDict({"moe": MoeBlock(), "lm_head": torch.nn.Linear(H, 8)})
    ds_quant.prep_model(model, {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")})
    assert [type(e).__name__ for e in model["moe"].experts] == ["MeasuredLinear"] * E
    assert type(model["moe"].gate) is torch.nn.Linear and type(model["lm_head"]).__name__ == "MeasuredLinear"
    assert [(n, c) for n, c, r in skipped_tp_layers(model) if r.startswith("MoE router")] == [("moe.gate", "Linear")]


@pytest.mark.parametrize("arch, leaves", [("mixtral", ("w1", "w3", "w2")),
                                          ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"))])
def test_expert_layout_follows_transformers_conversion_mapping(arch, leaves):
    """Where a fused block's experts lie in a folder (per-expert linears, as transformers 5 saves and loads them):
    read from transformers' own conversion mapping, [gate; up] rows of gate_up_proj, down whole."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_quant.workflows.hf_model import expert_layouts

    extra = {"num_local_experts": E} if arch == "mixtral" else {"num_experts": E, "moe_intermediate_size": FF}
    c = AutoConfig.for_model(arch, hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_experts_per_tok=K, vocab_size=64, **extra)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(c)
    layouts = expert_layouts(model)
    assert sorted(layouts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    lay = layouts["model.layers.1.mlp.experts"]
    gate, up, down = leaves
    assert lay.num_experts == E and lay.shapes == {"gate_up_proj": (2 * FF, H), "down_proj": (H, FF)}
    assert lay.parts("gate_up_proj", 3) == [(f"model.layers.1.mlp.experts.3.{gate}", slice(0, FF)),
                                            (f"model.layers.1.mlp.experts.3.{up}", slice(FF, 2 * FF))]
    assert lay.parts("down_proj", 0) == [(f"model.layers.1.mlp.experts.0.{down}", slice(0, H))]
    assert len(lay.all_parts()) == 3 * E
