"""Measurement files: naming, atomic save/load, gather over the TP group, merge, validation.

A *shard* holds what one rank saw. The *merged* file holds statistics of the whole model, independent
of the TP size that produced them: per linear, the per-input-channel max-abs over the full
`in_features` (row-parallel / lm-head slices placed by DeepSpeed's partition sizes; column-parallel
inputs are replicated, so the max over ranks), and per-tensor input/output/weight max-abs.

Files are JSON (header + one line per layer). When a file would hold more than `INLINE_MAX_VALUES`
channel values, the vectors go to a companion binary `{stem}.{digest}.f32` (little-endian float32,
named by its content) and the JSON points at it; see docs/measurements.md for the format and sizes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import MeasurementError
from ..parallel.tp import SPLIT_INPUT_KINDS
from .atomic import atomic_write_bytes, gc_paused, glob_escape

try:  # 3x faster than json on the shards' layer lines (bench/merge_bench.py); json is the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _fast_loads = json.loads

FORMAT = "ds_quant.measurements"
VERSION = 1
KINDS = ("column", "row", "lm-head", "plain")  # = tp.Kind's values (tests/layers/test_linear.py checks)
# Above this many channel values in one file, vectors go to the companion binary: a 70B-like merged file
# is 124 MB as JSON and 25 MB as float32 (bench/merge_bench.py), and loads in ~2.1 s vs ~0.23 s.
INLINE_MAX_VALUES = 1 << 16
_COMPANION_DTYPE = "<f4"


# -- atomic I/O ----------------------------------------------------------------------------------------
def atomic_write_json(path: str | os.PathLike, doc: Mapping) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file.

    A large document's vectors are written first to their companion binary (named by content, also
    temp + rename); the JSON, renamed last, is the commit point, so a reader sees either the old pair
    or the new pair. Companions no longer referenced are removed afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc, blob = _split_vectors(doc, path)
    if blob is not None:
        atomic_write_bytes(path.parent / doc["vectors"]["file"], blob)
    atomic_write_bytes(path, dumps(doc).encode())
    remove_stale_companions(path, doc.get("vectors", {}).get("file"))


def _companions(path: Path) -> list[Path]:
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return [p for p in path.parent.glob(f"{glob_escape(stem)}.*.f32")
            if re.fullmatch(re.escape(stem) + r"\.[0-9a-f]{16}\.f32", p.name)]


def remove_stale_companions(path: Path, keep: str | None) -> None:
    for p in _companions(path):
        if p.name != keep:
            p.unlink(missing_ok=True)


def _split_vectors(doc: Mapping, path: Path) -> tuple[dict, bytes | None]:
    """Small documents stay as they are; large ones get `{"offset", "count"}` in place of each vector."""
    layers = doc.get("layers")
    if not isinstance(layers, Mapping):
        return dict(doc), None
    vecs = [r.get("input_channel_amax") for r in layers.values()]
    if sum(len(v) for v in vecs if v is not None) <= INLINE_MAX_VALUES:
        return {**doc, "layers": {n: _plain(r) for n, r in layers.items()}}, None
    parts, offset, out = [], 0, {}
    for name, rec in layers.items():
        vec = rec.get("input_channel_amax")
        if vec is None:
            out[name] = dict(rec)
            continue
        arr = np.asarray(vec, dtype=_COMPANION_DTYPE)
        parts.append(arr)
        out[name] = {**rec, "input_channel_amax": {"offset": offset, "count": int(arr.size)}}
        offset += arr.size
    blob = np.concatenate(parts).tobytes() if parts else b""
    digest = hashlib.sha256(blob).hexdigest()
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    head = {k: v for k, v in doc.items() if k != "layers"}
    head["vectors"] = {"file": f"{stem}.{digest[:16]}.f32", "dtype": "float32-le", "count": int(offset),
                       "sha256": digest}
    return {**head, "layers": out}, blob


def _plain(rec: Mapping) -> dict:
    vec = rec.get("input_channel_amax")
    return {**rec, "input_channel_amax": vec.tolist()} if isinstance(vec, np.ndarray) else dict(rec)


def dumps(doc: Mapping) -> str:
    """Readable and diff-friendly: one header key per line, one layer per line."""
    if "layers" not in doc:
        return json.dumps(doc, indent=1) + "\n"
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k not in ("layers", "kv")]
    sections = [f' {json.dumps(key)}: {{\n' + ",\n".join(f"  {json.dumps(n)}: {json.dumps(r)}" for n, r in
                                                        doc[key].items()) + "\n }" for key in ("kv", "layers")
                if key in doc]
    return "{\n" + ",\n".join(head + sections) + "\n}\n"


def load(path: str | os.PathLike) -> dict:
    """Read and validate a shard or merged file; errors name the file and what is wrong.

    Vectors come back as lists of floats (inline) or float32 numpy arrays (from the companion binary)."""
    with gc_paused():
        return _load(path)


def _load(path: str | os.PathLike) -> dict:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MeasurementError(f"{path}: measurement file not found") from None
    except OSError as e:
        raise MeasurementError(f"{path}: cannot read measurement file: {e}") from None
    try:
        doc = _fast_loads(data)
    except ValueError:  # orjson is strict JSON; Python's json also reads NaN/Infinity, which validation then names
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"at line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise MeasurementError(f"{path}: not valid JSON (truncated or corrupt?) {where}") from None
    if isinstance(doc, dict) and "vectors" in doc:
        _attach_vectors(doc, Path(path))
    _validate(doc, str(path))
    return doc


def _attach_vectors(doc: dict, path: Path) -> None:
    meta = doc["vectors"]
    if not isinstance(meta, dict) or not all(k in meta for k in ("file", "count", "sha256")):
        raise MeasurementError(f"{path}: header 'vectors' must hold file, count and sha256")
    companion = path.parent / os.path.basename(str(meta["file"]))
    try:
        blob = companion.read_bytes()
    except FileNotFoundError:
        raise MeasurementError(f"{path}: its vector file {companion} is missing; copy it along with the JSON") from None
    if len(blob) != 4 * meta["count"]:
        raise MeasurementError(f"{path}: vector file {companion} has {len(blob)} bytes, expected "
                               f"{4 * meta['count']} (truncated?)")
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise MeasurementError(f"{path}: vector file {companion} does not match its sha256 (corrupt or replaced)")
    flat = np.frombuffer(blob, dtype=_COMPANION_DTYPE).astype(np.float32, copy=False)  # no copy on little-endian
    if not (np.isfinite(flat).all() and (flat >= 0).all()):
        raise MeasurementError(f"{path}: vector file {companion} holds a negative or non-finite value")
    for name, rec in doc.get("layers", {}).items():
        ref = rec.get("input_channel_amax") if isinstance(rec, dict) else None
        if isinstance(ref, dict):
            o, n = ref.get("offset"), ref.get("count")
            if not (isinstance(o, int) and isinstance(n, int) and 0 <= o and o + n <= flat.size):
                raise MeasurementError(f"{path}: layer '{name}': vector reference {ref} is outside {companion}")
            rec["input_channel_amax"] = flat[o:o + n]
    del doc["vectors"]


def _validate(doc, where: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MeasurementError(f"{where}: not a ds_quant measurement file (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise MeasurementError(f"{where}: format version {doc.get('version')!r}, this ds_quant reads {VERSION}")
    for key in ("kind", "observer", "world_size", "fingerprint", "layers"):
        if key not in doc:
            raise MeasurementError(f"{where}: header key '{key}' is missing")
    if doc["kind"] not in ("shard", "merged"):
        raise MeasurementError(f"{where}: header 'kind' is {doc['kind']!r}, expected 'shard' or 'merged'")
    if not isinstance(doc["world_size"], int) or doc["world_size"] < 1:
        raise MeasurementError(f"{where}: header 'world_size' is {doc['world_size']!r}, expected an integer >= 1")
    if doc["kind"] == "shard" and not (isinstance(doc.get("rank"), int) and 0 <= doc["rank"] < doc["world_size"]):
        raise MeasurementError(f"{where}: shard 'rank' is {doc.get('rank')!r}, expected 0..{doc['world_size'] - 1}")
    for section in SECTIONS.values():
        section.validate(doc.get(section.key, {}), doc["kind"], where)


# -- record kinds ----------------------------------------------------------------------------------------------
# The file schema, defined once. A file holds one section per record kind: "layers" (linears and expert
# projections: the hot path, 64,000 records for 64 ranks x 1,000 layers), "kv" (the KV cache) and "attention" (q.kT,
# p.v, softmax). Each is a `Section` (SECTIONS): its records' kinds, required and optional keys, the check of one
# record and the merge rule of one layer's records over the ranks. Producers build records with the constructors
# below (`linear_record`, `kv_record`, `attention_record`), never with key lists of their own; readers validate with
# the same table. Files written before a section existed have none, and load as before.
class Section(NamedTuple):
    key: str  # the file's section name
    kinds: tuple[str, ...]  # every record's "kind" is one of these
    what: str  # for messages: "layer", "KV cache", "attention"
    keys: tuple[str, ...]  # required in every record
    optional: tuple[str, ...]  # may be present (absent in older files)
    check: Callable[[str, dict, str, str], None]  # (name, record, file kind, where): raise MeasurementError
    merge: Callable[[str, list[dict], bool], dict]  # (name, one record per rank in rank order, lists) -> the model's
    required: bool = False  # every file has this section (possibly empty)

    def validate(self, records, file_kind: str, where: str) -> None:
        if not isinstance(records, dict):
            raise MeasurementError(f"{where}: '{self.key}' must be an object of {self.what} name -> statistics")
        keys, kinds, check = frozenset(self.keys), self.kinds, self.check
        for name, rec in records.items():
            # Runs once per record per shard: the cheap checks first, messages only on failure.
            if type(rec) is not dict or not rec.keys() >= keys:
                missing = next(k for k in self.keys if not isinstance(rec, dict) or k not in rec)
                raise MeasurementError(f"{where}: {self.what} '{name}' has no '{missing}'")
            if rec["kind"] not in kinds:
                expected = kinds[0] if len(kinds) == 1 else f"one of {', '.join(kinds)}"
                raise MeasurementError(f"{where}: {self.what} '{name}': kind {rec['kind']!r} is not {expected}")
            check(name, rec, file_kind, where)

    def merge_shards(self, shards: list[Mapping], where: str, lists: bool = True) -> dict | None:
        names = [s.get(self.key, {}).keys() for s in shards]
        for s, n in zip(shards[1:], names[1:], strict=True):
            if n != names[0]:
                diff = sorted(set(n) ^ set(names[0]))
                raise MeasurementError(f"{where}: shard of rank {s['rank']} has other {self.what} records than rank "
                                       f"0: {diff[:5]}")
        if not names[0] and not self.required:
            return None
        return {n: self.merge(n, [s[self.key][n] for s in shards], lists) for n in shards[0].get(self.key, {})}


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


# Linear records, section "layers": per linear (and per expert projection), its full shape, the max-abs of its
# input (per tensor and per input channel), output and weight. A shard holds what this rank saw: its input slice
# (`local_in_features` channels of a split input, by DeepSpeed's `partition_sizes`); the merged file the model's.
LINEAR_KEYS = ("kind", "in_features", "out_features", "input_amax", "samples")
# What an observer measures (observers.MaxAbsObserver.stats): None where `measure_exclude` left it out.
LINEAR_STATS = ("input_amax", "input_channel_amax", "output_amax", "weight_amax", "samples", "nonfinite_inputs")
LINEAR_OPTIONAL = ("input_channel_amax", "output_amax", "weight_amax", "nonfinite_inputs", "local_in_features",
                   "partition_sizes")
_AMAX_KEYS = ("input_amax", "output_amax", "weight_amax")
_NUMBER = (int, float)  # a bool is not a number here


def linear_record(kind: str, in_features: int | None, out_features: int | None, stats: Mapping, *,
                  local_in_features: int | None = None, partition_sizes=None) -> dict:
    """A linear's record. `stats`: the observer's keys (LINEAR_STATS; `nonfinite_inputs` may be absent, as in
    files imported from HQT). `local_in_features` / `partition_sizes`: a shard's input slice (omitted in a merged
    record, and for records made from another tool's model-level statistics)."""
    if kind not in KINDS:
        raise MeasurementError(f"linear record kind {kind!r} is not one of {', '.join(KINDS)}")
    unknown = set(stats) - set(LINEAR_STATS)
    if unknown or "input_amax" not in stats or "samples" not in stats:
        raise MeasurementError(f"linear record statistics have keys {sorted(stats)}, expected {list(LINEAR_STATS)}")
    rec = {"kind": kind, "in_features": in_features, "out_features": out_features}
    if local_in_features is not None:
        rec["local_in_features"] = local_in_features
        rec["partition_sizes"] = list(partition_sizes or [])
    rec.update({k: stats[k] for k in LINEAR_STATS if k in stats})
    return rec


