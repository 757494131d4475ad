"""The safetensors reader (pread, no mmap) and streaming writer the FP8 checkpoints go through
(ds_quant/files/safetensors.py), and weights quantized in the row blocks they are read in: bitwise, no tolerance."""

import json
from pathlib import Path

import pytest
import torch

from ds_quant.errors import CheckpointError
from ds_quant.files import safetensors as st_io
from tests.workflows.fp8_folders import same


# -- the reader (pread, no mmap) and the streaming writer -------------------------------------------------
def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(37, 53, generator=g).to(torch.bfloat16),
            "q": torch.randn(11, 7, generator=g).to(torch.float8_e4m3fn), "v": torch.randn(5, generator=g),
            "m": torch.tensor([True, False, True]), "e": torch.empty(0, 4), "s": torch.tensor(3.0),
            "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "h": torch.randn(3, 4, 5, generator=g).half()}


def test_reader_reads_tensors_and_slices_bitwise(tmp_path, monkeypatch):
    """Whole tensors, row slices (one pread), column slices (rows read in chunks: the chunk is set to 300 bytes,
    so a slice spans several chunks), several row runs, every dtype the format holds: bitwise what safe_open
    gives."""
    from safetensors import safe_open
    from safetensors.torch import save_file


    ts = _sample_tensors()
    save_file(ts, tmp_path / "x.safetensors")
    monkeypatch.setattr(st_io, "_CHUNK_BYTES", 300)
    f = st_io.SafetensorsFile(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as ref:
        for k in ts:
            assert same(f.read(k), ref.get_tensor(k)), k
        sl = ref.get_slice("w")
        for rows, cols in [(slice(3, 9), None), (None, slice(10, 20)), (slice(0, 37), slice(0, 53)),
                           ([slice(0, 2), slice(30, 37)], slice(5, 50)), ([slice(1, 3), slice(5, 6)], None),
                           (slice(4, 4), None)]:
            parts = rows if isinstance(rows, list) else [rows or slice(None)]
            want = torch.cat([sl[r] if cols is None else sl[r, cols] for r in parts])
            assert same(f.read("w", rows, cols), want), (rows, cols)
        assert same(f.read("v", slice(1, 3)), ref.get_slice("v")[1:3])
        assert same(f.read("h", slice(1, 3), slice(2, 4)), ref.get_slice("h")[1:3, 2:4])
    f.close()


def test_reader_refuses_bad_headers_naming_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from ds_quant.files.safetensors import SafetensorsFile

    save_file(_sample_tensors(), tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def write(h: dict, data: bytes) -> Path:
        b = json.dumps(h).encode()
        (tmp_path / "bad.safetensors").write_bytes(len(b).to_bytes(8, "little") + b + data)
        return tmp_path / "bad.safetensors"

    data = raw[8 + n:]
    cases = [({**header, "w": {**header["w"], "dtype": "F4"}}, data, r"tensor 'w': bad header entry"),
             ({**header, "w": {**header["w"], "shape": [37, 54]}}, data, r"tensor 'w': BF16 \[37, 54\] needs 3996 "
              r"bytes, its offsets span 3922"),
             ({**header, "w": {**header["w"], "data_offsets": [0, -1]}}, data, r"tensor 'w': bad header entry"),
             (header, data[:-9], r"the header describes \d+ bytes of tensor data, the file holds \d+")]
    for h, d, msg in cases:
        with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors file \(" + msg +
                           r".*\); it is truncated or corrupt: convert again"):
            SafetensorsFile(write(h, d))
    (tmp_path / "bad.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*header length 1000000, file size 10"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*header is not JSON"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_reader_does_not_keep_file_pages_resident(tmp_path):
    """The point of pread: reading a file tensor by tensor (each freed after use) grows RSS by about one tensor,
    while safe_open's mmap keeps every touched page resident (+216 MB through safe_open here). Bound: two
    tensors. The tensors are 36 MB, above glibc's largest mmap threshold (32 MB), so each buffer is unmapped when
    freed; smaller ones come from the heap, which glibc keeps up to twice that threshold before trimming."""
    import gc

    import psutil
    from safetensors.torch import save_file

    from ds_quant.files.safetensors import SafetensorsFile

    n = 9 << 20
    save_file({f"t{i}": torch.full((n,), float(i)) for i in range(6)}, tmp_path / "big.safetensors")
    gc.collect()
    proc = psutil.Process()
    with SafetensorsFile(tmp_path / "big.safetensors") as f:
        r0, grew = proc.memory_info().rss, 0
        for i in range(6):
            t = f.read(f"t{i}")
            assert float(t.sum()) == float(i) * n  # every page touched
            del t
            grew = max(grew, proc.memory_info().rss - r0)
    assert grew < 72 * 2**20, f"RSS grew {grew / 2**20:.0f} MB reading 216 MB tensor by tensor"


def test_streaming_writer_writes_what_safetensors_reads(tmp_path):
    """The header is planned first, tensors written in any order: safe_open and load_file read it back
    bitwise; a tensor that does not match its plan, or one never written, is refused naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ds_quant.files.safetensors import SafetensorsWriter

    ts = _sample_tensors()
    w = SafetensorsWriter(tmp_path / "y.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in ts.items()},
                          {"format": "pt"})
    for k in reversed(list(ts)):
        w.write(k, ts[k])
    w.close()
    back = load_file(tmp_path / "y.safetensors")
    assert set(back) == set(ts) and all(same(back[k], v) for k, v in ts.items())
    with safe_open(str(tmp_path / "y.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    w = SafetensorsWriter(tmp_path / "z.safetensors", {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))})
    with pytest.raises(CheckpointError, match=r"z\.safetensors: tensor 'a' is torch\.float32 \[3, 2\], planned as "
                                              r"torch\.float32 \[2, 3\]"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"z\.safetensors: tensors \['b'\] were planned but never written"):
        w.close()
    w.abort()


def test_weights_quantized_in_row_blocks_are_bitwise_the_whole_weights(monkeypatch):
    """quantize_weight casts (and takes maxima) in row blocks, and quantize-on-load feeds quantize_weight_blocks
    blocks read from the file: both bitwise equal to one pass over the whole weight, for every recipe and device
    profile (blocks of 1000 elements here, so every weight spans several; an inf, a zero row, an odd width)."""
    from ds_quant.numerics import scales

    g = torch.Generator().manual_seed(3)
    weights = [(torch.randn(300, 70, generator=g) * 3).to(torch.bfloat16), torch.randn(5, 1001, generator=g),
               torch.zeros(0, 16, dtype=torch.bfloat16)]
    weights[0][7] = 0
    weights[1][2, 3] = float("inf")
    fp8 = torch.float8_e4m3fn
    for w in weights:
        for method, recipe in scales.RECIPES.items():
            for profile in scales.PROFILES.values():
                monkeypatch.setattr(scales, "_CHUNK_ELEMS", 1 << 40)
                ref_q, ref_s = scales.quantize_weight(w, recipe, fp8, profile)
                monkeypatch.setattr(scales, "_CHUNK_ELEMS", 1000)
                q, s = scales.quantize_weight(w, recipe, fp8, profile)
                assert same(q, ref_q) and same(s, ref_s), (method, w.shape)
                if recipe.weight_opt:  # the weight search needs the whole weight
                    continue
                step = max(1, 1000 // w.shape[1])
                blocks = lambda w=w, step=step: (w[i:i + step] for i in range(0, max(1, w.shape[0]), step))  # noqa: E731
                q, s, top = scales.quantize_weight_blocks(blocks, tuple(w.shape), recipe, fp8, profile)
                assert same(q, ref_q) and same(s, ref_s), (method, w.shape)
                assert top == (float(w.abs().max()) if w.numel() else 0.0)

