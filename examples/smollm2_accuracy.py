"""FP8 accuracy on a real pretrained model: SmolLM2-135M-Instruct, perplexity and next-token top-1 agreement
against bf16 on held-out CPython pydoc text, one row per config, at TP = the launcher's world size.

    python examples/smollm2.py                                              # once: builds the model folder
    deepspeed --num_gpus 2 examples/smollm2_accuracy.py --out out/smollm2/tp2.json     # measures, then all rows
    deepspeed --num_gpus 3 examples/smollm2_accuracy.py --reuse-stats --out out/smollm2/tp3.json
    python examples/smollm2_accuracy.py --reuse-stats --out out/smollm2/tp1.json       # TP=1, no DeepSpeed
    python examples/smollm2_accuracy.py --table out/smollm2/tp2.json out/smollm2/tp1.json out/smollm2/tp3.json

Text: CPython's `pydoc_data.topics`, sorted by key, tokenized once, cut into windows of 256 tokens.
Evaluation: windows 4..4+EVAL (the issue's recipe: 8 windows, 2040 predicted tokens). Calibration: windows
0..3, then the windows after the evaluation ones, CALIB in all, so the two never overlap whatever CALIB is.

One launch: the model is split by `deepspeed.init_inference`, its bf16 logits on the evaluation windows are
the reference; the same module is then prepared in MEASURE mode with `--measure-config` (the twins compute
exactly what bf16 does) and run on the calibration windows; `--reuse-stats` skips this and uses the file an
earlier launch (any TP size) wrote. Each row then loads a fresh copy, splits it, QUANTIZEs it with its config
(`dump_stats_path` replaced by `--stats`) and scores it. Rows: named by `--variants` (a scale method plus
modifiers, see `variant`; default DEFAULT_ROWS), and any QUANTIZE JSON given with `--config` (e.g.
examples/configs/recommended_quant.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

try:
    import smollm2  # run as a script: this folder is sys.path[0]
except ModuleNotFoundError:  # imported from the repository root (tests, bench)
    from examples import smollm2

HERE = Path(__file__).resolve().parent

WINDOW = 256
FIRST_EVAL = 4  # the recipe: calibrate on windows 0..3, score the next ones
PCS_OPT = "act_maxabs_hw_weights_pcs_opt_pow2"
ALIASES = {"pcs_opt": PCS_OPT, "pcs_pow2": "act_maxabs_pow2_weights_pcs_opt_pow2",
           "dyn_pcs": "act_dynamic_per_token_weights_pcs"}
METHODS = ("unit_scale", "maxabs_hw", "maxabs_pow2", "maxabs_hw_opt_weight", "maxabs_pow2_opt_weight",
           "act_maxabs_hw_weights_pcs_maxabs_pow2", PCS_OPT, "act_maxabs_pow2_weights_pcs_maxabs_pow2",
           "act_maxabs_pow2_weights_pcs_opt_pow2", "act_dynamic_per_token_weights_pcs")
# The default rows: every scale method with lm_head in bf16, lm_head in FP8 for two, input backoffs.
DEFAULT_ROWS = ("maxabs_hw+lm_head", "pcs_opt+lm_head", *METHODS, "pcs_opt@in0.5", "pcs_opt@in1.0",
                "pcs_opt-k_proj", "pcs_pow2#o8", "pcs_pow2#o16")


def variant(name: str) -> dict:
    """A row's QUANTIZE keys from its name: METHOD (a scale method or an ALIASES key), then modifiers:
    `+lm_head` lm_head in FP8 (else bf16), `@inX` / `@wX` input / weight backoff X, `-PROJ` every PROJ
    (e.g. k_proj) in bf16 too, `#oK` outlier_channels K, `~sA` smooth_alpha A, `^g` gptq (defaults; `^ga` with
    act_order; the measurement file needs Hessians: a --measure-config with `gptq`). E.g.
    `pcs_opt@in0.125-k_proj`, `pcs_pow2#o8`, `pcs_opt~s0.5#o16`, `pcs_opt#o16^g`."""
    import re

    mod = r"\+lm_head|@in[0-9.]+|@w[0-9.]+|-[a-z_]+|#o[0-9]+|~s[0-9.]+|\^ga?"
    m = re.fullmatch(rf"([a-z0-9_]+)((?:{mod})*)", name)
    if m is None:
        raise SystemExit(f"smollm2_accuracy: row name {name!r}: METHOD[+lm_head][@inX][@wX][-PROJ][#oK][~sA][^g|^ga]")
    mods = re.findall(mod, m.group(2))
    blocked = [] if "+lm_head" in mods else ["lm_head"]
    blocked += [rf"\.{x[1:]}$" for x in mods if x.startswith("-")]
    params = {("input_backoff" if x.startswith("@in") else "weight_backoff"): float(x.lstrip("@inw"))
              for x in mods if x.startswith("@")}
    keys = {"scale_method": ALIASES.get(m.group(1), m.group(1)), "blocklist": {"types": [], "names": blocked}}
    for x in mods:
        if x.startswith("#o"):
            keys["outlier_channels"] = int(x[2:])
        if x.startswith("~s"):
            keys["smooth_alpha"] = float(x[2:])
        if x.startswith("^g"):
            keys["gptq"] = {"act_order": x == "^ga"}
    return {**keys, "scale_params": params} if params else keys


# -- data -------------------------------------------------------------------------------------------------------
def windows(tokenizer, calib: int, evals: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration windows, evaluation windows), each (1, WINDOW) token ids, disjoint."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = len(ids) // WINDOW
    order = list(range(FIRST_EVAL)) + list(range(FIRST_EVAL + evals, n))
    if evals < 1 or FIRST_EVAL + evals > n or not 1 <= calib <= len(order):
        raise SystemExit(f"smollm2_accuracy: the text has {n} windows of {WINDOW} tokens: --eval must be in "
                         f"1..{n - FIRST_EVAL} and --calib in 1..{n - evals}")
    cut = [ids[i * WINDOW:(i + 1) * WINDOW].unsqueeze(0) for i in range(n)]
    return [cut[i] for i in order[:calib]], cut[FIRST_EVAL:FIRST_EVAL + evals]


# -- model ------------------------------------------------------------------------------------------------------
def load(model_dir: Path, world: int):
    """A fresh bf16 copy, split over `world` ranks by DeepSpeed AutoTP (TP=1: the plain model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    if world == 1:
        return model
    import deepspeed

    return deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=torch.bfloat16,
                                    replace_with_kernel_inject=False).module


