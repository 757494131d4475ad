"""SmoothQuant-style activation smoothing (config `smooth_alpha`), folded into the model before QUANTIZE.

For every input channel j shared by a group of linears, s_j = max|X_j|^a / max|W_j|^(1-a), with max|X_j| the
model-level measurement (`input_channel_amax`, full width) and max|W_j| the max over every row of every linear
that reads that input. 1/s goes into whatever produces the input (a norm's weight, or a linear's output rows)
and s into the consumers' weight columns: the input range moves into the weights, where per-channel scales
absorb it. The measured input statistics are divided by s too, so static input scales and outlier channels
come from the smoothed inputs.

s is rounded to a power of two: multiplying by it is exact in bf16 (short of under/overflow), so a folded bf16
model computes bit for bit what the original does, and only the FP8 rounding sees the difference. The inputs
of s are a file and maxima of weights, identical at every TP size (a max does not depend on how the rows are
split), so every TP size folds the same factors; each rank folds its local slices (the model is already split
by AutoTP when QUANTIZE runs).

Pairs are known per architecture (`PAIRS`, by `config.model_type`); any other architecture is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, SmoothError
from ..log import current_rank, get_logger
from ..parallel import dist
from ..parallel.tp import TPLayout

# Factors stay within 2^-MAX_LOG2 .. 2^MAX_LOG2: far from bf16's under/overflow for weights of ordinary size.
MAX_LOG2 = 20


@dataclass(frozen=True)
class Pair:
    """`producer` (a norm, or a linear whose output rows feed `consumers`) -> the linears reading its output;
    names relative to a decoder layer."""
    producer: str
    consumers: tuple[str, ...]


_LLAMA = (Pair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          Pair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          Pair("mlp.up_proj", ("mlp.down_proj",)))  # down reads act(gate) * up: scaling up's rows scales it
# model_type -> pairs. Only RMSNorm computing `weight * x_normed` (not Gemma's `(1 + weight)`) and separate
# q/k/v and gate/up projections qualify. v_proj -> o_proj (one factor per v channel, repeated over the query
# heads that read it) was built and measured worse on SmolLM2 (commit 989d5cf, README): not folded.
PAIRS: dict[str, tuple[Pair, ...]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA}


# -- pure math -----------------------------------------------------------------------------------------------
def smooth_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """(in,) float32 factors s = x^alpha / w^(1 - alpha), rounded to a power of two; 1 where either
    statistic is zero or not finite (nothing to balance)."""
    x, w = x_amax.detach().double().cpu(), w_amax.detach().double().cpu()
    ok = (x > 0) & (w > 0) & torch.isfinite(x) & torch.isfinite(w)
    log2 = alpha * torch.log2(torch.where(ok, x, 1.0)) - (1 - alpha) * torch.log2(torch.where(ok, w, 1.0))
    log2 = torch.round(log2).clamp(-MAX_LOG2, MAX_LOG2)
    return torch.where(ok, torch.exp2(log2), 1.0).float()


def smoothed_record(record: Mapping, s: torch.Tensor) -> dict:
    """A layer's measurement as the smoothed input would have produced it: channel max-abs / s."""
    channels = np.asarray(record["input_channel_amax"], dtype=np.float32) / s.detach().cpu().numpy()
    return {**record, "input_channel_amax": channels, "input_amax": float(channels.max(initial=0.0))}


# -- the model's pairs ---------------------------------------------------------------------------------------
@dataclass
class Group:
    producer: str
    consumers: tuple[str, ...]


def architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PAIRS:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
        raise SmoothError(f"smooth_alpha: {what}: which norm feeds which linear is not known for this "
                          f"architecture (known: {', '.join(PAIRS)}); drop 'smooth_alpha' from the config")
    return model_type


