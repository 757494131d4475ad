"""Error-compensating FP8 weight rounding: GPTQ (Frantar et al., 2022) on the FP8 E4M3 grid. Pure torch.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of a (N, K) weight one at a
time and pushes each column's rounding error onto the columns not yet rounded, weighted by the inverse of the
input Hessian H = sum_t x_t x_tᵀ (K, K, from calibration inputs), so that the layer's output on inputs like
the calibration ones, ‖X Wᵀ − X Ŵᵀ‖, is smaller than RTN's. The grid is the one the layer's FP8 weight uses:
`to_fp8_saturated(w / scale)` with the per-tensor or per-output-channel scale QUANTIZE computes anyway, so
only which grid point each weight goes to changes, never the scale or the format.

Rows are independent: each output channel is rounded with the same H, so any split of the rows (the
column-parallel shards of tensor parallelism) gives the same rows. Columns are not: a row-parallel layer
needs its whole weight and the full-K Hessian, which is why the Hessian is model-level (full `in_features`).

`keep`: columns that stay high precision (`outlier_channels`): they are ordered last and never rounded, so
they take up the rest of the error of every rounded column (zero cost: they are bf16 anyway).

All the arithmetic is float64: the result is a deterministic function of (w, H, scale) up to the last bits of
float64 GEMMs, far below the FP8 spacing, so every TP size rounds to the same grid points.
"""

from __future__ import annotations

import torch

from ..config import GptqParams
from ..errors import HessianError
from .scales import to_fp8_saturated

__all__ = ["GptqParams", "HessianError", "gptq_round", "hessian_add"]


def hessian_add(h: torch.Tensor, x: torch.Tensor) -> None:
    """h (K, K) float64 += xᵀ x over every row (token) of x (..., K), in place."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    h.addmm_(x2.t(), x2)


def gptq_round(w_hp: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fmax: float,
               params: GptqParams | None = None, keep: torch.Tensor | None = None, name: str = "weight"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 (N, K) in `dtype`, keep_hp (N, len(keep)) float64, columns in ascending channel order): the FP8
    codes of w_hp (N, K) under `scale` (() per tensor or (N,) per output channel, the convention of scales.py:
    w ≈ w_fp8 * scale), rounded by GPTQ with `hessian` (K, K); the `keep` columns (input channel indices) are 0 in w_fp8 and returned,
    error-compensated, in keep_hp. With a diagonal Hessian (uncorrelated inputs) this is RTN, exactly."""
    params = GptqParams() if params is None else params
    n, k = w_hp.shape
    if hessian.shape != (k, k):
        raise HessianError(f"{name}: Hessian of shape {tuple(hessian.shape)} for a weight of {k} input channels")
    h = hessian.to(torch.float64, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise HessianError(f"{name}: the Hessian has non-finite values; measure again")
    diag = h.diagonal()
    dead = diag <= 0  # channels that never saw a non-zero input: their rows / columns of H are 0
    live_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = live_mean
    diag += params.damp * live_mean

    keep_mask = torch.zeros(k, dtype=torch.bool)
    if keep is not None and len(keep):
        keep_mask[keep.cpu().long()] = True
    order = torch.argsort(-diag.cpu(), stable=True) if params.act_order else torch.arange(k)
    order = torch.cat([order[~keep_mask[order]], order[keep_mask[order]]])  # kept columns last
    n_round = int((~keep_mask).sum())
    order_dev = order.to(w_hp.device)
    w = w_hp.to(torch.float64)[:, order_dev].clone()
    h = h.to(w_hp.device)[order_dev][:, order_dev]
    try:
        # Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U): row i of U, divided by U[i, i], is how the error of column
        # i spreads over the columns after it once the columns before it are fixed (GPTQ's Cholesky form).
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(f"{name}: the damped Hessian is not positive definite (damp {params.damp:g}); "
                           "raise 'damp' or measure on more tokens") from None

    s = scale.to(w.device, torch.float32)
    s_col = s.reshape(-1, 1) if s.dim() else s  # (N, 1) rows or a scalar
    codes = torch.zeros((n, k), dtype=dtype, device=w.device)
    block = max(1, int(params.block))
    for i1 in range(0, n_round, block):
        i2 = min(i1 + block, n_round)
        wb = w[:, i1:i2].clone()
        err = torch.zeros_like(wb)
        ub = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = wb[:, j:j + 1]
            q = to_fp8_saturated(col, s_col, dtype, fmax)
            codes[:, i1 + j:i1 + j + 1] = q
            e = (col - q.to(torch.float64) * s_col.to(torch.float64)) / ub[j, j]
            wb[:, j + 1:] -= e * ub[j, j + 1:]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    inverse = torch.argsort(order_dev)
    codes = codes[:, inverse]
    keep_hp = w[:, n_round:][:, torch.argsort(order[n_round:]).to(w.device)] if n_round < k else w[:, :0]
    return codes, keep_hp


