"""Safetensors I/O: files read with pread into buffers of their own, written with a planned header."""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# -- safetensors, read with pread (no mmap) -------------------------------------------------------------------
# safetensors dtype -> torch dtype (little-endian, as the format is)
DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
          "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


ST_DTYPE = {v: k for k, v in DTYPES.items()}


_MAX_HEADER = 100_000_000


_CHUNK_BYTES = 16 << 20  # a column slice is read in row chunks of about this size


_OWN_MAP_BYTES = 1 << 20  # buffers from this size up are anonymous mappings of their own, unmapped when freed


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of its bytes
    end: int


class SafetensorsFile:
    """One safetensors file read with `os.pread` into fresh buffers that are freed with the tensors they back.

    safe_open maps the file: every page a read touches stays mapped and counts in the process's RSS until the
    handle closes, so reading a model tensor by tensor peaks near the file size. Here the header (8-byte
    little-endian length + JSON) is parsed and every entry's dtype, shape and offsets are checked at open; a read
    copies just the bytes asked for (a row slice: one pread; a column slice: rows read in chunks).

    Buffers of 1 MB and more are anonymous mappings of their own (`fresh_tensor`): freed, they go back to the system
    at once, where glibc would keep freed heap blocks below its mmap threshold (up to 32 MB) and fragment, which
    a layer-by-layer read-quantize-free loop turns into hundreds of MB. `read(..., mapped=True)` instead gives
    a whole tensor as a copy-on-write view of the file (as safe_open does): for the weights used as they are
    (embeddings, norms), whose untouched pages then never count, shared by the ranks through the page cache."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        self._map = None
        try:
            self.tensors, self.metadata = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a readable safetensors file ({why}); it is truncated or corrupt: "
                               "convert again")

    def _parse(self) -> tuple[dict[str, TensorInfo], dict]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise self._bad(f"header length {n}, file size {size}")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        data, tensors, end = 8 + n, {}, 0
        for key, v in header.items():
            try:
                dtype, shape, (b, e) = v["dtype"], tuple(v["shape"]), v["data_offsets"]
                ok = dtype in DTYPES and all(isinstance(s, int) and s >= 0 for s in shape) and \
                    isinstance(b, int) and isinstance(e, int) and 0 <= b <= e
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise self._bad(f"tensor '{key}': bad header entry {v}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if e - b != nbytes:
                raise self._bad(f"tensor '{key}': {dtype} {list(shape)} needs {nbytes} bytes, its offsets span "
                                f"{e - b}")
            tensors[key] = TensorInfo(dtype, shape, data + b, data + e)
            end = max(end, e)
        if size - data < end:
            raise self._bad(f"the header describes {end} bytes of tensor data, the file holds {size - data}")
        return tensors, meta

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _pread_into(self, buf: memoryview, offset: int, key: str) -> None:
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise self._bad(f"tensor '{key}': file ends at byte {offset + done}")
            done += got

    def read(self, key: str, rows: slice | list[slice] | None = None, cols: slice | None = None,
             mapped: bool = False) -> torch.Tensor:
        """The tensor, or rows `rows` (one slice or several, concatenated) x columns `cols` of it, in a fresh
        buffer of its own; `mapped` (whole tensors only): a copy-on-write view of the file instead."""
        info = self.tensors[key]
        dtype, shape = DTYPES[info.dtype], info.shape
        if mapped and rows is None and cols is None and info.end > info.begin and info.begin % dtype.itemsize == 0:
            if self._map is None:
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
            return flat.view(dtype).reshape(shape)  # the tensor keeps the mapping alive
        if rows is None and cols is None:
            out = fresh_tensor(shape, dtype)
            if out.numel():
                self._pread_into(_bytes_of(out), info.begin, key)
            return out
        if not shape or (cols is not None and len(shape) < 2):
            raise CheckpointError(f"{self.path}: tensor '{key}' is {list(shape)}, it has no rows/columns to slice")
        parts = [(r if r is not None else slice(None)).indices(shape[0]) for r in
                 (rows if isinstance(rows, list) else [rows])]
        if any(step != 1 for _, _, step in parts):
            raise CheckpointError(f"{self.path}: tensor '{key}': strided row slices are not supported")
        c0, c1 = (0, shape[1] if len(shape) > 1 else 0) if cols is None else cols.indices(shape[1])[:2]
        c1 = max(c0, c1)
        whole = cols is None or (c0 == 0 and c1 == shape[1])
        n_rows = sum(max(0, stop - start) for start, stop, _ in parts)
        out = fresh_tensor((n_rows, c1 - c0, *shape[2:]) if len(shape) > 1 else (n_rows,), dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        at = 0
        for start, stop, _ in parts:
            if stop <= start:
                continue
            k = stop - start
            if whole:  # whole rows: one read straight into out
                self._pread_into(_bytes_of(out[at:at + k]), info.begin + start * row_bytes, key)
            else:  # column slice: whole rows in chunks, the columns copied out
                step = max(1, _CHUNK_BYTES // max(1, row_bytes))
                buf = fresh_tensor((min(step, k), *shape[1:]), dtype)
                for i in range(0, k, step):
                    m = min(step, k - i)
                    self._pread_into(_bytes_of(buf[:m]), info.begin + (start + i) * row_bytes, key)
                    out[at + i:at + i + m] = buf[:m, c0:c1]
                del buf
            at += k
        return out

    def close(self) -> None:
        """Closes the file; tensors read `mapped` keep their mapping (and stay valid) until they are freed."""
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fresh_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; from 1 MB up in an anonymous mapping of its own (unmapped when freed)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _OWN_MAP_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).reshape(shape)


def release_freed_memory() -> None:
    """Hand the heap's freed blocks back to the system (glibc `malloc_trim`; a no-op elsewhere). A loop that
    reads, quantizes and frees one layer at a time frees blocks below glibc's mmap threshold into the heap,
    between the FP8 tensors it keeps: glibc keeps them (measured: ~470 MB of a quantize-on-load's RSS)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    flat = t.reshape(-1).view(torch.uint8)  # float8 / bool / any dtype: its bytes
    return memoryview(flat.numpy()).cast("B")


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor without holding them: the plan (key -> dtype, shape) fixes
    every offset up front, so the header is written first and each tensor is written at its place as it comes
    (`os.pwrite`, any order), then freed. The layout is safetensors' own (tensors by alignment, then name; header
    padded to 8 bytes), so `safetensors.safe_open` and HF read it. `close()` checks every tensor was written and
    fsyncs."""

    def __init__(self, path: str | os.PathLike, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        order = sorted(plan, key=lambda k: (-plan[k][0].itemsize, k))
        header, self._at, off = {}, {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for k in order:
            dtype, shape = plan[k]
            if dtype not in ST_DTYPE:
                raise CheckpointError(f"{self.path}: tensor '{k}' has dtype {dtype}, which safetensors cannot hold")
            n = math.prod(shape) * dtype.itemsize
            header[k] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self._at[k] = (off, n, dtype, tuple(shape))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data = 8 + len(raw)
        self._left = set(plan)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._data + off)
        self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def write(self, key: str, t: torch.Tensor) -> None:
        if key not in self._at:
            raise CheckpointError(f"{self.path}: tensor '{key}' is not in the file's plan")
        off, n, dtype, shape = self._at[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor '{key}' is {t.dtype} {list(t.shape)}, planned as {dtype} "
                                  f"{list(shape)}")
        if n:
            self._pwrite(_bytes_of(t.detach().to("cpu").contiguous()), self._data + off)
        self._left.discard(key)

    def close(self) -> None:
        if self._left:
            raise CheckpointError(f"{self.path}: tensors {sorted(self._left)[:5]} were planned but never written")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsFolder:
    """The safetensors files of an HF folder, every header parsed at open (a truncated or corrupt file fails
    here, with one error naming it); then tensors, or just a rank's slices of them, are read on demand."""

    def __init__(self, folder: str | os.PathLike, rename=None):
        """`rename(file_key) -> model_key`: the model's own checkpoint key mapping (transformers renames some
        legacy keys on load, e.g. GPT-NeoX's `embed_out.` -> `lm_head.`); tensors are then looked up by model key."""
        self.path = Path(folder)
        self._rename = rename or (lambda k: k)
        self.file_key: dict[str, str] = {}  # model key -> key in the file
        self._files: dict[str, SafetensorsFile] = {}  # file name -> open file
        self.where: dict[str, str] = {}  # tensor name -> file name
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensor name -> (safetensors dtype, shape)
        for fname in self._weight_files():
            self._open(fname)

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            return files
        if (self.path / WEIGHTS_NAME).is_file():
            return [WEIGHTS_NAME]
        raise CheckpointError(f"{self.path}: no {WEIGHTS_NAME} nor {INDEX_NAME}")

    def _open(self, fname: str) -> None:
        path = self.path / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named by {INDEX_NAME})")
        handle = SafetensorsFile(path)  # header parsed and checked: one error naming the file
        self._files[fname] = handle
        for k, v in handle.tensors.items():
            name = self._rename(k)
            self.where[name], self.file_key[name] = fname, k
            self.meta[name] = (v.dtype, v.shape)

    def named(self, key: str) -> str:
        """`key` quoted as the file spells it (and as the model does, where transformers renames it)."""
        fk = self.file_key.get(key, key)
        return f"'{fk}'" if fk == key else f"'{fk}' (the model's '{key}')"

    def _file_of(self, key: str) -> Path:
        return self.path / self.where.get(key, "?")

    def has(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str, rows: slice | list[slice] | None = None, cols: slice | None = None,
             mapped: bool = False) -> torch.Tensor:
        """The tensor `key`, or only rows `rows` (a slice or several, concatenated) x columns `cols`; `mapped`:
        a whole tensor as a copy-on-write view of the file (SafetensorsFile.read)."""
        if key not in self.where:
            raise CheckpointError(f"{self.path}: no tensor '{key}' in the checkpoint")
        try:
            return self._files[self.where[key]].read(self.file_key[key], rows, cols, mapped)
        except OSError as e:
            raise CheckpointError(f"{self._file_of(key)}: reading tensor '{key}' failed ({e}); the file is "
                                  "unreadable or corrupt: convert again") from None

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][1]
