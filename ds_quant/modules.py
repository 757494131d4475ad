"""The measured twin and the FP8 twin of a linear.

Both keep the original layer's tensor-parallel layout (`tp.TPLayout`): the local input, DeepSpeed's
allreduce and bias placement. The GEMM is the only thing they change. Mode is the class: a layer is
built from the original with `from_original(...)` and never switches behaviour at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ActScope, MeasureExclude, QuantConfig
from .observers import MaxAbsObserver
from .scales import (
    PROFILES,
    RECIPES,
    Act,
    fp8_dtype,
    input_to_scale,
    per_token_scale,
    quantize_weight,
    tensor_to_amax,
    to_fp8_saturated,
)
from .tp import Kind, TPLayout


class _TwinLinear(nn.Module):
    """local input -> GEMM (subclass) -> DeepSpeed's steps after its matmul (allreduce, bias, gather)."""

    def __init__(self, name: str, layout: TPLayout, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.name = name
        self.layout = layout
        self.out_dtype = out_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_local = self.layout.local_input(x)
        # nn.Linear adds its bias inside the GEMM; DeepSpeed's layers add it after (row: after the allreduce).
        fused_bias = self.bias if self.layout.kind is Kind.PLAIN else None
        y = self.gemm(x_local, fused_bias)
        return self.layout.finish(y, None if self.layout.kind is Kind.PLAIN else self.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class MeasuredLinear(_TwinLinear):
    """Computes exactly what the original computes, and records max-abs statistics on the way."""

    def __init__(self, name: str, layout: TPLayout, weight: torch.Tensor, bias: torch.Tensor | None,
                 exclude: MeasureExclude):
        super().__init__(name, layout, bias, weight.dtype)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares storage with the original
        self.observer = MaxAbsObserver(weight.shape[1], exclude, device=weight.device)

    @classmethod
    def from_original(cls, module: nn.Module, name: str, config: QuantConfig) -> MeasuredLinear:
        return cls(name, TPLayout.of(module), module.weight, module.bias, config.measure_exclude)

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.observer.observe_input(x_local)
        if bias is not None:
            return F.linear(x_local, self.weight, bias)
        return torch.matmul(x_local, self.weight.transpose(-1, -2))  # as DeepSpeed's layers do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.observer.observe_output(y)  # the layer's real output: after allreduce / bias / gather
        return y

    def stats(self) -> dict:
        out_full, in_full = self.layout.full_shape(self.out_features, self.in_features)
        return {"kind": self.layout.kind.value, "in_features": in_full, "out_features": out_full,
                "local_in_features": self.in_features, "partition_sizes": list(self.layout.partition_sizes),
                **self.observer.stats(self.weight)}

    def extra_repr(self) -> str:
        return f"{self.layout.kind.value}, in={self.in_features}, out={self.out_features}, samples={self.observer.samples}"


def scaled_mm_unsupported_reason(device: torch.device, out_features: int, in_features: int,
                                 rowwise: bool = False) -> str | None:
    """Why `torch._scaled_mm` cannot run this GEMM here, or None if it can."""
    if in_features == 0 or out_features == 0:
        return "empty shard (DeepSpeed gave this rank no channels)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            return "this GPU has no FP8 GEMM (needs compute capability 8.9+)"
        if in_features % 16 or out_features % 16:
            return "in/out features not multiples of 16"
        if rowwise and capability < (9, 0):
            return "rowwise scales need compute capability 9.0+; scales applied to the output instead"
        return None
    return f"no FP8 GEMM on device type {device.type}"


class Fp8Linear(_TwinLinear):
    """FP8 weight with per-tensor or per-output-channel scales; activations cast with a static per-tensor
    scale (from the measurements) or dynamic per-token scales; GEMM in FP8, output in the model dtype.
    Exposes `weight` (fp8), `weight_scale` (float32, () or (out,)) and `input_scale` (float32 (), or None
    when dynamic)."""

    def __init__(self, name: str, layout: TPLayout, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 input_scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 act_limit: float):
        super().__init__(name, layout, bias, out_dtype)
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.act_limit = act_limit  # +-fp8 max of the device profile (240 on Gaudi2)
        self.rowwise = input_scale is None or weight_scale.dim() == 1
        # Rowwise GEMMs take the weight scales as a (1, N) row; built once, not per forward.
        self.register_buffer("_scale_b_row", weight_scale.float().expand(weight_fp8.shape[0]).reshape(1, -1).clone()
                             if self.rowwise else None, persistent=False)
        self.fallback_reason = scaled_mm_unsupported_reason(weight_fp8.device, *weight_fp8.shape,
                                                            rowwise=self.rowwise)

    @classmethod
    def from_original(cls, module: nn.Module, name: str, config: QuantConfig, record: dict | None) -> Fp8Linear:
        """`record` is the layer's measurement (None when the method needs none)."""
        layout = TPLayout.of(module)
        recipe = RECIPES[config.method_for(name)]
        dtype = fp8_dtype(config.fp8_config)
        profile = PROFILES[config.device_for_scales]
        w_hp = module.weight.detach()
        reduce_max, reduce_sum = layout.reducers(recipe.weight_per_channel)
        w_fp8, weight_scale = quantize_weight(w_hp, recipe, dtype, profile, config.weight_backoff, reduce_max,
                                              reduce_sum)
        if record is not None and record.get("weight_amax") is not None:
            _check_weights_unchanged(name, w_hp, record["weight_amax"], layout)
        input_scale = None
        if recipe.act is not Act.DYNAMIC:
            amax = torch.tensor(input_amax(record, layout, config.act_scope) if record else 0.0, device=w_hp.device)
            input_scale = input_to_scale(amax, recipe, dtype, profile, config.input_backoff)
        return cls(name, layout, w_fp8, weight_scale, input_scale, module.bias, w_hp.dtype, profile.fp8_max(dtype))

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x_local.shape[:-1]
        x_2d = x_local.reshape(lead.numel(), x_local.shape[-1])  # (M, K); K may be 0 (empty shard)
        scale_a = per_token_scale(x_2d, self.act_limit) if self.input_scale is None else self.input_scale
        x_fp8 = to_fp8_saturated(x_2d, scale_a, self.weight.dtype, self.act_limit)
        scale_b = self.weight_scale
        if self.rowwise:  # (M, 1) x (1, N): every combination of per-tensor / per-token / per-channel
            if scale_a.dim() == 0:
                scale_a = scale_a.reshape(1, 1).repeat(x_2d.shape[0], 1)  # materialised: stride (1, 1)
            scale_b = self._scale_b_row
        if self.fallback_reason is None:
            # mat2 must be column-major: weight is (N, K) row-major, so .t() is (K, N) column-major.
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=self.out_dtype)
        else:
            # Same FP8 values and scales; accumulate in float32 as the FP8 GEMM does, then apply the scales.
            y = (torch.matmul(x_fp8.float(), self.weight.float().t()) * scale_a * scale_b).to(self.out_dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        path = "scaled_mm" if self.fallback_reason is None else f"dequant ({self.fallback_reason})"
        act = "dynamic per-token" if self.input_scale is None else f"input_scale={float(self.input_scale):.4g}"
        w = "per-channel" if self.weight_scale.dim() else f"weight_scale={float(self.weight_scale):.4g}"
        return (f"{self.layout.kind.value}, in={self.in_features}, out={self.out_features}, {self.weight.dtype}, "
                f"{act}, {w}, {path}")


def input_amax(record: dict, layout: TPLayout, act_scope: ActScope) -> float:
    """The measured input max-abs this rank scales with: the layer's (global, TP-invariant), or, with
    act_scope "rank", the max over this rank's slice of the per-channel statistics."""
    channels = record.get("input_channel_amax")
    part = layout.input_slice()
    if act_scope is ActScope.RANK and part is not None and channels is not None and \
            len(channels) == record["in_features"]:
        return max(channels[part], default=0.0)
    return record["input_amax"]


def _check_weights_unchanged(name: str, w_hp: torch.Tensor, measured_amax: float, layout: TPLayout) -> None:
    # The measurement covers the whole (unsharded) weight; above it means the weights changed since MEASURE.
    reduce_max, _ = layout.reducers(per_channel=False)
    amax = float(reduce_max(tensor_to_amax(w_hp)))
    if amax > measured_amax * (1 + 1e-3) + 1e-12:
        raise ValueError(f"layer '{name}': weight max-abs {amax:.6g} exceeds the measured {measured_amax:.6g}; "
                         "the weights changed since MEASURE. Measure again.")
