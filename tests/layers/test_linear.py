"""DeepSpeed's own TP layer objects in a single process: one test per class in tp.DS_SPECS.

`as_rank(r, world)` builds a DeepSpeed layer as rank r of `world` would (its constructor asks the group for size
and rank; a stand-in group answers), so the per-rank layouts (fused qkv rows, packed gate_up halves, transposed
Conv1D weights) are DeepSpeed's real ones. Collectives are switched off (`is_parallel` is False), which column
layers never need and row layers need only after the GEMM; each rank's output is compared with DeepSpeed's own
layer on that rank, and the merged measurements of the ranks with those of the whole layer.
"""

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn

import ds_quant
from ds_quant.config import QuantConfig
from ds_quant.files import measurements as ms
from ds_quant.layers.linear import Fp8Linear, MeasuredLinear
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import sqnr_db
from ds_quant.parallel.tp import DS_SPECS, PLAIN, Input, Kind, TPLayout, spec_of, unhandled_tp_reason

layers = pytest.importorskip("deepspeed.module_inject.layers")
from deepspeed.module_inject.tp_shard import AutoTPMeta  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

IN, OUT = 64, 192


class FalconDecoderLayer(nn.Module):
    """DeepSpeed picks the fused-qkv layout by the block's class name: Falcon's is 'bloomtype' (per-head
    interleaved q/k/v, no per-sub-parameter sizes)."""


class GLMBlock(nn.Module):
    """'glmtype': q, k, v cut one by one (DeepSpeed records the sub-parameter sizes)."""


@pytest.fixture(autouse=True)
def no_collectives():
    """The stand-in group spans no ranks: DeepSpeed's layers and the twins skip their allreduce alike."""
    with mock.patch.object(layers.pg_utils, "is_parallel", lambda group: False):
        yield


@contextlib.contextmanager
def as_rank(rank: int, world: int):
    with mock.patch.object(layers.dist, "get_world_size", lambda group=None: world), \
            mock.patch.object(layers.dist, "get_rank", lambda group=None: rank):
        yield object()  # the stand-in group


def linear(out_f=OUT, in_f=IN, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)


# class -> (source module, constructor kwargs); every supported DeepSpeed class that computes a GEMM.
COLUMN_CASES = {
    "LinearLayer": (linear, {}),
    "VocabParallelLinear": (linear, {"name": "lm_head"}),
    "fused_LinearLayer[bloomtype]": (linear, {"fused_module": FalconDecoderLayer(), "tp_meta": AutoTPMeta()}),
    "fused_LinearLayer[glmtype]": (linear, {"fused_module": GLMBlock(), "tp_meta": AutoTPMeta()}),
    "GateUpPack_LinearLayer": (linear, {"tp_meta": AutoTPMeta()}),
    "SubParamLinearLayer": (linear, {"shape": (3, -1), "partition_dim": 0}),
    "Yuan_LinearLayer": (lambda: linear(IN, IN), {"tp_meta": AutoTPMeta(num_kv_heads=4)}),
}
ROW_CASES = {
    "LinearAllreduce": (lambda: linear(IN, OUT), {}),
    # HF Conv1D(nf=out, nx=in) stores (in, out); DeepSpeed transposes it to (out, in) before cutting in.
    "Conv_LinearALlreduce": (lambda: conv1d(IN, IN), {"name": "attn.c_proj"}),
    "LmHeadLinearAllreduce": (lambda: linear(40, IN), {}),
    "LinearAllreduceWithReplicatedInput": (lambda: linear(40, IN), {"name": "lm_head"}),
}


def conv1d(out_f, in_f, seed=0):
    """Without bias: DeepSpeed 0.19.8's Conv_LinearALlreduce transposes every parameter, and a 1-D bias fails
    there (IndexError) before any forward, so GPT-2's biased c_proj cannot be built by DeepSpeed itself."""
    torch.manual_seed(seed)
    c = Conv1D(out_f, in_f)
    c.bias = None
    return c.to(torch.bfloat16)


