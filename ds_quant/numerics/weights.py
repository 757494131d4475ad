"""The one weight path: a high-precision weight + its LayerSpec + its measurement record (+ Hessian) -> the
quantized weight, its scale and the layer's input scale.

Every producer of quantized weights calls `quantize_weight` (and, for the input scale, `input_scale`): the FP8
linear and experts twins (in-memory QUANTIZE), `ds-quant convert`, and quantize-on-load (a bf16 folder read in
row blocks), so they agree by construction: the same check that the weights are the measured ones, the same
scale (round-to-nearest, or the weight search), the same GPTQ rounding on that scale's grid. The source is a
whole weight, a rank's slice of one (with `reduce_max` / `reduce_sum` combining statistics over the ranks that
hold the rest), or `RowBlocks` streamed from a folder (scales only; `cast_rows` casts the rows a rank asks for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import MeasurementError
from .gptq import gptq_round
from .layer_spec import LayerSpec
from .scales import (
    Act,
    Reduce,
    cast_weight_block,
    input_to_scale,
    quantize_weight_blocks,
    tensor_to_amax,
    weight_scale_blocks,
)
from .scales import quantize_weight as _quantize_weight_recipe


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class RowBlocks:
    """A whole (N, K) weight as its consecutive row blocks: `blocks()` yields them (called once per pass)."""
    blocks: Callable[[], Iterable[torch.Tensor]]
    shape: tuple[int, int]
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class QuantizedWeight:
    """`w_q` (N, K) in the spec's FP8 dtype (None for `RowBlocks` without `out`: cast with `cast_rows`), `w_scale`
    float32 (() per tensor, (N,) per output channel), `input_scale` float32 () (None when dynamic), and for GPTQ with
    kept columns their error-compensated high-precision values `keep_hp` (N, len(keep)) float64."""
    w_q: torch.Tensor | None
    w_scale: torch.Tensor
    input_scale: torch.Tensor | None
    keep_hp: torch.Tensor | None = None


def quantize_weight(w_hp: torch.Tensor | RowBlocks, spec: LayerSpec, record: dict | None = None,
                    hessian: torch.Tensor | None = None, *, name: str | None = None, input_amax: float | None = None,
                    keep: torch.Tensor | None = None, reduce_max: Reduce = _identity, reduce_sum: Reduce = _identity,
                    reduce_tensor_max: Reduce = _identity, out: torch.Tensor | None = None) -> QuantizedWeight:
    """The quantized weight of layer `name` under `spec`.

    `record`: its measurement (None when the method needs none): the weight must not exceed its measured max-abs
    (MeasurementError otherwise), and the input scale comes from its `input_amax` (or `input_amax` given: an
    outlier split's or a rank's own). `hessian` (K, K): GPTQ rounding (spec.gptq) on the same scale's grid.
    `keep`: input channels (columns) that stay high precision: zero in the quantized weight and left out of its
    scale (with GPTQ they take up the rest of the error, returned in keep_hp). `reduce_max` / `reduce_sum`:
    the scale's statistics over the ranks holding the rest of the weight (scales.quantize_weight);
    `reduce_tensor_max`: the weight's max-abs over them (the check). `out`: where RowBlocks' FP8 rows go."""
    name = spec.name if name is None else name
    recipe = spec.recipe
    if isinstance(w_hp, RowBlocks):
        if recipe.weight_opt or hessian is not None or keep is not None:
            raise ValueError(f"layer '{name}': the weight search, GPTQ and kept columns need the whole weight")
        if out is None:
            scale, top = weight_scale_blocks(w_hp.blocks(), w_hp.shape[0], recipe, spec.fp8_dtype, spec.profile,
                                             spec.weight_backoff, reduce_max, w_hp.device)
            w_q = None
        else:
            w_q, scale, top = quantize_weight_blocks(w_hp.blocks, w_hp.shape, recipe, spec.fp8_dtype, spec.profile,
                                                     spec.weight_backoff, reduce_max, w_hp.device, out)
        check_unchanged(name, top, record)  # the blocks are the whole weight
        return QuantizedWeight(w_q, scale, input_scale(spec, record, input_amax, w_hp.device))
    if record is not None and record.get("weight_amax") is not None:
        check_unchanged(name, float(reduce_tensor_max(weight_amax(w_hp))), record)
    w_rest = w_hp
    if keep is not None:
        w_rest = w_hp.clone()
        w_rest[:, keep.to(w_hp.device)] = 0
    w_q, scale = _quantize_weight_recipe(w_rest, recipe, spec.fp8_dtype, spec.profile, spec.weight_backoff,
                                         reduce_max, reduce_sum)
    keep_hp = None
    if hessian is not None:
        w_q, keep_hp = gptq_round(w_hp, hessian, scale, spec.fp8_dtype, spec.fp8_max, spec.gptq, keep=keep,
                                  name=name)
    return QuantizedWeight(w_q, scale.float(), input_scale(spec, record, input_amax, w_hp.device), keep_hp)


def input_scale(spec: LayerSpec, record: dict | None, amax: float | None = None,
                device: torch.device | str | None = None) -> torch.Tensor | None:
    """The layer's static per-tensor input scale (float32 ()), from `amax` or else the record's measured input
    max-abs (0 without a record: unit_scale needs none); None when its activations are scaled per token."""
    if spec.recipe.act is Act.DYNAMIC:
        return None
    if amax is None:
        amax = float((record or {}).get("input_amax") or 0.0)
    return input_to_scale(torch.as_tensor(amax, dtype=torch.float32, device=device), spec.recipe, spec.fp8_dtype,
                          spec.profile, spec.input_backoff).reshape(())


def cast_rows(block: torch.Tensor, w_scale: torch.Tensor, first_row: int, spec: LayerSpec) -> torch.Tensor:
    """FP8 of rows first_row.. (any of their columns) of a weight whose scale `quantize_weight` gave (`w_scale`):
    bitwise the whole weight's cast."""
    return cast_weight_block(block, w_scale, first_row, spec.fp8_dtype, spec.profile)


def weight_amax(w_hp: torch.Tensor) -> torch.Tensor:
    """The weight's max-abs (float32 ()), in row blocks: no float32 copy of the whole weight."""
    parts = [tensor_to_amax(c) for c in w_hp.split(1 << 12)] if w_hp.dim() and w_hp.shape[0] else []
    return torch.stack(parts).amax() if parts else torch.zeros((), dtype=torch.float32, device=w_hp.device)


def check_unchanged(name: str, amax: float, record: dict | None) -> None:
    """The weight's max-abs `amax` may not exceed the measured one (the record covers the whole weight): above it,
    the weights changed since MEASURE and the measured input statistics belong to other weights."""
    measured = None if record is None else record.get("weight_amax")
    if measured is not None and amax > measured * (1 + 1e-3) + 1e-12:
        raise MeasurementError(f"layer '{name}': weight max-abs {amax:.6g} exceeds the measured {measured:.6g}; the "
                               "weights changed since MEASURE. Measure again.")
