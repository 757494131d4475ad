"""What each DeepSpeed tensor-parallel linear means: one frozen spec per class, and the forward laid out around
the GEMM from it.

                      input                   GEMM (the only thing ds_quant changes)   after the GEMM
    plain  nn.Linear   x                      x @ W.T                                  + bias
    column LinearLayer x (whole: replicated)  x @ W_shard.T  (W cut on out dim)        + bias_shard [gather]
    row    LinearAllreduce x_shard (sharded)  x_shard @ W_shard.T (W cut on in dim)    allreduce, + bias
    lmhead LmHeadLinearAllreduce x (sliced)   x[..., my slice] @ W_shard.T             allreduce, + bias

`DS_SPECS` names every linear class of DeepSpeed 0.19.8's `module_inject.layers`. The names are only how a
row finds its class: `ds_specs()` resolves them to the class objects, lazily and only if DeepSpeed's layers are
already imported (a model cannot hold them otherwise), and modules match by exact type, so a subclass DeepSpeed
adds later is never matched by accident: it is named in the log as not in the table. Everything else (the
config's type list, the measurement merge rule, the twins' forward) asks the spec.

This module imports no torch at import time: `config` and `measurements` derive their rules from the table and
stay torch-free.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from . import dist


class Kind(str, enum.Enum):
    """The label a layer's measurement record carries (the file format's `kind`)."""
    PLAIN = "plain"
    COLUMN = "column"
    ROW = "row"
    LMHEAD = "lm-head"


class Input(str, enum.Enum):
    """What one rank's layer receives, relative to the full input channels."""
    WHOLE = "whole"  # every rank gets all channels (replicated)
    SHARDED = "sharded"  # arrives already cut: this rank's contiguous slice, placed by the partition sizes
    SLICED = "sliced"  # arrives whole; the layer cuts its own contiguous slice with the frozen partition sizes
    SCATTERED = "scattered"  # this rank's channels are a piece of every sub-parameter, not one slice

    @property
    def split(self) -> bool:
        """Does the GEMM see only part of the input channels? (Then shards concatenate, else take the max.)"""
        return self is not Input.WHOLE


@dataclass(frozen=True)
class TPSpec:
    """How one DeepSpeed TP class lays out its weight and its forward.

    partitioned_dim: dim of the (out, in) weight DeepSpeed cuts (0: out, column-parallel; 1: in, row-parallel).
    gather: the forward honours the module's `gather_output` (LinearLayer.forward does).
    weight_transposed: the source module stored (in, out) (HF `Conv1D`); DeepSpeed's layer holds (out, in), and
        its `_orig_weight_shape` is the transposed (in, out).
    sub_params: a rank's rows are a piece of every sub-parameter (fused q/k/v, packed gate/up), not one block;
        DeepSpeed keeps the sizes in `_subparam_sizes` (None where blocks interleave or replicate). Measurements
        do not care: a column layer's input is whole, and its rows are quantized row by row or per tensor.
    unsupported: why ds_quant leaves the class in high precision (None: supported).
    """
    kind: Kind | None
    partitioned_dim: int | None
    input: Input
    allreduce: bool = False
    gather: bool = False
    weight_transposed: bool = False
    sub_params: bool = False
    unsupported: str | None = None

    @property
    def supported(self) -> bool:
        return self.unsupported is None


PLAIN = TPSpec(Kind.PLAIN, None, Input.WHOLE)
_COLUMN = TPSpec(Kind.COLUMN, 0, Input.WHOLE, gather=True)
_ROW = TPSpec(Kind.ROW, 1, Input.SHARDED, allreduce=True)
_SLICED_ROW = TPSpec(Kind.LMHEAD, 1, Input.SLICED, allreduce=True)
_NOT_A_GEMM = "an embedding lookup, not a GEMM: stays in high precision on purpose"

