"""Method x data kind -> SQNR (dB) of one FP8 linear's output against a float64 reference.

    python bench/numerics_table.py            # markdown table
Data kinds: Gaussian, Student-t (df=3, heavy tails), and channel outliers: weight rows whose magnitudes
spread over four decades (log-uniform 1e-3..10) and 4 activation channels 30x larger, as in LLMs. FP8's
exponent covers ~2^15, so per-tensor scales only hurt when rows are that far apart: then the small rows
fall into subnormals. Overall SQNR is dominated by the big rows, so the table also gives the worst
output channel's SQNR ("min ch"). Seeds are fixed (ds_quant.testing makes the data);
tests/numerics/test_numerics.py asserts floors.
"""

from __future__ import annotations

from ds_quant.config import ScaleMethod
from ds_quant.testing import KINDS, layer_sqnr


def main() -> None:
    print("| method | " + " | ".join(KINDS) + " | channel_outliers, min ch |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for method in ScaleMethod:
        cells = [layer_sqnr(k, method) for k in KINDS]
        print(f"| {method.value} | " + " | ".join(f"{c[0]:.1f}" for c in cells) + f" | {cells[-1][1]:.1f} |")


if __name__ == "__main__":
    main()
