"""FP8 KV cache on transformers' own Cache API (HQT's `KVCache` type).

`generate()` builds a `DynamicCache`: one layer object per decoder layer. ds_quant swaps its full-attention
layers for

    MeasuredKVLayer  MEASURE   transformers' `DynamicLayer`, plus the per-head max-abs of every key and value stored
    Fp8KVLayer       QUANTIZE  keys/values stored in FP8 (`fp8_config`: E4M3 or E5M2) with one static scale per layer
                               and tensor (k, v) from the measurements, cast saturating; de-quantized on read, so
                               attention computes what it always computes

On transformers 5, `Fp8KVLayer` is a `Fp8QuantizedLayer` (the layer of `QuantizedCache(backend="fp8")`, with its
`_quantized_keys = (fp8, scale)` storage) whose scale comes from the measurements instead of the prompt, and whose
cast saturates (the prompt's scale lets later tokens overflow to NaN). transformers 4.57 has no FP8 layer: there it
is a `DynamicLayer` with the same methods. Like transformers' layer, the first update (the prompt) returns the
states as they came; later reads de-quantize (on CPU with a compiled kernel, `numerics/csrc/kv_cache_cpu.cpp`).

Decode on the FP8 cache (CPU, QUANTIZE, a model whose attention was `sdpa`): `layers/attention.py` registers the
attention implementation `ds_quant_kv` and points the model's config at it (`attention.choose`). Later reads then
return the cache as `Fp8KVTensor`s (the FP8 buffer and its scale, looking like the bf16 tensor they stand for), and for one query token
`ds_quant_kv` computes attention straight from the FP8 bytes (`ds_quant::decode_attention`: each key and value
row read once, one byte per element, no bf16 copy of the cache). Anything else (several query tokens, a mask or an
argument it does not implement, a bf16 cache) runs sdpa on the de-quantized tensors, and any other code that
touches an `Fp8KVTensor` sees it de-quantized (`__torch_dispatch__`). The config key `"kv_cache_attention": false`
(or DS_QUANT_KV_ATTENTION=0) turns it off.

Which cache generate() gets: `prep_model` replaces the prepared model's `_prepare_cache_for_generation` (on the
instance) by one that swaps the layers of the `DynamicCache` generate() would build by default. A cache the caller
passes, or a `cache_implementation` they set, is left as it is; `make_kv_cache(model)` builds ours explicitly (for
forward calls, or to reuse across generate() calls).

Measurements: per layer, the per-head max-abs of keys and values, this rank's heads (AutoTP splits the KV heads
over the TP ranks); merged over ranks by concatenating in rank order (measurements.merge_kv). The scale is per
layer (max over heads), so it is the same at every TP size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import KV_CACHE_TYPES, Mode
from ..errors import MeasurementError
from ..files.measurements import kv_record
from ..log import current_rank, get_logger
from ..numerics import layer_spec
from ..numerics.ops import dequantize_fp8
from ..numerics.scales import Act, amax_to_scale, to_fp8_saturated
from . import attention
from .attention import Fp8KVTensor, attention_modules
from .state import state_of

KV_TYPE = KV_CACHE_TYPES[0]  # HQT's type name; the allow/block lists select the KV cache by it


# -- what to do, per layer ------------------------------------------------------------------------------------
@dataclass
class KVStats:
    """Running per-head max-abs of one layer's keys and values on this rank."""
    key: torch.Tensor | None = None  # (local heads,) float32
    value: torch.Tensor | None = None
    tokens: int = 0

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.numel() == 0:
            return
        ka, va = (t.detach().abs().amax(dim=(0, 2, 3)).float().cpu() for t in (k, v))  # (B, H, S, D) -> (H,)
        self.key = ka if self.key is None else torch.maximum(self.key, ka)
        self.value = va if self.value is None else torch.maximum(self.value, va)
        self.tokens += int(k.shape[0] * k.shape[2])


@dataclass
class KVPlan:
    """The KV-cache layers of one prepared model: {layer index: name}, and per mode the stats or the scales."""
    mode: Mode
    names: dict[int, str]
    model_heads: int  # the model's KV heads (all ranks)
    dtype: torch.dtype = torch.float8_e4m3fn
    limit: float = 448.0
    backoff: float = 0.25
    scales: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)  # None: from the prompt
    stats: dict[int, KVStats] = field(default_factory=dict)
    source: str = ""  # QUANTIZE: the measurement file the scales come from
    fused: bool = False  # QUANTIZE: reads return Fp8KVTensors for `ds_quant_kv` (see the module docstring)

    def layer(self, idx: int):
        """A fresh cache layer for decoder layer `idx`, or None to keep transformers' own."""
        if idx not in self.names:
            return None
        if self.mode is Mode.MEASURE:
            return measured_layer_class()(self.stats.setdefault(idx, KVStats()))
        k_scale, v_scale = self.scales[idx]
        layer = fp8_layer_class()(k_scale, v_scale, self.dtype, self.limit, self.backoff)
        layer.fused = self.fused
        return layer