# DeepSpeed 0.19.8, deepspeed/module_inject/layers.py. Row order: column kinds, row kinds, the rest.
DS_SPECS: MappingProxyType[str, TPSpec] = MappingProxyType({
    "LinearLayer": _COLUMN,
    # Forces gather_output=False: the logits stay rank-local, as DeepSpeed leaves them.
    "VocabParallelLinear": _COLUMN,
    # Fused qkv (Falcon, GPT-NeoX, Bloom, Phi-3, MPT, ...) and packed gate_up (Phi-3, GLM): LinearLayer.forward
    # on rows cut per sub-parameter (or interleaved per head); the GEMM and the bias shard are the same.
    "SubParamColumnParallel": replace(_COLUMN, sub_params=True),  # the base of the next two
    "fused_LinearLayer": replace(_COLUMN, sub_params=True),
    "GateUpPack_LinearLayer": replace(_COLUMN, sub_params=True),
    # AutoTP's partition_config path; its own forward has no gather.
    "SubParamLinearLayer": replace(_COLUMN, gather=False, sub_params=True),
    # Yuan's v_proj: rows are non-contiguous head groups, forward is LinearLayer's.
    "Yuan_LinearLayer": replace(_COLUMN, sub_params=True),
    "conv_LinearLayer": replace(_COLUMN, weight_transposed=True, unsupported=(
        "DeepSpeed 0.19.8 cuts Conv1D's (in, out) weight on its out dim with sizes computed from in, then runs "
        "x @ W.T on it (AutoTP's heuristic path even discards the layer): there is no consistent GEMM to keep")),
    "LinearAllreduce": _ROW,
    # GPT-2's Conv1D c_proj: DeepSpeed transposes the weight to (out, in) before cutting its in dim.
    "Conv_LinearALlreduce": replace(_ROW, weight_transposed=True),
    "LmHeadLinearAllreduce": _SLICED_ROW,
    # Row-parallel head after a replicated layer (training path): cuts its own slice, like the lm-head.
    "LinearAllreduceWithReplicatedInput": _SLICED_ROW,
    "SubParamLinearAllreduce": replace(_ROW, input=Input.SCATTERED, sub_params=True, unsupported=(
        "its input channels are scattered over sub-parameters; merging them into model-level measurements is "
        "not implemented")),
    "Yuan_LinearAllreduce": replace(_ROW, input=Input.SCATTERED, unsupported=(
        "Yuan's shared-QK split gives each rank non-contiguous input head groups and a pre-divided bias; not "
        "implemented")),
    "VocabParallelEmbedding": TPSpec(None, 0, Input.WHOLE, unsupported=_NOT_A_GEMM),
    "HiddenParallelEmbedding": TPSpec(None, 1, Input.WHOLE, unsupported=_NOT_A_GEMM),
})

# Class names a config's `types` may name (HQT's convention): nn.Linear, its checked subclasses, and every
# supported DeepSpeed class.
LINEAR_TYPE_NAMES = ("Linear", "FalconLinear")
SUPPORTED_TYPE_NAMES = LINEAR_TYPE_NAMES + tuple(n for n, s in DS_SPECS.items() if s.supported)
# DeepSpeed classes ds_quant knows and leaves in high precision, with the reason.
UNSUPPORTED_TYPE_REASONS = MappingProxyType({n: s.unsupported for n, s in DS_SPECS.items() if not s.supported})
# The merge rule: for these kinds each rank recorded its own slice of the input channels.
SPLIT_INPUT_KINDS = frozenset(s.kind.value for s in DS_SPECS.values() if s.supported and s.input.split)


def ds_specs() -> dict[type, TPSpec]:
    """DeepSpeed's TP class objects -> spec; empty when DeepSpeed's layers were never imported. A name missing
    from the installed DeepSpeed is skipped."""
    layers = sys.modules.get("deepspeed.module_inject.layers")
    if layers is None:
        return {}
    return {cls: spec for name, spec in DS_SPECS.items() if isinstance(cls := getattr(layers, name, None), type)}


def spec_of(module) -> TPSpec | None:
    """The spec of a layer ds_quant can patch, or None (see `unhandled_tp_reason` for why)."""
    spec, _ = _resolve(module)
    return spec


def kind_of(module) -> Kind | None:
    spec = spec_of(module)
    return None if spec is None else spec.kind


def unhandled_tp_reason(module) -> str | None:
    """Why a DeepSpeed TP layer or an nn.Linear subclass is left in high precision; None if it is patchable
    or is neither."""
    return _resolve(module)[1]


