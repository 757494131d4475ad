"""Method x data kind -> SQNR (dB) of one FP8 linear's output against a float64 reference.

    python bench/numerics_table.py            # markdown table
Data kinds: Gaussian, Student-t (df=3, heavy tails), and channel outliers: weight rows whose magnitudes
spread over four decades (log-uniform 1e-3..10) and 4 activation channels 30x larger, as in LLMs. FP8's
exponent covers ~2^15, so per-tensor scales only hurt when rows are that far apart: then the small rows
fall into subnormals. Overall SQNR is dominated by the big rows, so the table also gives the worst
output channel's SQNR ("min ch"). Seeds are fixed; tests/test_numerics.py asserts floors.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_quant.config import QuantConfig, ScaleMethod
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import sqnr_db

KINDS = ("gaussian", "student_t", "channel_outliers")


def make_data(kind: str, out_features: int = 256, in_features: int = 512, tokens: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "student_t":
        t = torch.distributions.StudentT(3.0)
        torch.manual_seed(seed)
        w, x = t.sample((out_features, in_features)) * 0.02, t.sample((tokens, in_features))
    else:
        w = torch.randn(out_features, in_features, generator=g) * 0.02
        x = torch.randn(tokens, in_features, generator=g)
        if kind == "channel_outliers":
            w *= torch.exp(torch.empty(out_features, 1).uniform_(-3, 1, generator=g) * 2.302585)
            x[:, torch.randperm(in_features, generator=g)[:4]] *= 30
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer, x


def quantize(layer: nn.Linear, x: torch.Tensor, method: ScaleMethod, **cfg) -> Fp8Linear:
    record = {"input_amax": float(x.abs().max()), "weight_amax": float(layer.weight.detach().abs().max()),
              "in_features": x.shape[-1], "input_channel_amax": None}
    return Fp8Linear.from_original(layer, "layer", resolve(QuantConfig(scale_method=method, **cfg), "layer"), record)


def layer_sqnr(kind: str, method: ScaleMethod, **cfg) -> tuple[float, float]:
    """(output SQNR, worst output channel's SQNR) in dB."""
    layer, x = make_data(kind)
    ref = x.double() @ layer.weight.detach().double().t()
    with torch.no_grad():
        y = quantize(layer, x, method, **cfg)(x)
    return sqnr_db(ref, y), min(sqnr_db(ref[:, j], y[:, j]) for j in range(ref.shape[1]))


def main() -> None:
    print("| method | " + " | ".join(KINDS) + " | channel_outliers, min ch |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for method in ScaleMethod:
        cells = [layer_sqnr(k, method) for k in KINDS]
        print(f"| {method.value} | " + " | ".join(f"{c[0]:.1f}" for c in cells) + f" | {cells[-1][1]:.1f} |")


if __name__ == "__main__":
    main()
