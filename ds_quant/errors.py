"""The errors ds_quant raises for bad input: each names the file, key, layer or rank and the fix."""

from __future__ import annotations

import json

try:  # 3x faster than json on the shards' layer lines (bench/merge_bench.py); json is the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _fast_loads = json.loads
import json


class MeasurementError(ValueError):
    """A measurement file that is missing, malformed, or does not fit the model."""


class CheckpointError(ValueError):
    """An FP8 folder that is malformed, truncated, or does not fit the model; the message names file and tensor."""


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line that says what to fix."""


# -- errors -----------------------------------------------------------------------------------------------
class RankError(ValueError):
    """A check failed on at least one rank; every rank raises this one, with the same message."""


class HessianError(ValueError):
    """The Hessian cannot be used for this weight (shape, non-finite, not positive definite after damping)."""


class SmoothError(ValueError):
    """Smoothing cannot be applied to this model; the message names the layer and the fix."""