def _resolve(module) -> tuple[TPSpec | None, str | None]:
    from torch import nn

    cls = type(module)
    if cls is nn.Linear:
        return PLAIN, None
    spec = ds_specs().get(cls)
    if spec is not None:
        if not spec.supported:
            return None, f"DeepSpeed TP class {cls.__name__}: {spec.unsupported}; left in high precision"
        problem = _layout_problem(module, spec)
        if problem:
            return None, f"DeepSpeed TP class {cls.__name__}: {problem}; left in high precision"
        return spec, None
    layers = sys.modules.get("deepspeed.module_inject.layers")
    if layers is not None and isinstance(module, layers.TensorParallel_Layer) and hasattr(module, "weight"):
        return None, (f"DeepSpeed TP class {cls.__name__} is not in ds_quant's table (written for DeepSpeed "
                      "0.19.8); left in high precision")
    if isinstance(module, nn.Linear):
        mismatch = linear_forward_mismatch(module)
        if mismatch:
            return None, f"subclass {cls.__name__} of nn.Linear: {mismatch}; left in high precision"
        return PLAIN, None
    return None, None


def linear_forward_mismatch(module) -> str | None:
    """Why an nn.Linear subclass's forward is not x @ W.T + b, or None if it is.

    Checked by behaviour, not by name: an inherited nn.Linear.forward is accepted as is; an overridden one (e.g.
    transformers' FalconLinear, `input @ W.T + bias`) is run once on a small seeded input and compared with
    float32 x @ W.T + b. Tolerance: 2^-6 of |x| @ |W|.T + |b| per element, ~4 bf16 roundings; a forward that
    scales, adds, drops the bias or returns something else misses it by far more."""
    import torch
    from torch import nn

    if type(module).forward is nn.Linear.forward:
        return None
    w, b = module.weight, module.bias
    if w.device.type == "meta":
        return f"{type(module).__name__}.forward overrides nn.Linear.forward and its weights are on meta (cannot check it)"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, w.shape[1], generator=g).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            y = module(x)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain linear"
        return f"its forward failed on a (2, {w.shape[1]}) input ({type(e).__name__}: {e})"
    if not isinstance(y, torch.Tensor) or y.shape != (2, w.shape[0]):
        return f"its forward returns {type(y).__name__}{'' if not isinstance(y, torch.Tensor) else tuple(y.shape)}, " \
               f"not a (2, {w.shape[0]}) tensor"
    with torch.no_grad():
        ref = x.float() @ w.float().t() + (0 if b is None else b.float())
        bound = x.float().abs() @ w.float().abs().t() + (0 if b is None else b.float().abs())
        err = (y.float() - ref).abs()
    if not bool((err <= bound * 2 ** -6 + 1e-6).all()):
        return f"its forward is not x @ W.T + b (max deviation {float(err.max()):.3g})"
    return None


def _layout_problem(module, spec: TPSpec) -> str | None:
    """A DeepSpeed layer whose frozen partition sizes do not describe its own weight (its forward would fail)."""
    if spec.weight_transposed and module.mp_group is None:
        return ("built without a TP group, DeepSpeed never transposed Conv1D's (in, out) weight, so its own forward "
                "(x @ W.T) is not the layer's")
    if not spec.input.split:
        return None
    sizes = tuple(int(s) for s in module._partition_sizes)
    out_full, in_full = _orig_shape(module, spec)
    if sum(sizes) != in_full or sizes[int(module.tp_index)] != module.weight.shape[1]:
        return (f"its partition sizes {sizes} do not describe its input dim ({in_full} features, "
                f"{module.weight.shape[1]} on rank {int(module.tp_index)})")
    return None


def _orig_shape(module, spec: TPSpec) -> tuple[int, int]:
    """(out_features, in_features) of the whole layer, from the shape DeepSpeed recorded before cutting."""
    shape = tuple(int(s) for s in module._orig_weight_shape)
    return (shape[1], shape[0]) if spec.weight_transposed else (shape[0], shape[1])


