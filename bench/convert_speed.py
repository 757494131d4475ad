"""Conversion time of one 4096x4096 bf16 weight per scale method, as ratios to plain maxabs, in one run.

    python bench/convert_speed.py [--size 4096] [--repeat 11]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ds_quant.config import DeviceForScales, Fp8Format, ScaleMethod
from ds_quant.numerics.scales import PROFILES, RECIPES, fp8_dtype, quantize_weight


def convert(w: torch.Tensor, method: ScaleMethod) -> torch.Tensor:
    """What Fp8Linear.from_original does to a weight: scale(s) and the FP8 cast."""
    return quantize_weight(w, RECIPES[method], fp8_dtype(Fp8Format.E4M3), PROFILES[DeviceForScales.CUDA])[0]


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ratio(fn_a, fn_b, repeat: int) -> tuple[float, float, float]:
    """(median a/b over interleaved pairs, median seconds of a, of b): interleaving cancels machine drift."""
    fn_a(), fn_b()  # warm-up
    pairs = [(seconds(fn_a), seconds(fn_b)) for _ in range(repeat)]
    return (statistics.median(x / y for x, y in pairs), statistics.median(x for x, _ in pairs),
            statistics.median(y for _, y in pairs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=11)
    args = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16) * 0.02
    pairs = [(ScaleMethod.MAXABS_HW_OPT_WEIGHT, ScaleMethod.MAXABS_HW),
             (ScaleMethod.MAXABS_POW2_OPT_WEIGHT, ScaleMethod.MAXABS_POW2),
             (ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2, ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2)]
    print(f"{args.size}x{args.size} bf16 weight, {torch.get_num_threads()} threads; medians of {args.repeat} "
          "interleaved pairs")
    print("| method | ms | / maxabs_hw | / its maxabs counterpart |\n|---|---|---|---|")
    for opt, plain in pairs:
        r_hw, t_opt, t_hw = ratio(lambda m=opt: convert(w, m), lambda: convert(w, ScaleMethod.MAXABS_HW), args.repeat)
        r_plain, _, _ = ratio(lambda m=opt: convert(w, m), lambda m=plain: convert(w, m), args.repeat)
        print(f"| {opt.value} | {t_opt * 1e3:.0f} (maxabs_hw {t_hw * 1e3:.0f}) | {r_hw:.2f} | {r_plain:.2f} |")


if __name__ == "__main__":
    main()