def kv_names(model) -> dict[int, str]:
    """{decoder layer index: name of its KV cache}: `{attention module}.kv_cache` (modules with a `layer_idx`)."""
    names = {}
    for fqn, m in attention_modules(model).items():
        names.setdefault(m.layer_idx, f"{fqn}.kv_cache")
    return names


def _text_config(model):
    config = getattr(model, "config", None)
    return None if config is None else config.get_text_config(decoder=True)


def _supports_cache(model) -> bool:
    return hasattr(model, "_prepare_cache_for_generation") and _text_config(model) is not None


def plan_for(model, mode: Mode, select: Callable[[str], bool], spec: Callable[[str], layer_spec.LayerSpec],
             load=None, named: bool = False) -> KVPlan | None:
    """The plan for `model`, or None when the model has no KV cache ds_quant can swap or `select` keeps none. The
    caller resolves the config (workflows.kv_attention): `select(name)` says whether a layer's KV cache is selected,
    `spec(name)` gives its LayerSpec, `named`: the allowlist names KVCache (then missing measurements are an error).
    QUANTIZE: `load()` -> (measurement document, its path), called only if static scales are needed."""
    if not _supports_cache(model):
        return None
    text = _text_config(model)
    all_names = kv_names(model)
    names = {i: n for i, n in all_names.items() if select(n) and _full_attention(text, i)}
    if not names:
        return None
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    specs = {n: spec(n) for n in names.values()}
    first = next(iter(specs.values()))  # dtype, device profile and backoff are the same for every KV layer
    plan = KVPlan(mode, names, heads, first.fp8_dtype, first.fp8_max, first.input_backoff)
    if mode is Mode.QUANTIZE:
        plan.scales, plan.source = _scales(plan, specs, load, named)
        if plan.scales is None:
            return None
    return plan


def _full_attention(text, idx: int) -> bool:
    types = getattr(text, "layer_types", None)
    return types is None or idx >= len(types) or types[idx] == "full_attention"


