"""Every attention implementation ds_quant registers with transformers, and the one place that decides which a
model gets (`choose`):

    ds_quant_fp8   FP8 attention matmuls and softmax (HQT's `Matmul` and `Softmax` types): below
    ds_quant_kv    decode attention straight from the FP8 KV cache (layers/kv_cache.py stores it; the bottom of
                   this module reads it: `Fp8KVTensor`, `kv_attention_forward`)

`install` (FP8 attention sites) and `use_fp8_cache` (called by kv_cache.install) record what they install and
call `choose`, which decides from all of it, in whatever order they came: FP8 attention sites win the model's
config, and their unmarked modules still read the FP8 cache through `ds_quant_kv` where it can.

FP8 attention matmuls and softmax through transformers' attention interface.

Models of transformers 4.5x/5.x call their attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
with the projected, rotated query, key and value (B, heads, S, D). ds_quant registers its own implementation,
`ds_quant_fp8`, points the prepared model's config at it, and marks each selected attention module with what to do:

    MEASURE   the eager math (q·kᵀ · scaling + mask, softmax in float32, p·v), recording the max-abs of q, k, v and
              p (the softmax output) per attention module on this rank
    QUANTIZE  HQT's `matmul_qk` with FP8 q and k, `matmul_av` with FP8 p and v (static per-tensor scales from the
              measurements, casts saturate), the softmax in float32; with `Softmax` selected its output is cast to
              FP8 too. The products of FP8 values are exact in float32: on hardware without FP8 matmuls (every CPU,
              and this code on GPUs) the operands are rounded to FP8 and multiplied in float32, which is the FP8
              matmul's arithmetic, not its speed

An attention module that is not marked (not selected, or another model sharing the registration) runs the
implementation the model had (sdpa, eager, ...), or `ds_quant_kv` (see `choose`). Names follow HQT's Gaudi modules: `{attention}.matmul_qk`,
`{attention}.matmul_av`, `{attention}.softmax`; the blocklist takes them (types or names).

Selection (unlike HQT, opt-in): `Matmul` and/or `Softmax` in the allowlist's types. They do not narrow the
allowlist for the other types (an allowlist of `["Matmul"]` alone keeps every linear, as HQT's empty allowlist
does). Opt-in because, without FP8 matmul hardware, FP8 attention costs accuracy and buys no speed or memory.

Measurements: the file's "attention" section, per attention module `{q,k,v,p}_amax` over this rank's heads; merged
by the max over ranks (measurements.ATTENTION), so the per-tensor scales are the same at every TP size. Models
whose attention does not go through the interface (they call torch.matmul inline) are named in the log.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import ATTENTION_TYPES, Mode
from ..errors import MeasurementError
from ..files.measurements import ATTENTION_OPERANDS, attention_record
from ..log import current_rank, get_logger
from ..numerics import kernels, layer_spec
from ..numerics.ops import dequantize_fp8
from ..numerics.scales import Act, to_fp8_saturated
from .state import state_of

IMPL = "ds_quant_fp8"
MATMUL_TYPE, SOFTMAX_TYPE = ATTENTION_TYPES
_ATTR = "_ds_quant_attention"
_FALLBACK_ATTR = "_ds_quant_attention_fallback"  # on every attention module: what runs where no site is marked
OPERANDS = ATTENTION_OPERANDS  # q, k, v, p (softmax output)
KV_IMPL = "ds_quant_kv"  # the attention implementation that reads the FP8 KV cache directly
_KV_FALLBACK_ATTR = "_ds_quant_kv_fallback"  # on each attention module: what ds_quant_kv runs where it cannot fuse
_CALLS_ATTR = "_ds_quant_kv_calls"  # on each attention module: {"fused": n, "fallback": n}


@dataclass
class AttentionStats:
    """Running max-abs of one attention module's operands on this rank."""
    amax: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OPERANDS, 0.0))
    calls: int = 0

    def add(self, **tensors: torch.Tensor) -> None:
        for key, t in tensors.items():
            if t.numel():
                a = float(torch.nan_to_num(t.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).abs().amax())
                self.amax[key] = max(self.amax[key], a)
        self.calls += 1


@dataclass
class AttentionSite:
    """What ds_quant does in one attention module: its name, the mode, which of HQT's modules are selected, and
    the statistics (MEASURE) or the scales (QUANTIZE; None = dynamic, from the tensor)."""
    name: str
    mode: Mode
    matmul_qk: bool
    matmul_av: bool
    softmax: bool
    fallback: str  # the attention implementation the model had
    dtype: torch.dtype = torch.float8_e4m3fn
    limit: float = 448.0
    stats: AttentionStats = field(default_factory=AttentionStats)
    scales: dict[str, float | None] = field(default_factory=dict)

    def quantizes(self, operand: str) -> bool:
        return {"q": self.matmul_qk, "k": self.matmul_qk, "v": self.matmul_av,
                "p": self.matmul_av or self.softmax}[operand]


