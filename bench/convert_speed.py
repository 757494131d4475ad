"""Conversion time of one 4096x4096 bf16 weight per scale method, as ratios to plain maxabs, in one run.

    python bench/convert_speed.py [--size 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from ds_quant.config import DeviceForScales, Fp8Format, ScaleMethod
from ds_quant.scales import PROFILES, RECIPES, fp8_dtype, to_fp8_saturated, weight_to_scale


def convert(w: torch.Tensor, method: ScaleMethod) -> torch.Tensor:
    recipe, dtype, profile = RECIPES[method], fp8_dtype(Fp8Format.E4M3), PROFILES[DeviceForScales.CUDA]
    scale = weight_to_scale(w, recipe, dtype, profile)
    return to_fp8_saturated(w, scale[:, None] if scale.dim() else scale, dtype, profile.fp8_max(dtype))


def seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16) * 0.02
    pairs = [(ScaleMethod.MAXABS_HW_OPT_WEIGHT, ScaleMethod.MAXABS_HW),
             (ScaleMethod.MAXABS_POW2_OPT_WEIGHT, ScaleMethod.MAXABS_POW2),
             (ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2, ScaleMethod.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2)]
    base = seconds(lambda: convert(w, ScaleMethod.MAXABS_HW), args.repeat)
    print(f"{args.size}x{args.size} bf16 on {torch.get_num_threads()} threads; maxabs_hw: {base * 1e3:.0f} ms "
          f"(best of {args.repeat})")
    print("| method | ms | / maxabs_hw | / its maxabs counterpart |\n|---|---|---|---|")
    for opt, plain in pairs:
        t_opt, t_plain = seconds(lambda m=opt: convert(w, m), args.repeat), seconds(lambda m=plain: convert(w, m),
                                                                                    args.repeat)
        print(f"| {opt.value} | {t_opt * 1e3:.0f} | {t_opt / base:.2f} | {t_opt / t_plain:.2f} |")


if __name__ == "__main__":
    main()