def _check_linear(name: str, rec: dict, file_kind: str, where: str) -> None:
    for key in _AMAX_KEYS:
        v = rec.get(key)
        if v is None or (type(v) in _NUMBER and 0 <= v < math.inf):  # NaN fails 0 <= v
            continue
        if not (isinstance(v, _NUMBER) and type(v) is not bool and 0 <= v < math.inf):  # e.g. a numpy float
            raise MeasurementError(f"{where}: layer '{name}': {key} is {v!r}, expected a finite number >= 0 "
                                   "(or null when not measured)")
    vec = rec.get("input_channel_amax")
    expected = rec["in_features"] if file_kind == "merged" else rec.get("local_in_features")
    if vec is None:
        return
    if not isinstance(vec, (list, np.ndarray)):
        raise MeasurementError(f"{where}: layer '{name}': input_channel_amax must be a list of numbers")
    if expected is not None and len(vec) != expected:
        raise MeasurementError(f"{where}: layer '{name}': input_channel_amax has {len(vec)} values, "
                               f"expected {expected}")
    if isinstance(vec, np.ndarray):
        return  # from the companion binary: checked as a whole in _attach_vectors
    try:
        arr = np.asarray(vec, dtype=np.float64)
    except (TypeError, ValueError):
        raise MeasurementError(f"{where}: layer '{name}': input_channel_amax holds a value that is not a number") \
            from None
    if arr.size and not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise MeasurementError(f"{where}: layer '{name}': input_channel_amax holds a negative or non-finite value")


