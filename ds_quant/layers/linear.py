"""The measured twin and the FP8 twin of a linear.

Both keep the original layer's tensor-parallel layout (`tp.TPLayout`): the local input, DeepSpeed's
allreduce and bias placement. The GEMM is the only thing they change. Mode is the class: a layer is
built from the original with `from_original(...)` and never switches behaviour at run time. A twin takes its
layer's `LayerSpec` (layer_spec.resolve) and never reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ActScope, MeasureExclude
from ..files.measurements import linear_record
from ..numerics import ops
from ..numerics.layer_spec import LayerSpec, outlier_split, require_spec
from ..numerics.scales import Act
from ..numerics.weights import QuantizedWeight, quantize_weight
from ..parallel import dist
from ..parallel.tp import Kind, TPLayout
from .observers import HessianObserver, MaxAbsObserver


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
                 exclude: MeasureExclude, hessian: bool = False):
        super().__init__(name, layout, bias, weight.dtype)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares storage with the original
        self.observer = MaxAbsObserver(weight.shape[1], exclude, device=weight.device)
        # config `gptq`: Σ xᵀx over the whole input (row-parallel slices all-gathered)
        self.hessian = HessianObserver(layout, layout.full_shape(*weight.shape)[1], weight.device) if hessian else None
        self.dump = None  # observer "save": the rank's TensorDump (tensor_dump.py), shared by its layers

    @classmethod
    def from_original(cls, module: nn.Module, name: str, spec: LayerSpec) -> MeasuredLinear:
        spec = require_spec(spec, "MeasuredLinear.from_original")
        return cls(name, TPLayout.of(module), module.weight, module.bias, spec.measure_exclude, spec.gptq is not None)

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.observer.observe_input(x_local)
        if self.hessian is not None:
            self.hessian.observe(x_local)
        if self.dump is not None:
            self.dump.add(self.name, "input", x_local)
        if bias is not None:
            return F.linear(x_local, self.weight, bias)
        return torch.matmul(x_local, self.weight.transpose(-1, -2))  # as DeepSpeed's layers do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.observer.observe_output(y)  # the layer's real output: after allreduce / bias / gather
        if self.dump is not None:
            self.dump.add(self.name, "output", y)
        return y

    def stats(self) -> dict:
        out_full, in_full = self.layout.full_shape(self.out_features, self.in_features)
        return linear_record(self.layout.kind.value, in_full, out_full, self.observer.stats(self.weight),
                             local_in_features=self.in_features, partition_sizes=self.layout.partition_sizes)

    def extra_repr(self) -> str:
        return f"{self.layout.kind.value}, in={self.in_features}, out={self.out_features}, samples={self.observer.samples}"


class Fp8Linear(_TwinLinear):
    """FP8 weight with per-tensor or per-output-channel scales; activations cast with a static per-tensor
    scale (from the measurements) or dynamic per-token scales; GEMM in FP8, output in the model dtype.
    Exposes `weight` (fp8), `weight_scale` (float32, () or (out,)) and `input_scale` (float32 (), or None
    when dynamic)."""

    def __init__(self, name: str, layout: TPLayout, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 input_scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 act_limit: float, outliers: Outliers | None = None):
        super().__init__(name, layout, bias, out_dtype)
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.act_limit = act_limit  # +-fp8 max of the device profile (240 on Gaudi2)
        # outlier_channels: local input channel indices (k,) and their weight columns (out_local, k), high precision
        self.register_buffer("outlier_index", None if outliers is None else outliers.index, persistent=False)
        self.register_buffer("outlier_weight", None if outliers is None else outliers.weight_hp, persistent=False)

    @property
    def rowwise(self) -> bool:
        return self.input_scale is None or self.weight_scale.dim() == 1

    @property
    def fallback_reason(self) -> str | None:
        """Why this layer runs the slow reference GEMM where its weight is now (None: a fast backend)."""
        return ops.fallback_reason(self.weight.device, *self.weight.shape, rowwise=self.rowwise)

    @classmethod
    def from_original(cls, module: nn.Module, name: str, spec: LayerSpec, record: dict | None,
                      hessian: torch.Tensor | None = None) -> Fp8Linear:
        """`spec`: the layer's numbers (`layer_spec.resolve(config, name)`); `record`: its measurement (None when
        the method needs none); `hessian`: its model-level input Hessian (in_features², config `gptq`), or None
        for round-to-nearest weights."""
        spec = require_spec(spec, "Fp8Linear.from_original")
        layout = TPLayout.of(module)
        w_hp = module.weight.detach()
        if hessian is not None and spec.gptq is not None:
            q, outliers = gptq_weight(name, layout, w_hp, record, spec, hessian)
        else:  # the one weight path (numerics/weights.py), on this rank's slice: statistics reduced over the ranks
            outliers = split_outliers(record, layout, w_hp, spec.outlier_channels) if record else None
            rec = record if outliers is None else outliers.record
            reduce_max, reduce_sum = layout.reducers(spec.recipe.weight_per_channel)
            q = quantize_weight(w_hp, spec, rec, name=name, input_amax=_rank_input_amax(rec, layout, spec),
                                keep=None if outliers is None else outliers.index, reduce_max=reduce_max,
                                reduce_sum=reduce_sum, reduce_tensor_max=layout.reducers(per_channel=False)[0])
        w_fp8, weight_scale, input_scale = q.w_q, q.w_scale, q.input_scale
        return cls(name, layout, w_fp8, weight_scale, input_scale, module.bias, w_hp.dtype, spec.fp8_max, outliers)

    def gemm(self, x_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Outlier channels: their weight columns are zero in FP8 (whatever the saturated cast makes of those
        # inputs adds nothing); their exact contribution is added in high precision.
        y = ops.fp8_linear(x_local, self.weight, self.weight_scale, self.input_scale, self.out_dtype, bias,
                           self.act_limit)
        if self.outlier_index is not None:
            y = y + torch.matmul(x_local.index_select(-1, self.outlier_index).to(self.outlier_weight.dtype),
                                 self.outlier_weight.t()).to(y.dtype)
        return y

    def gemm_plan(self) -> str:
        """Which backend of ds_quant.ops serves this layer where its weight is now, per M."""
        return ops.describe(self.weight.device, *self.weight.shape, rowwise=self.rowwise)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.input_scale is None else f"input_scale={float(self.input_scale):.4g}"
        w = "per-channel" if self.weight_scale.dim() else f"weight_scale={float(self.weight_scale):.4g}"
        gemm = self.gemm_plan()
        hp = "" if self.outlier_index is None else f", {len(self.outlier_index)} outlier channel(s) high precision"
        return (f"{self.layout.kind.value}, in={self.in_features}, out={self.out_features}, {self.weight.dtype}, "
                f"{act}, {w}{hp}, {gemm}")


@dataclass(frozen=True)
class Outliers:
    """One rank's part of a layer's outlier channels (config `outlier_channels`, LLM.int8()-style decomposition)."""
    index: torch.Tensor  # (k,) int64: local input channels
    weight_hp: torch.Tensor  # (out_local, k): their weight columns, high precision
    record: dict  # the measurement without them: input_amax over the other channels


def split_outliers(record: dict, layout: TPLayout, w_hp: torch.Tensor, k: int) -> Outliers | None:
    """The K input channels of largest measured max-abs (model-level, so every TP size picks the same ones)
    stay high precision; the input scale comes from the other channels. None when K = 0, the record has no
    channel statistics, or the local weight is not a slice of them (sub-parameter layouts)."""
    split = outlier_split(record, k)  # the same channels and rest the tables (layer_spec.record_scales) use
    if split is None:
        return None
    top, rest_channels = split
    part = layout.input_slice() or slice(0, len(rest_channels))
    if part.stop - part.start != w_hp.shape[1]:
        return None
    local = top[(top >= part.start) & (top < part.stop)] - part.start
    rest = {**record, "input_amax": float(rest_channels.max()), "input_channel_amax": rest_channels.numpy()}
    local = local.to(w_hp.device)
    return Outliers(local, w_hp[:, local].clone(), rest)


def gptq_weight(name: str, layout: TPLayout, w_hp: torch.Tensor, record: dict | None, spec: LayerSpec,
                hessian: torch.Tensor) -> tuple[QuantizedWeight, Outliers | None]:
    """(this rank's part of the quantized layer, outliers): its weight rounded by GPTQ (the one weight path,
    numerics/weights.py) on the grid of the scale round-to-nearest gives it (outlier columns zeroed, as there).
    GPTQ couples the input channels, so a layer whose rank holds a slice of them (row-parallel) gathers its whole
    weight first (a collective over the TP group): every rank rounds the same whole weight with the same full-K
    Hessian and keeps its columns, so every TP size gets the same FP8 weight. Column-parallel rows are rounded
    where they are (rows are independent). The outlier columns stay high precision and take up the rest of the
    error (GPTQ's compensation), so they differ from the bf16 originals."""
    part = layout.input_slice()
    tensor_max = layout.reducers(per_channel=False)[0]
    if part is not None and layout.tp_size > 1:
        w_full = dist.all_gather_last_dim(w_hp, layout.partition_sizes, layout.mp_group).to(w_hp.dtype)
        reduce_max = reduce_sum = tensor_max = lambda t: t  # noqa: E731 - the whole weight is here
    else:
        w_full, part = w_hp, None
        reduce_max, reduce_sum = layout.reducers(spec.recipe.weight_per_channel)
    split = outlier_split(record, spec.outlier_channels) if record else None
    top, rest_record = None, record
    if split is not None and len(split[1]) == w_full.shape[1]:
        top, rest = split
        rest_record = {**record, "input_amax": float(rest.max()), "input_channel_amax": rest.numpy()}
    q = quantize_weight(w_full, spec, rest_record, hessian, name=name,
                        input_amax=_rank_input_amax(rest_record, layout, spec), keep=top, reduce_max=reduce_max,
                        reduce_sum=reduce_sum, reduce_tensor_max=tensor_max)
    start = 0 if part is None else part.start
    width = w_hp.shape[1]
    codes = q.w_q if part is None else q.w_q[:, start:start + width].contiguous()
    if top is None:
        return replace(q, w_q=codes), None
    mine = (top >= start) & (top < start + width)
    local = (top[mine] - start).to(w_hp.device)
    return replace(q, w_q=codes, keep_hp=None), Outliers(
        local, q.keep_hp[:, mine.to(q.keep_hp.device)].to(w_hp.dtype).contiguous(), rest_record)


def _rank_input_amax(record: dict | None, layout: TPLayout, spec: LayerSpec) -> float | None:
    """The input max-abs this rank scales with (None: no record, a unit range)."""
    return None if record is None or spec.recipe.act is Act.DYNAMIC else input_amax(record, layout, spec.act_scope)


def input_amax(record: dict, layout: TPLayout, act_scope: ActScope) -> float:
    """The measured input max-abs this rank scales with: the layer's (global, TP-invariant), or, with
    act_scope "rank", the max over this rank's slice of the per-channel statistics."""
    channels = record.get("input_channel_amax")
    part = layout.input_slice()
    if act_scope is ActScope.RANK and part is not None and channels is not None and \
            len(channels) == record["in_features"]:
        return max(channels[part], default=0.0)
    return record["input_amax"]
