"""ops: every CPU backend against the reference definition of an FP8 GEMM, the choice of backend, fallbacks.

Tolerances. The compiled paths compute the same FP8 products as the reference (exact in float32: a product of
two FP8 values has at most 8 significant bits) and differ only in accumulation order, so against a float64
evaluation of the same sum their error is bounded by fp32 accumulation: |err| <= K * 2^-24 * (|x| @ |w|.T),
times the scales (the classic gamma_K bound; we use 2K for the final scaling multiplications). The blocked
path on bf16 hardware rounds the accumulator to bf16 once (relative 2^-9) before scaling: bound + 2^-8 |y|,
and its SQNR stays >= 40 dB (the issue's kernel-vs-reference floor; one bf16 rounding is ~54 dB).
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ds_quant import QuantConfig
from ds_quant.layers.linear import Fp8Linear
from ds_quant.numerics import ops
from ds_quant.numerics.layer_spec import resolve
from ds_quant.numerics.scales import sqnr_db, to_fp8_saturated

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
needs_kernel = pytest.mark.skipif(ops.cpu_kernel().isa is None, reason=f"no CPU kernel: {ops.cpu_kernel().reason}")


def operands(m, n, k, dtype, scales, seed=0):
    """x (M, K) and w (N, K) in FP8, heavy-tailed, with saturated (+-max) and subnormal elements planted."""
    g = torch.Generator().manual_seed(seed)
    fmax = float(torch.finfo(dtype).max)
    x = torch.randn(m, k, generator=g) * torch.randn(m, 1, generator=g).exp() * 40
    w = torch.distributions.StudentT(2.0).sample((n, k)) * 30
    tiny = float(torch.finfo(dtype).smallest_normal) / 4  # a subnormal of this format
    if k:
        x[:, -1], x[:, 0] = -tiny, 1e9  # 1e9 saturates to +max
        w[:, k // 2] = -tiny
    x8, w8 = to_fp8_saturated(x, torch.tensor(1.0), dtype), to_fp8_saturated(w, torch.tensor(1.0), dtype)
    sa = torch.rand(m, 1, generator=g) + 0.01 if scales[0] == "token" else torch.tensor(0.0123)
    sb = torch.rand(n, generator=g) + 0.01 if scales[1] == "channel" else torch.tensor(0.5)
    assert k < 2 or m == 0 or (x8[:, 0].float() == fmax).all() and (x8[:, -1].float() == -tiny).all()
    return x8, w8, sa, sb


def exact(x8, w8, sa, sb):
    """float64 value and the fp32 accumulation error bound of each output."""
    x, w = x8.double(), w8.double()
    scale = sa.double().reshape(-1, 1) * sb.double().reshape(1, -1)
    k = max(x.shape[1], 1)
    return x @ w.t() * scale, 2 * k * 2.0**-24 * (x.abs() @ w.abs().t()) * scale.abs()


# (kernel, gemm dtype); the bf16 dot-product kernel exists only where the build has avx512_bf16
CPU_PATHS = [("cpu_gemv", None), ("cpu_blocked", torch.float32), ("cpu_blocked", torch.bfloat16)] + \
    ([("cpu_dp", None)] if ops.cpu_kernel().has_dp else [])
PATH_IDS = ["gemv", "blocked-fp32", "blocked-bf16", "dp"][:len(CPU_PATHS)]


def run_path(name, gemm_dtype, x8, w8, sa, sb, out_dtype):
    if name == "cpu_gemv":
        return torch.ops.ds_quant.fp8_gemm_gemv(x8, w8, sa, sb, out_dtype)
    if name == "cpu_dp":
        return torch.ops.ds_quant.fp8_gemm_dp(x8, w8, sa, sb, out_dtype)
    return torch.ops.ds_quant.fp8_gemm_blocked(x8, w8, sa, sb, out_dtype, gemm_dtype, 64)


@needs_kernel
@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scales", [("tensor", "tensor"), ("tensor", "channel"), ("token", "channel")])
@pytest.mark.parametrize("path", CPU_PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 77), (3, 130, 300), (17, 9, 16), (512, 70, 65), (5, 4, 1),
                                   (0, 8, 32), (4, 0, 32), (6, 10, 0), (2, 1, 4097)])
def test_kernel_matches_definition(dtype, scales, path, m, n, k):
    """Odd shapes: M = 0, 1, 3, 17, 512; K not a multiple of 16 or 64; K = 0 (empty shard); N not a multiple of
    the 4-row tile or the 64-row block."""
    x8, w8, sa, sb = operands(m, n, k, dtype, scales)
    ref, bound = exact(x8, w8, sa, sb)
    y = run_path(*path, x8, w8, sa, sb, torch.float32)
    assert y.shape == (m, n) and y.dtype is torch.float32
    if path[1] is torch.bfloat16:
        bound = bound + 2.0**-8 * ref.abs()
        if ref.numel() and ref.abs().max() > 0:
            assert sqnr_db(ref.float(), y) >= 40
    assert torch.all((y.double() - ref).abs() <= bound + 1e-30), (y.double() - ref).abs().max()
    # The reference backend is the definition itself: the same bound.
    assert torch.all((ops.fp8_mm_reference(x8, w8, sa, sb, torch.float32).double() - ref).abs() <= bound + 1e-30)


@needs_kernel
@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("path", CPU_PATHS, ids=PATH_IDS)
def test_every_fp8_value_widens_exactly(dtype, path):
    """An identity x picks out each weight: every finite FP8 encoding (subnormals, +-0, +-max) comes back exact."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    values = codes.view(dtype).float()
    finite = torch.isfinite(values)
    w8 = codes[finite].view(dtype).reshape(-1, 1).repeat(1, 16)  # (n, 16): the value in every column
    x8 = torch.zeros(1, 16).to(dtype)
    x8[0, 3] = torch.tensor(1.0).to(dtype)
    y = run_path(*path, x8, w8, torch.tensor(1.0), torch.tensor(1.0), torch.float32)
    assert torch.equal(y[0], values[finite])


