// FP8 -> bf16 / fp16 / fp32 de-quantization of KV-cache states on CPU (ds_quant/kv_cache.py).
//
//   ds_quant_kv::dequantize(x_fp8, scale, out_dtype) = (x_fp8.float() * scale).to(out_dtype), bit for bit.
//
// torch's element-wise FP8 conversion runs ~4.5 ns per element on the CPUs measured: at 8k context it would cost
// twice the attention itself. Here each byte goes through a 256-entry table of the final values (exact: the table
// holds (value * scale) rounded once, as torch does), and on AVX-512 16 bytes at a time are widened to fp16 bits by
// shifts (E4M3 -> fp16 is exact, value / 2^8; E5M2 is the upper byte of fp16), to float, scaled, and rounded to
// bf16 (round to nearest even) in registers. NaN encodings are never produced by ds_quant's saturating casts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <optional>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline uint16_t fp8_to_half_bits(uint8_t b, bool e4m3) {
  return e4m3 ? static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7F) << 7)) : static_cast<uint16_t>(b << 8);
}

// Exact float value of one FP8 byte times `mul` (E4M3: the fp16 bits hold value / 2^8, so mul = scale * 2^8).
inline float scaled(uint8_t b, bool e4m3, float mul) {
  return static_cast<float>(c10::Half(fp8_to_half_bits(b, e4m3), c10::Half::from_bits())) * mul;
}

template <typename T>
void by_table(const uint8_t* src, T* dst, int64_t n, const T* tab) {
  for (int64_t i = 0; i < n; ++i) dst[i] = tab[src[i]];
}

#if defined(__AVX512F__)
// 16 bytes -> 16 bf16, in registers.
inline void widen16_bf16(const uint8_t* src, uint16_t* dst, bool e4m3, __m512 mul) {
  __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  __m256i h = e4m3 ? _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                     _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7))
                   : _mm256_slli_epi16(b, 8);
  __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), mul);
  __m512i u = _mm512_castps_si512(f);  // round to nearest even: + 0x7FFF + lsb, keep the upper half
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(u));
}
#endif

at::Tensor dequantize(const at::Tensor& x_fp8, double scale, at::ScalarType out_dtype,
                      const std::optional<at::Tensor>& out_buf) {
  TORCH_CHECK(x_fp8.device().is_cpu(), "ds_quant_kv::dequantize: CPU tensors only");
  const bool e4m3 = x_fp8.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(e4m3 || x_fp8.scalar_type() == at::kFloat8_e5m2, "ds_quant_kv::dequantize: FP8 input expected");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "ds_quant_kv::dequantize: out_dtype must be bfloat16, float16 or float32");
  // Rows of contiguous bytes at a fixed stride: a (B, H, S, D) view of a cache buffer with room for more tokens
  // (stride(1) = capacity * D) is read in place, not copied.
  at::Tensor x = x_fp8;
  const bool rows_ok = x.dim() == 4 && x.stride(3) == 1 && x.stride(2) == x.size(3) &&
                       x.stride(0) == x.size(1) * x.stride(1);
  if (!rows_ok) x = x.contiguous();
  const int64_t n = x.numel();
  const int64_t rows = rows_ok ? x.size(0) * x.size(1) : 1;
  const int64_t len = rows ? n / std::max<int64_t>(rows, 1) : 0;
  const int64_t row_stride = rows_ok ? x.stride(1) : n;
  at::Tensor out;
  if (out_buf.has_value()) {  // a caller's buffer, reused across calls
    TORCH_CHECK(out_buf->scalar_type() == out_dtype && out_buf->is_contiguous() && out_buf->numel() >= n,
                "ds_quant_kv::dequantize: out must be contiguous, of out_dtype, with at least x.numel() elements");
    out = out_buf->view(-1).narrow(0, 0, n).view(x.sizes());
  } else {
    out = at::empty(x.sizes(), x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  }
  if (n == 0) return out;
  const uint8_t* base = reinterpret_cast<const uint8_t*>(x.data_ptr());
  const float mul = static_cast<float>(scale) * (e4m3 ? 256.f : 1.f);
  constexpr int64_t kGrain = 1 << 15;
  // Element i of the output: row i / len, column i % len of the input.
  auto each_span = [&](int64_t a, int64_t b, auto&& span) {
    while (a < b) {
      const int64_t r = a / len, c = a % len, m = std::min(b - a, len - c);
      span(base + r * row_stride + c, a, m);
      a += m;
    }
  };
  if (out_dtype == at::kBFloat16) {
    uint16_t tab[256];
    for (int i = 0; i < 256; ++i) tab[i] = c10::BFloat16(scaled(static_cast<uint8_t>(i), e4m3, mul)).x;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
      each_span(a, b, [&](const uint8_t* src, int64_t o, int64_t m) {
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 vmul = _mm512_set1_ps(mul);
        for (; i + 16 <= m; i += 16) widen16_bf16(src + i, dst + o + i, e4m3, vmul);
#endif
        by_table(src + i, dst + o + i, m - i, tab);
      });
    });
  } else if (out_dtype == at::kHalf) {
    uint16_t tab[256];
    for (int i = 0; i < 256; ++i) tab[i] = c10::Half(scaled(static_cast<uint8_t>(i), e4m3, mul)).x;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
      each_span(a, b, [&](const uint8_t* src, int64_t o, int64_t m) { by_table(src, dst + o, m, tab); });
    });
  } else {
    float tab[256];
    for (int i = 0; i < 256; ++i) tab[i] = scaled(static_cast<uint8_t>(i), e4m3, mul);
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
      each_span(a, b, [&](const uint8_t* src, int64_t o, int64_t m) { by_table(src, dst + o, m, tab); });
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(ds_quant_kv, m) {
  m.def("dequantize(Tensor x_fp8, float scale, ScalarType out_dtype, Tensor? out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ds_quant_kv, CPU, m) { m.impl("dequantize", &dequantize); }
