"""`observer: "save"` (HQT's tensor-dump observer): MEASURE also keeps the inputs and outputs the measured linears
see, and each rank writes them to one safetensors file beside its shard.

    {dump_stats_path}_tensors_{rank}_{world_size}.safetensors
        "{layer}.input.{call}"   the layer's local input of forward call `call` (0, 1, ...), as the GEMM saw it
        "{layer}.output.{call}"  its output after the allreduce / gather / bias: what the next layer receives
        metadata: format, rank, world_size, run, max_bytes, saved_bytes, dropped_tensors, first_dropped

Statistics are recorded as with `maxabs` (the measurement file is the same and QUANTIZE reads it as usual); the
dump is for looking at the real activations (outliers, a layer gone wrong) with any safetensors reader:
`safetensors.torch.load_file(path)` or `safetensors.safe_open(path, "np")`.

Memory: the tensors are copied to host memory during calibration, at most `save_max_bytes` per rank (default 1 GiB;
the allowlist's `names` select the layers to keep, e.g. `{"names": ["layers\\.0\\."]}`). Once the cap is reached,
nothing more is kept on that rank, and the rank logs one warning naming the first tensor it dropped, how many it
dropped and the key to raise. The file is written temp + rename: never half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..log import get_logger
from .atomic import atomic_write, glob_escape

FORMAT = "ds_quant.tensors"
DEFAULT_MAX_BYTES = 1 << 30


def dump_path(prefix: str, rank: int, world_size: int) -> str:
    return f"{prefix}_tensors_{rank}_{world_size}.safetensors"


class TensorDump:
    """The tensors one rank keeps, in the order they were seen, under one byte budget shared by every layer."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.saved_bytes = 0
        self.dropped = 0
        self.first_dropped: str | None = None

    def add(self, layer: str, what: str, t: torch.Tensor) -> None:
        call = self.calls.get((layer, what), 0)
        self.calls[(layer, what)] = call + 1
        key = f"{layer}.{what}.{call}"
        size = t.numel() * t.element_size()
        if self.dropped or self.saved_bytes + size > self.max_bytes:
            self.dropped += 1
            self.first_dropped = self.first_dropped or key
            return
        self.tensors[key] = t.detach().to("cpu", copy=True).contiguous()
        self.saved_bytes += size

    def write(self, prefix: str, rank: int, world_size: int, run: str | None) -> str:
        """This rank's file (temp + rename); logs the cap warning where tensors were dropped. Returns the path."""
        from safetensors.torch import save_file

        path = Path(dump_path(prefix, rank, world_size))
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "rank": str(rank), "world_size": str(world_size), "run": run or "",
                "max_bytes": str(self.max_bytes), "saved_bytes": str(self.saved_bytes),
                "dropped_tensors": str(self.dropped), "first_dropped": self.first_dropped or ""}
        atomic_write(path, lambda tmp: save_file(self.tensors, tmp, metadata=meta))
        if self.dropped:
            get_logger().warning(
                f"observer 'save': reached save_max_bytes ({_size(self.max_bytes)}) on this rank at "
                f"{self.first_dropped}; {self.dropped} tensor(s) not saved. Raise \"save_max_bytes\" in the config, "
                "or select fewer layers with the allowlist's names")
        return str(path)


def remove_previous(prefix: str, rank: int) -> list[str]:
    """An earlier run's dump files under `prefix`: rank 0 removes every one it sees, other ranks their own."""
    folder, stem = os.path.split(prefix)
    gone = []
    for p in Path(folder or ".").glob(f"{glob_escape(stem)}_tensors_*_*.safetensors"):
        parts = p.name[len(stem) + len("_tensors_"):-len(".safetensors")].split("_")
        if len(parts) == 2 and all(x.isdigit() for x in parts) and (rank == 0 or int(parts[0]) == rank):
            p.unlink(missing_ok=True)
            gone.append(str(p))
    return gone


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"
