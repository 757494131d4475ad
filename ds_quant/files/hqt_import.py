"""Import HQT / INC measurement files (`*_hooks_maxabs_{rank}_{world}.json` or `.npz`) as a merged file.

HQT's schema: `{"GlobalRank", "LocalRank", "Mode", "Nodes": {name: {"inputs": [...], "outputs": ...,
"params": {"weight": ...}}}}`, one file per rank, each value a max-abs (a number, or nested lists around
one: `[[x]]`; per-channel observers store a vector). A linear is a node with one input and a weight;
matmul, kv-cache, softmax and fused-SDPA nodes are skipped with the reason.

HQT records neither layer shapes nor which layers were split how. Per-tensor max-abs merge by max over
ranks whatever the split, so they are always imported. Shapes and per-channel vectors need the model:
with `shapes` (e.g. from `--model DIR`) vectors are placed (replicated: max; split: concatenated in rank
order); without it, shapes stay null and vectors are kept only from a single-rank file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import MeasurementError
from . import measurements as ms

_NAME = re.compile(r"_(\d+)_(\d+)\.(json|npz)$")
_NOT_LINEAR_HINTS = (("matmul", "matmul (two activations, no weight): ds_quant quantizes linears only"),
                     ("cache", "kv-cache: not a linear"), ("softmax", "softmax: not a linear"),
                     ("sdpa", "fused SDPA: not a linear"), ("attn_fn", "attention function: not a linear"))


def read_hqt_file(path: str | Path, allow_pickle: bool = False) -> dict:
    """One HQT measurement file as a dict; errors name the file and what is wrong."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=allow_pickle) as z:
                arr = z[z.files[0]]
                doc = arr.item() if arr.dtype == object else None
        else:
            doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeasurementError(f"{path}: HQT measurement file not found") from None
    except json.JSONDecodeError as e:
        raise MeasurementError(f"{path}: not valid JSON (truncated or corrupt?) at line {e.lineno}: {e.msg}") from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise MeasurementError(f"{path}: stores a pickled object; pass --allow-pickle if you trust the file, "
                                   "or have HQT save JSON") from None
        raise MeasurementError(f"{path}: cannot read as .npz: {e}") from None
    except (OSError, IndexError) as e:
        raise MeasurementError(f"{path}: cannot read: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Nodes"), dict):
        raise MeasurementError(f"{path}: not an HQT measurement file (expected an object with \"Nodes\")")
    return doc


def rank_and_world(path: str | Path, doc: Mapping) -> tuple[int, int]:
    m = _NAME.search(Path(path).name)
    if m:
        return int(m.group(1)), int(m.group(2))
    rank = doc.get("GlobalRank")
    return (int(rank), None) if isinstance(rank, int) else (0, 1)


def amax_of(value, where: str) -> float:
    try:
        arr = np.abs(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise MeasurementError(f"{where}: {value!r} is not a number or list of numbers") from None
    if arr.size == 0 or not np.isfinite(arr).all():
        raise MeasurementError(f"{where}: empty or non-finite max-abs {value!r}")
    return float(arr.max())


def vector_of(value) -> np.ndarray | None:
    """A per-channel vector (length > 1 once squeezed), else None."""
    arr = np.asarray(value, dtype=np.float32).squeeze()
    return np.abs(arr) if arr.ndim == 1 and arr.size > 1 else None


def skip_reason(name: str, node: Mapping) -> str | None:
    inputs, params = node.get("inputs"), node.get("params") or {}
    if "weight" not in params:
        for hint, why in _NOT_LINEAR_HINTS:
            if hint in name.lower():
                return why
        if isinstance(inputs, list) and len(inputs) == 2:
            return "two inputs and no weight (a matmul): ds_quant quantizes linears only"
        return "no weight parameter: not a linear"
    if not isinstance(inputs, list) or len(inputs) != 1:
        return f"{len(inputs) if isinstance(inputs, list) else 'no'} inputs: a linear has one"
    return None


def import_hqt(paths: Sequence[str | Path], shapes: Mapping[str, tuple[int, int]] | None = None,
               allow_pickle: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """(merged document, [(node, why skipped)]) from one HQT file per rank."""
    if not paths:
        raise MeasurementError("no HQT files given")
    docs = {}
    for p in paths:
        doc = read_hqt_file(p, allow_pickle)
        rank, world = rank_and_world(p, doc)
        if rank in docs:
            raise MeasurementError(f"{p}: rank {rank} given twice (also {docs[rank][0]})")
        docs[rank] = (str(p), world, doc)
    worlds = {w for _, w, _ in docs.values() if w is not None}
    world = worlds.pop() if len(worlds) == 1 else (len(docs) if not worlds else None)
    if world is None:
        raise MeasurementError(f"HQT files from different world sizes: "
                               f"{', '.join(f'{p} ({w})' for p, w, _ in docs.values())}")
    missing = [r for r in range(world) if r not in docs]
    if missing:
        raise MeasurementError(f"HQT files of world size {world}: ranks {missing} missing (given: "
                               f"{', '.join(p for p, _, _ in docs.values())})")
    ordered = [docs[r] for r in range(world)]
    names = list(ordered[0][2]["Nodes"])
    layers, skipped = {}, []
    for name in names:
        node = ordered[0][2]["Nodes"][name]
        why = skip_reason(name, node)
        if why is None and shapes is not None and name not in shapes:
            why = "not a linear of the given model"
        if why is None:
            absent = [p for p, _, d in ordered if name not in d["Nodes"]]
            why = f"missing from {', '.join(absent)}" if absent else None
        if why:
            skipped.append((name, why))
            continue
        layers[name] = _layer(name, [(p, d["Nodes"][name]) for p, _, d in ordered],
                              None if shapes is None else shapes[name])
    head = ms._header("merged", "maxabs", "unknown", world, layers)
    head["source"] = {"hqt_files": [p for p, _, _ in ordered], "mode": ordered[0][2].get("Mode")}
    return {**head, "layers": layers}, skipped


def _layer(name: str, nodes: list[tuple[str, Mapping]], shape: tuple[int, int] | None) -> dict:
    inputs = [amax_of(n["inputs"][0], f"{p}: node '{name}' inputs") for p, n in nodes]
    weights = [amax_of(n["params"]["weight"], f"{p}: node '{name}' weight") for p, n in nodes]
    outputs = [amax_of(n["outputs"], f"{p}: node '{name}' outputs") if n.get("outputs") is not None else None
               for p, n in nodes]
    out_f, in_f = shape if shape else (None, None)
    vecs = [vector_of(n["inputs"][0]) for _, n in nodes]
    channels = None
    if all(v is not None for v in vecs):
        lens = [len(v) for v in vecs]
        if in_f is None and len(vecs) == 1:
            channels, in_f = vecs[0], lens[0]
        elif in_f is not None and all(n == in_f for n in lens):
            channels = np.max(vecs, axis=0)  # replicated input
        elif in_f is not None and sum(lens) == in_f:
            channels = np.concatenate(vecs)  # split input, in rank order
    return ms.linear_record("plain", in_f, out_f, {
        "input_amax": max(inputs), "input_channel_amax": None if channels is None else channels.astype(np.float32).tolist(),
        "output_amax": None if any(o is None for o in outputs) else max(outputs), "weight_amax": max(weights),
        "samples": 0})


def model_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """{fqn: (out_features, in_features)} of the nn.Linear layers of an HF model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
