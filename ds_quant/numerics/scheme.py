"""A layer's quantization scheme in compressed-tensors' terms: `QuantArgs` per role, `QuantScheme` per layer.

`QuantArgs` has the fields of compressed-tensors' `QuantizationArgs`, one to one (num_bits, type, symmetric,
group_size, strategy, block_structure, dynamic, actorder, scale_dtype, zp_dtype, observer, observer_kwargs), plus
what HQT decides and compressed-tensors leaves to the runtime: the scale `rounding` (unit, none, pow2, hw), the
`backoff`, the FP8 flavour and the device profile. `QuantScheme` has `QuantizationScheme`'s roles (weights,
input_activations, output_activations, format). `to_ct()` / `from_ct()` convert both ways (the HQT fields stay
behind), so a folder's `quantization_config` and a user's preset speak the same words as llm-compressor.

Config key `scheme` names a preset (`PRESETS`: compressed-tensors' names and values); FP8 and FP8_DYNAMIC are
implemented, as HQT scale methods (config.SCHEME_PRESETS), so they are bitwise what those methods give. A layer's
scheme is `scheme_of(spec)`: derived from its `LayerSpec`'s recipe, backoffs, FP8 format and profile, and
`recipe_of(scheme)` gives the recipe back (the numbers the weight path and the twins use).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import DeviceForScales, Fp8Format
from .scales import INPUT_BACKOFF, WEIGHT_BACKOFF, Act, Recipe, Rounding

UNIT = "unit"  # HQT's unit_scale: scale 1, no rounding (a `rounding` value beside scales.Rounding's)


@dataclass(frozen=True)
class QuantArgs:
    """One role's quantization: compressed-tensors' QuantizationArgs fields (same names, defaults and values), then
    HQT's. Tuples where compressed-tensors has lists or dicts (frozen), dtype names where it has torch dtypes."""
    num_bits: int = 8
    type: str = "int"  # "float" | "int"
    symmetric: bool = True
    group_size: int | None = None
    strategy: str | None = None  # tensor | channel | group | block | token | tensor_group | attn_head
    block_structure: tuple[int, ...] | None = None
    dynamic: bool | str = False  # True: per call; "local": compressed-tensors' tensor_group only
    actorder: str | None = None
    scale_dtype: str | None = None  # a torch dtype's name ("uint8"), None: the tensor's
    zp_dtype: str | None = None
    observer: str | None = None  # "mse": HQT's opt search (weights); minmax: the max-abs
    observer_kwargs: tuple[tuple[str, Any], ...] = ()
    # -- HQT's (not in compressed-tensors): None where the config's value applies ------------------------------
    rounding: str | None = None  # unit | none | pow2 | hw (scales.Rounding, plus unit: scale 1)
    backoff: float | None = None  # the fraction of the FP8 range the max-abs maps to
    fp8_format: Fp8Format | None = None  # E4M3 | E5M2 (num_bits 8, type float)
    device: DeviceForScales | None = None  # the device profile the scales are made for

    def to_ct(self) -> dict:
        """compressed-tensors' `QuantizationArgs(**args.to_ct())` of this role (HQT's fields left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _HQT_FIELDS}
        out["block_structure"] = None if self.block_structure is None else list(self.block_structure)
        out["observer_kwargs"] = dict(self.observer_kwargs)
        for k in ("scale_dtype", "zp_dtype"):
            out[k] = None if out[k] is None else getattr(torch, out[k])
        return out

    @classmethod
    def from_ct(cls, args: Any, **hqt) -> QuantArgs:
        """From a compressed-tensors QuantizationArgs (or its dict); `hqt`: HQT's fields."""
        get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
        values = {f.name: get(f.name, f.default) for f in fields(cls) if f.name not in _HQT_FIELDS}
        values["type"], values["strategy"] = _value(values["type"]), _value(values["strategy"])
        values["actorder"], values["dynamic"] = _value(values["actorder"]), _value(values["dynamic"])
        values["block_structure"] = None if values["block_structure"] is None else tuple(values["block_structure"])
        values["observer_kwargs"] = tuple(sorted(dict(values["observer_kwargs"] or {}).items()))
        for k in ("scale_dtype", "zp_dtype"):
            values[k] = None if values[k] is None else str(values[k]).replace("torch.", "")
        return cls(**values, **hqt)


_HQT_FIELDS = ("rounding", "backoff", "fp8_format", "device")


def _value(v: Any) -> Any:
    """An enum's value (compressed-tensors' str enums), anything else as it is."""
    return v.value if hasattr(v, "value") and not isinstance(v, bool) else v


