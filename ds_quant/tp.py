"""What each DeepSpeed tensor-parallel linear means, and how its forward is laid out around the GEMM.

                      input            GEMM (the only thing ds_quant changes)   after the GEMM
    plain  nn.Linear  x                x @ W.T                                  + bias
    column LinearLayer x (replicated)  x @ W_shard.T  (W split on out dim)      + bias_shard [gather]
    row    LinearAllreduce x_shard     x_shard @ W_shard.T (W split on in dim)  allreduce, + bias
    lmhead LmHeadLinearAllreduce x     x[..., my slice] @ W_shard.T             allreduce, + bias

The registry maps DeepSpeed's class *objects* (found lazily, only if DeepSpeed is already imported:
a model cannot hold DeepSpeed layers otherwise) to a kind. Types match exactly, so subclasses
DeepSpeed adds (fused, sub-param, conv variants) are never matched by accident.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class Kind(str, enum.Enum):
    PLAIN = "plain"
    COLUMN = "column"
    ROW = "row"
    LMHEAD = "lm-head"


def ds_layer_kinds() -> dict[type, Kind]:
    """DeepSpeed's TP linear classes -> kind; empty when DeepSpeed's layers were never imported."""
    layers = sys.modules.get("deepspeed.module_inject.layers")
    if layers is None:
        return {}
    return {layers.LinearLayer: Kind.COLUMN, layers.LinearAllreduce: Kind.ROW,
            layers.LmHeadLinearAllreduce: Kind.LMHEAD}


def kind_of(module: nn.Module) -> Kind | None:
    if type(module) is nn.Linear:
        return Kind.PLAIN
    return ds_layer_kinds().get(type(module))


def unhandled_tp_reason(module: nn.Module) -> str | None:
    """Why a DeepSpeed TP layer is left in high precision, or None if it is not one."""
    layers = sys.modules.get("deepspeed.module_inject.layers")
    if layers is None or kind_of(module) is not None:
        return None
    if isinstance(module, layers.TensorParallel_Layer) and hasattr(module, "weight"):
        return f"DeepSpeed TP class {type(module).__name__} is not supported by ds_quant; left in high precision"
    if isinstance(module, nn.Linear):
        return f"subclass {type(module).__name__} of nn.Linear is not matched (exact types only)"
    return None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TPLayout:
    """Where the GEMM sits in one rank's forward. `partition_sizes` are DeepSpeed's frozen split of the
    partitioned dimension (out dim for column, in dim for row / lm-head); `()` for a plain linear."""

    kind: Kind
    tp_rank: int = 0
    tp_size: int = 1
    partition_sizes: tuple[int, ...] = ()
    gather_output: bool = False
    mp_group: Any = None

    @classmethod
    def of(cls, module: nn.Module) -> TPLayout:
        kind = kind_of(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} is not a linear ds_quant can patch")
        if kind is Kind.PLAIN:
            return cls(kind=kind)
        # Rank and size come from the module's own group (DeepSpeed stored them from mp_group), never
        # from the environment: a TP group need not be the world.
        return cls(kind=kind, tp_rank=int(module.tp_index), tp_size=int(module.tp_world_size),
                   partition_sizes=tuple(int(s) for s in module._partition_sizes),
                   gather_output=bool(getattr(module, "gather_output", False)), mp_group=module.mp_group)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def shard_offset(self) -> int:
        return sum(self.partition_sizes[: self.tp_rank])

    def full_shape(self, local_out: int, local_in: int) -> tuple[int, int]:
        """(out_features, in_features) of the whole, unpartitioned layer."""
        if self.kind is Kind.COLUMN:
            return sum(self.partition_sizes), local_in
        if self.kind in (Kind.ROW, Kind.LMHEAD):
            return local_out, sum(self.partition_sizes)
        return local_out, local_in

    def input_slice(self) -> slice | None:
        """This rank's slice of the full input channels (None: input is replicated/whole)."""
        if self.kind in (Kind.ROW, Kind.LMHEAD):
            return slice(self.shard_offset, self.shard_offset + self.partition_sizes[self.tp_rank])
        return None

    # -- forward pieces --------------------------------------------------------------------------------
    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        """lm-head takes the full hidden state and cuts it with the sizes DeepSpeed froze on the module."""
        if self.kind is Kind.LMHEAD:
            if x.shape[-1] != sum(self.partition_sizes):
                raise ValueError(f"lm_head was partitioned for {sum(self.partition_sizes)} input features, "
                                 f"got {x.shape[-1]}")
            s = self.input_slice()
            return x[..., s.start:s.stop]
        return x

    def finish(self, y_local: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Everything DeepSpeed does after its matmul, in its order."""
        if self.kind in (Kind.ROW, Kind.LMHEAD):
            y_local = self._allreduce(y_local)
        if bias is not None:
            y_local = y_local + bias
        if self.kind is Kind.COLUMN and self.gather_output:
            from deepspeed.module_inject.layers import GatherFromTensorParallelRegion

            y_local = GatherFromTensorParallelRegion.apply(self.mp_group, y_local, self.partition_sizes)
        return y_local

    # -- statistics over the ranks that hold the rest of a weight (conversion time, not the forward) -----
    def reducers(self, per_channel: bool):
        """(max, sum) over the ranks holding the rest of what a weight statistic covers: the whole tensor
        (per tensor: every sharded kind), or whole rows (per channel: only row-parallel splits rows)."""
        sharded = self.kind in (Kind.ROW, Kind.LMHEAD) if per_channel else self.kind is not Kind.PLAIN
        if not sharded or self.mp_group is None or self.tp_size == 1:
            return _identity, _identity
        import torch.distributed as dist

        def reduce(op):
            def run(t: torch.Tensor) -> torch.Tensor:
                t = t.clone()
                dist.all_reduce(t, op=op, group=self.mp_group)
                return t

            return run

        return reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM)

    def _allreduce(self, y: torch.Tensor) -> torch.Tensor:
        # DeepSpeed's own inference allreduce (shm on CPU, NCCL on GPU), in the output dtype (bf16).
        from deepspeed import comm as dist
        from deepspeed.comm import pg_utils

        if not pg_utils.is_parallel(self.mp_group):  # the same test DeepSpeed's layers make
            return y
        y = y.contiguous()
        dist.inference_all_reduce(y, group=self.mp_group)
        return y
