"""DeepSpeed's own TP layer objects in a single process (mp_group=None): exact-type matching, semantics kept,
unsupported subclasses left in high precision and named in the log."""

import logging

import pytest
import torch
from torch import nn

import ds_quant
from ds_quant.modules import Fp8Linear, MeasuredLinear
from ds_quant.scales import sqnr_db

layers = pytest.importorskip("deepspeed.module_inject.layers")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.col = layers.LinearLayer(nn.Linear(64, 96), None)
        self.row = layers.LinearAllreduce(nn.Linear(96, 64), None)
        self.head = layers.LmHeadLinearAllreduce(nn.Linear(64, 40), None)
        self.yuan = layers.Yuan_LinearLayer(nn.Linear(64, 64), None)  # a DeepSpeed subclass we do not handle

    def forward(self, x):
        return self.head(self.yuan(self.row(torch.relu(self.col(x)))))


@pytest.fixture
def caplog_ds(caplog):
    logger = logging.getLogger("ds_quant")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_ds_layers_swapped_by_exact_type_and_subclass_named(tmp_path, caplog_ds):
    net = Net().to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = net(x)
        cfg = {"method": "HOOKS", "mode": "MEASURE", "dump_stats_path": str(tmp_path / "s")}
        ds_quant.prep_model(net, cfg)
        assert [type(m).__name__ for m in (net.col, net.row, net.head, net.yuan)] == [
            "MeasuredLinear", "MeasuredLinear", "MeasuredLinear", "Yuan_LinearLayer"]
        assert [m.layout.kind.value for m in (net.col, net.row, net.head)] == ["column", "row", "lm-head"]
        assert torch.equal(net(x), ref), "the measured twins must compute exactly what DeepSpeed's layers compute"
        ds_quant.finish_measurements(net)
    assert "left in high precision: yuan: DeepSpeed TP class Yuan_LinearLayer: not handled yet" in caplog_ds.text

    quant = Net().to(torch.bfloat16)
    ds_quant.prep_model(quant, {**cfg, "mode": "QUANTIZE"})
    assert all(isinstance(m, Fp8Linear) for m in (quant.col, quant.row, quant.head))
    assert not isinstance(quant.yuan, (Fp8Linear, MeasuredLinear))
    with torch.no_grad():
        # 3 FP8 GEMMs in series (~26 dB each, see test_scales): 21 dB fails on any wrong scale or bias placement.
        assert sqnr_db(ref.float(), quant(x).float()) > 21


def test_empty_shard_measures_and_quantizes(tmp_path):
    """DeepSpeed may give a rank no input channels (TP=4 over 2 kv heads): nothing to multiply, output 0."""
    from ds_quant.tp import Kind, TPLayout

    torch.manual_seed(0)
    empty = nn.Linear(0, 16, bias=False)
    layout = TPLayout(kind=Kind.ROW, tp_rank=1, tp_size=2, partition_sizes=(8, 0))
    measured = MeasuredLinear("o_proj", layout, empty.weight, None, ds_quant.config.MeasureExclude.OUTPUT)
    measured(torch.randn(1, 3, 0))
    assert measured.stats()["input_amax"] == 0.0 and measured.stats()["in_features"] == 8
    record = {"input_amax": 0.0, "weight_amax": 0.0, "in_features": 8, "input_channel_amax": None}
    fp8 = Fp8Linear.from_original(layers.LinearAllreduce(empty, None), "o_proj", ds_quant.QuantConfig(), record)
    assert fp8.fallback_reason.startswith("empty shard")
    y = fp8(torch.randn(1, 3, 0, dtype=torch.float32))
    assert y.shape == (1, 3, 16) and not y.any()