def _max_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else max(values)


def _split_input_kinds() -> frozenset[str]:
    # Which kinds saw only a slice of the input comes from tp.py's table. Imported here, not at the top, so this
    # file loads on its own (no torch, no package), as the kill-mid-write test loads it.

    return SPLIT_INPUT_KINDS


def merge_linear(name: str, recs: list[dict], lists: bool = True) -> dict:
    """One linear's records of ranks 0..N-1 -> the model's. lists=False: the channel vector stays a float32
    array, for a merge that goes straight to a file."""
    first = recs[0]
    kind = first["kind"]
    vectors = [r.get("input_channel_amax") for r in recs]
    if any(v is None for v in vectors):
        channels = None
    elif kind in _split_input_kinds():
        # Each rank saw its own slice of the input; place the slices by DeepSpeed's partition sizes.
        sizes = first["partition_sizes"]
        if [len(v) for v in vectors] != list(sizes):
            raise MeasurementError(f"layer '{name}': slice lengths {[len(v) for v in vectors]} do not match "
                                   f"partition sizes {sizes}")
        channels = np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
    else:
        # Replicated input: every rank saw the same channels.
        if len({len(v) for v in vectors}) != 1:
            raise MeasurementError(f"layer '{name}': {kind} input is replicated, but ranks saw "
                                   f"{[len(v) for v in vectors]} channels")
        channels = np.asarray(vectors, dtype=np.float32).max(axis=0)
    return {"kind": kind, "in_features": first["in_features"], "out_features": first["out_features"],
            "input_amax": _max_or_none([r["input_amax"] for r in recs]),
            "input_channel_amax": channels.tolist() if lists and channels is not None else channels,
            "output_amax": _max_or_none([r.get("output_amax") for r in recs]),
            "weight_amax": _max_or_none([r.get("weight_amax") for r in recs]),
            "samples": max(r["samples"] for r in recs),
            **_merged_nonfinite(kind, recs)}