@needs_kernel
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_rounding_matches_reference(out_dtype):
    """With the accumulation exact (small integers), only the final rounding is left: identical to the reference."""
    g = torch.Generator().manual_seed(1)
    x8 = torch.randint(-8, 9, (7, 48), generator=g).float().to(torch.float8_e4m3fn)
    w8 = torch.randint(-8, 9, (20, 48), generator=g).float().to(torch.float8_e4m3fn)
    sa, sb = torch.tensor(0.37), torch.rand(20, generator=g)
    ref = ops.fp8_mm_reference(x8, w8, sa, sb, out_dtype)
    for path in CPU_PATHS[:2] + CPU_PATHS[3:]:
        assert torch.equal(run_path(*path, x8, w8, sa, sb, out_dtype), ref), path


@needs_kernel
@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_activation_cast_is_torchs_bit_for_bit(dtype, hp):
    """ops casts activations with the kernel's one-pass quantize_fp8 on CPU: it must give exactly the bytes of
    scales.to_fp8_saturated: every magnitude from 1e-12 to 1e6, every FP8 value, every midpoint between two
    (ties to even), +-0, beyond the limit, NaN; per-tensor and per-token scales."""
    g = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).float()
    codes = codes[torch.isfinite(codes)].sort().values
    mids = (codes[:-1] + codes[1:]) / 2
    x = torch.cat([torch.randn(4000, generator=g) * torch.logspace(-12, 6, 4000), codes, mids, -mids,
                   torch.tensor([0.0, -0.0, 1e30, -1e30, float("nan")])]).to(hp)
    x = torch.stack([x, x.flip(0)])  # (2, K)
    limit = 240.0 if dtype is torch.float8_e4m3fn else float(torch.finfo(dtype).max)  # Gaudi2's limit for E4M3
    for scale in (torch.tensor(1.0), torch.tensor(0.37), torch.tensor([[0.5], [3.0]])):
        want = to_fp8_saturated(x, scale, dtype, limit).view(torch.uint8)
        got = torch.ops.ds_quant.quantize_fp8(x, scale, limit, dtype).view(torch.uint8)
        assert torch.equal(got, want), (scale, (got != want).sum())


