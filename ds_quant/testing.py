"""Generators the tests and the benchmarks share (like `torch.testing`): seeded data for one FP8 linear and its
SQNR against a float64 reference, and synthetic measurement shards with the merge benchmark built on them.

Nothing in the package imports this module; it may import any wing (it sits with the faces), and it is not part
of the public API `import ds_quant` gives. Everything here is deterministic: fixed seeds, so a test can assert a
floor that bench/numerics_table.py prints.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import QuantConfig, ScaleMethod
from .files.measurements import atomic_write_json, make_shard, merge
from .files.shards import merge_files, shard_path
from .layers.linear import Fp8Linear
from .numerics.layer_spec import resolve
from .numerics.scales import sqnr_db

# -- one FP8 linear on made-up data (bench/numerics_table.py, tests/numerics/test_numerics.py) ---------------
KINDS = ("gaussian", "student_t", "channel_outliers")


def make_data(kind: str, out_features: int = 256, in_features: int = 512, tokens: int = 64, seed: int = 0):
    """(nn.Linear, input) of one of KINDS: Gaussian, Student-t (df=3, heavy tails), or channel outliers: weight
    rows whose magnitudes spread over four decades (log-uniform 1e-3..10) and 4 activation channels 30x larger,
    as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "student_t":
        t = torch.distributions.StudentT(3.0)
        torch.manual_seed(seed)
        w, x = t.sample((out_features, in_features)) * 0.02, t.sample((tokens, in_features))
    else:
        w = torch.randn(out_features, in_features, generator=g) * 0.02
        x = torch.randn(tokens, in_features, generator=g)
        if kind == "channel_outliers":
            w *= torch.exp(torch.empty(out_features, 1).uniform_(-3, 1, generator=g) * 2.302585)
            x[:, torch.randperm(in_features, generator=g)[:4]] *= 30
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer, x


def quantize(layer: nn.Linear, x: torch.Tensor, method: ScaleMethod, **cfg) -> Fp8Linear:
    """The FP8 twin of `layer` with `method`, its record measured on `x` alone (per-tensor max-abs)."""
    record = {"input_amax": float(x.abs().max()), "weight_amax": float(layer.weight.detach().abs().max()),
              "in_features": x.shape[-1], "input_channel_amax": None}
    return Fp8Linear.from_original(layer, "layer", resolve(QuantConfig(scale_method=method, **cfg), "layer"), record)


def layer_sqnr(kind: str, method: ScaleMethod, **cfg) -> tuple[float, float]:
    """(output SQNR, worst output channel's SQNR) in dB."""
    layer, x = make_data(kind)
    ref = x.double() @ layer.weight.detach().double().t()
    with torch.no_grad():
        y = quantize(layer, x, method, **cfg)(x)
    return sqnr_db(ref, y), min(sqnr_db(ref[:, j], y[:, j]) for j in range(ref.shape[1]))


# -- measurement shards of a made-up model (bench/merge_bench.py, tests/files/test_measurements.py) ------------
def synthetic_shards(n_shards: int, n_layers: int, width: int = 1024) -> list[dict]:
    """Shards of a made-up model: `n_layers` linears of `width` inputs, 5 in 7 column-parallel (inputs
    replicated: every shard carries the full vector), the rest row-parallel (split unevenly when
    `width` does not divide). Deterministic."""
    rng = np.random.default_rng(0)
    base, extra = divmod(width, n_shards)
    sizes = [base + (r < extra) for r in range(n_shards)]
    shards = []
    for rank in range(n_shards):
        layers = {}
        for i in range(n_layers):
            kind = "row" if i % 7 in (3, 6) else "column"
            n = sizes[rank] if kind == "row" else width
            vec = rng.random(n, dtype=np.float32)  # as the observers give it
            layers[f"model.layers.{i // 7}.linear{i % 7}"] = {
                "kind": kind, "in_features": width, "out_features": width, "local_in_features": n,
                "partition_sizes": sizes, "input_amax": float(vec.max()) if n else 0.0, "input_channel_amax": vec,
                "output_amax": 1.0, "weight_amax": 0.5, "samples": 64}
        shards.append(make_shard(layers, rank, n_shards, "maxabs", "bfloat16"))
    return shards


def bench_merge(n_shards: int = 64, n_layers: int = 1000, width: int = 1024, folder: str | None = None) -> dict:
    """Seconds to merge `n_shards` synthetic shards of `n_layers` linears: in memory (what the online
    merge does after the gather) and offline from files (load every shard, merge, write). For
    `bench/run.py`'s `merge_seconds_64x1000`, read `["merge_seconds"]`."""
    shards = synthetic_shards(n_shards, n_layers, width)
    t0 = time.perf_counter()
    merge(shards)
    in_memory = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        prefix = os.path.join(tmp, "stats")
        for s in shards:
            atomic_write_json(shard_path(prefix, s["rank"], n_shards), s)
        shard_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        t0 = time.perf_counter()
        out = merge_files(prefix)
        offline = time.perf_counter() - t0
        merged_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir()) - shard_bytes
        del out
    return {"n_shards": n_shards, "n_layers": n_layers, "width": width, "merge_seconds": in_memory,
            "offline_merge_seconds": offline, "shard_bytes": shard_bytes, "merged_bytes": merged_bytes}
