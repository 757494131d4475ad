"""Reading measurements at TP=2 when files are bad, or on one node only: run by tests/test_faults.py.

    deepspeed --num_gpus 2 dist_faults.py WORK_DIR

Each rank works in its own folder WORK_DIR/node{rank} (as if the two ranks were on two nodes with their own
disks) with the same relative dump_stats_path, so a case can put a file on one "node" only. Every case runs
on both ranks; each rank writes what it got, per case, to WORK_DIR/result_{rank}.json: "ok" with a digest of
the document read, or the error's type and message.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from ds_quant import errors
from ds_quant.files import measurements as ms
from ds_quant.files import shards as sf
from ds_quant.parallel import dist as dsq_dist
from ds_quant.workflows.quantize import read_measurements

work = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]).resolve()
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
home = work / f"node{rank}"
home.mkdir(parents=True, exist_ok=True)
os.chdir(home)
PREFIX = "stats/m"


def layer(kind, vec, out=4):
    return {"kind": kind, "in_features": 6, "out_features": out, "local_in_features": len(vec),
            "partition_sizes": [3, 3], "input_amax": max(vec), "input_channel_amax": vec, "output_amax": 1.0,
            "weight_amax": 0.5, "samples": 8}


SHARDS = [ms.make_shard({"down": layer("row", [1.0, 2.0, 3.0]), "up": layer("column", [1.0] * 6)}, r, 2, "maxabs",
                        "bfloat16", run="r1") for r in range(2)]
MERGED = ms.merge(SHARDS)


def digest(doc) -> str:
    plain = {n: {k: (list(map(float, v)) if k == "input_channel_amax" else v) for k, v in rec.items()}
             for n, rec in doc["layers"].items()}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]


def reset() -> None:
    shutil.rmtree("stats", ignore_errors=True)
    os.makedirs("stats")


def on(ranks, write) -> None:
    """Write this case's files on the given ranks' "nodes" only."""
    if rank in ranks:
        write()


def truncate(path: str) -> None:
    text = Path(path).read_text()
    Path(path).write_text(text[: len(text) // 2])


def big_merged() -> None:
    # Large enough for the companion binary; then corrupt one byte of it (sha256 mismatch).
    layers = {f"l{i}": {**layer("column", [1.0] * 6), "in_features": 40000, "local_in_features": 40000,
                        "input_channel_amax": [1.0] * 40000} for i in range(2)}
    ms.atomic_write_json(sf.merged_path(PREFIX), ms.merge([ms.make_shard(layers, 0, 1, "maxabs", "bfloat16")]))
    blob = next(Path("stats").glob("m.*.f32"))
    data = bytearray(blob.read_bytes())
    data[5] ^= 0xFF
    blob.write_bytes(bytes(data))


CASES = {
    "merged_on_both": lambda: on((0, 1), lambda: ms.atomic_write_json(sf.merged_path(PREFIX), MERGED)),
    "merged_on_rank1_only": lambda: on((1,), lambda: ms.atomic_write_json(sf.merged_path(PREFIX), MERGED)),
    "shards_spread_over_nodes": lambda: ms.atomic_write_json(sf.shard_path(PREFIX, rank, 2), SHARDS[rank]),
    "shard_1_missing": lambda: on((0,), lambda: ms.atomic_write_json(sf.shard_path(PREFIX, 0, 2), SHARDS[0])),
    "nothing": lambda: None,
    "truncated_merged": lambda: (ms.atomic_write_json(sf.merged_path(PREFIX), MERGED), truncate(sf.merged_path(PREFIX))),
    "truncated_on_rank1_only": lambda: (ms.atomic_write_json(sf.merged_path(PREFIX), MERGED),
                                        on((1,), lambda: truncate(sf.merged_path(PREFIX)))),
    "wrong_version": lambda: Path(sf.merged_path(PREFIX)).write_text(ms.dumps({**MERGED, "version": 7})),
    "bad_companion_sha": big_merged,
    "shards_of_two_runs": lambda: ms.atomic_write_json(sf.shard_path(PREFIX, rank, 2),
                                                       {**SHARDS[rank], "run": f"run{rank}"}),
}

results = {}
for name, setup in CASES.items():
    reset()
    setup()
    dist.barrier()
    try:
        doc, where = read_measurements(PREFIX, world, None)
        results[name] = {"ok": digest(doc), "where": where}
    except Exception as e:  # noqa: BLE001 - recorded for the test to compare across ranks
        results[name] = {"error": type(e).__name__, "message": str(e)}
    dist.barrier()

# An error on one rank only, in any check: every rank raises the same one.
def fails_on_rank1():
    if rank == 1:
        raise errors.MeasurementError("stats/m.json: something only rank 1 sees")
    return "fine"


try:
    results["agree_one_rank"] = {"ok": dsq_dist.agree(fails_on_rank1, None, what="QUANTIZE")}
except errors.RankError as e:
    results["agree_one_rank"] = {"error": type(e).__name__, "message": str(e)}

# MEASURE's start on a dump path one node cannot write: stopped before calibration, on every rank.
reset()
if rank == 1:
    shutil.rmtree("stats")
    Path("stats").write_text("a file where the folder should be")
try:
    dsq_dist.agree(lambda: sf.check_writable("stats/sub/m", 1000), None, what="MEASURE")
    results["unwritable_on_rank1"] = {"ok": "written"}
except errors.RankError as e:
    results["unwritable_on_rank1"] = {"error": type(e).__name__, "message": str(e)}

results["expected_digest"] = digest(MERGED)
(work / f"result_{rank}.json").write_text(json.dumps(results, indent=1))
dsq_dist.shutdown()
