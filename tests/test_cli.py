"""`ds-quant merge | inspect | import-hqt | check-config`: exit codes, output and messages."""

import inspect
import json

import numpy as np
import pytest
import torch
from torch import nn

import ds_quant
from ds_quant import errors, run
from ds_quant.cli import main
from ds_quant.files import measurements as ms
from ds_quant.files import shards as sf
from ds_quant.layers.linear import Fp8Linear


def shards():
    def rec(kind, ch, sizes, in_full, w):
        return {"kind": kind, "in_features": in_full, "out_features": 8, "local_in_features": len(ch),
                "partition_sizes": sizes, "input_amax": max(ch), "input_channel_amax": ch, "output_amax": 3.0,
                "weight_amax": w, "samples": 4}

    return [ms.make_shard({"down": rec("row", ch, [3, 2], 5, w), "up": rec("column", [4.0, 1.0], [4, 4], 2, 0.5)},
                          r, 2, "maxabs", "bfloat16")
            for r, (ch, w) in enumerate((([1.0, 2.0, 3.0], 0.5), ([224.0, 0.5], 0.75)))]


@pytest.fixture
def prefix(tmp_path):
    p = str(tmp_path / "stats")
    for s in shards():
        ms.atomic_write_json(sf.shard_path(p, s["rank"], 2), s)
    return p


def test_merge_writes_the_model_level_file(prefix, capsys):
    assert main(["merge", prefix]) == 0
    assert capsys.readouterr().out.strip() == f"merged 2 shard(s), 2 layers -> {prefix}.json"
    assert ms.load(prefix + ".json")["layers"]["down"]["input_channel_amax"] == [1.0, 2.0, 3.0, 224.0, 0.5]


