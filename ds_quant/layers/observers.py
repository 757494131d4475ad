"""Max-abs observer: what one rank sees flowing through one linear.

Running maxima stay on the layer's device and never sync to the host during a forward; they are read
once, when the shard is written. NaN and Inf in what a layer sees are counted and left out of the maxima (an
overflowed activation must not become an infinite, or NaN, scale); the count goes into the record.
"""

from __future__ import annotations

import torch

from ..config import MeasureExclude
from ..numerics.scales import channel_amax, tensor_to_amax
from ..parallel import dist
from ..parallel.tp import TPLayout


class MaxAbsObserver:
    """Per-tensor and per-input-channel max-abs of a linear's (local) input, max-abs of its output."""

    def __init__(self, in_features: int, exclude: MeasureExclude, device: torch.device | None = None):
        self.measure_input = exclude not in (MeasureExclude.INPUT, MeasureExclude.ALL)
        self.measure_output = exclude not in (MeasureExclude.OUTPUT, MeasureExclude.ALL)
        self.measure_params = exclude not in (MeasureExclude.PARAMS, MeasureExclude.ALL)
        self.input_channel_amax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.output_amax = torch.zeros((), dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # NaN/Inf input values seen
        self.samples = 0  # rows (tokens) seen

    def observe_input(self, x_local: torch.Tensor) -> None:
        self.samples += x_local.shape[:-1].numel()
        if self.measure_input:
            if x_local.device.type == "cpu":
                # NaN and Inf propagate into their channel's max: one pass finds whether there are any, and only
                # then are they counted and masked (three more passes, 17 % of a 512 x 5504 x 4096 bf16 GEMM).
                amax = channel_amax(x_local)
                if not bool(torch.isfinite(amax).all()):
                    amax = channel_amax(self._finite(x_local))
            else:  # no host sync in a GPU forward: count and mask always
                amax = channel_amax(self._finite(x_local))
            torch.maximum(self.input_channel_amax, amax, out=self.input_channel_amax)

    def observe_output(self, y: torch.Tensor) -> None:
        if self.measure_output:
            finite = torch.isfinite(y)
            torch.maximum(self.output_amax, tensor_to_amax(y.masked_fill(~finite, 0)), out=self.output_amax)

    def _finite(self, x: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(x)
        self.nonfinite += bad.sum()
        return x.masked_fill(bad, 0)

    def stats(self, weight_local: torch.Tensor) -> dict:
        """Statistics for the shard file: floats, ints, None, and the per-channel max-abs as a float32 numpy
        array (pickled compactly by the gather and merged without a per-value conversion; the file writer
        turns it into JSON numbers or the companion binary)."""
        channels = self.input_channel_amax.cpu()
        # An empty shard (DeepSpeed may give a rank 0 input channels) saw nothing: amax 0.
        input_amax = float(channels.max()) if channels.numel() else 0.0
        return {
            "input_amax": input_amax if self.measure_input else None,
            "input_channel_amax": channels.numpy() if self.measure_input else None,
            "output_amax": float(self.output_amax) if self.measure_output else None,
            "weight_amax": float(tensor_to_amax(weight_local)) if self.measure_params else None,
            "samples": int(self.samples),
            "nonfinite_inputs": int(self.nonfinite),
        }


class HessianObserver:
    """Σ xᵀx over every token of a linear's whole input, (in_features, in_features) float32 (config `gptq`).

    Model-level like the max-abs vectors: where this rank's GEMM sees a slice of the input channels (row-parallel,
    lm-head) the slices are all-gathered in every forward (a collective: every rank runs the same forwards);
    column-parallel inputs are the same on every rank. So every rank would hold the same sum: only TP rank 0
    keeps it (memory: in_features² × 4 bytes per linear), the others take part in the gathers. Non-finite
    values count as 0, as in MaxAbsObserver."""

    def __init__(self, layout: TPLayout, in_features: int, device: torch.device | None = None):
        self.layout = layout
        self.keep = layout.tp_rank == 0
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if self.keep else None
        self.tokens = 0

    def observe(self, x_local: torch.Tensor) -> None:
        x = x_local.reshape(-1, x_local.shape[-1])
        if self.layout.spec.input.split and self.layout.tp_size > 1:
            x = dist.all_gather_last_dim(x, self.layout.partition_sizes, self.layout.mp_group)
        if not self.keep:
            return
        x = x.float()
        x = x.masked_fill(~torch.isfinite(x), 0)
        self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]