def _scales(plan: KVPlan, specs: dict[str, layer_spec.LayerSpec], load, named: bool):
    """({idx: (k_scale, v_scale)}, source) from the measurements' kv records; (None, source) keeps the bf16 cache
    (a file without kv records, e.g. calibrated by forward calls only, and a config that does not name KVCache)."""
    out, missing = {}, []
    static = [n for n in plan.names.values() if specs[n].recipe.act is Act.STATIC]
    doc, where = load() if static and load is not None else ({}, "")
    records = doc.get("kv", {})
    for idx, name in plan.names.items():
        recipe = specs[name].recipe
        if recipe.act is Act.UNIT:
            out[idx] = (1.0, 1.0)
        elif recipe.act is Act.DYNAMIC:
            out[idx] = (None, None)  # from the prompt, as transformers' Fp8QuantizedLayer does
        elif name not in records:
            missing.append(name)
        else:
            rec = records[name]
            if len(rec["key_head_amax"]) != plan.model_heads:
                raise MeasurementError(f"{where}: {name}: measured {len(rec['key_head_amax'])} KV heads, the model "
                                       f"has {plan.model_heads}; measure this model")
            out[idx] = tuple(float(specs[name].input_scale(max(rec[k]))) for k in ("key_head_amax", "value_head_amax"))
    if missing and named:
        raise MeasurementError(f"{where}: no KV-cache measurements for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                               "; run MEASURE with this config and a script that calls model.generate()")
    if missing and len(missing) == len(plan.names):
        get_logger().info(f"KV cache stays in high precision: {where} has no KV-cache records (MEASURE records "
                          "them during model.generate(); calibration by forward calls alone records none)")
        return None, where
    if missing:
        raise MeasurementError(f"{where}: KV-cache records for some layers but not {missing[:3]}; measure again")
    return out, where


# -- installing it into generate() ------------------------------------------------------------------------------
def install(model, plan: KVPlan | None, read_directly: bool = True) -> KVPlan | None:
    """Make `model.generate()` use the KV-cache layers of `plan` (`plan_for`) by default (see the module docstring);
    the plan is kept in the model's PreparedState. `read_directly` (config `kv_cache_attention`): decode attention
    may read the FP8 cache without de-quantizing it (`attention.choose` decides where it can)."""
    if plan is None:
        return None
    state_of(model, create=True).kv = plan
    original = model._prepare_cache_for_generation

    @functools.wraps(original)
    def prepare_cache(*args, **kwargs):
        out = original(*args, **kwargs)
        model_kwargs = kwargs.get("model_kwargs", args[1] if len(args) > 1 else None)
        for key in ("cache", "past_key_values"):  # transformers 5.24 / 4.57 names
            cache = (model_kwargs or {}).get(key)
            if cache is not None and not getattr(cache, "_is_user_defined", False) and _is_default_cache(cache):
                swap_layers(cache, plan)
        return out

    model._prepare_cache_for_generation = prepare_cache
    if plan.mode is Mode.QUANTIZE:  # attention.choose decides plan.fused, with what else ds_quant installed
        attention.use_fp8_cache(model, plan, read_directly)
    if current_rank() == 0:
        what = (f"recording KV-cache max-abs per head in {len(plan.names)} layer(s)" if plan.mode is Mode.MEASURE
                else f"KV cache in {str(plan.dtype).replace('torch.', '')} in {len(plan.names)} layer(s)"
                + (f", static scales from {plan.source}" if plan.source else "")
                + (f"; decode attention reads it directly (attention implementation '{attention.KV_IMPL}')" if plan.fused
                   else ""))
        get_logger().info(f"{plan.mode.value}: {what} (generate() builds it; ds_quant.layers.kv_cache.make_kv_cache "
                          "for explicit use)")
    return plan


def _is_default_cache(cache) -> bool:
    from transformers import DynamicCache

    return type(cache) is DynamicCache


def swap_layers(cache, plan: KVPlan):
    """Replace the plain full-attention layers of a fresh DynamicCache by ds_quant's, in place."""
    from transformers.cache_utils import DynamicLayer

    for idx, layer in enumerate(cache.layers):
        new = plan.layer(idx) if type(layer) is DynamicLayer else None
        if new is not None:
            cache.layers[idx] = new
    return cache


def make_kv_cache(model):
    """A fresh cache with ds_quant's layers for a prepared model (pass it as `past_key_values=` / `cache=`)."""
    plan = plan_of(model)
    if plan is None:
        raise RuntimeError("make_kv_cache: this model has no ds_quant KV cache (not prepared, or the config selects "
                           "no KVCache)")
    from transformers import DynamicCache

    return swap_layers(DynamicCache(config=model.config), plan)


def plan_of(model) -> KVPlan | None:
    state = state_of(model)
    return None if state is None else state.kv


# -- measurements ------------------------------------------------------------------------------------------------
def records(model) -> dict[str, dict]:
    """This rank's kv records for the shard file (see measurements.merge_kv for the merged form)."""
    plan = plan_of(model)
    if plan is None or plan.mode is not Mode.MEASURE:
        return {}
    out = {}
    for idx, name in plan.names.items():
        s = plan.stats.get(idx)
        if s is None or s.key is None:
            continue
        out[name] = kv_record(idx, plan.model_heads, s.key.tolist(), s.value.tolist(), s.tokens)
    return out


# -- the cache layers ----------------------------------------------------------------------------------------------
def quantize_kv(x_hp: torch.Tensor, scale: float, dtype: torch.dtype, limit: float) -> torch.Tensor:
    return to_fp8_saturated(x_hp, torch.tensor(scale, dtype=torch.float32, device=x_hp.device), dtype, limit)


GROW_TOKENS = 64  # room a full FP8 buffer grows by: one copy per 64 decode steps instead of one per step


def append_tokens(q_fp8: torch.Tensor, new_fp8: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) + (B, H, n, D) -> (B, H, S + n, D), a view of a buffer with room for GROW_TOKENS more (the
    prompt's buffer is exact): appending writes only the new tokens, where torch.cat copies the whole cache."""
    s, n = q_fp8.shape[2], new_fp8.shape[2]
    base = q_fp8._base if q_fp8._base is not None else q_fp8
    if base.shape[:2] != q_fp8.shape[:2] or base.shape[3] != q_fp8.shape[3] or base.dim() != 4 or \
            s + n > base.shape[2] or base.data_ptr() != q_fp8.data_ptr():
        fresh = q_fp8.new_empty((*q_fp8.shape[:2], s + n + (GROW_TOKENS if s else 0), q_fp8.shape[3]))
        fresh[:, :, :s] = q_fp8
        base = fresh
    base[:, :, s:s + n] = new_fp8
    return base[:, :, :s + n]


class _Fp8KV:
    """Mixed into transformers' `Fp8QuantizedLayer` (5.x) or `DynamicLayer` (4.57): see the module docstring.
    `_quantized_keys` / `_quantized_values`: (FP8 tensor (B, H, S, D), float scale)."""
    is_croppable = True
    fused = False  # reads return Fp8KVTensors (set by KVPlan.layer when `ds_quant_kv` runs the model's attention)

    def __init__(self, k_scale: float | None, v_scale: float | None, dtype: torch.dtype, limit: float,
                 backoff: float):
        super().__init__()
        self.fp8_dtype, self.fp8_max, self._backoff = dtype, limit, backoff
        self._static_scales = (k_scale, v_scale)
        self.cumulative_length = 0
        self._quantized_keys = self._quantized_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(0)  # the high-precision slots stay empty: everything lives in FP8
        self.values = key_states.new_empty(0)
        empty = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]), dtype=self.fp8_dtype)
        scales = [s if s is not None else self._prompt_scale(t)
                  for s, t in zip(self._static_scales, (key_states, value_states), strict=True)]
        self._quantized_keys, self._quantized_values = (empty, scales[0]), (empty.clone(), scales[1])
        self.is_initialized = True

    def _prompt_scale(self, t: torch.Tensor) -> float:
        return float(amax_to_scale(t.detach().abs().amax().float(), self.fp8_max, self._backoff))

    def _quantize(self, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        return quantize_kv(tensor, scale, self.fp8_dtype, self.fp8_max)

    def _dequantize(self, qtensor) -> torch.Tensor:
        return dequantize_fp8(qtensor[0], qtensor[1], self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        (qk, ks), (qv, vs) = self._quantized_keys, self._quantized_values
        self._quantized_keys = (append_tokens(qk, self._quantize(key_states, ks)), ks)
        self._quantized_values = (append_tokens(qv, self._quantize(value_states, vs)), vs)
        if first:  # the prompt attends to itself as it came, as in transformers' FP8 layer
            return key_states, value_states
        if self.fused and key_states.device.type == "cpu":  # fused: the kernel is built (attention.choose)
            return (Fp8KVTensor(*self._quantized_keys, self.dtype),
                    Fp8KVTensor(*self._quantized_values, self.dtype))
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.keys = self.values = None
        self._quantized_keys = self._quantized_values = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _apply(self, fn) -> None:
        if self.is_initialized:
            (qk, ks), (qv, vs) = self._quantized_keys, self._quantized_values
            self._quantized_keys, self._quantized_values = (fn(qk), ks), (fn(qv), vs)
            self.cumulative_length = self._quantized_keys[0].shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self._quantized_keys[0].device)
            self._apply(lambda t: t.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, n: int) -> None:
        """n >= 0: keep the first n tokens (transformers 4.57's form); n < 0: drop the last -n (both versions)."""
        keep = n if n >= 0 else self.cumulative_length + n
        if 0 <= keep < self.cumulative_length:
            self._apply(lambda t: t[..., :keep, :])

    def offload(self):  # the FP8 states stay where they are (offloading is not supported with this layer)
        return None

    def prefetch(self):
        return None


class _MeasuredKV:
    """Mixed into transformers' `DynamicLayer`: the same cache, plus statistics of what it stores."""

    def __init__(self, stats: KVStats):
        super().__init__()
        self._stats = stats

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._stats.add(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)


@functools.lru_cache(maxsize=1)
def fp8_layer_class() -> type:
    from transformers import cache_utils

    base = getattr(cache_utils, "Fp8QuantizedLayer", None) or cache_utils.DynamicLayer
    return type("Fp8KVLayer", (_Fp8KV, base), {"__module__": __name__, "__doc__": _Fp8KV.__doc__})


@functools.lru_cache(maxsize=1)
def measured_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    return type("MeasuredKVLayer", (_MeasuredKV, DynamicLayer), {"__module__": __name__,
                                                                 "__doc__": _MeasuredKV.__doc__})


def describe(cache) -> dict:
    """Layer types, storage dtypes and bytes of a cache (for tests, the bench and reports): `bytes` is what the
    layers' tensors allocate (an FP8 buffer's room for more tokens included), `held_bytes` what the tokens in it take."""
    layers = list(getattr(cache, "layers", []))
    tensors = []
    for layer in layers:
        if isinstance(layer, _Fp8KV) and layer.is_initialized:
            tensors += [layer._quantized_keys[0], layer._quantized_values[0]]
        elif getattr(layer, "keys", None) is not None:
            tensors += [layer.keys, layer.values]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return {"layer_types": [type(x).__name__ for x in layers],
            "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.numel()}),
            "bytes": sum(storages.values()), "held_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "scales": [(layer._quantized_keys[1], layer._quantized_values[1])
                       for layer in layers if isinstance(layer, _Fp8KV) and layer.is_initialized]}
