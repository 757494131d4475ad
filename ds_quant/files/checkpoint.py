"""FP8 HF model folders in compressed-tensors' float-quantized form: write (atomically), validate, read slices.

A folder is an ordinary HF model folder. `config.json` carries a `quantization_config` as compressed-tensors
writes it (`quant_method: compressed-tensors`, `format: float-quantized`), and each FP8 linear `L` has, in the
safetensors files, the full unsharded tensors

    L.weight        float8_e4m3fn (out, in)      w ~= weight * weight_scale
    L.weight_scale  float32 (1,) per tensor, or (out, 1) per output channel
    L.input_scale   float32 (1,), static activations only (absent: dynamic per-token)

so any TP size, HF transformers + compressed-tensors and vLLM read it. Every other tensor is carried over as
it was. ds_quant's own extras (scale method, device profile, activation limit, measurement fingerprint) sit in
`quantization_config["ds_quant"]`; compressed-tensors ignores unknown keys.

This file knows the format only: no model, no DeepSpeed. `load.py` joins it to the layers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors import INDEX_NAME, WEIGHTS_NAME, SafetensorsFolder, SafetensorsWriter

EXTRA_KEY = "ds_quant"
FORMAT = "ds_quant.fp8-checkpoint"
VERSION = 1
E4M3_MAX = 448.0
# Files of a source folder that are not carried over (weights are rewritten, other weight formats dropped).
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".index.json")


# -- the scheme, as compressed-tensors spells it ------------------------------------------------------------
def _args(strategy: str, dynamic: bool, observer: str | None = None) -> dict:
    d = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": strategy,
         "dynamic": dynamic}
    return d if observer is None else {**d, "observer": observer}


@dataclass(frozen=True)
class Scheme:
    """What one FP8 linear stores: per-channel weight scales or not, static input scale or dynamic per token."""
    weight_per_channel: bool
    static_input: bool

    def to_ct(self, targets: list[str]) -> dict:
        return {"targets": targets,
                "weights": _args("channel" if self.weight_per_channel else "tensor", False),
                "input_activations": _args("tensor", False, "static_minmax") if self.static_input
                else _args("token", True),
                "output_activations": None, "format": None}


def quantization_config(schemes: dict[str, Scheme], unquantized: list[str], extras: dict) -> dict:
    """`quantization_config` for config.json: one group targeting `Linear` when every FP8 layer shares a scheme
    (the linears left in high precision are `ignore`d), else one group per scheme naming its layers."""
    kinds = sorted(set(schemes.values()), key=lambda s: (s.weight_per_channel, s.static_input))
    if len(kinds) <= 1:
        groups = {"group_0": (kinds[0] if kinds else Scheme(False, True)).to_ct(["Linear"])}
        ignore = sorted(unquantized)
    else:
        groups = {f"group_{i}": s.to_ct(sorted(n for n, x in schemes.items() if x == s)) for i, s in enumerate(kinds)}
        ignore = []
    return {"config_groups": groups, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
            "format": "float-quantized", "quantization_status": "compressed", "global_compression_ratio": None,
            "ignore": ignore, EXTRA_KEY: {"format": FORMAT, "version": VERSION, **extras}}


def _check_group(where: str, name: str, group: dict) -> None:
    """A config group ds_quant can run: 8-bit float symmetric weights per tensor or channel; activations static
    per tensor or dynamic per token."""
    w, a = group.get("weights"), group.get("input_activations")
    def bad(why):
        return CheckpointError(f"{where}: quantization_config group '{name}': {why}; ds_quant loads FP8 weights "
                               "(8-bit float, symmetric, per tensor or channel) with static per-tensor or dynamic "
                               "per-token FP8 activations")
    if not isinstance(w, dict) or w.get("num_bits") != 8 or w.get("type") != "float":
        raise bad(f"weights {w}")
    if w.get("strategy") not in ("tensor", "channel") or w.get("group_size") or w.get("dynamic") or \
            not w.get("symmetric", True):
        raise bad(f"weight strategy {w.get('strategy')!r} (group_size {w.get('group_size')}, dynamic "
                  f"{w.get('dynamic')})")
    if a is None:
        raise bad("weight-only (no input_activations)")
    if a.get("num_bits") != 8 or a.get("type") != "float" or not a.get("symmetric", True):
        raise bad(f"input_activations {a}")
    if (a.get("strategy"), bool(a.get("dynamic"))) not in (("tensor", False), ("token", True)):
        raise bad(f"input_activations strategy {a.get('strategy')!r} dynamic {a.get('dynamic')}")
    if group.get("output_activations"):
        raise bad("output activations are quantized")


def read_config(folder: str | os.PathLike) -> dict | None:
    """config.json's quantization_config if it is an FP8 float-quantized compressed-tensors one, else None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a JSON object ({e})") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    if qc.get("format") not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"{path}: compressed-tensors format {qc.get('format')!r}: ds_quant loads "
                              "'float-quantized' FP8 folders")
    for name, group in (qc.get("config_groups") or {}).items():
        _check_group(str(path), name, group)
    return qc


def is_fp8_folder(folder) -> bool:
    try:
        return Path(folder).is_dir() and read_config(folder) is not None
    except CheckpointError:
        return True  # it claims to be one: let the reader say what is wrong


