"""The Hessian file of config key `gptq`: `{dump_stats_path}.hessians.safetensors`, beside the measurement file.

Per linear, H = Σ xᵀx of its whole input over the calibration tokens, (in_features, in_features) float32: a
model-level statistic like the measurements (MEASURE all-gathers row-parallel input slices), so QUANTIZE at any
TP size reads the same H for a layer. Layers whose sums are bitwise equal (q/k/v, gate/up read the same input)
share one tensor. Safetensors metadata (strings): `format`, `version`, `run` (the MEASURE run id the
measurement file carries, so a Hessian file of another run is refused) and `layers`: JSON {layer: {"tensor": key,
"in_features": K, "tokens": n}}. Written to a temp file in the same folder, fsynced, renamed into place.

Size: Σ in_features² × 4 bytes over the distinct inputs (SmolLM2-135M: ~0.4 GB; a 70B model would need
~0.4 TB: GPTQ from one measurement file is for models whose per-layer K × K fits).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import MeasurementError
from .atomic import atomic_write

FORMAT = "ds_quant.hessians"
VERSION = 1


def hessian_path(prefix: str) -> str:
    return f"{prefix}.hessians.safetensors"


def remove_previous(prefix: str) -> list[str]:
    """Before a MEASURE run writes (rank 0): an earlier run's Hessian file goes, whether or not this run records one."""
    path = Path(hessian_path(prefix))
    if path.exists():
        path.unlink()
        return [str(path)]
    return []


def write(prefix: str, hessians: Mapping[str, tuple[torch.Tensor, int]], run: str | None) -> str:
    """Write {layer: (H (K, K), tokens)} atomically; returns the path."""
    from safetensors.torch import save_file

    tensors, layers, seen = {}, {}, {}
    for name in sorted(hessians):
        h, tokens = hessians[name]
        h = h.detach().float().cpu().contiguous()
        digest = (tuple(h.shape), int(tokens), hashlib.sha256(h.numpy().tobytes()).hexdigest())
        key = seen.get(digest)
        if key is None:
            key = seen[digest] = f"h{len(tensors)}"
            tensors[key] = h
        layers[name] = {"tensor": key, "in_features": int(h.shape[0]), "tokens": int(tokens)}
    meta = {"format": FORMAT, "version": str(VERSION), "run": run or "", "layers": json.dumps(layers, sort_keys=True)}
    path = Path(hessian_path(prefix))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return str(path)


class HessianFile:
    """A checked Hessian file; `get(layer)` reads one layer's H (float32) when asked."""

    def __init__(self, path: str, layers: dict[str, dict]):
        self.path, self.layers = path, layers

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.layers[name]["tensor"])


def read(prefix: str, wanted: Mapping[str, int], run: str | None = None) -> HessianFile:
    """The Hessian file of `prefix`, checked against {layer: in_features} (every one present, its K right) and,
    when given, the measurement file's run id. Raises MeasurementError naming the file and the layer."""
    from safetensors import SafetensorError, safe_open

    path = hessian_path(prefix)
    if not Path(path).exists():
        raise MeasurementError(f"{path}: no Hessian file; config key 'gptq' needs one: run MEASURE with 'gptq' in "
                               "its config (it writes this file beside the measurement file)")
    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise MeasurementError(f"{path}: not a readable safetensors file ({e}); run MEASURE again") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise MeasurementError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                               f"{FORMAT!r} version {VERSION}")
    try:
        layers = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError):
        raise MeasurementError(f"{path}: its 'layers' metadata is missing or not JSON; run MEASURE again") from None
    if run and meta.get("run") and meta["run"] != run:
        raise MeasurementError(f"{path}: written by MEASURE run {meta['run']}, the measurement file by run {run}; "
                               "both must come from the same run: measure again")
    missing = [n for n in wanted if n not in layers]
    if missing:
        raise MeasurementError(f"{path}: no Hessian for layer '{missing[0]}'" + (f" and {len(missing) - 1} more"
                               if len(missing) > 1 else "") + "; measure again with 'gptq' and the same allow/block lists")
    for name, k in wanted.items():
        rec = layers[name]
        if rec.get("in_features") != k or rec.get("tensor") not in keys:
            raise MeasurementError(f"{path}: layer '{name}': Hessian for {rec.get('in_features')} input channels, the "
                                   f"model has {k}; measure this model again")
    return HessianFile(path, layers)
