"""FP8 attention matmuls and softmax (HQT's `Matmul` and `Softmax` types) through transformers' attention interface.

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
implementation the model had (sdpa, eager, ...). Names follow HQT's Gaudi modules: `{attention}.matmul_qk`,
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
from ..numerics import layer_spec
from ..numerics.scales import Act, to_fp8_saturated
from .state import state_of

IMPL = "ds_quant_fp8"
MATMUL_TYPE, SOFTMAX_TYPE = ATTENTION_TYPES
_ATTR = "_ds_quant_attention"
_FALLBACK_ATTR = "_ds_quant_attention_fallback"  # on every attention module: what runs where no site is marked
OPERANDS = ATTENTION_OPERANDS  # q, k, v, p (softmax output)


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
    fallback = getattr(config, "_attn_implementation", None) or "eager"
    if fallback == IMPL:  # the config object is shared with a model prepared before: its original is not known here
        fallback = "sdpa"
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
        setattr(m, _FALLBACK_ATTR, fallback)
        if name in sites:
            setattr(m, _ATTR, sites[name])
    _register()
    config._attn_implementation = IMPL
    state_of(model, create=True).attention = sites
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


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPL, attention_forward)
    AttentionMaskInterface.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # an additive float mask


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