# -- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Layer:
    """One FP8 linear of a folder: its full weight shape, its scales (small: read at open, checked)."""
    name: str
    shape: tuple[int, int]
    weight_scale: torch.Tensor  # float32 () per tensor, (out,) per channel
    input_scale: torch.Tensor | None  # float32 (); None: dynamic per token


class Fp8Folder(SafetensorsFolder):
    """An FP8 folder opened for reading: besides the headers, every FP8 layer's tensors and scales are checked
    up front; then any rank reads just its slices."""

    def __init__(self, folder: str | os.PathLike, rename=None):
        qc = read_config(folder)
        if qc is None:
            raise CheckpointError(f"{folder}: no compressed-tensors quantization_config in config.json")
        self.quant_config = qc
        self.extras = qc.get(EXTRA_KEY) or {}
        self.act_limit = float(self.extras.get("act_limit", E4M3_MAX))
        super().__init__(folder, rename)
        self.layers = self._find_layers()

    def _find_layers(self) -> dict[str, Fp8Layer]:
        layers = {}
        for key, (dtype, _) in self.meta.items():
            if key.endswith(".weight") and dtype.startswith("F8") and f"{key[:-len('weight')]}weight_scale" not in \
                    self.meta:
                raise CheckpointError(f"{self._file_of(key)}: tensor {self.named(key)} is {dtype} but the file has "
                                      "no weight_scale beside it; the checkpoint is corrupt or truncated: convert "
                                      "again")
            if not key.endswith(".weight_scale"):
                continue
            name = key[: -len(".weight_scale")]
            layers[name] = self._layer(name)
        return layers

    def _layer(self, name: str) -> Fp8Layer:
        w = f"{name}.weight"
        if w not in self.meta:
            raise CheckpointError(f"{self._file_of(name + '.weight_scale')}: {self.named(name + '.weight_scale')} "
                                  f"without '{w}'")
        dtype, shape = self.meta[w]
        if dtype != "F8_E4M3" or len(shape) != 2:
            raise CheckpointError(f"{self._file_of(w)}: tensor {self.named(w)} is {dtype} {list(shape)}, expected a 2-D "
                                  "F8_E4M3 (float8_e4m3fn) weight")
        ws = self._scale(f"{name}.weight_scale", shape[0])
        ins = self._scale(f"{name}.input_scale", 1) if f"{name}.input_scale" in self.meta else None
        if ins is not None and ins.numel() != 1:
            raise CheckpointError(f"{self._file_of(name + '.input_scale')}: {self.named(name + '.input_scale')} has "
                                  f"{ins.numel()} elements; ds_quant loads one static input scale per layer")
        return Fp8Layer(name, shape, ws.reshape(()) if ws.numel() == 1 and shape[0] != 1 else ws.reshape(-1),
                        None if ins is None else ins.reshape(()))

    def _scale(self, key: str, rows: int) -> torch.Tensor:
        dtype, shape = self.meta[key]
        n = math.prod(shape)
        if dtype != "F32" or n not in (1, rows) or len(shape) > 2 or (n == rows and rows > 1 and
                                                                        shape not in ((rows, 1), (rows,))):
            raise CheckpointError(f"{self._file_of(key)}: tensor {self.named(key)} is {dtype} {list(shape)}, expected F32 "
                                  f"[1] (per tensor) or [{rows}, 1] (per output channel)")
        t = self.read(key)
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise CheckpointError(f"{self._file_of(key)}: tensor {self.named(key)} holds zero, negative or non-finite "
                                  "scales; the checkpoint is corrupt: convert again")
        return t


# -- writing ---------------------------------------------------------------------------------------------
class FolderWriter:
    """Writes a folder under a temp name beside OUT_DIR and renames it into place at `commit()`: a killed or
    failed conversion never leaves anything at OUT_DIR (a leftover `.OUT_DIR.tmp-PID` can be deleted)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise CheckpointError(f"{self.out}: exists and is not empty; remove it or choose another OUT_DIR")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.weight_map: dict[str, str] = {}

    def stream(self, fname: str, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> SafetensorsWriter:
        """A writer for `fname` in the temp folder, its tensors (key -> dtype, shape) fixed up front; write each
        with `.write(key, tensor)` as it is made, then `.close()`."""
        w = SafetensorsWriter(self.tmp / fname, plan, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(plan, fname))
        return w

    def write_tensors(self, fname: str, tensors: dict[str, torch.Tensor]) -> None:
        w = self.stream(fname, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
        for k, v in tensors.items():
            w.write(k, v)
        w.close()

    def copy_files(self, src: str | os.PathLike) -> list[str]:
        """Tokenizer, generation config and the like: every file but weights and config.json."""
        copied = []
        for p in sorted(Path(src).iterdir()):
            if p.is_file() and p.name != "config.json" and not p.name.endswith(_NOT_COPIED):
                shutil.copy2(p, self.tmp / p.name)
                copied.append(p.name)
        return copied

    def commit(self, config: dict) -> Path:
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files = sorted(set(self.weight_map.values()))
        if len(files) > 1:
            total = sum((self.tmp / f).stat().st_size for f in files)
            (self.tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                           "weight_map": dict(sorted(self.weight_map.items()))},
                                                          indent=2) + "\n")
        elif files and files[0] != WEIGHTS_NAME:
            os.replace(self.tmp / files[0], self.tmp / WEIGHTS_NAME)
        for p in self.tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if self.out.exists():
            self.out.rmdir()  # empty (checked at start)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