@dataclass(frozen=True)
class TPLayout:
    """Where the GEMM sits in one rank's forward. `partition_sizes` are DeepSpeed's frozen split of the
    partitioned dimension (out dim for column, in dim for row / lm-head); `()` for a plain linear. `spec`
    defaults to the kind's canonical DeepSpeed class; `full` is the whole layer's (out, in) where DeepSpeed
    recorded it (sub-parameter layers have no partition sizes to add up)."""
    kind: Kind
    tp_rank: int = 0
    tp_size: int = 1
    partition_sizes: tuple[int, ...] = ()
    gather_output: bool = False
    mp_group: Any = None
    spec: TPSpec | None = field(default=None, compare=False)
    full: tuple[int, int] | None = None

    def __post_init__(self):
        if self.spec is None:
            object.__setattr__(self, "spec", _CANONICAL[self.kind])

    @classmethod
    def of(cls, module) -> TPLayout:
        spec = spec_of(module)
        if spec is None:
            raise TypeError(f"{type(module).__name__} is not a linear ds_quant can patch: "
                            f"{unhandled_tp_reason(module) or 'not a linear'}")
        if spec is PLAIN:
            return cls(kind=Kind.PLAIN, spec=spec)
        # Rank and size come from the module's own group (DeepSpeed stored them from mp_group), never
        # from the environment: a TP group need not be the world.
        return cls(kind=spec.kind, tp_rank=int(module.tp_index), tp_size=int(module.tp_world_size),
                   partition_sizes=tuple(int(s) for s in getattr(module, "_partition_sizes", ())),
                   gather_output=spec.gather and bool(getattr(module, "gather_output", False)),
                   mp_group=module.mp_group, spec=spec, full=_orig_shape(module, spec))

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def shard_offset(self) -> int:
        return sum(self.partition_sizes[: self.tp_rank])

    def full_shape(self, local_out: int, local_in: int) -> tuple[int, int]:
        """(out_features, in_features) of the whole, unpartitioned layer."""
        if self.full is not None:
            return self.full
        if self.spec.partitioned_dim == 0:
            return sum(self.partition_sizes), local_in
        if self.spec.partitioned_dim == 1:
            return local_out, sum(self.partition_sizes)
        return local_out, local_in

    def input_slice(self) -> slice | None:
        """This rank's slice of the full input channels (None: input is whole)."""
        if self.spec.input.split:
            return slice(self.shard_offset, self.shard_offset + self.partition_sizes[self.tp_rank])
        return None

    # -- forward pieces --------------------------------------------------------------------------------
    def local_input(self, x):
        """A sliced-input layer takes the full hidden state and cuts it with the sizes DeepSpeed froze on it."""
        if self.spec.input is Input.SLICED:
            if x.shape[-1] != sum(self.partition_sizes):
                raise ValueError(f"{self.kind.value} layer was partitioned for {sum(self.partition_sizes)} input "
                                 f"features, got {x.shape[-1]}")
            s = self.input_slice()
            return x[..., s.start:s.stop]
        return x

    def finish(self, y_local, bias):
        """Everything DeepSpeed does after its matmul, in its order."""
        if self.spec.allreduce:
            y_local = self._allreduce(y_local)
        if bias is not None:
            y_local = y_local + bias
        if self.gather_output:
            from deepspeed.module_inject.layers import GatherFromTensorParallelRegion

            y_local = GatherFromTensorParallelRegion.apply(self.mp_group, y_local, self.partition_sizes)
        return y_local

    # -- statistics over the ranks that hold the rest of a weight (conversion time, not the forward) -----
    def reducers(self, per_channel: bool):
        """(max, sum) over the ranks holding the rest of what a weight statistic covers: the whole tensor
        (per tensor: every sharded kind), or whole rows (per channel: only an in-dim cut splits rows)."""
        dim = self.spec.partitioned_dim
        sharded = dim == 1 if per_channel else dim is not None
        return dist.reducers(self.mp_group if self.tp_size > 1 else None, sharded)

    def _allreduce(self, y):
        return dist.inference_all_reduce(y, self.mp_group)


_CANONICAL = {Kind.PLAIN: PLAIN, Kind.COLUMN: DS_SPECS["LinearLayer"], Kind.ROW: DS_SPECS["LinearAllreduce"],
              Kind.LMHEAD: DS_SPECS["LmHeadLinearAllreduce"]}