def groups(model: nn.Module) -> list[Group]:
    """Every (producer, consumers) of the model's architecture, by full module name. Raises SmoothError for an
    unknown architecture, or a pair whose modules are missing or not shaped as the table says."""
    pairs = PAIRS[architecture(model)]
    modules = dict(model.named_modules())
    out = []
    for pair in pairs:
        for name in modules:
            if not (name == pair.producer or name.endswith("." + pair.producer)):
                continue
            prefix = name[: len(name) - len(pair.producer)]
            consumers = tuple(prefix + c for c in pair.consumers)
            missing = [c for c in consumers if c not in modules]
            if missing:
                raise SmoothError(f"smooth_alpha: '{name}' has no consumer '{missing[0]}' (architecture "
                                  f"{architecture(model)}); drop 'smooth_alpha' from the config")
            out.append(Group(name, consumers))
    if not out:
        raise SmoothError(f"smooth_alpha: no {pairs[0].producer} found in the model; drop 'smooth_alpha'")
    return out


# -- folding -------------------------------------------------------------------------------------------------
@dataclass
class _Step:
    producer: str
    x_full: torch.Tensor  # (in,) measured input max-abs, max over the consumers' records
    consumers: list  # (name, module, layout, this rank's slice of the full input)


def fold(model: nn.Module, layers: Mapping[str, Mapping], alpha: float, group=None
         ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fold the factors into the (possibly AutoTP-split) model in place. Returns (the measurement layers with
    the consumers' records smoothed and the changed weights' `weight_amax`, {producer: full-width s}).
    Collective over the TP `group` (None: alone): every rank must call it. Every check runs before any weight
    changes, and ranks agree on its outcome."""
    modules = dict(model.named_modules())
    steps = dist.agree(lambda: plan(model, modules, layers), dist.LOCAL if group is None else group,
                       what="QUANTIZE smooth_alpha")
    factors, touched = {}, {}
    for st in steps:
        w_full = torch.zeros(len(st.x_full))
        for _, m, layout, part in st.consumers:  # full-width column max-abs: the same on every rank and TP size
            local = torch.zeros(len(st.x_full))
            local[part] = m.weight.detach().abs().amax(0).float().cpu()
            reduce_max, _ = layout.reducers(per_channel=False)
            w_full = torch.maximum(w_full, reduce_max(local.to(m.weight.device)).cpu())
        s = smooth_factors(st.x_full, w_full, alpha)
        factors[st.producer] = s
        _fold_producer(modules[st.producer], s, st.consumers[0][3])
        for name, m, layout, part in st.consumers:
            with torch.no_grad():
                m.weight.mul_(s[part].to(m.weight.device, m.weight.dtype))
            touched[name] = (m, layout)
        if layers.get(st.producer) is not None:
            touched[st.producer] = (modules[st.producer], _layout(modules[st.producer], st.producer))
    out = dict(layers)
    for st in steps:
        for name, _, _, _ in st.consumers:
            if out.get(name) is not None and out[name].get("input_channel_amax") is not None:
                out[name] = smoothed_record(out[name], factors[st.producer])
        if out.get(st.producer) is not None:
            out[st.producer] = {**out[st.producer], "output_amax": None}  # its outputs are now / s, per channel
    for name, (m, layout) in touched.items():
        if out.get(name) is not None and out[name].get("weight_amax") is not None:
            reduce_max, _ = layout.reducers(per_channel=False)
            out[name] = {**out[name], "weight_amax": float(reduce_max(m.weight.detach().abs().amax().float()))}
    return out, factors


def plan(model: nn.Module, modules: Mapping[str, nn.Module], layers: Mapping[str, Mapping]) -> list[_Step]:
    """What `fold` will do, checked: every group with measured inputs, each consumer's local input slice, and
    the producer's local shape matching it. Raises SmoothError; changes nothing."""
    steps = []
    for g in groups(model):
        recs = [layers.get(c) for c in g.consumers]
        x = [r["input_channel_amax"] for r in recs if r is not None and r.get("input_channel_amax") is not None]
        if not x:
            continue  # nothing measured for this input: left as it is
        width = len(x[0])
        if any(len(v) != width for v in x):
            raise SmoothError(f"smooth_alpha: the consumers of '{g.producer}' have channel statistics of different "
                              "widths; measure again")
        consumers = []
        for c in g.consumers:
            layout = _layout(modules[c], c)
            consumers.append((c, modules[c], layout, _part(c, modules[c], layout, width)))
        _check_producer(g.producer, modules[g.producer], consumers[0], width)
        x_full = torch.as_tensor(np.max(np.stack([np.asarray(v, dtype=np.float32) for v in x]), 0))
        steps.append(_Step(g.producer, x_full, consumers))
    return steps


def _layout(module: nn.Module, name: str):
    try:
        return TPLayout.of(module)
    except TypeError as e:
        raise SmoothError(f"smooth_alpha: layer '{name}': {e}") from None


def _part(name: str, module: nn.Module, layout, width: int) -> slice:
    """The full input channels this rank's `module` holds."""
    part = layout.input_slice() or slice(0, width)
    if part.stop - part.start != module.weight.shape[1] or part.stop > width:
        raise SmoothError(f"smooth_alpha: layer '{name}': its local weight has {module.weight.shape[1]} input "
                          f"channels, the measured statistics {width} (rank slice {part.start}:{part.stop}); "
                          "measure this model again")
    return part


def _check_producer(name: str, module: nn.Module, consumer, width: int) -> None:
    """A norm's weight is whole on every rank; a linear producer's local output rows must be exactly the
    slice of channels its consumer reads on this rank."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise SmoothError(f"smooth_alpha: '{name}' ({type(module).__name__}) has no weight to fold into")
    if weight.dim() == 1:
        if weight.shape[0] != width:
            raise SmoothError(f"smooth_alpha: norm '{name}' has {weight.shape[0]} channels, its consumers' "
                              f"statistics {width}; measure this model again")
        return
    c_name, _, _, part = consumer
    layout = _layout(module, name)
    start = layout.shard_offset if layout.spec.partitioned_dim == 0 else 0
    if (start, start + weight.shape[0]) != (part.start, part.stop):
        raise SmoothError(f"smooth_alpha: '{name}' holds output rows {start}:{start + weight.shape[0]} on this rank, "
                          f"its consumer '{c_name}' reads channels {part.start}:{part.stop}; the two are split "
                          "differently, so 1/s cannot be folded into it")


def _fold_producer(module: nn.Module, s: torch.Tensor, part: slice) -> None:
    """Divide what `module` produces by s: a norm's weight, or a linear's local output rows (and bias)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    with torch.no_grad():
        local = s.to(weight.device, weight.dtype) if weight.dim() == 1 else s[part].to(weight.device, weight.dtype)
        weight.div_(local if weight.dim() == 1 else local[:, None])
        if isinstance(bias, torch.Tensor):  # a LayerNorm's or a linear's: the output it adds to is / s too
            bias.div_(local)


def fold_for_quantize(model: nn.Module | None, layers: Mapping[str, Mapping], config, group) -> dict:
    """QUANTIZE's step (prepare.py): fold `config.smooth_alpha`'s factors into `model` and return the smoothed
    measurement layers. Collective over `group`."""
    if model is None:
        raise ConfigError(f"{config.source}: key 'smooth_alpha': this entry point quantizes layers without the "
                          "model around them (ds_quant.report), so nothing can be folded; drop 'smooth_alpha' here")
    out, factors = fold(model, layers, config.smooth_alpha, group)
    if factors and current_rank() == 0:
        log2 = torch.cat([torch.log2(s) for s in factors.values()])
        get_logger().info(f"smooth_alpha {config.smooth_alpha:g}: folded into {len(factors)} norm(s)/linear(s), "
                          f"factors 2^{int(log2.min())} .. 2^{int(log2.max())}")
    elif not factors:
        get_logger().warning(f"smooth_alpha {config.smooth_alpha:g}: no measured channel statistics for any pair; "
                             "nothing was smoothed")
    return out
