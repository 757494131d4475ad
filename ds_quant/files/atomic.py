"""Atomic writes: a temp file beside the target, fsynced, renamed into place."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

try:  # 3x faster than json on the shards' layer lines (bench/merge_bench.py); json is the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _fast_loads = json.loads


@contextlib.contextmanager
def gc_paused():
    """The cyclic GC off while a file's records are parsed or merged: they make ~100 container objects per
    layer and no cycles, and at 64 shards x 1000 layers the collections the allocations trigger took more
    than half the merge's time (bench/merge_bench.py). Nests; restores the previous state."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temp file beside `path`; it is fsynced and renamed into place, or removed on any error:
    readers never see half a file. For writers that want a path (safetensors' save_file), and for bytes below."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files: give them the mode open() would
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
