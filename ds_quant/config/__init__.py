"""Quantization config: HQT's JSON schema, loaded strictly.

A config is a frozen dataclass. Loading validates every key and value and fails with one line that
names the file, the key, the bad value and what is accepted. Loading has no side effects: it creates
no directories and reads no ranks.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..parallel.tp import UNSUPPORTED_TYPE_REASONS
from .schemes import (
    METHOD_SCHEMES,
    SCHEME_ARGS,
    SCHEME_PRESETS,
    SCHEME_PRESETS_LATER,
    SCHEME_ROLES,
    SchemeChoice,
    _parse_schemes,
)
from .values import (
    _HQT_ONLY_VALUES,
    _ROLES,
    ATTENTION_TYPES,
    CLI_FLAG,
    ENV_VAR,
    EXPERTS_TYPES,
    HQT_OTHER_TYPES,
    KV_CACHE_TYPES,
    SUPPORTED_TYPES,
    ActScope,
    DeviceForScales,
    Fp8Format,
    GptqParams,
    MeasureExclude,
    Mode,
    ModuleFilter,
    Observer,
    ScaleMethod,
    closest,
    parse_overrides,
)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "HOOKS"
    mode: Mode = Mode.QUANTIZE
    observer: Observer = Observer.MAXABS
    allowlist: ModuleFilter = field(default_factory=ModuleFilter)
    blocklist: ModuleFilter = field(default_factory=ModuleFilter)
    dump_stats_path: str = "stats"
    dump_stats_xlsx_path: str | None = None
    scale_method: ScaleMethod = ScaleMethod.MAXABS_HW
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    fp8_config: Fp8Format = Fp8Format.E4M3
    device_for_scales: DeviceForScales = DeviceForScales.CUDA
    input_backoff: float = 0.25  # HQT's: activations use a quarter of the FP8 range (headroom)
    weight_backoff: float = 0.5  # HQT's: weights are known exactly; half the range
    scale_method_overrides: tuple[tuple[str, ScaleMethod], ...] = ()  # (name regex, method), first match wins
    act_scope: ActScope = ActScope.GLOBAL
    auto_blocklist_sqnr_db: float | None = None  # report.quantize_with_report: layers below stay high precision
    outlier_channels: int = 0  # QUANTIZE: each linear's K largest measured input channels stay high precision
    save_max_bytes: int = 1 << 30  # observer "save": the most bytes of tensors one rank keeps
    smooth_alpha: float | None = None  # QUANTIZE: SmoothQuant-style smoothing with this migration strength (smooth.py)
    gptq: GptqParams | None = None  # MEASURE records input Hessians; QUANTIZE rounds weights by GPTQ (gptq.py)
    quantize_on_load: bool = False  # from_pretrained of a bf16 folder quantizes layer by layer as it reads (hf_model)
    kv_cache_attention: bool = True  # QUANTIZE, CPU: decode attention reads the FP8 KV cache directly (attention.py)
    # keys `scheme` / `scheme_overrides` as written (preset, role overrides), for reports; they are resolved at load
    # into scale_method / scale_method_overrides, which is all QUANTIZE reads
    scheme: SchemeChoice | None = None
    scheme_overrides: tuple[tuple[str, SchemeChoice], ...] = ()
    source: str = field(default="<dict>", compare=False)

    def method_for(self, fqn: str) -> ScaleMethod:
        """The scale method of one layer: the first override whose regex is found in its name, else the default."""
        for pattern, method in self.scale_method_overrides:
            if re.search(pattern, fqn):
                return method
        return self.scale_method

    def selects(self, role: str, type_names: str | Iterable[str], name: str) -> bool:
        """Is module `name` selected by the allow/block lists for `role` ("linear", "experts", "kv_cache",
        "attention")? `type_names`: what the `types` lists know it by (its class name, "Linear" too for a plain
        linear, HQT's "KVCache" / "Matmul" / "Softmax"). HQT's rule: in the allowlist (types or names; an empty one
        selects every supported module) and in neither blocklist list. Attention is opt-in (no speed or memory to
        gain without FP8 matmul hardware): its type must be named in the allowlist's types. The one copy of the rule:
        layers never read the config, they get this as a predicate from the caller."""
        if role not in _ROLES:
            raise ValueError(f"selects: role {role!r} is not one of {list(_ROLES)}")
        types = (type_names,) if isinstance(type_names, str) else tuple(type_names)
        if role == "attention":
            allowed = any(t in self.allowlist.types for t in types)
        else:
            allowed = not self.allowlist.narrows() or any(self.allowlist.matches(t, name) for t in types)
        return allowed and not any(self.blocklist.matches(t, name) for t in types)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> QuantConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        for legacy, new in (("whitelist", "allowlist"), ("blacklist", "blocklist")):
            if legacy in data:
                if new in data:
                    raise ConfigError(f"{source}: keys '{legacy}' and '{new}' are the same setting; keep only '{new}'")
                data[new] = data.pop(legacy)
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"{source}: unknown key '{k}'{closest(k, _KEYS)}; accepted keys: {', '.join(_KEYS)}")
        if "method" not in data:
            raise ConfigError(f"{source}: key 'method' is required; set \"method\": \"HOOKS\"")
        if str(data["method"]).upper() != "HOOKS":
            raise ConfigError(f"{source}: key 'method': {data['method']!r} is not one of: HOOKS")
        _reject_hqt_only(data, source)
        schemes = _parse_schemes(data, source)
        cfg = cls(
            method="HOOKS",
            mode=Mode.parse(data.get("mode", "QUANTIZE"), "mode", source),
            observer=Observer.parse(data.get("observer", "maxabs"), "observer", source),
            allowlist=_parse_filter(data.get("allowlist", {}), "allowlist", source),
            blocklist=_parse_filter(data.get("blocklist", {}), "blocklist", source),
            dump_stats_path=_parse_path(data.get("dump_stats_path", "stats"), "dump_stats_path", source),
            dump_stats_xlsx_path=_parse_optional_path(data.get("dump_stats_xlsx_path"), "dump_stats_xlsx_path", source),
            scale_method=ScaleMethod.parse(data.get("scale_method", "maxabs_hw"), "scale_method", source),
            measure_exclude=MeasureExclude.parse(data.get("measure_exclude", "OUTPUT"), "measure_exclude", source),
            fp8_config=Fp8Format.parse(data.get("fp8_config", "E4M3"), "fp8_config", source),
            device_for_scales=DeviceForScales.parse(data.get("device_for_scales", "cuda"), "device_for_scales",
                                                    source),
            **_parse_scale_params(data.get("scale_params", {}), source),
            scale_method_overrides=parse_overrides(data.get("scale_method_overrides", {}), source),
            act_scope=ActScope.parse(data.get("act_scope", "global"), "act_scope", source),
            auto_blocklist_sqnr_db=_parse_sqnr_db(data.get("auto_blocklist_sqnr_db"), source),
            outlier_channels=_parse_outlier_channels(data.get("outlier_channels", 0), source),
            save_max_bytes=_parse_save_max_bytes(data.get("save_max_bytes", 1 << 30), source),
            smooth_alpha=_parse_smooth_alpha(data.get("smooth_alpha"), source),
            gptq=_parse_gptq(data.get("gptq"), source),
            quantize_on_load=_parse_bool(data.get("quantize_on_load", False), "quantize_on_load", source),
            kv_cache_attention=_parse_bool(data.get("kv_cache_attention", True), "kv_cache_attention", source),
            source=source,
        )
        if schemes:
            cfg = replace(cfg, **schemes)
        cfg._check_combinations()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> QuantConfig:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_env_or_args(cls, argv: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None) -> QuantConfig | None:
        """`--quant-config FILE` on the command line, else `QUANT_CONFIG`, else None."""
        path = config_path_from_argv(sys.argv if argv is None else argv)
        if path is None:
            path = (os.environ if env is None else env).get(ENV_VAR) or None
        return None if path is None else cls.from_json(path)

    def with_mode(self, mode: Mode | str) -> QuantConfig:
        return replace(self, mode=Mode.parse(mode, "mode", self.source))

    # -- validation of combinations ----------------------------------------------------------------
    def _check_combinations(self) -> None:
        src = self.source
        if self.mode is Mode.MEASURE and self.measure_exclude in (MeasureExclude.INPUT, MeasureExclude.ALL):
            raise ConfigError(
                f"{src}: key 'measure_exclude': {self.measure_exclude.value!r} with mode MEASURE records no inputs, "
                "so QUANTIZE could not compute input scales; use OUTPUT (default), NONE or PARAMS")
        for t in self.allowlist.types:
            if t in UNSUPPORTED_TYPE_REASONS:
                raise ConfigError(f"{src}: key 'allowlist.types': {t!r} is not a module type ds_quant can quantize: "
                                  f"{UNSUPPORTED_TYPE_REASONS[t]}")
            if t not in SUPPORTED_TYPES:
                raise ConfigError(f"{src}: key 'allowlist.types': {t!r} is not a module type ds_quant can quantize; "
                                  f"accepted: {', '.join(SUPPORTED_TYPES)}{closest(t, SUPPORTED_TYPES)}")
        if self.smooth_alpha is not None and self.scale_method in (ScaleMethod.UNIT_SCALE,
                                                                   ScaleMethod.ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS):
            raise ConfigError(f"{src}: key 'smooth_alpha' needs measured input statistics, which scale_method "
                              f"{self.scale_method.value!r} does not read; use a static method (e.g. "
                              "act_maxabs_hw_weights_pcs_opt_pow2) or drop 'smooth_alpha'")
        if self.gptq is not None and self.smooth_alpha is not None:
            raise ConfigError(f"{src}: keys 'gptq' and 'smooth_alpha' together are not implemented (the Hessians are "
                              "of the unsmoothed inputs); drop one of them")
        both = set(self.allowlist.types) & set(self.blocklist.types)
        if both:
            raise ConfigError(f"{src}: keys 'allowlist.types' and 'blocklist.types' both list {sorted(both)}; "
                              "a type cannot be allowed and blocked")


_KEYS = ("method", "mode", "observer", "allowlist", "blocklist", "dump_stats_path", "dump_stats_xlsx_path",
         "scale_method", "measure_exclude", "fp8_config", "device_for_scales", "scale_params",
         "scale_method_overrides", "act_scope", "auto_blocklist_sqnr_db", "outlier_channels", "save_max_bytes",
         "smooth_alpha", "gptq", "quantize_on_load", "kv_cache_attention", "scheme", "scheme_overrides")
_GPTQ_KEYS = ("damp", "block", "act_order")


def _parse_gptq(value: Any, source: str) -> GptqParams | None:
    """`gptq`: an object with any of damp (number in (0, 1]), block (integer 1..65536), act_order (true/false);
    `{}` takes the defaults; absent or null = off."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key 'gptq': {value!r} must be an object such as "
                          '{"damp": 0.01, "block": 128, "act_order": false} ({} for the defaults); leave it out for '
                          "round-to-nearest weights")
    unknown = [k for k in value if k not in _GPTQ_KEYS]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown key 'gptq.{k}'{closest(k, _GPTQ_KEYS)}; accepted: {', '.join(_GPTQ_KEYS)}")
    damp, block, act_order = (value.get(k, getattr(GptqParams, k)) for k in _GPTQ_KEYS)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
        raise ConfigError(f"{source}: key 'gptq.damp': {damp!r} must be a number in (0, 1] (e.g. 0.01: 1 % of the "
                          "Hessian's mean diagonal)")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 65536:
        raise ConfigError(f"{source}: key 'gptq.block': {block!r} must be an integer in 1..65536 (e.g. 128)")
    if not isinstance(act_order, bool):
        raise ConfigError(f"{source}: key 'gptq.act_order': {act_order!r} must be true or false")
    return GptqParams(float(damp), block, act_order)