def test_choice_per_device_and_m(monkeypatch):
    monkeypatch.delenv("DS_QUANT_CPU_BACKEND", raising=False)
    monkeypatch.delenv("DS_QUANT_CPU_GEMV_MAX_M", raising=False)
    cpu = torch.device("cpu")
    assert ops.choose_backend(cpu, 4, 0, 16).name == "reference"  # empty shard
    assert ops.choose_backend(cpu, 4, 16, 0).reason.startswith("empty shard")
    assert ops.choose_backend(torch.device("meta"), 1, 16, 16).reason == "no FP8 GEMM on device type meta"
    if ops.cpu_kernel().isa is not None:
        limit = ops.cpu_gemv_max_m()
        assert ops.choose_backend(cpu, 1, 64, 64).name == "cpu_gemv"
        assert ops.choose_backend(cpu, limit, 64, 64).name == "cpu_gemv"
        assert ops.choose_backend(cpu, limit + 1, 64, 64).name == ("cpu_dp" if ops.cpu_kernel().has_dp
                                                                  else "cpu_blocked")
        assert ops.choose_backend(cpu, 512, 64, 64).name == "cpu_blocked"
        monkeypatch.setenv("DS_QUANT_CPU_GEMV_MAX_M", "64")
        assert ops.choose_backend(cpu, 64, 64, 64).name == "cpu_gemv"
    monkeypatch.setenv("DS_QUANT_CPU_BACKEND", "scaled_mm")
    assert ops.choose_backend(cpu, 1, 64, 64).name == "cpu_scaled_mm"
    monkeypatch.setenv("DS_QUANT_CPU_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DS_QUANT_CPU_BACKEND='fastest': accepted values are gemv"):
        ops.choose_backend(cpu, 1, 64, 64)


@pytest.mark.parametrize("backend", ["scaled_mm", "reference", "gemv", "dp", "blocked"])
def test_fp8_linear_every_cpu_backend_agrees(monkeypatch, backend):
    """Through the layer (activation cast, scales, bias, leading dims), every backend gives the reference's
    numbers up to fp32 accumulation order and bf16 output rounding (rtol 2^-7: one bf16 ulp)."""
    if backend in ("gemv", "blocked") and ops.cpu_kernel().isa is None:
        pytest.skip(ops.cpu_kernel().reason)
    if backend == "dp" and not ops.cpu_kernel().has_dp:
        pytest.skip(f"no avx512_bf16 in this build ({ops.cpu_kernel().isa})")
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    record = {"input_amax": float(x.abs().max()), "weight_amax": float(layer.weight.detach().abs().max())}
    fp8 = Fp8Linear.from_original(layer, "layer", resolve(QuantConfig(), "layer"), record)
    monkeypatch.setenv("DS_QUANT_CPU_BACKEND", "reference")
    y_ref = fp8(x)
    monkeypatch.setenv("DS_QUANT_CPU_BACKEND", backend)
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype is torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=2**-7)


