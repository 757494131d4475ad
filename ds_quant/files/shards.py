"""Measurement shard files: naming, writing, finding, reading plans and merging on disk."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import MeasurementError
from .atomic import gc_paused, glob_escape
from .measurements import atomic_write_json, load, make_shard, merge, merge_lists, remove_stale_companions

try:  # 3x faster than json on the shards' layer lines (bench/merge_bench.py); json is the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _fast_loads = json.loads


# -- naming ------------------------------------------------------------------------------------------
def shard_path(prefix: str, rank: int, world_size: int) -> str:
    """HQT's naming: `{dump_stats_path}_{rank}_{world_size}.json`."""
    return f"{prefix}_{rank}_{world_size}.json"


def merged_path(prefix: str) -> str:
    return f"{prefix}.json"


def find_shards(prefix: str) -> dict[tuple[int, int], str]:
    """{(rank, world_size): path} of the shard files `shard_path(prefix, *, *)` on disk."""
    folder, stem = os.path.split(prefix)
    pattern = re.compile(re.escape(stem) + r"_(\d+)_(\d+)\.json$")
    found = {}
    for p in sorted(Path(folder or ".").glob(f"{glob_escape(stem)}_*_*.json")):
        m = pattern.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = os.path.join(folder, p.name) if folder else p.name
    return found


# -- offline merge (`ds-quant merge PREFIX`) -----------------------------------------------------------------
def merge_files(prefix: str, world_size: int | None = None, out: str | None = None) -> str:
    """Merge the shard files of `prefix` into `merged_path(prefix)` (or `out`); returns the path written.

    Finds missing, duplicate and foreign shards (another world size, model fingerprint or observer) and
    names them; nothing is written unless every shard is present and consistent."""
    found = find_shards(prefix)
    if not found:
        raise MeasurementError(f"no shard files {shard_path(prefix, 'RANK', 'WORLD')} found; MEASURE writes them")
    worlds = sorted({w for _, w in found})
    if world_size is None and len(worlds) > 1:
        listing = "; ".join(f"world size {w}: " + ", ".join(p for (_, ww), p in sorted(found.items()) if ww == w)
                            for w in worlds)
        raise MeasurementError(f"shards of {prefix} come from several runs ({listing}); pass --world-size N "
                               "or remove the stale ones")
    world = world_size or worlds[0]
    paths = {r: p for (r, w), p in found.items() if w == world}
    missing = [shard_path(prefix, r, world) for r in range(world) if r not in paths]
    if missing:
        raise MeasurementError(f"shards of {prefix} at world size {world}: missing {', '.join(missing)}")
    with gc_paused():
        shards = {r: load(p) for r, p in sorted(paths.items())}
    for r, s in shards.items():
        if s["kind"] != "shard":
            raise MeasurementError(f"{paths[r]}: is a {s['kind']} file, not a shard")
        if (s["rank"], s["world_size"]) != (r, world):
            holder = [paths[q] for q, t in shards.items() if q != r and t["rank"] == s["rank"]]
            dup = f"; duplicate of {', '.join(holder)}" if holder else ""
            raise MeasurementError(f"{paths[r]}: holds rank {s['rank']} of world size {s['world_size']}, but its name "
                                   f"says rank {r} of {world}{dup}")
    for key in ("fingerprint", "observer", "run"):
        values = {}
        for r, s in shards.items():
            values.setdefault(s.get(key), []).append(paths[r])
        if len(values) > 1:
            groups = sorted(values.items(), key=lambda kv: -len(kv[1]))
            odd = "; ".join(f"{key}={v!r}: {', '.join(ps)}" for v, ps in groups[1:])
            raise MeasurementError(f"foreign shards of {prefix}: {odd} (the other {len(groups[0][1])} have "
                                   f"{key}={groups[0][0]!r}); they come from another model or run")
    target = out or merged_path(prefix)
    with gc_paused():
        merged = merge_lists(shards.values(), where=f"shards of {prefix}", lists=False)
    atomic_write_json(target, merged)
    return target


# -- write (MEASURE) ------------------------------------------------------------------------------------------
def check_writable(prefix: str, needed_bytes: int = 0) -> None:
    """Fail before calibration, not after it: the folder of `prefix` can be created and written, and has room for
    `needed_bytes` (plus a margin)."""
    import shutil

    folder = Path(os.path.dirname(prefix) or ".")
    fix = "; choose a writable dump_stats_path with free space"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ds_quant-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MeasurementError(f"dump_stats_path {prefix!r}: cannot write in {folder}: {e.strerror or e}{fix}") \
            from None
    free = shutil.disk_usage(folder).free
    if free < 2 * needed_bytes + (1 << 20):
        raise MeasurementError(f"dump_stats_path {prefix!r}: {free / 2**20:.1f} MiB free in {folder}, the "
                               f"measurements need about {needed_bytes / 2**20:.1f} MiB{fix}")


