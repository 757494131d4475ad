"""The measured twin and the FP8 twin of a linear.

Both keep the original layer's tensor-parallel layout (`tp.TPLayout`): the local input, DeepSpeed's
allreduce and bias placement. The GEMM is the only thing they change. Mode is the class: a layer is
built from the original with `from_original(...)` and never switches behaviour at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MeasureExclude, QuantConfig
from .observers import MaxAbsObserver
from .scales import INPUT_BACKOFF, WEIGHT_BACKOFF, amax_to_scale, fp8_dtype, tensor_to_amax, to_fp8_saturated
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


def scaled_mm_unsupported_reason(device: torch.device, out_features: int, in_features: int) -> str | None:
    """Why `torch._scaled_mm` cannot run this GEMM here, or None if it can."""
    if in_features == 0 or out_features == 0:
        return "empty shard (DeepSpeed gave this rank no channels)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "this GPU has no FP8 GEMM (needs compute capability 8.9+)"
        if in_features % 16 or out_features % 16:
            return "in/out features not multiples of 16"
        return None
    return f"no FP8 GEMM on device type {device.type}"


class Fp8Linear(_TwinLinear):
    """FP8 weight (per-tensor scale), activation cast with a static per-tensor scale, GEMM in FP8,
    output in the model dtype. Exposes `weight` (fp8), `weight_scale` and `input_scale` (float32)."""

    def __init__(self, name: str, layout: TPLayout, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 input_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__(name, layout, bias, out_dtype)
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()))
        self.register_buffer("input_scale", input_scale.float().reshape(()))
        self.fallback_reason = scaled_mm_unsupported_reason(weight_fp8.device, *weight_fp8.shape)

    @classmethod
    def from_original(cls, module: nn.Module, name: str, config: QuantConfig, record: dict | None) -> Fp8Linear:
        """`record` is the layer's measurement (None only for unit_scale)."""
        dtype = fp8_dtype(config.fp8_config)
        w_hp = module.weight.detach()
        w_amax = tensor_to_amax(w_hp)
        if record is not None and record.get("weight_amax") is not None:
            measured = torch.tensor(record["weight_amax"], dtype=torch.float32)
            # The measured amax covers the whole (unsharded) weight, so every TP size quantizes every
            # element with the same scale. A local shard above it means the weights changed since MEASURE.
            if float(w_amax) > float(measured) * (1 + 1e-3) + 1e-12:
                raise ValueError(f"layer '{name}': weight max-abs {float(w_amax):.6g} exceeds the measured "
                                 f"{float(measured):.6g}; the weights changed since MEASURE. Measure again.")
            w_amax = measured
        weight_scale = amax_to_scale(w_amax, config.scale_method, dtype, WEIGHT_BACKOFF).to(w_hp.device)
        input_amax = torch.tensor(record["input_amax"] if record else 0.0, dtype=torch.float32)
        input_scale = amax_to_scale(input_amax, config.scale_method, dtype, INPUT_BACKOFF).to(w_hp.device)
        w_fp8 = to_fp8_saturated(w_hp, weight_scale, dtype)
        return cls(name, TPLayout.of(module), w_fp8, weight_scale, input_scale, module.bias, w_hp.dtype)

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x_local.shape[:-1]
        x_2d = x_local.reshape(-1, x_local.shape[-1])  # (M, K)
        x_fp8 = to_fp8_saturated(x_2d, self.input_scale, self.weight.dtype)
        if self.fallback_reason is None:
            # mat2 must be column-major: weight is (N, K) row-major, so .t() is (K, N) column-major.
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 out_dtype=self.out_dtype)
        else:
            # Same scales, same FP8 values: dequantize and multiply in float32, as the FP8 GEMM accumulates.
            y = (torch.matmul(x_fp8.float(), self.weight.float().t()) * (self.input_scale * self.weight_scale))
            y = y.to(self.out_dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        path = "scaled_mm" if self.fallback_reason is None else f"dequant ({self.fallback_reason})"
        return (f"{self.layout.kind.value}, in={self.in_features}, out={self.out_features}, {self.weight.dtype}, "
                f"input_scale={float(self.input_scale):.4g}, weight_scale={float(self.weight_scale):.4g}, {path}")