@needs_kernel
def test_layer_built_on_meta_picks_the_cpu_kernel_once_materialised(monkeypatch):
    monkeypatch.delenv("DS_QUANT_CPU_BACKEND", raising=False)
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    record = {"input_amax": 3.0, "weight_amax": float(layer.weight.detach().abs().max())}
    real = Fp8Linear.from_original(layer, "l", resolve(QuantConfig(), "l"), record)
    # As a checkpoint loader builds it: the constructor on meta (no data), then to_empty + load_state_dict.
    meta = Fp8Linear("l", real.layout, real.weight.to("meta"), real.weight_scale.to("meta"),
                     real.input_scale.to("meta"), None, torch.bfloat16, real.act_limit)
    assert meta.fallback_reason == "no FP8 GEMM on device type meta"
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    assert meta.fallback_reason is None and "cpu_gemv M=1" in repr(meta) and "cpu_blocked M>=" in repr(meta)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(meta(x), real(x), atol=0, rtol=0)


def _in_subprocess(code: str, **env: str) -> str:
    full = {**os.environ, **env}
    full.pop("DS_QUANT_CPU_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


CHOICE = ("import torch; from ds_quant.numerics import ops; b = ops.choose_backend(torch.device('cpu'), 1, 64, 64); "
          "print('BACKEND', b.name, '|', b.reason)")


def test_kernel_switched_off_uses_the_reference():
    out = _in_subprocess(CHOICE, DS_QUANT_CPU_KERNEL="0")
    assert "BACKEND reference | DS_QUANT_CPU_KERNEL=0" in out


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """A machine without a working C++ compiler still runs (the reference), and says why once."""
    out = _in_subprocess(CHOICE + "; ops.choose_backend(torch.device('cpu'), 512, 64, 64)",
                         CXX=str(tmp_path / "no-such-compiler"), DS_QUANT_KERNEL_CACHE=str(tmp_path / "cache"))
    assert "BACKEND reference | CPU kernel unavailable" in out
    assert out.count("FP8 GEMMs on CPU use the pure-torch reference") == 1


VARIANT_CHECK = r"""
import torch
from ds_quant.numerics import ops
from ds_quant.numerics.scales import to_fp8_saturated
k = ops.cpu_kernel()
print("ISA", k.isa, k.reason)
g = torch.Generator().manual_seed(0)
for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    for m, n, k_ in ((1, 37, 77), (3, 9, 300), (6, 10, 33), (40, 70, 65)):
        x8 = to_fp8_saturated(torch.randn(m, k_, generator=g) * 30, torch.tensor(1.0), dtype)
        w8 = to_fp8_saturated(torch.randn(n, k_, generator=g) * 30, torch.tensor(1.0), dtype)
        sa, sb = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
        ref = x8.double() @ w8.double().t() * sa.double() * sb.double()
        bound = 2 * k_ * 2.0**-24 * (x8.double().abs() @ w8.double().abs().t()) * sa.double() * sb.double()
        for y in (torch.ops.ds_quant.fp8_gemm_gemv(x8, w8, sa, sb, torch.float32),
                  torch.ops.ds_quant.fp8_gemm_blocked(x8, w8, sa, sb, torch.float32, torch.float32, 16)):
            assert torch.all((y.double() - ref).abs() <= bound + 1e-30), (dtype, m, n, k_)
print("VARIANT OK")
"""


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 with AVX2 only")
@pytest.mark.parametrize("march,isa", [("haswell", "avx2"), ("x86-64", "portable")])
def test_other_isa_builds_match_definition(tmp_path, march, isa):
    """The CPU a user has is not known in advance: build the AVX2 and the portable paths here as well (each
    `-march` is its own build) and check them against the float64 definition, same bound as above."""
    out = _in_subprocess(VARIANT_CHECK, DS_QUANT_CPU_KERNEL_MARCH=march, DS_QUANT_KERNEL_CACHE=str(tmp_path))
    assert f"ISA {isa} " in out and "VARIANT OK" in out


cuda_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                              reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")


@pytest.mark.cuda
@cuda_fp8
@pytest.mark.parametrize("scales", [("tensor", "tensor"), ("tensor", "channel"), ("token", "channel")])
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 48, 80), (33, 40, 72), (2048, 256, 512)])
def test_cuda_scaled_mm_matches_definition(scales, m, n, k):
    """On CUDA ops pads K and N to multiples of 16 for _scaled_mm (N=40, K=72 here); same bound as on CPU
    plus the bf16 output rounding of _scaled_mm's epilogue (relative 2^-8)."""
    if scales[0] == "token" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise scales need compute capability 9.0+")
    x8, w8, sa, sb = operands(m, n, k, torch.float8_e4m3fn, scales)
    ref, bound = exact(x8, w8, sa, sb)
    dev = torch.device("cuda")
    assert ops.choose_backend(dev, m, n, k, rowwise=scales != ("tensor", "tensor")).name == "cuda_scaled_mm"
    y = ops.fp8_mm(x8.to(dev), w8.to(dev), sa.to(dev), sb.to(dev), torch.bfloat16).cpu()
    assert y.shape == (m, n)
    assert torch.all((y.double() - ref).abs() <= bound + 2.0**-8 * ref.abs() + 1e-30)