def _merged_nonfinite(kind: str, recs: list[dict]) -> dict:
    """NaN/Inf input values the layer saw: summed over the slices of a split input, the max over ranks of a
    replicated one (every rank saw the same values). Absent in files written before the count existed."""
    counts = [r.get("nonfinite_inputs") for r in recs]
    if any(c is None for c in counts):
        return {}
    return {"nonfinite_inputs": sum(counts) if kind in _split_input_kinds() else max(counts)}


# KV-cache records (ds_quant/layers/kv_cache.py), section "kv": per layer, the per-head max-abs of keys and values; a shard
# holds this rank's heads, the merged file all of the model's.
KV_KEYS = ("kind", "layer_idx", "model_heads", "heads", "key_head_amax", "value_head_amax", "samples")


def kv_record(layer_idx: int, model_heads: int, key_head_amax: list[float], value_head_amax: list[float],
              samples: int) -> dict:
    """One layer's KV-cache record: the per-head max-abs of the keys and values this rank's heads stored."""
    if len(key_head_amax) != len(value_head_amax):
        raise MeasurementError(f"kv record of layer {layer_idx}: {len(key_head_amax)} key heads, "
                               f"{len(value_head_amax)} value heads")
    return {"kind": "kv", "layer_idx": int(layer_idx), "model_heads": int(model_heads), "heads": len(key_head_amax),
            "key_head_amax": [float(x) for x in key_head_amax], "value_head_amax": [float(x) for x in value_head_amax],
            "samples": int(samples)}


