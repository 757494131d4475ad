"""The measured and FP8 twins of fused MoE experts (transformers 5: `MixtralExperts`, `Qwen3MoeExperts`, ...).

transformers 5 holds a layer's experts as two 3-D parameters, `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I), in a module called as `experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`; the
router stays outside (and in high precision). DeepSpeed's AutoTP does not shard them: every rank holds every
expert whole, so a rank's statistics are already model-level (ranks see the same tokens; the merge takes the
max).

Each expert projection is recorded as its own plain linear in the measurement file, `{name}.gate_up_proj.{e}`
and `{name}.down_proj.{e}` (full shapes, no new record kind): per-expert weight scales and per-expert input
scales, from the tokens the model's own router sent to that expert. An expert that saw no calibration token
takes the largest input max-abs of its layer's experts (logged), never a zero scale.

Dispatch: the twins run transformers' eager expert loop (tokens grouped per hit expert, weighted by the
router, summed over the top-k in float32 as `batched_mm` does); the GEMMs are the only thing they change.
transformers 4.x holds experts as `nn.Linear`s, which the linear twins already cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MeasureExclude
from ..files.measurements import linear_record
from ..log import get_logger
from ..numerics import ops
from ..numerics.layer_spec import LayerSpec, require_spec
from ..numerics.scales import Act
from ..numerics.weights import quantize_weight
from .observers import MaxAbsObserver

PROJ = ("gate_up_proj", "down_proj")


def experts_unsupported_reason(module: nn.Module) -> str | None:
    """None if `module` is a fused-experts block the twins reproduce; else why not (or not experts at all)."""
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return "no 3-D gate_up_proj and down_proj pair (transformers 5's fused-experts layout), not quantized"
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}
    other = [f"{k}={getattr(module, k)!r}" for k, v in layout.items() if getattr(module, k, v) != v]
    if other:
        return f"expert layout {', '.join(other)} is not handled (only gate_up [gate; up], no bias, (E, out, in))"
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2) or not hasattr(module, "act_fn"):
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not pair as (E, 2I, H), (E, H, I)"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    return not isinstance(module, _TwinExperts) and experts_unsupported_reason(module) is None


def record_name(name: str, proj: str, expert: int) -> str:
    return f"{name}.{proj}.{expert}"


class _TwinExperts(nn.Module):
    """The model's own expert dispatch around two per-expert GEMMs (subclass)."""

    def __init__(self, name: str, original: nn.Module):
        super().__init__()
        self.name = name
        self.num_experts = int(original.gate_up_proj.shape[0])
        self.act_fn = original.act_fn
        self._gate = type(original)._apply_gate if hasattr(type(original), "_apply_gate") else None

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate is not None:
            return self._gate(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        hit = torch.unique(top_k_index)
        for expert in hit.tolist():
            if not 0 <= expert < self.num_experts:  # expert-parallel sentinels
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            h = self.apply_gate(self.project("gate_up_proj", expert, hidden_states[token_idx]))
            y = self.project("down_proj", expert, h)
            out.index_add_(0, token_idx, y.float() * top_k_weights[token_idx, k_pos, None].float())
        return out.to(hidden_states.dtype)


class MeasuredExperts(_TwinExperts):
    """The experts' bf16 GEMMs, with max-abs statistics per expert and projection."""

    def __init__(self, name: str, original: nn.Module, exclude: MeasureExclude):
        super().__init__(name, original)
        self.gate_up_proj = nn.Parameter(original.gate_up_proj.detach(), requires_grad=False)
        self.down_proj = nn.Parameter(original.down_proj.detach(), requires_grad=False)
        dev = self.gate_up_proj.device
        self.observers = {(p, e): MaxAbsObserver(getattr(self, p).shape[2], exclude, device=dev)
                          for p in PROJ for e in range(self.num_experts)}

    @classmethod
    def from_original(cls, module: nn.Module, name: str, spec: LayerSpec) -> MeasuredExperts:
        return cls(name, module, require_spec(spec, "MeasuredExperts.from_original").measure_exclude)

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        obs = self.observers[(proj, expert)]
        obs.observe_input(x)
        y = F.linear(x, getattr(self, proj)[expert])
        obs.observe_output(y)
        return y

    def stats(self) -> dict[str, dict]:
        """One plain-linear record per expert projection."""
        out = {}
        for (proj, e), obs in self.observers.items():
            w = getattr(self, proj)[e]
            out[record_name(self.name, proj, e)] = linear_record("plain", w.shape[1], w.shape[0], obs.stats(w),
                                                                 local_in_features=w.shape[1], partition_sizes=[])
        return out

    def wanted_shapes(self) -> dict[str, tuple[int, int]]:
        return expert_shapes(self, self.name)


def expert_shapes(module: nn.Module, name: str) -> dict[str, tuple[int, int]]:
    return {record_name(name, p, e): tuple(getattr(module, p).shape[1:]) for p in PROJ
            for e in range(getattr(module, p).shape[0])}


class Fp8Experts(_TwinExperts):
    """FP8 expert weights (E, out, in) with per-expert scales (`{proj}_scale`: (E,) or (E, out) per channel) and
    per-expert static input scales (`{proj}_input_scale`: (E,); None when dynamic per token). The GEMM applies the
    same FP8 values and scales as the linear twins, accumulating in float32."""

    def __init__(self, name: str, original: nn.Module, weights: dict, scales: dict, input_scales: dict | None,
                 act_limit: float):
        super().__init__(name, original)
        self.out_dtype = original.gate_up_proj.dtype
        self.act_limit = act_limit
        for p in PROJ:
            setattr(self, p, nn.Parameter(weights[p], requires_grad=False))
            self.register_buffer(f"{p}_scale", scales[p])
            self.register_buffer(f"{p}_input_scale", None if input_scales is None else input_scales[p])

    @classmethod
    def from_original(cls, module: nn.Module, name: str, spec: LayerSpec, layers: dict | None) -> Fp8Experts:
        """`spec`: the block's numbers (`layer_spec.resolve(config, name, "experts")`); `layers`: the measurement
        file's records (None when the method needs none)."""
        spec = require_spec(spec, "Fp8Experts.from_original")
        weights, scales, inputs = {}, {}, {}
        for p in PROJ:
            w_hp = getattr(module, p).detach()
            q = [quantize_expert(w_hp[e], spec, layers.get(record_name(name, p, e)) if layers else None,
                                 record_name(name, p, e)) for e in range(len(w_hp))]
            weights[p] = torch.stack([w for w, _ in q])
            scales[p] = torch.stack([s for _, s in q])
            inputs[p] = expert_input_scales(name, p, len(w_hp), spec, layers, w_hp.device)
        return cls(name, module, weights, scales, None if spec.recipe.act is Act.DYNAMIC else inputs, spec.fp8_max)

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        w_fp8 = getattr(self, proj)[expert]
        w_scale = getattr(self, f"{proj}_scale")[expert]
        in_scales = getattr(self, f"{proj}_input_scale")
        # the same FP8 GEMM as the linear twins (ops picks the backend: the CPU kernel, _scaled_mm on CUDA)
        return ops.fp8_linear(x, w_fp8, w_scale, None if in_scales is None else in_scales[expert], self.out_dtype,
                              None, self.act_limit)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.gate_up_proj_input_scale is None else "static per-expert input scales"
        return f"experts={self.num_experts}, {self.gate_up_proj.dtype}, {act}, {self.gemm_plan()}"

    def gemm_plan(self) -> str:
        return ops.describe(self.gate_up_proj.device, *self.gate_up_proj.shape[1:],
                            rowwise=self.gate_up_proj_scale.dim() > 1 or self.gate_up_proj_input_scale is None)


def quantize_expert(w_hp: torch.Tensor, spec: LayerSpec, record: dict | None = None,
                    name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 (out, in), float32 scale: () per tensor, (out,) per channel) of one expert's projection (out, in),
    e.g. `gate_up_proj[e]` (2I, H), its gate and up rows together: the one weight path (numerics/weights.py), as
    in-memory QUANTIZE, `ds-quant convert` and quantize-on-load call it. `record` (its measurement, `name` its
    record name): checked against the weight (the weights must be the measured ones)."""
    q = quantize_weight(w_hp, spec, record, name=name)
    return q.w_q, q.w_scale


def expert_input_scales(name: str, proj: str, num_experts: int, spec: LayerSpec, layers: dict | None,
                        device=None) -> torch.Tensor | None:
    """The per-expert static input scales (E,) float32 of `{name}.{proj}` from the measurement records (`layers`:
    the file's; unseen experts take the layer's largest max-abs); None when activations are dynamic."""
    if spec.recipe.act is Act.DYNAMIC:
        return None
    amax = [float(layers[record_name(name, proj, e)]["input_amax"] or 0.0) if layers else 0.0
            for e in range(num_experts)]
    return torch.stack([spec.input_scale(a, device=device).float() for a in _fill_unseen(name, proj, amax, layers)])


def _fill_unseen(name: str, proj: str, amax: list[float], layers: dict | None) -> list[float]:
    """An expert the router never chose during calibration has no statistics: it takes the largest input max-abs
    of the layer's experts (its input is the same hidden state, for gate_up; a like activation, for down)."""
    if not layers:
        return amax
    unseen = [e for e in range(len(amax)) if layers[record_name(name, proj, e)]["samples"] == 0]
    if unseen:
        get_logger().info(f"{name}.{proj}: expert(s) {unseen} saw no calibration token; their input scale uses the "
                          f"largest max-abs of the layer's {len(amax)} experts")
        top = max(amax)
        amax = [top if e in unseen else a for e, a in enumerate(amax)]
    return amax