def build(case: str, rank: int, world: int, cases=None):
    cases = cases or {**COLUMN_CASES, **ROW_CASES}
    make, kwargs = cases[case]
    cls = getattr(layers, case.split("[")[0])
    with as_rank(rank, world) as group:
        return cls(make(), group, **kwargs)


def measured_twin(module):
    return MeasuredLinear.from_original(module, "l", resolve(QuantConfig(mode="MEASURE", measure_exclude="NONE"), "l"))


def merged_record(modules, xs):
    """Each rank's twin sees its input; returns the merged record (what QUANTIZE at any TP size reads)."""
    world, shards = len(modules), []
    for rank, (m, x) in enumerate(zip(modules, xs, strict=True)):
        twin = measured_twin(m)
        with torch.no_grad():
            assert torch.equal(twin(x), m(x)), "the measured twin must compute exactly what DeepSpeed computes"
        shards.append(ms.make_shard({"l": twin.stats()}, rank, world, "maxabs", "bfloat16"))
    return ms.merge(shards)["layers"]["l"]


def assert_same_model_level_record(tp2, tp1):
    for key in ("kind", "in_features", "out_features", "input_amax", "weight_amax"):
        assert tp2[key] == tp1[key], key
    assert tp2["input_channel_amax"] == pytest.approx(tp1["input_channel_amax"])
    # Column: ranks hold different rows; their output maxima together are the layer's (bf16 GEMMs of a row subset
    # may round differently, hence approx).
    assert tp2["output_amax"] == pytest.approx(tp1["output_amax"], rel=2e-2)


@pytest.mark.parametrize("case", list(COLUMN_CASES))
def test_column_class_at_tp2_keeps_deepspeed_rows_and_model_level_measurements(case):
    """The input is whole (replicated), so per-input-channel statistics are whole on every rank whatever order
    DeepSpeed cut the rows in (fused qkv, gate_up halves): the ranks' merge equals the whole layer's."""
    ranks = [build(case, r, 2) for r in range(2)]
    whole = build(case, 0, 1)
    assert spec_of(ranks[0]).kind is Kind.COLUMN and spec_of(ranks[0]).input is Input.WHOLE
    assert all(m.weight.shape[0] < whole.weight.shape[0] for m in ranks), "DeepSpeed did not cut the rows"
    x = (torch.randn(3, 5, whole.weight.shape[1]) * torch.linspace(0.1, 4, whole.weight.shape[1])).bfloat16()
    tp2 = merged_record(ranks, [x, x])
    assert tp2["out_features"] == whole.weight.shape[0] and tp2["in_features"] == whole.weight.shape[1]
    assert_same_model_level_record(tp2, merged_record([whole], [x]))


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_class_at_tp2_keeps_deepspeed_split_and_model_level_measurements(case):
    """Each rank sees a slice of the input channels (sharded: already cut; sliced: the layer cuts it); the merge
    places the slices by DeepSpeed's partition sizes, so the channel vector equals the whole layer's."""
    ranks = [build(case, r, 2) for r in range(2)]
    whole = build(case, 0, 1)
    spec = spec_of(ranks[0])
    assert spec.input.split and spec.allreduce
    in_full = whole.weight.shape[1]
    x = (torch.randn(3, 5, in_full) * torch.linspace(0.1, 4, in_full)).bfloat16()
    if spec.input is Input.SHARDED:
        layouts = [TPLayout.of(m) for m in ranks]
        xs = [x[..., lay.input_slice()] for lay in layouts]
    else:
        xs = [x, x]
    tp2, tp1 = merged_record(ranks, xs), merged_record([whole], [x])
    for key in ("kind", "in_features", "out_features", "input_amax", "weight_amax"):
        assert tp2[key] == tp1[key], key
    assert tp2["input_channel_amax"] == pytest.approx(tp1["input_channel_amax"])
    # (output_amax: without the allreduce each rank's output is a partial sum, so it is not compared here.)