def _check_kv(name: str, rec: dict, file_kind: str, where: str) -> None:
    for key in ("key_head_amax", "value_head_amax"):
        v = rec[key]
        if not (isinstance(v, list) and len(v) == rec["heads"] and all(_finite_number(x) for x in v)):
            raise MeasurementError(f"{where}: KV cache '{name}': {key} must be {rec['heads']} finite numbers >= 0")
    if file_kind == "merged" and rec["heads"] != rec["model_heads"]:
        raise MeasurementError(f"{where}: KV cache '{name}': {rec['heads']} heads in a merged file, the model has "
                               f"{rec['model_heads']}")


def merge_kv(name: str, recs: list[dict], lists: bool = True) -> dict:
    """One layer's KV records of ranks 0..N-1 -> the model's: AutoTP gives each rank a contiguous run of the KV
    heads, in rank order, so the per-head vectors concatenate; heads replicated on every rank (fewer KV heads than
    ranks) take the max."""
    first, heads = recs[0], [r["heads"] for r in recs]
    if sum(heads) == first["model_heads"]:
        join = lambda key: [x for r in recs for x in r[key]]  # noqa: E731
    elif all(h == first["model_heads"] for h in heads):
        join = lambda key: np.max([r[key] for r in recs], axis=0).tolist()  # noqa: E731
    else:
        raise MeasurementError(f"KV cache '{name}': ranks hold {heads} heads, the model {first['model_heads']}: "
                               "neither a split nor a replication of the heads")
    return kv_record(first["layer_idx"], first["model_heads"], join("key_head_amax"), join("value_head_amax"),
                     max(r["samples"] for r in recs))


# Attention records (ds_quant/layers/attention.py), section "attention": per attention module, the max-abs of the query,
# key, value and softmax output over this rank's heads; the model's is the max over ranks (per-tensor scales, the
# same at every TP size).
ATTENTION_OPERANDS = ("q", "k", "v", "p")
ATTENTION_KEYS = ("kind", *(f"{op}_amax" for op in ATTENTION_OPERANDS), "samples")


def attention_record(amax: Mapping[str, float], samples: int) -> dict:
    """One attention module's record: `amax` per operand (q, k, v, p)."""
    if set(amax) != set(ATTENTION_OPERANDS):
        raise MeasurementError(f"attention record operands {sorted(amax)}, expected {list(ATTENTION_OPERANDS)}")
    return {"kind": "attention", **{f"{op}_amax": float(amax[op]) for op in ATTENTION_OPERANDS},
            "samples": int(samples)}


def _check_attention(name: str, rec: dict, file_kind: str, where: str) -> None:
    for key in ATTENTION_KEYS[1:-1]:
        if not _finite_number(rec[key]):
            raise MeasurementError(f"{where}: attention '{name}': {key} is {rec[key]!r}, expected a finite number >= 0")


def merge_attention(name: str, recs: list[dict], lists: bool = True) -> dict:
    return attention_record({op: max(r[f"{op}_amax"] for r in recs) for op in ATTENTION_OPERANDS},
                            max(r["samples"] for r in recs))


