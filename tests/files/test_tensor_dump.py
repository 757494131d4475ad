"""observer "save": MEASURE dumps what the measured linears see to a safetensors file per rank (single process
here; the TP=2 run through the launcher is in tests/test_distributed.py)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ds_quant
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError
from ds_quant.files.tensor_dump import dump_path
from ds_quant.layers.linear import Fp8Linear
from tests.test_prepare import Tiny


def cfg(tmp_path, **extra):
    return {"method": "HOOKS", "mode": "MEASURE", "observer": "save", "dump_stats_path": str(tmp_path / "stats" / "t"),
            **extra}


def calibrate(model, batches):
    with torch.no_grad():
        for x in batches:
            model(x)


def test_dump_holds_every_call_of_every_layer_exactly(tmp_path):
    torch.manual_seed(0)
    reference, batches = Tiny().eval(), [torch.randn(3, 5, 32), torch.randn(2, 7, 32)]
    seen = {}  # what the original linears receive and return, per call

    def hook(name):
        def f(mod, args, out):
            seen.setdefault(name, []).append((args[0].clone(), out.clone()))
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    calibrate(reference, batches)
    for h in handles:
        h.remove()
    model = ds_quant.prep_model(reference, cfg(tmp_path))
    calibrate(model, batches)
    ds_quant.finish_measurements(model)
    path = dump_path(str(tmp_path / "stats" / "t"), 0, 1)
    tensors = load_file(path)
    assert len(tensors) == 2 * 2 * len(seen) == 2 * 2 * 9  # input and output of 2 calls of 9 linears
    for name, calls in seen.items():
        for i, (x, y) in enumerate(calls):
            assert torch.equal(tensors[f"{name}.input.{i}"], x) and torch.equal(tensors[f"{name}.output.{i}"], y)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "ds_quant.tensors" and meta["dropped_tensors"] == "0" and meta["rank"] == "0"
    # The statistics are the maxabs observer's, in the usual measurement file: the dump agrees with them.
    merged = json.loads((tmp_path / "stats" / "t.json").read_text())
    assert merged["observer"] == "save"
    for name in seen:
        top = max(tensors[f"{name}.input.{i}"].abs().max().item() for i in range(2))
        assert merged["layers"][name]["input_amax"] == top  # exact: the same float32 values
    # QUANTIZE reads that file like any other.
    fp8 = ds_quant.prep_model(Tiny(), {**cfg(tmp_path), "mode": "QUANTIZE", "observer": "maxabs"})
    assert sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 9


def test_cap_keeps_the_first_tensors_and_says_what_it_dropped(tmp_path, caplog_ds):
    torch.manual_seed(0)
    one_input = 3 * 5 * 32 * 4  # bytes of one float32 input of the first linear
    model = ds_quant.prep_model(Tiny().eval(), cfg(tmp_path, save_max_bytes=one_input + 3 * 5 * 64 * 4))
    calibrate(model, [torch.randn(3, 5, 32)])
    ds_quant.finish_measurements(model)
    path = dump_path(str(tmp_path / "stats" / "t"), 0, 1)
    assert sorted(load_file(path)) == ["blocks.0.attn.0.input.0", "blocks.0.attn.0.output.0"]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["dropped_tensors"] == str(2 * 9 - 2) and meta["first_dropped"] == "blocks.0.attn.2.input.0"
    warning = [r.getMessage() for r in caplog_ds.records if "save_max_bytes" in r.getMessage()]
    assert len(warning) == 1 and "at blocks.0.attn.2.input.0; 16 tensor(s) not saved" in warning[0]


def test_allowlist_names_select_the_layers_and_a_rerun_removes_old_dumps(tmp_path):
    stale = dump_path(str(tmp_path / "stats" / "t"), 1, 2)  # another run's rank 1 of 2: rank 0 removes it
    (tmp_path / "stats").mkdir()
    open(stale, "wb").close()
    model = ds_quant.prep_model(Tiny().eval(), cfg(tmp_path, allowlist={"types": [], "names": ["lm_head"]}))
    calibrate(model, [torch.randn(2, 32)])
    ds_quant.finish_measurements(model)
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["t.json", "t_0_1.json", "t_tensors_0_1.safetensors"]
    assert sorted(load_file(dump_path(str(tmp_path / "stats" / "t"), 0, 1))) == ["lm_head.input.0", "lm_head.output.0"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "1GB"])
def test_bad_cap_is_refused_with_the_key(value):
    with pytest.raises(ConfigError, match="key 'save_max_bytes'.*whole number of bytes"):
        QuantConfig.from_dict({"method": "HOOKS", "observer": "save", "save_max_bytes": value})