def _parse_smooth_alpha(value: Any, source: str) -> float | None:
    """`smooth_alpha`: SmoothQuant's migration strength a, s_j = max|X_j|^a / max|W_j|^(1-a); absent = off."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{source}: key 'smooth_alpha': {value!r} must be a number in (0, 1] (e.g. 0.5: half "
                          "of each input channel's range moves into the weights); leave it out for no smoothing")
    return float(value)


def _parse_save_max_bytes(value: Any, source: str) -> int:
    """`save_max_bytes` (observer "save"): bytes of dumped tensors one rank keeps in memory and writes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: key 'save_max_bytes': {value!r} is not a whole number of bytes >= 0; "
                          "e.g. 1073741824 (1 GiB, the default)")
    return value


def _parse_outlier_channels(value: Any, source: str) -> int:
    """`outlier_channels`: how many input channels per linear (the largest measured max-abs) stay high precision."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise ConfigError(f"{source}: key 'outlier_channels': {value!r} must be an integer in 0..256 (e.g. 8: each "
                          "linear's 8 input channels of largest measured max-abs stay in high precision)")
    return value


def _parse_sqnr_db(value: Any, source: str) -> float | None:
    """`auto_blocklist_sqnr_db`: a layer whose FP8 output SQNR is below this many dB stays high precision."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{source}: key 'auto_blocklist_sqnr_db': {value!r} must be a finite number of dB >= 0 "
                          "(e.g. 20: layers whose FP8 output SQNR is below 20 dB stay in high precision)")
    return float(value)