def test_conv_allreduce_weight_is_transposed_by_deepspeed():
    """DeepSpeed's Conv_LinearALlreduce holds (out, in_shard) though Conv1D stored (in, out): the twin multiplies
    what DeepSpeed holds, and the record's shape is the model's (out, in), not Conv1D's."""
    src = conv1d(IN, IN)
    ranks = [build("Conv_LinearALlreduce", r, 2) for r in range(2)]
    assert [tuple(m.weight.shape) for m in ranks] == [(IN, IN // 2)] * 2
    assert torch.equal(torch.cat([m.weight for m in ranks], dim=1), src.weight.t())
    assert TPLayout.of(ranks[0]).full_shape(*ranks[0].weight.shape) == (IN, IN)
    assert DS_SPECS["Conv_LinearALlreduce"].weight_transposed


@pytest.mark.parametrize("case", list(COLUMN_CASES) + list(ROW_CASES))
def test_each_class_quantizes_to_fp8_with_deepspeed_semantics(case, tmp_path):
    """MEASURE then QUANTIZE a layer built at TP=1 with a group (DeepSpeed materialises its layout). Types and
    dtypes are asserted, not only outputs. Threshold 25 dB: one FP8 GEMM on Gaussian data scores ~28 dB
    (README, numerics table); a transposed weight, a misplaced bias or a wrong slice scores below 5 dB."""
    net = nn.Sequential(build(case, 0, 1))
    x = torch.randn(2, 7, net[0].weight.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        ref = net(x)
        cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}
        ds_quant.prep_model(net, cfg)
        assert type(net[0]) is MeasuredLinear
        assert torch.equal(net(x), ref)
        ds_quant.finish_measurements(net)
        original = build(case, 0, 1)
        quant = ds_quant.prep_model(nn.Sequential(original), {**cfg, "mode": "QUANTIZE"})
        twin = quant[0]
        assert type(twin) is Fp8Linear and twin.layout.spec is DS_SPECS[case.split("[")[0]]
        assert twin.weight.dtype == torch.float8_e4m3fn and twin.weight.shape == original.weight.shape
        assert twin.weight_scale.dtype == torch.float32 and twin.input_scale.dtype == torch.float32
        assert twin.bias is None or (twin.bias.dtype == torch.bfloat16 and not twin.bias.requires_grad)
        y = quant(x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert sqnr_db(ref.float(), y.float()) > 25


class NewDeepSpeedLayer(layers.LinearLayer):
    """A subclass a future DeepSpeed might add: never matched by accident."""


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Plain(nn.Linear):
    """Inherits nn.Linear.forward: a plain linear."""


def test_unsupported_classes_stay_bf16_named_and_counted(tmp_path, caplog_ds):
    from transformers.models.falcon.modeling_falcon import FalconLinear

    with as_rank(0, 1) as group:
        net = nn.ModuleDict({
            "sub_row": layers.SubParamLinearAllreduce(linear(IN, 3 * IN), group, shape=(IN, (IN,) * 3),
                                                     partition_dim=1),
            "yuan_row": layers.Yuan_LinearAllreduce(linear(IN, IN, bias=False), group, tp_meta=AutoTPMeta(num_kv_heads=4)),
            "new": NewDeepSpeedLayer(linear(), group),
            "conv_col": layers.conv_LinearLayer(conv1d(IN, IN), group),  # DeepSpeed fails to cut a non-square one
        })
    net["conv_unpartitioned"] = layers.Conv_LinearALlreduce(conv1d(IN, OUT), None, name="c_proj")  # never transposed
    net["scaled"], net["falcon"], net["plain"] = Scaled(IN, OUT), FalconLinear(IN, OUT), Plain(IN, OUT)
    cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}
    ds_quant.prep_model(net, cfg)
    assert {k: type(m).__name__ for k, m in net.items()} == {
        "sub_row": "SubParamLinearAllreduce", "yuan_row": "Yuan_LinearAllreduce", "new": "NewDeepSpeedLayer",
        "conv_col": "conv_LinearLayer", "conv_unpartitioned": "Conv_LinearALlreduce", "scaled": "Scaled",
        "falcon": "MeasuredLinear", "plain": "MeasuredLinear"}
    text = caplog_ds.text
    assert "left in high precision: sub_row: DeepSpeed TP class SubParamLinearAllreduce: its input channels are " \
           "scattered" in text
    assert "left in high precision: new: DeepSpeed TP class NewDeepSpeedLayer is not in ds_quant's table" in text
    assert "left in high precision: conv_unpartitioned: DeepSpeed TP class Conv_LinearALlreduce: built without a " \
           "TP group, DeepSpeed never transposed" in text
    assert "left in high precision: scaled: subclass Scaled of nn.Linear: its forward is not x @ W.T + b" in text
    assert ("patched 2 linear layer(s) (<dict>); left in high precision: 6 layer(s): 1 Conv_LinearALlreduce, "
            "1 NewDeepSpeedLayer, 1 Scaled, 1 SubParamLinearAllreduce, 1 Yuan_LinearAllreduce, "
            "1 conv_LinearLayer") in text


def test_falcon_linear_is_a_plain_linear_by_behaviour():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    assert FalconLinear.forward is not nn.Linear.forward  # it overrides forward: input @ W.T + bias
    assert spec_of(FalconLinear(IN, OUT)) is PLAIN and spec_of(FalconLinear(IN, OUT, bias=False)) is PLAIN
    assert spec_of(Plain(IN, OUT)) is PLAIN
    with torch.device("meta"):
        on_meta = FalconLinear(IN, OUT)
    assert "on meta" in unhandled_tp_reason(on_meta)


def test_every_deepspeed_tp_class_has_a_row():
    """A DeepSpeed upgrade that adds a TP class fails here until the class gets a spec (supported or a reason)."""
    found = {n for n, c in vars(layers).items() if isinstance(c, type) and issubclass(c, layers.TensorParallel_Layer)
             and c is not layers.TensorParallel_Layer}
    assert found - set(DS_SPECS) == set()
    assert set(DS_SPECS) - found == set(), "a row names a class this DeepSpeed does not have"
    assert all(s.supported or s.unsupported for s in DS_SPECS.values())


def test_config_types_come_from_the_table():
    assert "fused_LinearLayer" in ds_quant.config.SUPPORTED_TYPES and "FalconLinear" in ds_quant.config.SUPPORTED_TYPES
    QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["GateUpPack_LinearLayer"], "names": []}})
    with pytest.raises(ds_quant.ConfigError, match="'SubParamLinearAllreduce' is not a module type ds_quant can"):
        QuantConfig.from_dict({"method": "HOOKS", "allowlist": {"types": ["SubParamLinearAllreduce"], "names": []}})
    assert set(ms.KINDS) == {k.value for k in Kind}
    assert ds_quant.parallel.tp.SPLIT_INPUT_KINDS == {"row", "lm-head"}


def test_empty_shard_measures_and_quantizes(tmp_path):
    """DeepSpeed may give a rank no input channels (TP=4 over 2 kv heads): nothing to multiply, output 0."""
    torch.manual_seed(0)
    empty = nn.Linear(0, 16, bias=False)
    layout = TPLayout(kind=Kind.ROW, tp_rank=1, tp_size=2, partition_sizes=(8, 0))
    measured = MeasuredLinear("o_proj", layout, empty.weight, None, ds_quant.config.MeasureExclude.OUTPUT)
    measured(torch.randn(1, 3, 0))
    assert measured.stats()["input_amax"] == 0.0 and measured.stats()["in_features"] == 8
    record = {"input_amax": 0.0, "weight_amax": 0.0, "in_features": 8, "input_channel_amax": None}
    fp8 = Fp8Linear.from_original(layers.LinearAllreduce(empty, None), "o_proj", resolve(ds_quant.QuantConfig(), "o_proj"),
                                  record)
    assert fp8.fallback_reason.startswith("empty shard")
    y = fp8(torch.randn(1, 3, 0, dtype=torch.float32))
    assert y.shape == (1, 3, 16) and not y.any()