def site_names(attn: str) -> dict[str, tuple[str, str]]:
    """{which: (HQT type, module name)} of one attention module's matmuls and softmax."""
    return {"matmul_qk": (MATMUL_TYPE, f"{attn}.matmul_qk"), "matmul_av": (MATMUL_TYPE, f"{attn}.matmul_av"),
            "softmax": (SOFTMAX_TYPE, f"{attn}.softmax")}


def attention_modules(model) -> dict[str, torch.nn.Module]:
    """The decoder's attention modules: modules with an integer `layer_idx` whose class name says attention."""
    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower()}


def _uses_interface(cls) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


def _has_extras(module, config) -> bool:
    return getattr(module, "sinks", None) is not None or getattr(config, "attn_logit_softcapping", None) is not None


def _text_config(model):
    config = getattr(model, "config", None)
    return None if config is None else config.get_text_config(decoder=True)


# -- installing ---------------------------------------------------------------------------------------------------
def install(model, mode: Mode, select: Callable[[str, str], bool], spec: Callable[[str], layer_spec.LayerSpec],
            load=None) -> dict[str, AttentionSite]:
    """Mark the selected attention modules and route the model's attention through `ds_quant_fp8`. The caller
    resolves the config (workflows.kv_attention): `select(HQT type, site name)` says whether a matmul / softmax is
    selected, `spec(attention name)` gives its LayerSpec. QUANTIZE: `load()` -> (measurement document, its path).
    Returns {attention name: site} (empty: nothing to do), also kept in the model's PreparedState."""
    if _text_config(model) is None:
        return {}
    log = get_logger()
    config = _text_config(model)
    modules = attention_modules(model)
    covered = {cls: _uses_interface(cls) for cls in {type(m) for m in modules.values()}}  # source read once per class
    inline = sorted({cls.__name__ for cls, ok in covered.items() if not ok})
    if inline:
        log.warning(f"{mode.value}: attention matmuls not covered in {', '.join(inline)} (the model calls "
                    "torch.matmul inline, not transformers' attention interface); they stay in high precision")
    special = sorted({type(m).__name__ for m in modules.values() if _has_extras(m, config)})
    if special:
        log.warning(f"{mode.value}: attention matmuls not covered in {', '.join(special)} (attention sinks or "
                    "logit soft-capping, which ds_quant's attention does not implement); they stay in high precision")
        modules = {n: m for n, m in modules.items() if not _has_extras(m, config)}
    fallback = original_implementation(model)
    sites, specs = {}, {}
    for name, m in modules.items():
        if not covered[type(m)]:
            continue
        which = {k: select(t, n) for k, (t, n) in site_names(name).items()}
        if any(which.values()):
            specs[name] = one = spec(name)
            sites[name] = AttentionSite(name, mode, which["matmul_qk"], which["matmul_av"], which["softmax"],
                                        fallback, one.fp8_dtype, one.fp8_max)
    if not sites:
        return {}
    dtype = next(iter(sites.values())).dtype
    if mode is Mode.QUANTIZE:
        _set_scales(sites, specs, load)
    for name, m in modules.items():
        if name in sites:
            setattr(m, _ATTR, sites[name])
    state_of(model, create=True).attention = sites
    choose(model)
    if current_rank() == 0:
        ops = sorted({k for s in sites.values() for k in ("matmul_qk", "matmul_av", "softmax") if getattr(s, k)})
        what = ("recording q/k/v/softmax max-abs" if mode is Mode.MEASURE
                else f"{str(dtype).replace('torch.', '')} operands ({', '.join(ops)})")
        log.info(f"{mode.value}: attention {what} in {len(sites)} layer(s) (attention implementation "
                 f"'{IMPL}', in place of '{fallback}')")
    return sites


def _set_scales(sites: dict[str, AttentionSite], specs: dict[str, layer_spec.LayerSpec], load) -> None:
    need = [s for s in sites.values() if specs[s.name].recipe.act is Act.STATIC]
    doc, where = load() if need and load is not None else ({}, "")
    records = doc.get("attention", {})
    missing = [s.name for s in need if s.name not in records]
    if missing:
        raise MeasurementError(f"{where}: no attention measurements for {missing[:3]}"
                               f"{' ...' if len(missing) > 3 else ''}; run MEASURE with 'Matmul' (or 'Softmax') in "
                               "the allowlist's types")
    for s in sites.values():
        spec = specs[s.name]
        for op in OPERANDS:
            if spec.recipe.act is Act.UNIT:
                s.scales[op] = 1.0
            elif spec.recipe.act is Act.DYNAMIC:
                s.scales[op] = None
            else:
                s.scales[op] = float(spec.input_scale(records[s.name][f"{op}_amax"]))


