"""What ds_quant keeps on a model it prepared: one `PreparedState`, under one attribute, read with `state_of`.

It lives in `layers` (the lowest wing that needs it: the KV cache keeps its plan there) so that every user (layers,
workflows, the faces) can import it. Per-module state of the attention implementations (the fallback each
attention module runs, its call counts, its attention site) stays on those modules: their forward reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATE_ATTR = "_ds_quant"


@dataclass
class PreparedState:
    """One prepared model's state. Typed loosely on purpose: the classes held here live in modules that import this
    one (`kv_cache.KVPlan`, `attention.AttentionSite`, `hf_model.Pending`); the config is held, never read, here."""
    config: Any = None  # the QuantConfig the model was prepared with
    run: str | None = None  # MEASURE: the run id every shard of this run is stamped with
    finished: bool = False  # MEASURE: the measurements were written (finish_measurements ran)
    kv: Any = None  # kv_cache.KVPlan: the FP8 / measured KV-cache layers generate() gets
    attention: dict[str, Any] = field(default_factory=dict)  # {attention module name: attention.AttentionSite}
    pending: Any = None  # hf_model.Pending: built on meta from a folder; load.py fills it at init_inference
    kv_readable: Any = None  # the KVPlan whose FP8 cache decode attention may read directly (attention.choose)
    original_attention: str | None = None  # the attention implementation the model had before ds_quant


def state_of(model, create: bool = False) -> PreparedState | None:
    """The model's state; None if ds_quant has not touched it (with `create`, a fresh one, attached)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None and create:
        state = PreparedState()
        setattr(model, STATE_ATTR, state)
    return state
