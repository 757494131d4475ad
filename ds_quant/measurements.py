"""Measurement files: naming, atomic save/load, gather over the TP group, merge, validation.

A *shard* holds what one rank saw. The *merged* file holds statistics of the whole model, independent
of the TP size that produced them: per linear, the per-input-channel max-abs over the full
`in_features` (row-parallel / lm-head slices placed by DeepSpeed's partition sizes; column-parallel
inputs are replicated, so the max over ranks), and per-tensor input/output/weight max-abs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

FORMAT = "ds_quant.measurements"
VERSION = 1


class MeasurementError(ValueError):
    """A measurement file that is missing, malformed, or does not fit the model."""


# -- naming ------------------------------------------------------------------------------------------
def shard_path(prefix: str, rank: int, world_size: int) -> str:
    """HQT's naming: `{dump_stats_path}_{rank}_{world_size}.json`."""
    return f"{prefix}_{rank}_{world_size}.json"


def merged_path(prefix: str) -> str:
    return f"{prefix}.json"


# -- atomic I/O ----------------------------------------------------------------------------------------
def atomic_write_json(path: str | os.PathLike, doc: Mapping) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps(doc: Mapping) -> str:
    """Readable and diff-friendly: one header key per line, one layer per line."""
    if "layers" not in doc:
        return json.dumps(doc, indent=1) + "\n"
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "layers"]
    layers = [f"  {json.dumps(n)}: {json.dumps(r)}" for n, r in doc.get("layers", {}).items()]
    return "{\n" + ",\n".join(head + [' "layers": {\n' + ",\n".join(layers) + "\n }"]) + "\n}\n"