def estimated_bytes(in_features: Iterable[int]) -> int:
    """A generous size of one shard plus the merged file (float32 vectors, ~400 bytes of JSON per layer)."""
    widths = list(in_features)
    return 2 * (4 * sum(widths) + 400 * len(widths))


def remove_previous(prefix: str, rank: int) -> list[str]:
    """Before a MEASURE run writes: rank 0 removes the old merged file and every old shard it can see, other ranks
    their own old shards (of any world size; other nodes do not share rank 0's disk), so a run that dies leaves
    no file of an earlier run that QUANTIZE or `ds-quant merge` could mistake for its own. Returns what was
    removed."""
    gone = [p for (r, _), p in find_shards(prefix).items() if rank == 0 or r == rank]
    if rank == 0 and Path(merged_path(prefix)).exists():
        gone.append(merged_path(prefix))
    for p in gone:
        Path(p).unlink(missing_ok=True)
        remove_stale_companions(Path(p), None)
    return gone


def write_shard(layers: Mapping[str, dict], prefix: str, rank: int, world_size: int, observer: str, dtype: str,
                run: str | None = None, kv: Mapping[str, dict] | None = None,
                attention: Mapping[str, dict] | None = None) -> dict:
    """Write this rank's shard (atomically) and return it, for the gather."""
    shard = make_shard(layers, rank, world_size, observer, dtype, kv, run=run, attention=attention)
    atomic_write_json(shard_path(prefix, rank, world_size), shard)
    return shard


def write_merged(shards: Iterable[Mapping], prefix: str) -> str:
    out = merged_path(prefix)
    with gc_paused():
        merged = merge_lists(shards, where=f"shards of {prefix}", lists=False)
    atomic_write_json(out, merged)
    return out


# -- read (QUANTIZE) ----------------------------------------------------------------------------------------
def local_sources(prefix: str) -> dict:
    """What one rank can read of `prefix` on its own filesystem: {"merged": bool, "shards": {(rank, world): path}}."""
    return {"merged": Path(merged_path(prefix)).exists(), "shards": find_shards(prefix)}


def read_plan(prefix: str, seen: list[Mapping], world_size: int) -> tuple[str, dict[int, list[str]], str]:
    """Who reads what, from every rank's `local_sources` (in rank order). Pure: every rank computes the same.

    The merged file, read by the first rank that has it; else one shard per measured rank, each read by the first
    rank that has it (at the current world size if such shards exist, else at the one world size found). Returns
    (what: "merged" | "shards", {reader rank: [paths]}, a description for messages)."""
    holders = [r for r, s in enumerate(seen) if s["merged"]]
    if holders:
        return "merged", {holders[0]: [merged_path(prefix)]}, merged_path(prefix)
    found: dict[tuple[int, int], int] = {}
    for r, s in enumerate(seen):
        for key in s["shards"]:
            found.setdefault(tuple(key), r)
    if not found:
        raise MeasurementError(
            f"no measurements at {merged_path(prefix)} (nor shards {shard_path(prefix, 'RANK', 'WORLD')}) on any "
            f"rank: run MEASURE first with the same dump_stats_path, e.g. a config with \"mode\": \"MEASURE\", "
            f"\"dump_stats_path\": \"{prefix}\"")
    worlds = sorted({w for _, w in found})
    if world_size in worlds:
        world = world_size
    elif len(worlds) == 1:
        world = worlds[0]
    else:
        raise MeasurementError(f"no merged file {merged_path(prefix)}, and its shards come from several runs (world "
                               f"sizes {', '.join(map(str, worlds))}, none is this run's {world_size}): merge the "
                               f"right ones with `ds-quant merge {prefix} --world-size N`")
    missing = [k for k in range(world) if (k, world) not in found]
    if missing:
        names = ", ".join(f"shard {k} of {world} ({shard_path(prefix, k, world)})" for k in missing)
        raise MeasurementError(f"no merged file {merged_path(prefix)}, and no rank has {names}: copy it from the "
                               "node that measured it, or run MEASURE again")
    plan: dict[int, list[str]] = {}
    for k in range(world):
        plan.setdefault(found[(k, world)], []).append(shard_path(prefix, k, world))
    return "shards", plan, f"the {world} shards of {prefix} (no merged file)"


def read_local(prefix: str) -> tuple[dict, str]:
    """One process, no process group (`ds-quant convert`): the merged file, else the merge of the shards on disk."""
    what, plan, where = read_plan(prefix, [local_sources(prefix)], 1)
    docs = [load(p) for p in plan[0]]
    return (docs[0] if what == "merged" else merge(docs, where=where)), where