def _parse_scale_params(value: Any, source: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key 'scale_params' must be an object like {{\"input_backoff\": 0.25}}")
    out = {}
    for key, v in value.items():
        if key not in ("input_backoff", "weight_backoff"):
            raise ConfigError(f"{source}: unknown key 'scale_params.{key}'"
                              f"{closest(key, ('input_backoff', 'weight_backoff'))}; accepted: input_backoff, "
                              "weight_backoff")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ConfigError(f"{source}: key 'scale_params.{key}': {v!r} must be a number in (0, 1]: the fraction "
                              "of the FP8 range the measured max-abs maps to")
        out[key] = float(v)
    return out


def config_path_from_argv(argv: Sequence[str]) -> str | None:
    """The value of `--quant-config FILE` or `--quant-config=FILE` in argv, else None."""
    for i, arg in enumerate(argv):
        if arg == CLI_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{CLI_FLAG} needs a file path, e.g. {CLI_FLAG} quant_config.json")
            return argv[i + 1]
        if arg.startswith(CLI_FLAG + "="):
            return arg.split("=", 1)[1]
    return None


def resolve_config(config: QuantConfig | Mapping | str | os.PathLike | None) -> QuantConfig | None:
    """An explicit config (object, dict or path) wins; else `--quant-config`; else `QUANT_CONFIG`."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return QuantConfig.from_json(config)
    if config is None:
        return QuantConfig.from_env_or_args()
    raise ConfigError(f"config must be a QuantConfig, a dict or a JSON path, got {type(config).__name__}")


def _reject_hqt_only(data: Mapping[str, Any], source: str) -> None:
    for key, values in _HQT_ONLY_VALUES.items():
        value = data.get(key)
        if isinstance(value, str):
            for known, why in values.items():
                if value.lower() == known.lower():
                    raise ConfigError(f"{source}: key '{key}': {value!r} is an HQT value ds_quant does not support: {why}")


def _parse_filter(value: Any, key: str, source: str) -> ModuleFilter:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key '{key}' must be an object like {{\"types\": [], \"names\": []}}, "
                          f"got {type(value).__name__}")
    unknown = [k for k in value if k not in ("types", "names")]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{key}.{unknown[0]}'{closest(unknown[0], ('types', 'names'))}; "
                          "accepted: types, names")
    out = {}
    for sub in ("types", "names"):
        items = value.get(sub, [])
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{source}: key '{key}.{sub}' must be a list of strings, got {items!r}")
        out[sub] = tuple(items)
    for t in out["types"]:
        if t not in SUPPORTED_TYPES and t not in HQT_OTHER_TYPES:
            raise ConfigError(f"{source}: key '{key}.types': unknown module type {t!r}"
                              f"{closest(t, SUPPORTED_TYPES + HQT_OTHER_TYPES)}; ds_quant quantizes: "
                              f"{', '.join(SUPPORTED_TYPES)}")
    for pattern in out["names"]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{source}: key '{key}.names': {pattern!r} is not a valid regex: {e}") from None
    return ModuleFilter(**out)


def _parse_bool(value: Any, key: str, source: str) -> bool:
    """The ds_quant extensions that switch a behaviour on or off (HQT has none): JSON true / false only."""
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: key '{key}': {value!r} must be true or false")
    return value


def _parse_path(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: key '{key}' must be a non-empty path string, got {value!r}")
    if value.endswith("/"):
        raise ConfigError(f"{source}: key '{key}': {value!r} ends with '/'; it is a file prefix, "
                          f"e.g. {value}stats")
    return value


def _parse_optional_path(value: Any, key: str, source: str) -> str | None:
    return None if value is None else _parse_path(value, key, source)


__all__ = ["ATTENTION_TYPES", "ActScope", "CLI_FLAG", "ConfigError", "DeviceForScales", "ENV_VAR", "EXPERTS_TYPES", "Fp8Format", "GptqParams", "HQT_OTHER_TYPES", "KV_CACHE_TYPES", "METHOD_SCHEMES", "MeasureExclude", "Mode", "ModuleFilter", "Observer", "QuantConfig", "SCHEME_ARGS", "SCHEME_PRESETS", "SCHEME_PRESETS_LATER", "SCHEME_ROLES", "SUPPORTED_TYPES", "ScaleMethod", "SchemeChoice", "config_path_from_argv", "resolve_config"]
