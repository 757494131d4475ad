"""Config keys `scheme` and `scheme_overrides`: compressed-tensors' preset names (llm-compressor's `scheme=`), with
per-role overrides, resolved at load to the HQT scale methods they describe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .values import ScaleMethod, closest, parse_overrides

# -- key `scheme`: compressed-tensors' preset names (llm-compressor's `scheme=`), resolved to HQT's methods ---------
# HQT's scale methods in compressed-tensors' terms (FP8, symmetric; the rest is the method's):
# method: ((weights: strategy, rounding, observer), (input_activations: strategy, dynamic, rounding)).
# `rounding` is HQT's (not compressed-tensors'): unit (scale 1), none (any float32), pow2, hw (the device's set);
# observer "mse" is HQT's opt search. numerics/scheme.py derives the same from scales.RECIPES; a test compares them.
_M = ScaleMethod
METHOD_SCHEMES = {
    _M.UNIT_SCALE: (("tensor", "unit", None), ("tensor", False, "unit")),
    _M.MAXABS_HW: (("tensor", "hw", None), ("tensor", False, "hw")),
    _M.MAXABS_POW2: (("tensor", "pow2", None), ("tensor", False, "pow2")),
    _M.MAXABS_ARBITRARY: (("tensor", "none", None), ("tensor", False, "none")),
    _M.MAXABS_HW_OPT_WEIGHT: (("tensor", "hw", "mse"), ("tensor", False, "hw")),
    _M.MAXABS_POW2_OPT_WEIGHT: (("tensor", "pow2", "mse"), ("tensor", False, "pow2")),
    _M.ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2: (("channel", "pow2", None), ("tensor", False, "hw")),
    _M.ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2: (("channel", "pow2", "mse"), ("tensor", False, "hw")),
    _M.ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2: (("channel", "pow2", None), ("tensor", False, "pow2")),
    _M.ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2: (("channel", "pow2", "mse"), ("tensor", False, "pow2")),
    _M.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS: (("channel", "none", None), ("token", True, "none")),
}


# The presets implemented today as HQT methods (FP8: HQT's default, maxabs_hw: any scale on CUDA, Gaudi's own set)
SCHEME_PRESETS = {"FP8": _M.MAXABS_HW, "FP8_DYNAMIC": _M.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS}


# compressed-tensors' other preset names (0.20): recognised, refused with "not implemented yet".
SCHEME_PRESETS_LATER = ("FP8_BLOCK W8A8 INT8 W8A16 W4A16 W4A16_ASYM W4AFP8 UNQUANTIZED NVFP4A16 NVFP4 MXFP4A16 MXFP4 "
                        "MXFP4XFP8 MXFP6A16 MXFP6A8 MXFP8A16 MXFP8 W2A4 W2A8 W2A16 W3A4 W3A8 W3A16 W4A4 W4A8 W5A8 "
                        "W5A16 W6A8 W6A16 W7A8 W7A16").split()


SCHEME_ROLES = ("weights", "input_activations")
SCHEME_ARGS = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic", "actorder",
               "observer", "rounding")


_SCHEME_ENUMS = {"type": ("float", "int"), "rounding": ("none", "pow2", "hw", "unit"),
                 "strategy": ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")}


_MINMAX = (None, "minmax", "static_minmax", "memoryless_minmax")  # compressed-tensors' names for a plain max-abs
_FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
             "actorder": None}  # what every implemented scheme has


@dataclass(frozen=True)
class SchemeChoice:
    """A `scheme` value as written: a preset name and per-role overrides ((key, value), ...)."""
    preset: str
    weights: tuple[tuple[str, Any], ...] = ()
    input_activations: tuple[tuple[str, Any], ...] = ()


def _parse_schemes(data: Mapping[str, Any], source: str) -> dict:
    """Keys `scheme` and `scheme_overrides` -> QuantConfig fields: the choices as written, and the scale method(s)
    they are (scale_method, scale_method_overrides). With them, the HQT keys they replace are an error."""
    for key, hqt in (("scheme", "scale_method"), ("scheme_overrides", "scale_method_overrides")):
        if data.get(key) is not None and hqt in data:
            raise ConfigError(f"{source}: keys '{key}' and '{hqt}' both choose the quantization; keep one")
    out = {}
    if data.get("scheme") is not None:
        out["scheme"], out["scale_method"] = _parse_scheme(data["scheme"], "scheme", source)
    over = data.get("scheme_overrides")
    if over is not None:
        if not isinstance(over, Mapping):
            raise ConfigError(f"{source}: key 'scheme_overrides' must be an object of name regex -> scheme, e.g. "
                              "{\"lm_head\": \"FP8\"}")
        parse_overrides({p: "maxabs_hw" for p in over}, source, "scheme_overrides")  # the regexes
        parsed = [(p, *_parse_scheme(v, f"scheme_overrides.{p}", source)) for p, v in over.items()]
        out["scheme_overrides"] = tuple((p, c) for p, c, _ in parsed)
        out["scale_method_overrides"] = tuple((p, m) for p, _, m in parsed)
    return out


def _parse_scheme(value: Any, key: str, source: str) -> tuple[SchemeChoice, ScaleMethod]:
    """A preset name, or {"preset": NAME, "weights": {...}, "input_activations": {...}}, -> (choice, method)."""
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key '{key}' must be a preset name such as \"FP8_DYNAMIC\" or an object "
                          "{\"preset\": \"FP8_DYNAMIC\", \"weights\": {...}, \"input_activations\": {...}}")
    for k in value:
        if k not in ("preset",) + SCHEME_ROLES:
            raise ConfigError(f"{source}: unknown key '{key}.{k}'{closest(k, ('preset',) + SCHEME_ROLES)}; accepted: "
                              f"preset, {', '.join(SCHEME_ROLES)}")
    preset = value.get("preset")
    name = preset.strip().upper() if isinstance(preset, str) else preset
    implemented = ", ".join(SCHEME_PRESETS)
    if name in SCHEME_PRESETS_LATER:
        raise ConfigError(f"{source}: key '{key}': {name}: not implemented yet; implemented: {implemented}")
    if name not in SCHEME_PRESETS:
        raise ConfigError(f"{source}: key '{key}': preset {preset!r} is not one of: {implemented} (compressed-tensors' "
                          f"names){closest(str(preset).upper(), tuple(SCHEME_PRESETS))}")
    roles = {}
    for role in SCHEME_ROLES:
        over = value.get(role, {})
        if not isinstance(over, Mapping):
            raise ConfigError(f"{source}: key '{key}.{role}' must be an object of QuantizationArgs fields, e.g. "
                              "{\"strategy\": \"channel\"}")
        for k, v in over.items():
            _check_scheme_arg(v, k, f"{key}.{role}", source)
        roles[role] = tuple(over.items())
    choice = SchemeChoice(name, roles["weights"], roles["input_activations"])
    return choice, _scheme_method(choice, key, source)


def _check_scheme_arg(v: Any, k: str, where: str, source: str) -> None:
    if k not in SCHEME_ARGS:
        raise ConfigError(f"{source}: unknown key '{where}.{k}'{closest(k, SCHEME_ARGS)}; accepted: "
                          f"{', '.join(SCHEME_ARGS)}")
    if k in _SCHEME_ENUMS and v not in _SCHEME_ENUMS[k]:
        raise ConfigError(f"{source}: key '{where}.{k}': {v!r} is not one of: {', '.join(_SCHEME_ENUMS[k])}")
    if k in ("symmetric", "dynamic") and not isinstance(v, bool) and v != "local":
        raise ConfigError(f"{source}: key '{where}.{k}': {v!r} must be true or false")


def _scheme_method(choice: SchemeChoice, key: str, source: str) -> ScaleMethod:
    """The HQT method a preset with its overrides is; one line naming what is not implemented otherwise."""
    got = []
    for role, base, over in zip(SCHEME_ROLES, METHOD_SCHEMES[SCHEME_PRESETS[choice.preset]],
                                (choice.weights, choice.input_activations), strict=True):
        args = dict(zip(("strategy", "rounding", "observer") if role == "weights" else
                        ("strategy", "dynamic", "rounding"), base, strict=True), **_FP8_ARGS)
        args.update(over)
        for k, want in _FP8_ARGS.items():
            if args[k] != want:
                raise ConfigError(f"{source}: key '{key}.{role}.{k}': {args[k]!r} is not implemented yet; only FP8 "
                                  f"({k} {want!r}); implemented presets: {', '.join(SCHEME_PRESETS)}")
        observer = args.get("observer")
        if observer not in _MINMAX + (("mse",) if role == "weights" else ()):
            raise ConfigError(f"{source}: key '{key}.{role}.observer': {observer!r} is not implemented; use minmax"
                              + (" or mse" if role == "weights" else ""))
        got.append((args["strategy"], args["rounding"], observer if observer == "mse" else None) if role == "weights"
                   else (args["strategy"], args["dynamic"], args["rounding"]))
    for method, want in METHOD_SCHEMES.items():
        if tuple(got) == want:
            return method
    def describe(w: tuple, i: tuple) -> str:
        return f"weights {'/'.join(filter(None, w))} with inputs {i[0]}/{'dynamic' if i[1] else 'static'}/{i[2]}"
    accepted = "; ".join(f"{m.value} = {describe(w, i)}" for m, (w, i) in METHOD_SCHEMES.items())
    raise ConfigError(f"{source}: key '{key}': {describe(*got)} is not implemented; implemented: {accepted}")