# -- which implementation a model gets -----------------------------------------------------------------------------
def original_implementation(model) -> str:
    """The attention implementation the model had before ds_quant (recorded on first use, since `choose` changes the
    config). A config shared with a model prepared before already names one of ds_quant's: their original is sdpa."""
    state = state_of(model, create=True)
    if state.original_attention is None:
        impl = getattr(_text_config(model), "_attn_implementation", None) or "eager"
        state.original_attention = "sdpa" if impl in (IMPL, KV_IMPL) else impl
    return state.original_attention


def use_fp8_cache(model, plan, enabled: bool = True) -> None:
    """kv_cache.install: `plan` (a QUANTIZE KVPlan) stores the model's KV cache in FP8; `ds_quant_kv` may read it
    directly if `enabled`. `choose` decides, and sets `plan.fused`."""
    plan.fused = False
    if enabled:
        state_of(model, create=True).kv_readable = plan
    choose(model)


def choose(model) -> str | None:
    """Point the model's config at the attention implementation it gets, from everything ds_quant installed in it
    so far (`install`'s FP8 attention sites, `use_fp8_cache`'s FP8 KV cache), whatever the order they came in:

        FP8 attention sites          `ds_quant_fp8`; modules without a site run `ds_quant_kv` where it can read the
                                     FP8 cache, else the model's original implementation
        only an FP8 cache it reads   `ds_quant_kv` (sdpa wherever it cannot fuse)
        neither                      the model's own, untouched

    `ds_quant_kv` reads the cache where the model's original attention is sdpa, its weights are on CPU (or meta)
    and the CPU kernels are built. Returns the implementation chosen (None: untouched). Safe to call again."""
    config = _text_config(model)
    if config is None:
        return None
    original = original_implementation(model)
    state = state_of(model)
    plan = None if state is None else state.kv_readable
    fused = plan is not None and _reads_fp8_cache(model, original)
    if plan is not None:
        plan.fused = fused
    sites = sites_of(model)
    modules = attention_modules(model)
    if fused:
        _register(KV_IMPL, kv_attention_forward, "sdpa")  # None or a bool mask
        for m in modules.values():
            setattr(m, _KV_FALLBACK_ATTR, "sdpa")
            if getattr(m, _CALLS_ATTR, None) is None:
                setattr(m, _CALLS_ATTR, {"fused": 0, "fallback": 0})
    if sites:
        _register(IMPL, attention_forward, "eager")  # an additive float mask
        for m in modules.values():
            setattr(m, _FALLBACK_ATTR, KV_IMPL if fused else original)
    impl = IMPL if sites else KV_IMPL if fused else None
    if impl is not None:
        config._attn_implementation = impl
    return impl


def _reads_fp8_cache(model, original: str) -> bool:
    if original != "sdpa":
        return False
    params = next(iter(model.parameters()), None)
    if params is not None and params.device.type not in ("cpu", "meta"):
        return False
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:  # a transformers without the attention interface
        return False
    return kernels.available()


def _register(name: str, fn, mask: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])


def sites_of(model) -> dict[str, AttentionSite]:
    state = state_of(model)
    return {} if state is None else dict(state.attention)


def records(model) -> dict[str, dict]:
    """This rank's attention records for the shard file (merged by the max over ranks)."""
    out = {}
    for name, s in sites_of(model).items():
        if s.mode is Mode.MEASURE and s.stats.calls:
            out[name] = attention_record({op: s.stats.amax[op] for op in OPERANDS}, s.stats.calls)
    return out