# -- the one kernel library: every op has a fake (meta) kernel ------------------------------------------------------
def _op_samples(device):
    """(op name, args, expected output shape, expected dtype) for every tensor op of torch.ops.ds_quant."""
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x8, w8 = (torch.randn(s, generator=g).to(e4m3).to(device) for s in ((3, 32), (5, 32)))
    sa, sb = torch.ones((), device=device), torch.rand(5, generator=g).to(device)
    q = torch.randn(2, 4, 1, 16, generator=g).to(bf16).to(device)
    k8, v8 = (torch.randn(2, 2, 7, 16, generator=g).to(e4m3).to(device) for _ in range(2))
    gemm = (x8, w8, sa, sb, torch.float32)
    samples = [("fp8_gemm_gemv", gemm, (3, 5), torch.float32),
               ("fp8_gemm_blocked", (*gemm, torch.float32, 16), (3, 5), torch.float32),
               ("quantize_fp8", (torch.randn(3, 32, generator=g).to(bf16).to(device), sa, 448.0, e4m3), (3, 32), e4m3),
               ("dequantize_fp8", (k8, 0.5, bf16), (2, 2, 7, 16), bf16),
               ("decode_attention", (q, k8, 0.5, v8, 0.25, None, 0.25), (2, 1, 4, 16), bf16)]
    if ops.cpu_kernel().has_dp:  # the op exists everywhere; it runs only on avx512_bf16 builds
        samples.append(("fp8_gemm_dp", gemm, (3, 5), torch.float32))
    return samples


@needs_kernel
def test_every_op_has_a_fake_kernel_with_the_right_shape_and_dtype():
    """Meta tensors (what torch.compile and a model built on meta trace with) go through the fake kernels: each op
    gives the output shape and dtype its CPU kernel gives, without running it."""
    from ds_quant.numerics import kernels

    samples = _op_samples(torch.device("meta"))
    assert {name for name, *_ in samples} | ({"fp8_gemm_dp"} - {n for n, *_ in samples}) == set(kernels.FAKES)
    for name, args, shape, dtype in samples:
        out = getattr(torch.ops.ds_quant, name)(*args)
        assert out.device.type == "meta" and tuple(out.shape) == shape and out.dtype == dtype, name
    for name, args, shape, dtype in _op_samples(torch.device("cpu")):  # the real kernels agree
        out = getattr(torch.ops.ds_quant, name)(*args)
        assert tuple(out.shape) == shape and out.dtype == dtype, name


@needs_kernel
def test_ops_pass_opcheck():
    """torch.library.opcheck on small inputs: the fake kernels against the real ones (FakeTensor mode), the autograd
    registration, and that AOT dispatch traces them. (Its test_schema is left out: it mutates the inputs with
    element-wise ops torch does not implement for FP8 tensors.)"""
    for name, args, _, _ in _op_samples(torch.device("cpu")):
        torch.library.opcheck(getattr(torch.ops.ds_quant, name).default, args,
                              test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
