"""Faults at TP=2 through the real launcher: what a user sees, and what is left on disk (the README's matrix).

Two launches of tests/scripts/dist_faults.py cover the file faults (each rank on its own "node" folder), and one
sequence of wrapped runs of an unmodified script covers a user's job end to end: MEASURE, QUANTIZE from the
merged file, QUANTIZE from the shards alone, a rank killed mid-MEASURE, the rerun, a truncated merged file.
"""

import glob
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ds_quant import errors
from ds_quant.files import shards as sf
from tests.launcher import DEEPSPEED, ROOT, SHM_BUFFERS, deepspeed, free_port, leftover_shm, run_ok

FAULTS = str(ROOT / "tests" / "scripts" / "dist_faults.py")
SCRIPT = str(ROOT / "tests" / "scripts" / "hf_text_generation.py")
RUN_PY = str(ROOT / "launch" / "run.py")


@pytest.mark.distributed
def test_measurement_file_faults_agree_on_every_rank(tmp_path):
    deepspeed(2, FAULTS, str(tmp_path), cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1, "every rank must end the same way"  # one outcome, one message, on every rank
    good = r0.pop("expected_digest")
    # Read once, by the first rank that has the file, and broadcast: the other node needs no copy.
    for case in ("merged_on_both", "merged_on_rank1_only", "truncated_on_rank1_only"):
        assert r0[case] == {"ok": good, "where": "stats/m.json"}, case
    # No merged file: each node's shard is read where it is, and the merge is the same statistics.
    assert r0["shards_spread_over_nodes"] == {"ok": good, "where": "the 2 shards of stats/m (no merged file)"}
    errors = {  # case -> what the one line must say (it also names the rank whose check failed)
        "shard_1_missing": "QUANTIZE: ranks 0, 1: no merged file stats/m.json, and no rank has shard 1 of 2 "
                           "(stats/m_1_2.json)",
        "nothing": "QUANTIZE: ranks 0, 1: no measurements at stats/m.json",
        "truncated_merged": "QUANTIZE: rank 0: stats/m.json: not valid JSON (truncated or corrupt?)",
        "wrong_version": "QUANTIZE: rank 0: stats/m.json: format version 7, this ds_quant reads 1",
        "bad_companion_sha": "does not match its sha256 (corrupt or replaced)",
        "shards_of_two_runs": "shard of rank 1 has run='run1', rank 0 has 'run0'; shards come from different runs",
        "agree_one_rank": "QUANTIZE: rank 1: stats/m.json: something only rank 1 sees",
        "unwritable_on_rank1": "MEASURE: rank 1: dump_stats_path 'stats/sub/m': cannot write in stats/sub: Not a "
                               "directory; choose a writable dump_stats_path with free space",
    }
    for case, fragment in errors.items():
        assert r0[case]["error"] == "RankError" and fragment in r0[case]["message"], (case, r0[case])
        assert "\n" not in r0[case]["message"], case


def _launch(cfg: str, *args: str, cwd: Path, ok: bool = True) -> tuple[int, str, list[str]]:
    """One wrapped run; (rc, output, shm buffers of its job left behind). Cleans those up either way."""
    port = str(free_port())
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", port, RUN_PY, "--quant-config", cfg, SCRIPT, *args]
    before = set(glob.glob(SHM_BUFFERS))
    try:
        if ok:
            return 0, run_ok(cmd, cwd=cwd, keep_shm=True), leftover_shm(before, {port})
        env = {k: v for k, v in os.environ.items() if k != "QUANT_CONFIG"}
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr, leftover_shm(before, {port})
    finally:
        for path in leftover_shm(before, {port}):
            os.unlink(path)


@pytest.mark.distributed
def test_a_users_job_through_faults(tiny_model, tmp_path):
    """Wrapped runs of an unmodified script (sys.exit(0) at its end), one after another, in one dump path."""
    cfgs = {}
    for mode in ("MEASURE", "QUANTIZE"):
        cfgs[mode] = str(tmp_path / f"{mode}.json")
        Path(cfgs[mode]).write_text(json.dumps({"method": "HOOKS", "mode": mode, "scale_method": "maxabs_hw",
                                                "dump_stats_path": "stats/tiny"}))
    args = ["--model", tiny_model, "--max_new_tokens", "2", "--batch_size", "1", "--exit_with_sys_exit"]
    stats = tmp_path / "stats"

    def files() -> list[str]:
        return sorted(p.name for p in stats.iterdir()) if stats.exists() else []

    def clean(out: str, shm: list[str], step: str) -> None:
        # A run that succeeded exits 0 (run_ok checked), ends in order and leaves nothing in /dev/shm: left to
        # interpreter finalisation, a gloo worker thread could abort a finished job ("terminate called without an
        # active exception", rc -6, ~1 run in 20-30 under load).
        assert "INFO summary: hf_text_generation.py finished" in out and "terminate called" not in out, step
        assert not shm, f"{step}: left its shm buffers behind: {shm}"

    # 1. MEASURE: shards and the merged file.
    _, out, shm = _launch(cfgs["MEASURE"], *args, cwd=tmp_path)
    clean(out, shm, "MEASURE")
    assert files() == ["tiny.json", "tiny_0_2.json", "tiny_1_2.json"]
    # 2. QUANTIZE from the merged file.
    _, out, shm = _launch(cfgs["QUANTIZE"], *args, cwd=tmp_path)
    clean(out, shm, "QUANTIZE")
    assert "QUANTIZE with measurements from stats/tiny.json" in out
    # 3. QUANTIZE from the shards alone (the merged file lost): all 29 layers FP8, no false "weights changed".
    (stats / "tiny.json").unlink()
    _, out, shm = _launch(cfgs["QUANTIZE"], *args, "--report", "r3_{rank}.jsonl", cwd=tmp_path)
    clean(out, shm, "QUANTIZE from shards")
    assert "QUANTIZE with measurements from the 2 shards of stats/tiny (no merged file)" in out
    for rank in (0, 1):
        (run_,) = [json.loads(x) for x in (tmp_path / f"r3_{rank}.jsonl").read_text().splitlines()]
        assert set(run_["module_types"].values()) == {"Fp8Linear"} and len(run_["module_types"]) == 29
    # 4. A rank killed mid-MEASURE: the job fails; the earlier run's files are gone (removed when this run
    #    started), no merged file, nothing half-written; a merge of what is there names the missing shard.
    rc, out, _ = _launch(cfgs["MEASURE"], *args, "--kill_rank", "1", cwd=tmp_path, ok=False)
    assert rc != 0, out[-3000:]
    left = files()
    assert "tiny.json" not in left and not [f for f in left if f.endswith(".tmp") or f.startswith(".")], left
    assert set(left) <= {"tiny_0_2.json"}, left
    if left:
        with pytest.raises(errors.MeasurementError, match=r"missing .*tiny_1_2.json"):
            sf.merge_files(str(stats / "tiny"))
    # 5. The rerun succeeds.
    _, out, shm = _launch(cfgs["MEASURE"], *args, cwd=tmp_path)
    clean(out, shm, "MEASURE rerun")
    assert files() == ["tiny.json", "tiny_0_2.json", "tiny_1_2.json"]
    # 6. A truncated merged file: every rank stops at once with one line naming the file; no traceback.
    merged = stats / "tiny.json"
    merged.write_text(merged.read_text()[: merged.stat().st_size // 2])
    start = time.monotonic()
    rc, out, _ = _launch(cfgs["QUANTIZE"], *args, cwd=tmp_path, ok=False)
    assert rc != 0 and time.monotonic() - start < 120, out[-3000:]
    for rank in (0, 1):
        lines = [x for x in out.splitlines() if x.startswith(f"[ds_quant rank {rank}] ERROR")]
        assert len(lines) == 1 and "rank 0: stats/tiny.json: not valid JSON (truncated or corrupt?)" in lines[0], \
            out[-3000:]
    assert "Traceback" not in out and "gloo" not in out.lower(), out[-3000:]