LINEAR = Section("layers", KINDS, "layer", LINEAR_KEYS, LINEAR_OPTIONAL, _check_linear, merge_linear, required=True)
SECTIONS = {s.key: s for s in (
    LINEAR,
    Section("kv", ("kv",), "KV cache", KV_KEYS, (), _check_kv, merge_kv),
    Section("attention", ("attention",), "attention", ATTENTION_KEYS, (), _check_attention, merge_attention),
)}


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


def make_shard(layers: Mapping[str, dict], rank: int, world_size: int, observer: str, dtype: str,
               kv: Mapping[str, dict] | None = None, *, run: str | None = None,
               attention: Mapping[str, dict] | None = None) -> dict:
    """`run`: an id every shard of one MEASURE run shares, so shards of two runs are never merged together.
    `kv`, `attention`: this rank's records of those sections (see SECTIONS)."""
    head = _header("shard", observer, dtype, world_size, layers)
    if run is not None:
        head["run"] = run
    sections = {k: dict(v) for k, v in (("kv", kv), ("attention", attention)) if v}
    return {**head, "rank": rank, **sections, "layers": dict(layers)}


def merge(shards: Iterable[Mapping], where: str = "shards") -> dict:
    """Model-level statistics from one shard per rank (any order). Deterministic: same input, same output.
    Channel vectors come back as lists of floats."""
    with gc_paused():
        return merge_lists(shards, where, lists=True)


def merge_lists(shards: Iterable[Mapping], where: str, lists: bool) -> dict:
    # lists=False: vectors stay float32 arrays, for a merge that goes straight to a file.
    shards = sorted(shards, key=lambda s: s["rank"])
    if not shards:
        raise MeasurementError(f"{where}: no shards to merge")
    world = shards[0]["world_size"]
    ranks = [s["rank"] for s in shards]
    if ranks != list(range(world)):
        raise MeasurementError(f"{where}: expected one shard per rank 0..{world - 1}, got ranks {ranks}")
    for s in shards:
        for key in ("world_size", "fingerprint", "observer", "run"):
            if s.get(key) != shards[0].get(key):
                raise MeasurementError(f"{where}: shard of rank {s['rank']} has {key}={s.get(key)!r}, "
                                       f"rank 0 has {shards[0].get(key)!r}; shards come from different runs")
    merged = {key: recs for key, section in SECTIONS.items()
              if (recs := section.merge_shards(shards, where, lists)) is not None}
    head = _header("merged", shards[0]["observer"], shards[0]["dtype"], world, merged["layers"])
    head["created"] = shards[0]["created"]  # keep merges byte-identical for the same shards
    if shards[0].get("run") is not None:
        head["run"] = shards[0]["run"]
    layers = merged.pop("layers")
    return {**head, **merged, "layers": layers}


def check_layers(doc: dict, where: str, wanted: Mapping[str, tuple[int, int]]) -> None:
    """Every layer about to be quantized has statistics, with the same full (out, in) shape (files imported
    from HQT without a model may leave shapes null: those are not compared)."""
    missing = [n for n in wanted if n not in doc["layers"]]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MeasurementError(f"{where}: no measurements for layers {missing[:5]}{more}; the file is from another "
                               "model or a narrower allowlist: run MEASURE again with this model and config")
    wrong = [f"{n}: measured {doc['layers'][n]['out_features']}x{doc['layers'][n]['in_features']}, model {o}x{i}"
             for n, (o, i) in wanted.items()
             if not _shape_fits((doc["layers"][n]["out_features"], doc["layers"][n]["in_features"]), (o, i))]
    if wrong:
        raise MeasurementError(f"{where}: shapes differ from the model: {'; '.join(wrong[:3])}; measure this model")
    no_input = [n for n in wanted if doc["layers"][n]["input_amax"] is None]
    if no_input:
        raise MeasurementError(f"{where}: layers {no_input[:5]} have no input statistics "
                               "(measured with measure_exclude INPUT/ALL); measure with OUTPUT or NONE")


def _shape_fits(measured: tuple, model: tuple) -> bool:
    return all(m is None or m == x for m, x in zip(measured, model, strict=True))


