"""Config becomes numbers once: `resolve(config, name, kind)` -> the `LayerSpec` of one layer.

A `LayerSpec` is everything a layer's quantization needs from the config, already resolved for that layer: the
scale method (after `scale_method_overrides`) and its recipe, the FP8 dtype and its maximum on the device profile,
the input and weight backoffs (`scale_params`), the activation scope and the outlier channels. The FP8 twins
(modules.py, experts.py), the KV cache, the statistics workbook and `ds-quant inspect --quant-config` take a spec
and never read `QuantConfig` themselves, so they cannot disagree on a layer's numbers.

The scale formulas that need no weights (`input_scale`, `weight_scale_from_amax`) live here too: the twins apply
them to the measured input max-abs, the tables to the measured weight max-abs as well.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from ..config import (
    ActScope,
    DeviceForScales,
    Fp8Format,
    GptqParams,
    MeasureExclude,
    QuantConfig,
    ScaleMethod,
)
from .scales import (
    INPUT_BACKOFF,
    PROFILES,
    RECIPES,
    WEIGHT_BACKOFF,
    Act,
    DeviceProfile,
    Recipe,
    amax_to_scale,
    fp8_dtype,
    input_to_scale,
)
from .scheme import QuantScheme, scheme_of


class Kind(str, enum.Enum):
    """What a spec is for: the settings that do not apply to a kind are resolved to their neutral value."""
    LINEAR = "linear"  # a linear twin (Fp8Linear): every setting applies
    EXPERTS = "experts"  # a fused-experts block (experts are whole on every rank: no act scope, no outliers)
    KV_CACHE = "kv_cache"  # an FP8 KV cache: the input backoff scales keys and values
    ATTENTION = "attention"  # an attention module's matmul operands (attention.py): as for the KV cache


@dataclass(frozen=True)
class LayerSpec:
    """One layer's quantization numbers, resolved from the config by `resolve`."""
    name: str
    kind: Kind
    method: ScaleMethod
    recipe: Recipe
    fp8_format: Fp8Format
    device_for_scales: DeviceForScales
    input_backoff: float
    weight_backoff: float
    act_scope: ActScope = ActScope.GLOBAL
    outlier_channels: int = 0
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    gptq: GptqParams | None = None  # linears: MEASURE records the input Hessian, QUANTIZE rounds by GPTQ

    @property
    def fp8_dtype(self) -> torch.dtype:
        return fp8_dtype(self.fp8_format)

    @property
    def profile(self) -> DeviceProfile:
        return PROFILES[self.device_for_scales]

    @property
    def fp8_max(self) -> float:
        """The +-limit of a cast on this device profile (240 for E4M3 on Gaudi2)."""
        return self.profile.fp8_max(self.fp8_dtype)

    @property
    def needs_measurements(self) -> bool:
        return self.recipe.needs_measurements

    @property
    def scheme(self) -> QuantScheme:
        """The layer's scheme in compressed-tensors' terms (scheme.py), HQT's rounding, backoffs, FP8 flavour and
        device profile filled in; `scheme.recipe_of(spec.scheme) == spec.recipe` (tests/numerics/test_scheme.py)."""
        return scheme_of(self.recipe, self.fp8_format, self.device_for_scales, self.input_backoff,
                         self.weight_backoff)

    def with_method(self, method: ScaleMethod | str) -> LayerSpec:
        """The same layer under another scale method (the workbook's per-method columns)."""
        m = ScaleMethod.parse(method, "scale_method", self.name)
        return replace(self, method=m, recipe=RECIPES[m])

    # -- scale formulas that need no weights ---------------------------------------------------------------------
    def input_scale(self, amax: float | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The static per-tensor input scale for a measured input max-abs (float32 ()); None when dynamic."""
        if self.recipe.act is Act.DYNAMIC:
            return None
        amax = torch.as_tensor(amax, dtype=torch.float32, device=device)
        return input_to_scale(amax, self.recipe, self.fp8_dtype, self.profile, self.input_backoff).reshape(())

    def weight_scale_from_amax(self, amax: float | torch.Tensor) -> torch.Tensor:
        """The per-tensor maxabs weight scale for a weight max-abs: what `scales.quantize_weight` computes before
        an opt search (which may only lower it) or, per channel, row by row."""
        if self.recipe.weight_unit:
            return torch.ones((), dtype=torch.float32)
        return amax_to_scale(torch.as_tensor(amax, dtype=torch.float32), self.fp8_max, self.weight_backoff,
                             self.recipe.weight_rounding, self.profile)


def resolve(config: QuantConfig, name: str, kind: Kind | str = Kind.LINEAR) -> LayerSpec:
    """The spec of layer `name` (a module name; for experts the block's, for a KV cache `{attention}.kv_cache`)
    under `config`: the one place a layer's numbers are read from the config."""
    kind, src = Kind(kind), config.source
    method = ScaleMethod.parse(config.method_for(name), "scale_method", src)  # parse: a QuantConfig(...) built
    linear = kind is Kind.LINEAR                                              # in code may hold plain strings
    return LayerSpec(name=name, kind=kind, method=method, recipe=RECIPES[method],
                     fp8_format=Fp8Format.parse(config.fp8_config, "fp8_config", src),
                     device_for_scales=DeviceForScales.parse(config.device_for_scales, "device_for_scales", src),
                     input_backoff=float(config.input_backoff), weight_backoff=float(config.weight_backoff),
                     act_scope=ActScope.parse(config.act_scope, "act_scope", src) if linear else ActScope.GLOBAL,
                     outlier_channels=int(config.outlier_channels) if linear else 0,
                     measure_exclude=MeasureExclude.parse(config.measure_exclude, "measure_exclude", src),
                     gptq=config.gptq if linear else None)


def default_spec(name: str, method: ScaleMethod | str = ScaleMethod.MAXABS_HW,
                 device_for_scales: DeviceForScales | str = DeviceForScales.CUDA,
                 fp8: Fp8Format | str = Fp8Format.E4M3, source: str = "ds-quant inspect") -> LayerSpec:
    """A spec with HQT's default backoffs and no config (`ds-quant inspect` without `--quant-config`). The flags'
    values are validated with one line naming the flag."""
    m = ScaleMethod.parse(method, "--scale-method", source)
    return LayerSpec(name=name, kind=Kind.LINEAR, method=m, recipe=RECIPES[m],
                     fp8_format=Fp8Format.parse(fp8, "--fp8", source),
                     device_for_scales=DeviceForScales.parse(device_for_scales, "--device-for-scales", source),
                     input_backoff=INPUT_BACKOFF, weight_backoff=WEIGHT_BACKOFF)


def require_spec(spec, who: str) -> LayerSpec:
    """`spec` itself, or a TypeError naming the fix when a caller hands a QuantConfig (the pre-spec API)."""
    if isinstance(spec, LayerSpec):
        return spec
    if isinstance(spec, QuantConfig):
        raise TypeError(f"{who} takes a LayerSpec, not a QuantConfig; pass ds_quant.numerics.layer_spec.resolve(config, name)")
    raise TypeError(f"{who} takes a LayerSpec, got {type(spec).__name__}")


_SPLIT_INPUT = ("row", "lm-head")  # kinds whose ranks see a slice of the input (act_scope "rank" applies)


# -- what a measurement record gives, without the weights (the workbook, `ds-quant inspect`) ---------------------
def outlier_split(record: dict, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sorted indices of the K input channels of largest measured max-abs, the channel max-abs with those zeroed),
    model-level so every TP size picks the same channels; None when K = 0 or the record has no usable channel
    statistics. The FP8 twin keeps those channels in high precision and scales its input by the rest."""
    channels = record.get("input_channel_amax")
    if k <= 0 or channels is None or len(channels) != record["in_features"] or k >= len(channels):
        return None
    ch = torch.as_tensor(channels, dtype=torch.float32)
    top = torch.topk(ch, k).indices.sort().values
    rest = ch.clone()
    rest[top] = 0
    return top, rest


def record_scales(spec: LayerSpec, record: dict) -> tuple[float | str | None, float | str | None]:
    """(input scale, weight scale) that QUANTIZE gives the layer of `record` under `spec`, as far as the record
    tells: a float where it is exact; "dynamic" (per token at run time), "per-channel" (needs the weights),
    "<= x (opt)" (the opt search may lower the maxabs scale x), "<= x (outliers)" (the weight without its outlier
    columns), "per-rank" (act_scope rank: each rank's own slice); None where the record lacks the max-abs."""
    recipe = spec.recipe
    split = outlier_split(record, spec.outlier_channels) if recipe.act is Act.STATIC else None
    if recipe.act is Act.DYNAMIC:
        in_scale = "dynamic"
    elif record.get("input_amax") is None:
        in_scale = None
    elif spec.act_scope is ActScope.RANK and recipe.act is Act.STATIC and record.get("kind") in _SPLIT_INPUT:
        in_scale = "per-rank"
    else:
        amax = float(split[1].max()) if split is not None else float(record["input_amax"])
        in_scale = float(spec.input_scale(amax))
    w = record.get("weight_amax")
    if recipe.weight_unit:
        w_scale = 1.0
    elif recipe.weight_per_channel:
        w_scale = "per-channel"
    elif w is None:
        w_scale = None
    else:
        w_scale = float(spec.weight_scale_from_amax(float(w)))
        if recipe.weight_opt:
            w_scale = f"<= {w_scale:.6g} (opt)"
        elif split is not None:
            w_scale = f"<= {w_scale:.6g} (outliers)"
    return in_scale, w_scale


# An expert projection's record, `{block}.gate_up_proj.{e}` (experts.record_name): its numbers are its block's.
_EXPERT_RECORD = re.compile(r"^(?P<block>.+)\.(?P<proj>gate_up_proj|down_proj)\.\d+$")


def record_spec(config: QuantConfig, record_name: str) -> LayerSpec:
    """The spec QUANTIZE uses for the layer a measurement record describes (an expert's record: its block's)."""
    m = _EXPERT_RECORD.match(record_name)
    return resolve(config, m["block"], Kind.EXPERTS) if m else resolve(config, record_name)


def table_specs(doc: Mapping, config: QuantConfig) -> dict[str, LayerSpec]:
    """{record name: spec} for every layer of a measurement document, as QUANTIZE resolves them."""
    return {name: record_spec(config, name) for name in doc["layers"]}


def scaling_records(doc: Mapping) -> dict[str, dict]:
    """The records as QUANTIZE scales from them: an expert that saw no calibration token takes the largest input
    max-abs of its block's experts for that projection (experts._fill_unseen); every other record as measured."""
    layers = doc["layers"]
    groups: dict[tuple[str, str], list[str]] = {}
    for name in layers:
        m = _EXPERT_RECORD.match(name)
        if m:
            groups.setdefault((m["block"], m["proj"]), []).append(name)
    out = dict(layers)
    for names in groups.values():
        unseen = [n for n in names if layers[n]["samples"] == 0]
        if unseen:
            top = max(float(layers[n]["input_amax"] or 0.0) for n in names)
            out.update({n: {**layers[n], "input_amax": top} for n in unseen})
    return out