# -- the attention function ---------------------------------------------------------------------------------------
def _fp8(x: torch.Tensor, scale: float | None, site: AttentionSite) -> torch.Tensor:
    """x rounded to FP8 with `scale` (None: the tensor's own max-abs), back in float32 (exact)."""
    if scale is None:
        scale = max(float(x.detach().abs().amax()), 1e-12) / site.limit if x.numel() else 1.0
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return to_fp8_saturated(x, s, site.dtype, site.limit).float() * s


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: (B, H, S, D) query, (B, H_kv, S_kv, D) key / value ->
    (output (B, S, H, D), softmax weights)."""
    site: AttentionSite | None = getattr(module, _ATTR, None)
    if site is None:
        from transformers import AttentionInterface
        from transformers.models.llama.modeling_llama import eager_attention_forward

        fallback = getattr(module, _FALLBACK_ATTR, None) or "sdpa"
        fn = eager_attention_forward if fallback == "eager" else AttentionInterface()[fallback]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    quant = site.mode is Mode.QUANTIZE
    q, k, v = query.float(), key.float(), value.float()
    if quant and site.matmul_qk:
        q, k = _fp8(q, site.scales["q"], site), _fp8(k, site.scales["k"], site)
    scores = torch.matmul(q, _repeat_kv(k, groups).transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    p = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        p = torch.nn.functional.dropout(p, p=dropout)
    if quant and site.quantizes("p"):
        p = _fp8(p, site.scales["p"], site)
    if quant and site.matmul_av:
        v = _fp8(v, site.scales["v"], site)
    if not quant:
        site.stats.add(q=query, k=key, v=value, p=p)
    out = torch.matmul(p, _repeat_kv(v, groups)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


# -- ds_quant_kv: decode attention on the FP8 KV cache ---------------------------------------------------------
class Fp8KVTensor(torch.Tensor):
    """The FP8 cache of one layer standing in for its de-quantized (B, H, S, D) tensor: `fp8` (a view of the cache's
    buffer) and `scale`. `ds_quant_kv` reads the bytes; every other operation sees `dequantize()`."""

    @staticmethod
    def __new__(cls, fp8: torch.Tensor, scale: float, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, fp8.shape, dtype=dtype, device=fp8.device,
                                                   requires_grad=False)

    def __init__(self, fp8: torch.Tensor, scale: float, dtype: torch.dtype):
        self.fp8, self.scale = fp8, float(scale)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.fp8, self.scale, self.dtype)

    def __repr__(self) -> str:
        return f"Fp8KVTensor(shape={tuple(self.shape)}, {self.fp8.dtype} -> {self.dtype}, scale={self.scale})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        plain = lambda t: t.dequantize() if isinstance(t, Fp8KVTensor) else t  # noqa: E731
        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


def _fusable(module, query, key, value, mask, dropout, kwargs) -> bool:
    """One query token, FP8 K and V of the same layout, a mask the kernel implements (none, or (1|B, 1, 1, S) bool
    or additive), nothing the kernel does not do (dropout, sliding window, soft-capping, sinks)."""
    if not (isinstance(key, Fp8KVTensor) and isinstance(value, Fp8KVTensor)) or query.dim() != 4 or \
            query.shape[2] != 1 or query.device.type != "cpu" or dropout or getattr(module, "training", False):
        return False
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")) or \
            getattr(module, "sinks", None) is not None:
        return False
    b, hq, _, d = query.shape
    _, hkv, s, dk = key.shape
    if dk != d or hkv == 0 or hq % hkv or key.fp8.stride(3) != 1 or key.fp8.stride(2) != d or \
            value.fp8.stride(3) != 1 or value.fp8.stride(2) != d or tuple(value.shape) != tuple(key.shape):
        return False
    return mask is None or (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1:3] == (1, 1) and
                            mask.shape[3] == s and (mask.dtype == torch.bool or mask.is_floating_point()))


def kv_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """`ds_quant_kv`: one decode step straight from the FP8 cache where it can (see `_fusable`), otherwise the
    model's own implementation on the de-quantized tensors. Returns (output (B, S_q, H, D), None)."""
    calls = getattr(module, _CALLS_ATTR, None)
    if _fusable(module, query, key, value, attention_mask, dropout, kwargs):
        s = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        out = torch.ops.ds_quant.decode_attention(query, key.fp8, key.scale, value.fp8, value.scale,
                                                   attention_mask, s)
        if calls is not None:
            calls["fused"] += 1
        return out, None
    if calls is not None:
        calls["fallback"] += 1
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    key = key.dequantize() if isinstance(key, Fp8KVTensor) else key
    value = value.dequantize() if isinstance(value, Fp8KVTensor) else value
    fallback = ALL_ATTENTION_FUNCTIONS[getattr(module, _KV_FALLBACK_ATTR, "sdpa")]
    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_calls(model) -> dict[str, int]:
    """How many attention calls of a prepared model `ds_quant_kv` ran from the FP8 cache ("fused") and how many it
    handed to the model's own implementation ("fallback"), summed over layers (tests, the bench, debugging)."""
    out = {"fused": 0, "fallback": 0}
    for m in model.modules():
        for k, v in (getattr(m, _CALLS_ATTR, None) or {}).items():
            out[k] += v
    return out
