"""Experiment: GPTQ-style FP8 weight rounding vs round-to-nearest on SmolLM2-135M, TP=1, one process.

    .venv/bin/python -m bench.gptq_smollm2 [--out out/gptq/tp1.json] [--rows rtn gptq gptq_act]

The setup of examples/smollm2_accuracy.py (calibration windows 0-3, evaluation windows 4-11 of 256 tokens of
pydoc text, bf16 reference logits of the same process): MEASURE with recommended_measure.json; Hessians
H = Σ xᵀx of every linear's input (forward pre-hooks on the plain model, the same calibration windows); then
each row loads a fresh bf16 model and QUANTIZEs it with recommended_quant.json less its `gptq` key (pcs_opt, 16
outlier channels, lm_head bf16): the rtn row. The gptq rows first replace each linear's bf16 weight by its GPTQ-rounded one, snapped to the FP8
grid QUANTIZE uses (per-channel pow2 scale from the weight without its outlier columns; the outlier columns
stay bf16 and absorb the rest of the error), so QUANTIZE's own per-channel rounding reproduces it: the script
counts the elements where it did not. QUANTIZE's "weights changed since MEASURE" check is switched off for
those rows (GPTQ may raise a row's max-abs a little; the snapped weights are what we mean to quantize).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from examples import smollm2  # run with -m from the repository root, which puts the root on sys.path
from examples import smollm2_accuracy as acc

ROOT = Path(__file__).resolve().parents[1]

ROWS = {"rtn": None, "gptq": {"damp": 0.01, "block": 128, "act_order": False},
        "gptq_act": {"damp": 0.01, "block": 128, "act_order": True}}


def hessians(model, calib) -> dict[str, torch.Tensor]:
    from ds_quant.numerics.gptq import hessian_add

    hs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            hs[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: hessian_add(hs[n], args[0])))
    with torch.no_grad():
        for w in calib:
            model(w)
    for h in hooks:
        h.remove()
    return hs


def snap_gptq(model, hs, layers: dict, cfg, params) -> dict:
    """Replace each linear's weight by its GPTQ rounding on QUANTIZE's grid, in place. Returns timings."""
    from ds_quant.numerics import layer_spec
    from ds_quant.numerics.gptq import GptqParams, gptq_round
    from ds_quant.numerics.scales import quantize_weight

    p = GptqParams(**params)
    t0 = time.perf_counter()
    for name, m in model.named_modules():
        if name not in hs:
            continue
        spec = layer_spec.resolve(cfg, name)
        w = m.weight.detach()
        split = layer_spec.outlier_split(layers[name], spec.outlier_channels)
        top = split[0] if split is not None else None
        rest = w.clone()
        if top is not None:
            rest[:, top] = 0
        _, scale = quantize_weight(rest, spec.recipe, spec.fp8_dtype, spec.profile, spec.weight_backoff)
        codes, keep_hp = gptq_round(w, hs[name], scale, spec.fp8_dtype, spec.fp8_max, p, keep=top, name=name)
        snapped = codes.float() * (scale[:, None] if scale.dim() else scale)
        if top is not None:
            snapped[:, top] = keep_hp.float()
        with torch.no_grad():
            m.weight.copy_(snapped.to(w.dtype))
    return {"gptq_seconds": time.perf_counter() - t0}


def mismatches(model, snapped: dict[str, torch.Tensor]) -> int:
    """Elements where QUANTIZE's FP8 weight (dequantized) differs from the snapped bf16 weight it was given."""
    from ds_quant.layers.linear import Fp8Linear

    bad = 0
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear) and name in snapped:
            s = m.weight_scale[:, None] if m.weight_scale.dim() else m.weight_scale
            deq = m.weight.float() * s
            ref = snapped[name].float()
            if m.outlier_index is not None:
                ref = ref.clone()
                ref[:, m.outlier_index] = 0
            bad += int((deq != ref).sum())
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--out", default="out/gptq/tp1.json")
    p.add_argument("--stats", default="out/gptq/stats")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--hessian-windows", type=int, default=4,
                   help="calibration windows for the Hessians (the first 4 are MEASURE's; more come from after "
                        "the evaluation windows)")
    p.add_argument("--damp", type=float, default=None, help="override the gptq rows' damp")
    args = p.parse_args()
    from transformers import AutoTokenizer

    import ds_quant
    import ds_quant.layers.linear
    from ds_quant.config import QuantConfig
    from ds_quant.parallel import dist
    from ds_quant.workflows.quantize import read_measurements

    model_dir = smollm2.ensure(args.model)
    h_calib, evals = acc.windows(AutoTokenizer.from_pretrained(model_dir), max(4, args.hessian_windows), 8)
    calib = h_calib[:4]
    if args.damp is not None:
        for r in ROWS.values():
            if r is not None:
                r["damp"] = args.damp
    ref = acc.load(model_dir, 1)
    ppl_hp, top1_hp = acc.score(ref, evals)
    t0 = time.perf_counter()
    hs = hessians(ref, h_calib[:args.hessian_windows])
    t_h = time.perf_counter() - t0
    acc.measure(ref, ROOT / "examples/configs/recommended_measure.json", args.stats, calib)
    del ref
    doc, _ = read_measurements(args.stats, 1, dist.LOCAL)
    keys = json.loads((ROOT / "examples/configs/recommended_quant.json").read_text())
    # the RTN baseline: the recommended config without its own `gptq` (the gptq rows here apply theirs by snapping)
    keys = {k: v for k, v in keys.items() if k not in ("mode", "dump_stats_path", "gptq")}
    qcfg = acc.quant_config(keys, args.stats)
    out = {"bf16_ppl": ppl_hp, "hessian_windows": args.hessian_windows, "hessian_seconds": t_h, "cpu": acc.cpu_name(), "torch": torch.__version__, "rows": {}}
    check = ds_quant.numerics.weights.check_unchanged
    for row in args.rows:
        model = acc.load(model_dir, 1)
        extra, snapped = {}, {}
        if ROWS[row] is not None:
            extra = snap_gptq(model, hs, doc["layers"], QuantConfig.from_dict(qcfg), ROWS[row])
            snapped = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in hs}
            ds_quant.numerics.weights.check_unchanged = lambda *a, **k: None
        try:
            model = ds_quant.prep_model(model, qcfg)
        finally:
            ds_quant.numerics.weights.check_unchanged = check
        ppl, top1 = acc.score(model, evals)
        r = {"ppl": ppl, "delta_pct": 100 * (ppl / ppl_hp - 1), "top1_agreement": acc.agreement(top1, top1_hp),
             "params": ROWS[row], **extra}
        if snapped:
            r["requantize_mismatches"] = mismatches(model, snapped)
        out["rows"][row] = r
        print(f"TP=1 {row}: ppl {ppl:.3f} ({r['delta_pct']:+.2f} % vs bf16 {ppl_hp:.3f}), top-1 "
              f"{r['top1_agreement']:.1%}" + (f", requantize mismatches {r['requantize_mismatches']}, GPTQ "
                                               f"{r['gptq_seconds']:.1f} s" if snapped else ""), flush=True)
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