def test_merge_errors_exit_1_and_name_the_file(prefix, capsys):
    (ms.Path(prefix + "_1_2.json")).unlink()
    assert main(["merge", prefix]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: shards of ") and f"missing {prefix}_1_2.json" in err


def test_inspect_table_and_json(prefix, capsys):
    main(["merge", prefix])
    capsys.readouterr()
    assert main(["inspect", prefix + ".json", "--scale-method", "maxabs_arbitrary"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "merged, world size 2" in out[0] and "scales for maxabs_arbitrary" in out[0]
    assert out[1].split() == ["layer", "kind", "out", "x", "in", "in", "amax", "out", "amax", "w", "amax", "in",
                              "scale", "w", "scale", "samples"]
    # 224 / (448 * 0.25) = 2; weight 0.75 / (448 * 0.5)
    assert out[2].split() == ["down", "row", "8x5", "224", "3", "0.75", "2", "0.003348", "4"]
    assert main(["inspect", prefix + ".json", "--json", "--scale-method", "maxabs_pow2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 2 and doc["scale_method"] == "maxabs_pow2"
    down = doc["layers"][0]
    assert down["layer"] == "down" and down["input_scale"] == 2.0 and down["weight_scale"] == 2.0 ** -8
    assert main(["inspect", prefix + ".json", "--scale-method", "act_maxabs_pow2_weights_pcs_opt_pow2"]) == 0
    assert "per-channel" in capsys.readouterr().out


def test_inspect_errors(prefix, capsys):
    assert main(["inspect", prefix + "_0_2.json", "--scale-method", "maxabs_hwx"]) == 1
    assert "'maxabs_hwx' is not one of" in capsys.readouterr().err
    assert main(["inspect", prefix + "_nope.json"]) == 1
    assert "_nope.json: measurement file not found" in capsys.readouterr().err


def test_every_error_of_ours_is_a_ds_quant_error_and_still_a_value_error():
    """The faces catch DsQuantError once; users' `except ValueError` keeps catching what it caught before."""
    ours = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert {c.__name__ for c in ours} >= {"DsQuantError", "ConfigError", "MeasurementError", "CheckpointError",
                                          "RankError", "HessianError", "SmoothError"}
    for cls in [*ours, run.UsageError]:
        assert issubclass(cls, errors.DsQuantError), cls
        assert cls is errors.DsQuantError or issubclass(cls, ValueError), cls
    assert ds_quant.DsQuantError is errors.DsQuantError


def test_any_error_of_ours_is_one_line_and_exit_1_in_every_command(tmp_path, capsys, monkeypatch):
    """Caught once, in main: a command that raises an error of ours (here a CheckpointError from convert, which no
    command caught by name before) prints `error: <message>` and exits 1, without a traceback."""
    import ds_quant.cli as cli

    def broken(*args, **kwargs):
        raise errors.CheckpointError("bad/model.safetensors: truncated")

    monkeypatch.setattr(cli, "convert", broken)
    assert main(["convert", "in", "out", "--quant-config", "q.json"]) == 1
    assert capsys.readouterr().err == "error: bad/model.safetensors: truncated\n"
    monkeypatch.setattr(cli, "convert", lambda *a: (_ for _ in ()).throw(ValueError("not ours")))
    with pytest.raises(ValueError, match="not ours"):  # anything else keeps its traceback
        main(["convert", "in", "out", "--quant-config", "q.json"])


def test_check_config_still_works(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"method": "HOOKS"}')
    assert main(["check-config", str(tmp_path / "c.json")]) == 0 and capsys.readouterr().out == "ok\n"


# -- import-hqt ----------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def hqt_file(path, rank, world, scale=1.0):
    nodes = {
        "up": {"inputs": [[[2.0 * scale]]], "outputs": [[3.0]], "params": {"weight": [[0.25]]}},
        "down": {"inputs": [[[4.0 + rank]]], "outputs": [[1.0]], "params": {"weight": [[0.5 + rank]]}},
        "model.layers.0.self_attn.matmul_qk": {"inputs": [[[1.0]], [[2.0]]], "outputs": [[3.0]]},
        "model.layers.0.self_attn.k_cache": {"inputs": [[[1.0]]], "outputs": [[1.0]]},
        "model.layers.0.self_attn.softmax": {"inputs": [[[9.0]]]},
    }
    doc = {"GlobalRank": rank, "LocalRank": rank, "Mode": "DynamicRange", "Nodes": nodes}
    path.write_text(json.dumps(doc))
    return str(path)


def test_import_hqt_maps_linears_skips_the_rest_and_quantizes(tmp_path, capsys):
    files = [hqt_file(tmp_path / f"m_hooks_maxabs_{r}_2.json", r, 2) for r in (1, 0)]
    out = str(tmp_path / "imported")
    assert main(["import-hqt", *files, "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["skipped model.layers.0.self_attn.matmul_qk: matmul (two activations, no weight): "
                         "ds_quant quantizes linears only",
                         "skipped model.layers.0.self_attn.k_cache: kv-cache: not a linear",
                         "skipped model.layers.0.self_attn.softmax: softmax: not a linear"]
    assert lines[3] == f"imported 2 linear(s) from 2 HQT file(s), skipped 3 -> {out}.json"
    doc = ms.load(out + ".json")
    assert doc["world_size"] == 2 and doc["source"]["hqt_files"][0].endswith("_0_2.json")
    down = doc["layers"]["down"]
    assert (down["input_amax"], down["weight_amax"], down["output_amax"]) == (5.0, 1.5, 1.0)  # max over ranks
    # The imported file drives QUANTIZE like one of ours (shapes unknown: not compared).
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    with torch.no_grad():
        net.down.weight.clamp_(-0.5, 0.5)
    model = ds_quant.prep_model(net, {"method": "HOOKS", "mode": "QUANTIZE", "dump_stats_path": out,
                                      "scale_method": "maxabs_arbitrary"})
    assert isinstance(model.down, Fp8Linear) and float(model.down.input_scale) == pytest.approx(5.0 / 112)


def test_import_hqt_with_model_shapes_places_channel_vectors(tmp_path, monkeypatch, capsys):
    from ds_quant.files import hqt_import

    monkeypatch.setattr(hqt_import, "model_shapes", lambda d: {"up": (32, 16), "down": (16, 4)})
    files = []
    for r, vec in enumerate(([1.0, 2.0], [3.0, 0.5])):  # a row-parallel split of 4 input channels
        doc = {"GlobalRank": r, "Nodes": {"down": {"inputs": [vec], "params": {"weight": 0.5}},
                                          "lm_head": {"inputs": [[1.0]], "params": {"weight": 0.5}}}}
        (tmp_path / f"x_{r}_2.json").write_text(json.dumps(doc))
        files.append(str(tmp_path / f"x_{r}_2.json"))
    assert main(["import-hqt", *files, "--out", str(tmp_path / "y"), "--model", "dir"]) == 0
    assert "skipped lm_head: not a linear of the given model" in capsys.readouterr().out
    down = ms.load(tmp_path / "y.json")["layers"]["down"]
    assert down["input_channel_amax"] == [1.0, 2.0, 3.0, 0.5] and (down["out_features"], down["in_features"]) == (16, 4)


def test_import_hqt_npz_and_errors(tmp_path, capsys):
    hqt_file(tmp_path / "a_0_1.json", 0, 1)
    doc = json.loads((tmp_path / "a_0_1.json").read_text())
    np.savez(tmp_path / "a_0_1.npz", doc)  # what HQT's npz dump holds: a pickled dict
    assert main(["import-hqt", str(tmp_path / "a_0_1.npz"), "--out", str(tmp_path / "o")]) == 1
    assert "a_0_1.npz: stores a pickled object; pass --allow-pickle" in capsys.readouterr().err
    assert main(["import-hqt", str(tmp_path / "a_0_1.npz"), "--out", str(tmp_path / "o"), "--allow-pickle"]) == 0
    assert ms.load(tmp_path / "o.json")["layers"]["up"]["input_amax"] == 2.0
    capsys.readouterr()
    hqt_file(tmp_path / "b_1_2.json", 1, 2)
    assert main(["import-hqt", str(tmp_path / "b_1_2.json"), "--out", str(tmp_path / "o")]) == 1
    assert "ranks [0] missing" in capsys.readouterr().err
    (tmp_path / "c_0_1.json").write_text('{"GlobalRank": 0, "Nodes": {"up": {"inputs": [["x"]], '
                                         '"params": {"weight": 1.0}}}}')
    assert main(["import-hqt", str(tmp_path / "c_0_1.json"), "--out", str(tmp_path / "o")]) == 1
    assert "c_0_1.json: node 'up' inputs: ['x'] is not a number" in capsys.readouterr().err
    (tmp_path / "d_0_1.json").write_text('{"Nodes": ')
    assert main(["import-hqt", str(tmp_path / "d_0_1.json"), "--out", str(tmp_path / "o")]) == 1
    assert "d_0_1.json: not valid JSON (truncated or corrupt?)" in capsys.readouterr().err