def load(path: str | os.PathLike) -> dict:
    """Read and validate a shard or merged file; errors name the file and what is wrong."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise MeasurementError(f"{path}: measurement file not found") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MeasurementError(f"{path}: not valid JSON (truncated or corrupt?) at line {e.lineno}: {e.msg}") from None
    _validate(doc, str(path))
    return doc


def _validate(doc, where: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MeasurementError(f"{where}: not a ds_quant measurement file (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise MeasurementError(f"{where}: format version {doc.get('version')!r}, this ds_quant reads {VERSION}")
    for key in ("kind", "observer", "world_size", "fingerprint", "layers"):
        if key not in doc:
            raise MeasurementError(f"{where}: header key '{key}' is missing")
    if not isinstance(doc["layers"], dict):
        raise MeasurementError(f"{where}: 'layers' must be an object of layer name -> statistics")
    for name, rec in doc["layers"].items():
        for key in ("kind", "in_features", "out_features", "input_amax", "samples"):
            if not isinstance(rec, dict) or key not in rec:
                raise MeasurementError(f"{where}: layer '{name}' has no '{key}'")
        vec = rec.get("input_channel_amax")
        expected = rec["in_features"] if doc["kind"] == "merged" else rec.get("local_in_features")
        if vec is not None and len(vec) != expected:
            raise MeasurementError(f"{where}: layer '{name}': input_channel_amax has {len(vec)} values, "
                                   f"expected {expected}")


# -- documents -----------------------------------------------------------------------------------------
def fingerprint(layers: Mapping[str, Mapping]) -> str:
    """Names and full shapes only: the same model gives the same fingerprint at every TP size."""
    rows = sorted(f"{n}:{r['out_features']}x{r['in_features']}" for n, r in layers.items())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _header(kind: str, observer: str, dtype: str, world_size: int, layers: Mapping) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": kind, "observer": observer, "dtype": dtype,
            "world_size": world_size, "fingerprint": fingerprint(layers),
            "created": {"host": socket.gethostname(), "python": platform.python_version(),
                        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}


def make_shard(layers: Mapping[str, dict], rank: int, world_size: int, observer: str, dtype: str) -> dict:
    return {**_header("shard", observer, dtype, world_size, layers), "rank": rank, "layers": dict(layers)}


def merge(shards: Iterable[Mapping], where: str = "shards") -> dict:
    """Model-level statistics from one shard per rank (any order). Deterministic: same input, same output."""
    shards = sorted(shards, key=lambda s: s["rank"])
    if not shards:
        raise MeasurementError(f"{where}: no shards to merge")
    world = shards[0]["world_size"]
    ranks = [s["rank"] for s in shards]
    if ranks != list(range(world)):
        raise MeasurementError(f"{where}: expected one shard per rank 0..{world - 1}, got ranks {ranks}")
    for s in shards:
        for key in ("world_size", "fingerprint", "observer"):
            if s[key] != shards[0][key]:
                raise MeasurementError(f"{where}: shard of rank {s['rank']} has {key}={s[key]!r}, "
                                       f"rank 0 has {shards[0][key]!r}; shards come from different runs")
    merged = {name: _merge_layer(name, [s["layers"][name] for s in shards]) for name in shards[0]["layers"]}
    head = _header("merged", shards[0]["observer"], shards[0]["dtype"], world, merged)
    head["created"] = shards[0]["created"]  # keep merges byte-identical for the same shards
    return {**head, "layers": merged}


def _max_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else max(values)


def _merge_layer(name: str, recs: list[dict]) -> dict:
    first = recs[0]
    kind = first["kind"]
    vectors = [r.get("input_channel_amax") for r in recs]
    if any(v is None for v in vectors):
        channels = None
    elif kind in ("row", "lm-head"):
        # Each rank saw its own slice of the input; place the slices by DeepSpeed's partition sizes.
        sizes = first["partition_sizes"]
        if [len(v) for v in vectors] != list(sizes):
            raise MeasurementError(f"layer '{name}': slice lengths {[len(v) for v in vectors]} do not match "
                                   f"partition sizes {sizes}")
        channels = [x for v in vectors for x in v]
    else:
        # Replicated input: every rank saw the same channels.
        channels = [max(xs) for xs in zip(*vectors, strict=True)]
    return {"kind": kind, "in_features": first["in_features"], "out_features": first["out_features"],
            "input_amax": _max_or_none([r["input_amax"] for r in recs]),
            "input_channel_amax": channels,
            "output_amax": _max_or_none([r.get("output_amax") for r in recs]),
            "weight_amax": _max_or_none([r.get("weight_amax") for r in recs]),
            "samples": max(r["samples"] for r in recs)}


# -- gather + write (MEASURE) -------------------------------------------------------------------------------
def save(layers: Mapping[str, dict], prefix: str, rank: int, world_size: int, group, observer: str,
         dtype: str) -> str | None:
    """Write this rank's shard, gather all shards over `group` (no shared filesystem needed), and on
    rank 0 write the merged file. Returns the merged path on rank 0, else None."""
    shard = make_shard(layers, rank, world_size, observer, dtype)
    atomic_write_json(shard_path(prefix, rank, world_size), shard)
    if world_size == 1:
        shards = [shard]
    else:
        import torch.distributed as dist

        shards = [None] * world_size
        dist.all_gather_object(shards, shard, group=group)
    if rank != 0:
        return None
    out = merged_path(prefix)
    atomic_write_json(out, merge(shards, where=f"shards of {prefix}"))
    return out


# -- load (QUANTIZE) ---------------------------------------------------------------------------------------
def load_for_quantize(prefix: str, rank: int, world_size: int) -> tuple[dict, str]:
    """The merged file, else this rank's shard of a run at the same world size."""
    merged, shard = merged_path(prefix), shard_path(prefix, rank, world_size)
    if Path(merged).exists():
        return load(merged), merged
    if Path(shard).exists():
        return load(shard), shard
    raise MeasurementError(
        f"no measurements at {merged} (nor this rank's shard {shard}): run MEASURE first with the same "
        f"dump_stats_path, e.g. a config with \"mode\": \"MEASURE\", \"dump_stats_path\": \"{prefix}\"")


def check_layers(doc: dict, where: str, wanted: Mapping[str, tuple[int, int]]) -> None:
    """Every layer about to be quantized has statistics, with the same full (out, in) shape."""
    missing = [n for n in wanted if n not in doc["layers"]]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MeasurementError(f"{where}: no measurements for layers {missing[:5]}{more}; the file is from another "
                               "model or a narrower allowlist: run MEASURE again with this model and config")
    wrong = [f"{n}: measured {doc['layers'][n]['out_features']}x{doc['layers'][n]['in_features']}, model {o}x{i}"
             for n, (o, i) in wanted.items()
             if (doc["layers"][n]["out_features"], doc["layers"][n]["in_features"]) != (o, i)]
    if wrong:
        raise MeasurementError(f"{where}: shapes differ from the model: {'; '.join(wrong[:3])}; measure this model")
    no_input = [n for n in wanted if doc["layers"][n]["input_amax"] is None]
    if no_input:
        raise MeasurementError(f"{where}: layers {no_input[:5]} have no input statistics "
                               "(measured with measure_exclude INPUT/ALL); measure with OUTPUT or NONE")
