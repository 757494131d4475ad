"""The config's vocabulary: the accepted values of its keys (enums, module type names) and its small records."""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..parallel.tp import SUPPORTED_TYPE_NAMES, UNSUPPORTED_TYPE_REASONS

ENV_VAR = "QUANT_CONFIG"
CLI_FLAG = "--quant-config"


class _CaseInsensitiveEnum(str, enum.Enum):
    @classmethod
    def parse(cls, value: Any, key: str, source: str) -> _CaseInsensitiveEnum:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.strip().lower():
                    return member
        accepted = ", ".join(m.value for m in cls)
        by_lower = {m.value.lower(): m.value for m in cls}
        match = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.6)
        hint = f" (did you mean '{by_lower[match[0]]}'?)" if match else ""
        raise ConfigError(f"{source}: key '{key}': {value!r} is not one of: {accepted}{hint}")


class Mode(_CaseInsensitiveEnum):
    MEASURE = "MEASURE"
    QUANTIZE = "QUANTIZE"


class Observer(_CaseInsensitiveEnum):
    MAXABS = "maxabs"
    SAVE = "save"  # maxabs statistics, plus the measured layers' inputs and outputs dumped (tensor_dump.py)


class ScaleMethod(_CaseInsensitiveEnum):
    UNIT_SCALE = "unit_scale"
    MAXABS_HW = "maxabs_hw"
    MAXABS_POW2 = "maxabs_pow2"
    MAXABS_ARBITRARY = "maxabs_arbitrary"
    MAXABS_HW_OPT_WEIGHT = "maxabs_hw_opt_weight"
    MAXABS_POW2_OPT_WEIGHT = "maxabs_pow2_opt_weight"
    ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_hw_weights_pcs_maxabs_pow2"
    ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_hw_weights_pcs_opt_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2 = "act_maxabs_pow2_weights_pcs_maxabs_pow2"
    ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2 = "act_maxabs_pow2_weights_pcs_opt_pow2"
    # Beyond HQT: activation scales per token at run time (no measurements needed), weights per channel.
    ACT_DYNAMIC_PER_TOKEN_WEIGHTS_PCS = "act_dynamic_per_token_weights_pcs"


class DeviceForScales(_CaseInsensitiveEnum):
    CUDA = "cuda"
    GAUDI2 = "gaudi2"
    GAUDI3 = "gaudi3"


class ActScope(_CaseInsensitiveEnum):
    GLOBAL = "global"  # one input scale per layer, whatever the TP size (TP-invariant)
    RANK = "rank"  # each rank's scale from the channel statistics of its own input slice


class MeasureExclude(_CaseInsensitiveEnum):
    NONE = "NONE"
    OUTPUT = "OUTPUT"
    INPUT = "INPUT"
    PARAMS = "PARAMS"
    ALL = "ALL"


class Fp8Format(_CaseInsensitiveEnum):
    E4M3 = "E4M3"
    E5M2 = "E5M2"


# HQT values we recognise but do not implement: rejected with a specific reason, not "unknown".
_HQT_ONLY_VALUES = {
    "mode": {"NONE": "nothing to do; drop the config", "SHAPE": "shape dumps are Gaudi-only",
             "LOAD": "use QUANTIZE with the merged measurement file"},
    "scale_method": {m: "SmoothQuant is not supported; use a maxabs or pcs method"
                     for m in ("smoothquant_weights_output_channel_maxabs_pow2",
                               "weaksmoothquant_weights_output_channel_maxabs_pow2", "smoothquant_opt")},
}


# Module types ds_quant patches (class names, as HQT's `types` lists name them): from tp.py's table.
# Fused MoE experts are matched by layout (experts.py); these are the names the type lists may use for them.
EXPERTS_TYPES = ("MixtralExperts", "Qwen3MoeExperts")


# HQT's KV-cache type: the FP8 KV cache (kv_cache.py), selected like a module type, matched per layer by name
# `{attention module}.kv_cache`; an empty allowlist (types and names) selects it too, as in HQT.
KV_CACHE_TYPES = ("KVCache",)


# HQT's attention types (attention.py): opt-in, by naming them in the allowlist's types; naming them there does not
# narrow the allowlist for the other types.
ATTENTION_TYPES = ("Matmul", "Softmax")
_ROLES = ("linear", "experts", "kv_cache", "attention")  # QuantConfig.selects
SUPPORTED_TYPES = SUPPORTED_TYPE_NAMES + EXPERTS_TYPES + KV_CACHE_TYPES + ATTENTION_TYPES


# Types HQT knows that we never patch: harmless in a blocklist, an error in an allowlist.
HQT_OTHER_TYPES = ("Conv2d", "VLLMKVCache", "FusedSDPA", "ModuleFusedSDPA",
                   "LoRACompatibleLinear", "LoRACompatibleConv", "ScopedLinearAllReduce",
                   "MoeMatmul", "FusedMoE", "ReplicatedLinear", "RowParallelLinear", "ColumnParallelLinear",
                   "MergedColumnParallelLinear", "QKVParallelLinear", "GaudiMixtralSparseMoeBlock",
                   "DynamicMoeRuntimeDequantFusedMoE", "EmbeddingBag", "Embedding") + tuple(UNSUPPORTED_TYPE_REASONS)


@dataclass(frozen=True)
class ModuleFilter:
    """`{"types": [...], "names": [...]}`: class names, and regexes searched in the module's name."""
    types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not self.types and not self.names

    def narrows(self) -> bool:
        """As an allowlist: does it narrow the modules patched? Empty, or naming only the opt-in attention types
        (`Matmul`, `Softmax`), it selects every supported module, as HQT's empty allowlist does."""
        return bool(self.names) or any(t not in ATTENTION_TYPES for t in self.types)

    def matches(self, module_type_name: str, fqn: str) -> bool:
        return module_type_name in self.types or any(re.search(p, fqn) for p in self.names)


@dataclass(frozen=True)
class GptqParams:
    """Config key `gptq` (a ds_quant extension; HQT has none): GPTQ-style error-compensating weight rounding
    (gptq.py). MEASURE records each linear's input Hessian; QUANTIZE rounds the weights with it.
    damp: added to the Hessian's diagonal as a fraction of its mean. block: columns per batched update (speed
    only). act_order: round input channels in order of decreasing Hessian diagonal."""
    damp: float = 0.01
    block: int = 128
    act_order: bool = False


def closest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_overrides(value: Any, source: str, key: str = "scale_method_overrides"
                     ) -> tuple[tuple[str, ScaleMethod], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key '{key}' must be an object of name regex -> scale method, "
                          "e.g. {\"lm_head\": \"maxabs_pow2\"}")
    out = []
    for pattern, method in value.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{source}: key '{key}': {pattern!r} is not a valid regex: {e}") from None
        out.append((pattern, ScaleMethod.parse(method, f"scale_method_overrides.{pattern}", source)))
    return tuple(out)
