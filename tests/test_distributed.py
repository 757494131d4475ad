"""Through the real `deepspeed` launcher, 2 ranks on CPU (gloo + DeepSpeed's shm allreduce).

One MEASURE run at TP=2, then QUANTIZE at TP=2 and at TP=1 from the same merged file. The example
script is unmodified DeepSpeed inference code plus `ds_quant.install()`: the swap happens inside
`deepspeed.init_inference`, so these runs also test the hook and `--quant-config`.
"""

import json
from pathlib import Path

import pytest
import torch

from ds_quant.numerics.scales import sqnr_db
from tests.launcher import ROOT, deepspeed

pytestmark = pytest.mark.distributed


def launch(ranks: int, *args: str, cwd: Path) -> str:
    return deepspeed(ranks, ROOT / "examples" / "run.py", *args, cwd=cwd, QUANT_VERBOSE="1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """MEASURE at TP=2, QUANTIZE at TP=2 and TP=1; returns the working directory and outputs."""
    work = tmp_path_factory.mktemp("dist")
    for name, mode, method in [("measure", "MEASURE", "maxabs_hw"), ("quantize", "QUANTIZE", "maxabs_hw"),
                               ("pcs", "QUANTIZE", "act_maxabs_hw_weights_pcs_opt_pow2"),
                               ("dynamic", "QUANTIZE", "act_dynamic_per_token_weights_pcs")]:
        (work / f"{name}.json").write_text(json.dumps(  # MEASURE also dumps tensors (observer "save")
            {"method": "HOOKS", "mode": mode, "observer": "save" if mode == "MEASURE" else "maxabs",
             "scale_method": method, "dump_stats_path": "stats/tiny"}))
    out = {
        "measure": launch(2, "--quant-config", "measure.json", "--save-reference", "bf16.pt",
                          "--report", "measure_{rank}.json", cwd=work),
        "quant2": launch(2, "--quant-config", "quantize.json", "--compare-to", "bf16.pt",
                         "--save-reference", "fp8_tp2.pt", "--report", "quant2_{rank}.json", cwd=work),
        "quant1": launch(1, "--quant-config", "quantize.json", "--save-reference", "fp8_tp1.pt",
                         "--report", "quant1_{rank}.json", cwd=work),
    }
    for method in ("pcs", "dynamic"):
        for ranks in (2, 1):
            out[f"{method}{ranks}"] = launch(ranks, "--quant-config", f"{method}.json", "--save-reference",
                                             f"{method}_tp{ranks}.pt", "--report", f"{method}{ranks}_{{rank}}.json",
                                             cwd=work)
    return work, out


def report(work: Path, name: str) -> dict:
    return json.loads((work / f"{name}.json").read_text())


def test_measure_writes_two_shards_and_one_merged_file(runs):
    work, out = runs
    assert sorted(p.name for p in (work / "stats").iterdir()) == [
        "tiny.json", "tiny_0_2.json", "tiny_1_2.json", "tiny_tensors_0_2.safetensors", "tiny_tensors_1_2.safetensors"]
    merged = json.loads((work / "stats" / "tiny.json").read_text())
    assert merged["kind"] == "merged" and merged["world_size"] == 2 and len(merged["layers"]) == 29
    # Model-level statistics: full widths, whatever TP size measured them.
    assert len(merged["layers"]["lm_head"]["input_channel_amax"]) == 128
    assert len(merged["layers"]["model.layers.0.mlp.down_proj"]["input_channel_amax"]) == 352
    assert merged["layers"]["model.layers.0.self_attn.q_proj"]["out_features"] == 128
    for rank in (0, 1):
        rep = report(work, f"measure_{rank}")
        assert set(rep["original_kinds"].values()) == {"column", "row", "lm-head"}
        assert set(rep["module_types"].values()) == {"MeasuredLinear"}
    assert "[ds_quant rank 1] INFO wrote stats/tiny_1_2.json" in out["measure"]


def test_observer_save_dumps_each_ranks_own_view_at_tp2(runs):
    """Each rank's dump holds what its TP layers saw: the local input slice of a row-parallel layer, the
    replicated input and the local output slice of a column-parallel one, the allreduced output of a row one; and
    its maxima are exactly the statistics of that rank's shard."""
    from safetensors.torch import load_file

    work, out = runs
    dumps = [load_file(work / "stats" / f"tiny_tensors_{r}_2.safetensors") for r in (0, 1)]
    shards = [json.loads((work / "stats" / f"tiny_{r}_2.json").read_text()) for r in (0, 1)]
    down, q = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    # The row-parallel slices follow DeepSpeed's partition sizes (multiples of 64): 192 + 160 = 352.
    assert [dumps[r][f"{down}.input.0"].shape[-1] for r in (0, 1)] == [192, 160]
    for r in (0, 1):
        assert dumps[r][f"{q}.input.0"].shape[-1] == 128 and dumps[r][f"{q}.output.0"].shape[-1] == 64
        calls = sorted({k.rsplit(".", 1)[1] for k in dumps[r] if k.startswith(f"{down}.input.")})
        top = max(dumps[r][f"{down}.input.{c}"].float().abs().max().item() for c in calls)
        assert shards[r]["layers"][down]["input_amax"] == top
    assert torch.equal(dumps[0][f"{q}.input.0"], dumps[1][f"{q}.input.0"])  # replicated input
    assert torch.equal(dumps[0][f"{down}.output.0"], dumps[1][f"{down}.output.0"])  # after the allreduce
    assert not torch.equal(dumps[0][f"{down}.input.0"], dumps[1][f"{down}.input.0"])
    assert "[ds_quant rank 1] INFO wrote stats/tiny_tensors_1_2.safetensors" in out["measure"]


def test_quantize_replaces_all_three_deepspeed_classes(runs):
    work, out = runs
    for rank in (0, 1):
        rep = report(work, f"quant2_{rank}")
        assert set(rep["module_types"].values()) == {"Fp8Linear"} and len(rep["module_types"]) == 29
        kinds = rep["original_kinds"]
        assert kinds["model.layers.0.self_attn.q_proj"] == "column"
        assert kinds["model.layers.0.mlp.down_proj"] == "row" and kinds["lm_head"] == "lm-head"
        assert set(rep["weight_dtypes"].values()) == {"torch.float8_e4m3fn"}
    # The QUANT_VERBOSE table on rank 0: per decoder layer 5 column (q, k, v, gate, up) and 2 row (o, down).
    assert ("count: 8 LinearAllreduce -> Fp8Linear, 20 LinearLayer -> Fp8Linear, "
            "1 LmHeadLinearAllreduce -> Fp8Linear") in out["quant2"]


def test_fp8_weights_take_half_the_bytes(runs):
    work, _ = runs
    for rank in (0, 1):
        ratio = report(work, f"quant2_{rank}")["weight_bytes"] / report(work, f"measure_{rank}")["weight_bytes"]
        assert 0.5 <= ratio < 0.505, ratio  # 1 byte vs 2 per weight, plus two float32 scales per layer


def test_tp2_fp8_logits_close_to_bf16(runs):
    """Threshold 20 dB: five FP8 GEMMs in series (4 decoder layers + lm_head) on a random-init model, each
    ~26 dB (tests/numerics/test_scales.py); the same model quantized in a single process scores ~23 dB, so TP must not
    cost more than ~3 dB. A wrong scale, a dropped allreduce or a mis-sliced lm_head falls far below."""
    work, out = runs
    bf16, fp8 = torch.load(work / "bf16.pt"), torch.load(work / "fp8_tp2.pt")
    assert sqnr_db(bf16["logits"], fp8["logits"]) > 20
    assert "FP8 vs bf16: logits SQNR" in out["quant2"]


def test_tp2_fp8_matches_tp1_fp8_from_the_same_file(runs):
    """Scales come from model-level statistics, so both TP sizes quantize every weight identically. What is
    left is the bf16 rounding of row-parallel partial sums before the allreduce (2^-9 relative), which flips
    ~1 in 32 downstream activations by one FP8 step (2^-4): measured ~28.7 dB. Either run against bf16 scores
    ~23 dB, and independent scales per TP size would score ~20 dB (two independent FP8 noises), so 26 dB
    separates "same quantization" from "different quantization"."""
    work, _ = runs
    tp1, tp2 = torch.load(work / "fp8_tp1.pt"), torch.load(work / "fp8_tp2.pt")
    assert report(work, "quant1_0")["world_size"] == 1
    assert sqnr_db(tp1["logits"], tp2["logits"]) > 26


def test_per_channel_opt_at_tp2_matches_single_process(runs):
    """Per-channel weight scales: column-parallel shards carry their own rows' scales, row-parallel ranks
    agree on whole-row statistics (all-reduced max and MSE), so TP=2 quantizes every weight exactly as TP=1
    does. Same 26 dB bar and reasoning as for per-tensor scales above."""
    work, _ = runs
    for rank in (0, 1):
        rep = report(work, f"pcs2_{rank}")
        assert set(rep["module_types"].values()) == {"Fp8Linear"}
    tp1, tp2 = torch.load(work / "pcs_tp1.pt"), torch.load(work / "pcs_tp2.pt")
    bf16 = torch.load(work / "bf16.pt")
    assert sqnr_db(tp1["logits"], tp2["logits"]) > 26
    assert sqnr_db(bf16["logits"], tp2["logits"]) > 20


def test_dynamic_per_token_at_tp2_matches_single_process(runs):
    """Dynamic per-token scales need no measurement file. A row-parallel rank scales each token by the
    max over its own input slice (as vLLM does; a cross-rank max would cost a collective per GEMM), so TP=2
    and TP=1 differ by more than rounding: two valid quantizations, each ~23 dB from bf16. 20 dB between
    them is what two independent FP8 noises of that size give; a broken scale falls far below."""
    work, out = runs
    tp1, tp2 = torch.load(work / "dynamic_tp1.pt"), torch.load(work / "dynamic_tp2.pt")
    bf16 = torch.load(work / "bf16.pt")
    assert sqnr_db(tp1["logits"], tp2["logits"]) > 20
    assert sqnr_db(bf16["logits"], tp2["logits"]) > 20
    assert "QUANTIZE with measurements" not in out["dynamic2"]


def test_measurements_saved_at_exit_at_tp2(tmp_path):
    """A script that never calls finish_measurements: the exit handler gathers the shards over the TP group
    while it is still alive, and rank 0 writes the merged file."""
    (tmp_path / "measure.json").write_text(json.dumps({"method": "HOOKS", "mode": "MEASURE",
                                                      "dump_stats_path": "stats/exit"}))
    deepspeed(2, ROOT / "tests" / "scripts" / "measure_without_finish.py", cwd=tmp_path, QUANT_CONFIG="measure.json")
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["exit.json", "exit_0_2.json", "exit_1_2.json"]
    merged = json.loads((tmp_path / "stats" / "exit.json").read_text())
    assert merged["world_size"] == 2 and merged["layers"]["lm_head"]["samples"] == 16


COVERAGE_ARCHS = ("llama", "falcon-new", "falcon-old-mha", "gpt_neox", "bloom", "mixtral", "qwen3_moe")
MOE = {"mixtral": "MixtralTopKRouter", "qwen3_moe": "Qwen3MoeTopKRouter"}


@pytest.fixture(scope="module")
def coverage(tmp_path_factory):
    """One launch for every architecture (a launch costs 20-40 s here): bench/coverage.py's worker builds each
    tiny seeded model, runs DeepSpeed's bf16 TP=2, MEASURE and QUANTIZE at TP=2, and the same model at TP=1."""
    work = tmp_path_factory.mktemp("coverage")
    deepspeed(2, ROOT / "bench" / "coverage.py", "--worker", "--archs", ",".join(COVERAGE_ARCHS), "--json",
              "coverage.json", "--work", str(work), cwd=work, OMP_NUM_THREADS="1")
    return {r["arch"]: r for r in json.loads((work / "coverage.json").read_text())}


@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_every_gemm_weight_is_fp8_at_tp2(coverage, arch):
    """Counted like the coverage matrix: every floating tensor of >= 2 dims outside embeddings and norms, so a
    class that silently stays bf16 (fused qkv before this) shows as a share below 1."""
    r = coverage[arch]
    assert r["bf16_tp2"] == "ok"
    assert r["high_precision"] == []
    if arch in MOE:
        # Everything but the router (kept in high precision on purpose: 0.1-0.2 % of the GEMM weights here).
        assert list(r["bf16_share"]) == [MOE[arch]] and r["bf16_share"][MOE[arch]] < 0.005, r
        assert min(r["share_tp2"]) > 0.995 and r["share_tp1"] > 0.995, r
        return  # (MEASURE runs transformers' eager expert loop, not its grouped_mm: equal up to rounding)
    assert r["share_tp2"] == [1.0, 1.0] and r["share_tp1"] == 1.0, r  # TP=1: Falcon's FalconLinear included
    assert r["measure_exact"], "the measured twins must reproduce DeepSpeed's bf16 logits bit for bit"
    if arch != "llama":
        assert r["ds_classes"].get("fused_LinearLayer") == 2, r["ds_classes"]  # one fused qkv per decoder layer


@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_tp2_costs_no_accuracy(coverage, arch):
    """The issue's goal: logits SQNR FP8 vs bf16 at TP=2 within 1 dB of the same model at TP=1 (measured 22-29 dB
    both; the gap is the bf16 rounding of row-parallel partial sums). A fused layer quantized with the wrong rows'
    scales, or a model-level file that depends on the TP size, falls several dB below TP=1."""
    r = coverage[arch]
    assert r["sqnr_tp2"] > r["sqnr_tp1"] - 1, r
    assert r["sqnr_tp2"] > 20, r  # 5 FP8 GEMMs in series on random init, ~26 dB each (see test_tp2_fp8_logits...)