@torch.no_grad()
def score(model, evals: list[torch.Tensor]) -> tuple[float, list[int]]:
    """(perplexity, argmax next token at every predicted position)."""
    nll, n, top1 = 0.0, 0, []
    for w in evals:
        logits = model(w).logits.float()[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
        top1 += logits.argmax(-1).tolist()
    return math.exp(nll / n), top1


def fp8_counts(model) -> dict:
    """FP8 and total linears other than lm_head, and whether lm_head is FP8."""
    from ds_quant.layers.linear import Fp8Linear, _TwinLinear
    from ds_quant.parallel.tp import spec_of

    fp8 = total = 0
    head = False
    for name, m in model.named_modules():
        if not (isinstance(m, _TwinLinear) or spec_of(m) is not None):
            continue
        if name.endswith("lm_head"):
            head = isinstance(m, Fp8Linear)
            continue
        total += 1
        fp8 += isinstance(m, Fp8Linear)
    return {"fp8_linears": fp8, "linears": total, "lm_head_fp8": head}


# -- the run ---------------------------------------------------------------------------------------------------
def measure(model, cfg_path: Path, stats: str, calib: list[torch.Tensor]) -> None:
    import ds_quant

    cfg = {**json.loads(cfg_path.read_text()), "mode": "MEASURE", "dump_stats_path": stats}
    cfg.pop("dump_stats_xlsx_path", None)
    model = ds_quant.prep_model(model, cfg)
    with torch.no_grad():
        for w in calib:
            model(w)
    ds_quant.finish_measurements(model)


def quant_config(keys: dict, stats: str) -> dict:
    return {"method": "HOOKS", **keys, "mode": "QUANTIZE", "dump_stats_path": stats}


def run(args) -> dict:
    from transformers import AutoTokenizer

    import ds_quant

    world = int(os.environ.get("WORLD_SIZE", "1"))
    calib, evals = windows(AutoTokenizer.from_pretrained(args.model), args.calib, args.eval)
    t0 = time.perf_counter()
    reference = load(args.model, world)
    ppl_hp, top1_hp = score(reference, evals)
    if not args.reuse_stats:
        measure(reference, args.measure_config, args.stats, calib)
    del reference
    out = {"tp": world, "calib_windows": len(calib), "eval_windows": len(evals), "window": WINDOW,
           "tokens": len(top1_hp), "measure_config": None if args.reuse_stats else str(args.measure_config),
           "stats": args.stats, "cpu": cpu_name(), "torch": torch.__version__,
           "bf16": {"ppl": ppl_hp, "top1": top1_hp, "seconds": time.perf_counter() - t0}, "rows": {}}
    rows = {name: variant(name) for name in args.variants}
    for path in args.config:
        keys = json.loads(Path(path).read_text())
        rows[Path(path).stem] = {k: v for k, v in keys.items() if k not in ("mode", "dump_stats_path")}
    for name, keys in rows.items():
        t0 = time.perf_counter()
        model = ds_quant.prep_model(load(args.model, world), quant_config(keys, args.stats))
        ppl, top1 = score(model, evals)
        out["rows"][name] = {"config": keys, "ppl": ppl, "delta_pct": 100 * (ppl / ppl_hp - 1),
                             "top1_agreement": agreement(top1, top1_hp), "top1": top1, **fp8_counts(model),
                             "seconds": time.perf_counter() - t0}
        del model
        if rank() == 0:
            r = out["rows"][name]
            print(f"TP={world} {name}: ppl {ppl:.3f} ({r['delta_pct']:+.2f} % vs bf16 {ppl_hp:.3f}), top-1 "
                  f"{r['top1_agreement']:.1%}, FP8 {r['fp8_linears']}/{r['linears']} linears"
                  f"{' + lm_head' if r['lm_head_fp8'] else ''}", flush=True)
    return out


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


# -- the table ---------------------------------------------------------------------------------------------------
def table(paths: list[str]) -> str:
    """Markdown: one line per (row, TP). Δ and top-1 against bf16 of TP=2 when its file is given (the issue's
    reference), else against the same TP's bf16; also the ppl at each TP against the same row at TP=2."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: (r["tp"] != 2, r["tp"]))
    ref = runs[0]
    lines = [f"| config | TP | ppl | Δ ppl vs bf16 TP={ref['tp']} ({ref['bf16']['ppl']:.3f}) | top-1 agreement | "
             "FP8 linears (lm_head) | vs same row TP=" + str(ref["tp"]) + " |", "|---|---|---|---|---|---|---|"]
    for name in ref["rows"]:
        for r in runs:
            row = r["rows"].get(name)
            if row is None:
                continue
            vs_ref = "–" if r is ref else f"{100 * (row['ppl'] / ref['rows'][name]['ppl'] - 1):+.2f} %"
            lines.append(f"| {name} | {r['tp']} | {row['ppl']:.3f} | {100 * (row['ppl'] / ref['bf16']['ppl'] - 1):+.2f} % "
                         f"| {agreement(row['top1'], ref['bf16']['top1']):.1%} | {row['fp8_linears']}/{row['linears']} "
                         f"({'FP8' if row['lm_head_fp8'] else 'bf16'}) | "
                         f"{vs_ref} |")
    for r in runs[1:]:
        lines.append(f"| bf16 | {r['tp']} | {r['bf16']['ppl']:.3f} | {100 * (r['bf16']['ppl'] / ref['bf16']['ppl'] - 1):+.2f} % "
                     f"| {agreement(r['bf16']['top1'], ref['bf16']['top1']):.1%} | – | – |")
    return "\n".join(lines) + (f"\n\n{ref['tokens']} predicted tokens ({ref['eval_windows']} windows of "
                               f"{ref['window']}), calibration {ref['calib_windows']} windows; {ref['cpu']}, "
                               f"torch {ref['torch']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="the bf16 folder (default: examples/smollm2.py's)")
    p.add_argument("--out", default="out/smollm2/tp.json", help="results JSON (rank 0)")
    p.add_argument("--stats", default="out/smollm2/stats", help="measurement file prefix (dump_stats_path)")
    p.add_argument("--reuse-stats", action="store_true", help="do not measure: use the file at --stats")
    p.add_argument("--measure-config", type=Path, default=HERE / "configs" / "recommended_measure.json")
    p.add_argument("--calib", type=int, default=4, help="calibration windows of 256 tokens")
    p.add_argument("--eval", type=int, default=8, help="evaluation windows of 256 tokens")
    p.add_argument("--variants", nargs="*", default=list(DEFAULT_ROWS), metavar="NAME",
                   help="rows by name, see variant() (default: DEFAULT_ROWS); --variants with no name: none")
    p.add_argument("--config", action="append", default=[], help="a QUANTIZE config JSON as one more row")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of these results and exit")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.model = smollm2.ensure(args.model)
    # N ranks on one host share its cores: more threads than cores only adds contention.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    result = run(args)
    if rank() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result) + "\n")
    import ds_quant

    ds_quant.shutdown()  # an orderly exit (rc 0, nothing left in /dev/shm)


if __name__ == "__main__":
    main()
