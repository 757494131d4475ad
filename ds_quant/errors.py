"""The errors ds_quant raises for bad input: each names the file, key, layer or rank and the fix.

All derive from `DsQuantError`, so a face (`ds-quant`, `python -m ds_quant.run`) catches ours in one place and
prints one line, while anything else keeps its traceback; each is also a `ValueError`, as they always were, so
`except ValueError` in users' code still catches them.
"""

from __future__ import annotations


class DsQuantError(Exception):
    """Bad input ds_quant found and explained: the message is one line naming what to fix (no traceback needed)."""


class MeasurementError(DsQuantError, ValueError):
    """A measurement file that is missing, malformed, or does not fit the model."""


class CheckpointError(DsQuantError, ValueError):
    """An FP8 folder that is malformed, truncated, or does not fit the model; the message names file and tensor."""


class ConfigError(DsQuantError, ValueError):
    """A config that cannot be used; the message is one line that says what to fix."""


class RankError(DsQuantError, ValueError):
    """A check failed on at least one rank; every rank raises this one, with the same message."""


class HessianError(DsQuantError, ValueError):
    """The Hessian cannot be used for this weight (shape, non-finite, not positive definite after damping)."""


class SmoothError(DsQuantError, ValueError):
    """Smoothing cannot be applied to this model; the message names the layer and the fix."""
