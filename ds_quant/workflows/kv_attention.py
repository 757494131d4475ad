"""The KV cache and attention of a prepared model: where the config becomes what those layers are handed.

`kv_cache` and `attention` never read the config: here the allow/block rule (`QuantConfig.selects`) becomes their
selection predicate and `layer_spec.resolve` their LayerSpecs, for MEASURE and QUANTIZE alike.
"""

from __future__ import annotations

import functools
import os

from ..config import ATTENTION_TYPES, QuantConfig
from ..layers import attention, kv_cache
from ..numerics import layer_spec

KV_ATTENTION_ENV = "DS_QUANT_KV_ATTENTION"
"""`0` / `1`: overrides the config key `kv_cache_attention` (decode attention straight from the FP8 KV cache)."""


def kv_attention_enabled(cfg: QuantConfig) -> bool:
    """The config key `kv_cache_attention`, unless DS_QUANT_KV_ATTENTION overrides it."""
    env = os.environ.get(KV_ATTENTION_ENV, "")
    return env not in ("0", "false", "False") if env else cfg.kv_cache_attention


def kv_plan(model, cfg: QuantConfig, load=None) -> kv_cache.KVPlan | None:
    """The KV-cache plan of `model` under `cfg` (None: nothing to swap). `load()` -> (measurement document, its
    path), called only if static scales are needed."""
    return kv_cache.plan_for(model, cfg.mode, functools.partial(cfg.selects, "kv_cache", kv_cache.KV_TYPE),
                             lambda name: layer_spec.resolve(cfg, name, "kv_cache"), load,
                             named=kv_cache.KV_TYPE in cfg.allowlist.types)


def install(model, cfg: QuantConfig, load=None) -> None:
    """Install the selected FP8 / measured KV cache and attention into `model` (both kept in its PreparedState; the
    attention implementation the model gets does not depend on the order: `attention.choose`)."""
    install_kv_cache(model, cfg, load)
    install_attention(model, cfg, load)


def install_kv_cache(model, cfg: QuantConfig, load=None) -> None:
    kv_cache.install(model, kv_plan(model, cfg, load), kv_attention_enabled(cfg))


def install_attention(model, cfg: QuantConfig, load=None) -> None:
    # Attention is opt-in: unless the allowlist names one of its types, nothing is looked at (or logged).
    if any(t in cfg.allowlist.types for t in ATTENTION_TYPES):
        attention.install(model, cfg.mode, functools.partial(cfg.selects, "attention"),
                          lambda name: layer_spec.resolve(cfg, name, layer_spec.Kind.ATTENTION), load)