@dataclass(frozen=True)
class QuantScheme:
    """A layer's quantization per role: compressed-tensors' QuantizationScheme without `targets` (the config's
    allow/block lists and overrides choose the layers). KV cache and attention operands: later."""
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    output_activations: QuantArgs | None = None
    format: str | None = None

    def to_ct(self) -> dict:
        """compressed-tensors' `QuantizationScheme(targets=..., **scheme.to_ct())`."""
        return {"weights": _ct(self.weights), "input_activations": _ct(self.input_activations),
                "output_activations": _ct(self.output_activations), "format": self.format}

    @classmethod
    def from_ct(cls, scheme: Any) -> QuantScheme:
        get = scheme.get if isinstance(scheme, Mapping) else (lambda k, d=None: getattr(scheme, k, d))
        roles = {r: None if get(r) is None else QuantArgs.from_ct(get(r))
                 for r in ("weights", "input_activations", "output_activations")}
        return cls(**roles, format=_value(get("format")))


def _ct(args: QuantArgs | None) -> dict | None:
    return None if args is None else args.to_ct()


# -- presets: compressed-tensors' names and values (0.20's PRESET_SCHEMES); config.SCHEME_PRESETS says which run ---
def _fp8(strategy: str, dynamic: bool = False, **kw) -> QuantArgs:
    return QuantArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic, **kw)


def _int(bits: int, strategy: str, dynamic: bool = False, **kw) -> QuantArgs:
    return QuantArgs(num_bits=bits, type="int", strategy=strategy, dynamic=dynamic, **kw)


_W8A8 = QuantScheme(_int(8, "channel"), _int(8, "token", dynamic=True))
PRESETS: dict[str, QuantScheme] = {
    # implemented (rounding as HQT's method: FP8 is maxabs_hw, FP8_DYNAMIC act_dynamic_per_token_weights_pcs)
    "FP8": QuantScheme(_fp8("tensor", rounding="hw"), _fp8("tensor", observer="static_minmax", rounding="hw")),
    "FP8_DYNAMIC": QuantScheme(_fp8("channel", rounding="none"), _fp8("token", dynamic=True, rounding="none")),
    # not yet: config load refuses them with one line
    "FP8_BLOCK": QuantScheme(_fp8("block", block_structure=(128, 128)), _fp8("group", dynamic=True, group_size=128)),
    "W8A8": _W8A8,
    "INT8": _W8A8,
    "W8A16": QuantScheme(_int(8, "group", group_size=128)),
    "W4A16": QuantScheme(_int(4, "group", group_size=128)),
    "W4A16_ASYM": QuantScheme(_int(4, "group", group_size=128, symmetric=False)),
    "W4AFP8": QuantScheme(_int(4, "group", group_size=128), _fp8("token", dynamic=True)),
}


# -- a LayerSpec's scheme, and back -------------------------------------------------------------------------
def scheme_of(recipe: Recipe, fp8_format: Fp8Format, device: DeviceForScales,
              input_backoff: float = INPUT_BACKOFF, weight_backoff: float = WEIGHT_BACKOFF) -> QuantScheme:
    """The scheme of a layer quantized by `recipe` (a LayerSpec's: `spec.scheme`), HQT's fields filled in."""
    hqt = {"fp8_format": Fp8Format(fp8_format), "device": DeviceForScales(device)}
    weights = _fp8("channel" if recipe.weight_per_channel else "tensor",
                   observer="mse" if recipe.weight_opt else None,
                   rounding=UNIT if recipe.weight_unit else recipe.weight_rounding.value, backoff=weight_backoff,
                   **hqt)
    if recipe.act is Act.DYNAMIC:
        inputs = _fp8("token", dynamic=True, rounding=recipe.act_rounding.value, **hqt)
    else:
        inputs = _fp8("tensor", rounding=UNIT if recipe.act is Act.UNIT else recipe.act_rounding.value,
                      backoff=input_backoff, **hqt)
    return QuantScheme(weights, inputs)


def recipe_of(scheme: QuantScheme) -> Recipe:
    """The recipe (scales.py) that quantizes as `scheme` says; NotImplementedError naming what is not (yet)."""
    w, a = scheme.weights, scheme.input_activations
    for role, args in (("weights", w), ("input_activations", a)):
        if args is None or (args.num_bits, args.type, args.symmetric) != (8, "float", True) or \
                args.group_size is not None or args.block_structure is not None:
            raise NotImplementedError(f"{role}: {args}: only symmetric FP8 per tensor / channel / token is implemented")
    if w.dynamic or w.strategy not in ("tensor", "channel"):
        raise NotImplementedError(f"weights: strategy {w.strategy!r}, dynamic {w.dynamic!r}: not implemented")
    if (a.strategy, bool(a.dynamic)) not in (("tensor", False), ("token", True)):
        raise NotImplementedError(f"input_activations: strategy {a.strategy!r}, dynamic {a.dynamic!r}: only static "
                                  "per tensor or dynamic per token is implemented")
    act = Act.DYNAMIC if a.dynamic else Act.UNIT if a.rounding == UNIT else Act.STATIC
    return Recipe(act, Rounding.NONE if a.rounding in (UNIT, None) else Rounding(a.rounding),
                  weight_unit=w.rounding == UNIT, weight_per_channel=w.strategy == "channel",
                  weight_rounding=Rounding.NONE if w.rounding in (UNIT, None) else Rounding(w.rounding),
                  weight_opt=w.observer == "mse")
