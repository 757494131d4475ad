// FP8 -> bf16 / fp16 / fp32 de-quantization of KV-cache states on CPU (ds_quant/layers/kv_cache.py).
//
//   ds_quant::dequantize_fp8(x_fp8, scale, out_dtype) = (x_fp8.float() * scale).to(out_dtype), bit for bit.
//
// torch's element-wise FP8 conversion runs ~4.5 ns per element on the CPUs measured: at 8k context it would cost
// twice the attention itself. Here each byte goes through a 256-entry table of the final values (exact: the table
// holds (value * scale) rounded once, as torch does), and on AVX-512 16 bytes at a time are widened to fp16 bits by
// shifts (E4M3 -> fp16 is exact, value / 2^8; E5M2 is the upper byte of fp16), to float, scaled, and rounded to
// bf16 (round to nearest even) in registers. NaN encodings are never produced by ds_quant's saturating casts.
//
//   ds_quant::decode_attention(q, k_fp8, k_scale, v_fp8, v_scale, mask, scaling): one decode step of attention
//   (one query token) reading the FP8 cache directly, never de-quantizing it into a bf16 copy; see below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "fp8.h"  // DSQ_X86 / DSQ_AVX512, the FP8 widening (shared with fp8_gemm_cpu.cpp)

namespace {

// Exact float value of one FP8 byte times `mul` (E4M3: the fp16 bits hold value / 2^8, so mul = scale * 2^8).
// (c10::Half's conversion of fp8.h's bits, not dsq::widen1: the same value, and the code this kernel was tuned with.)
inline float scaled(uint8_t b, bool e4m3, float mul) {
  return static_cast<float>(c10::Half(dsq::fp8_to_half_bits(b, e4m3), c10::Half::from_bits())) * mul;
}

template <typename T>
void by_table(const uint8_t* src, T* dst, int64_t n, const T* tab) {
  for (int64_t i = 0; i < n; ++i) dst[i] = tab[src[i]];
}

#if defined(DSQ_AVX512)
// 16 bytes -> 16 bf16, in registers.
inline void widen16_bf16(const uint8_t* src, uint16_t* dst, bool e4m3, __m512 mul) {
  const __m256i h = dsq::half_bits16(src, e4m3);
  __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), mul);
  __m512i u = _mm512_castps_si512(f);  // round to nearest even: + 0x7FFF + lsb, keep the upper half
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(u));
}
#endif

at::Tensor dequantize(const at::Tensor& x_fp8, double scale, at::ScalarType out_dtype,
                      const std::optional<at::Tensor>& out_buf) {
  TORCH_CHECK(x_fp8.device().is_cpu(), "ds_quant::dequantize_fp8: CPU tensors only");
  const bool e4m3 = x_fp8.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(e4m3 || x_fp8.scalar_type() == at::kFloat8_e5m2, "ds_quant::dequantize_fp8: FP8 input expected");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "ds_quant::dequantize_fp8: out_dtype must be bfloat16, float16 or float32");
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
                "ds_quant::dequantize_fp8: out must be contiguous, of out_dtype, with at least x.numel() elements");
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
#if defined(DSQ_AVX512)
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


// ---- decode attention on the FP8 cache ------------------------------------------------------------------------
// out[b, h] = sum_t softmax_t(scaling * q[b, h] . k[b, g, t] + mask[b, t]) * v[b, g, t], g = h / (Hq / Hkv) (GQA),
// with k = k_fp8 * k_scale and v = v_fp8 * v_scale in float32 (exact: an FP8 value times a float32 scale, rounded
// once), products and sums in float32, the softmax in float32 (max subtracted). What sdpa computes on the
// de-quantized cache, without the bf16 copy of it (the reference rounds k and v to bf16 first: the two differ by
// that rounding). Each K and V row (D bytes) is read once per step for all the query heads that share it.
//
// q: (B, Hq, 1, D), k_fp8 / v_fp8: (B, Hkv, S, D) with contiguous rows of D (a view of the cache's growing buffer:
// any stride over heads and batch), mask: None, bool (Bm, 1, 1, S) (true = attend) or float (Bm, 1, 1, S) added to
// the scores, Bm in {1, B}. Returns (B, 1, Hq, D) in q's dtype: the layout transformers' attention functions return.
namespace {

// One row of D FP8 bytes -> D floats (value / post: E4M3 widens to value / 2^8, exact).
inline void widen_row(const uint8_t* src, float* dst, int64_t D, bool e4m3, const float* tab) {
  int64_t d = 0;
#if defined(DSQ_AVX512)
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(dsq::half_bits16(src + d, e4m3)));
#elif defined(DSQ_X86)
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(dsq::half_bits8(src + d, e4m3)));  // F16C
#endif
  for (; d < D; ++d) dst[d] = tab[src[d]];
}

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(DSQ_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

constexpr int64_t kBlock = 64;  // key / value rows widened at a time: 64 x 128 floats = 32 KB, L1-sized

// exp(x) for x <= 0 (a score minus the row's max): 2^n * p(f), n = round(x / ln 2), f = x - n ln 2 (two-part ln 2),
// p of degree 6 (relative error ~2e-7), in plain arithmetic the compiler vectorises (no call, no errno); below -80 it
// gives 0 (e^-80 ~ 2e-35 against a sum >= 1; masked scores are -inf).
inline float exp_poly(float x) {
  const float xc = x < -80.f ? -80.f : x;
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 x 2^23 trick): no call
  float f = xc - n * 0.693145752f;
  f = f - n * 1.42860677e-6f;
  float y = 1.38888889e-3f;
  y = y * f + 8.33333333e-3f;
  y = y * f + 4.16666667e-2f;
  y = y * f + 1.66666667e-1f;
  y = y * f + 0.5f;
  y = y * f + 1.f;
  y = y * f + 1.f;
  int32_t bits;
  std::memcpy(&bits, &y, 4);
  bits += static_cast<int32_t>(n) << 23;  // y * 2^n: n in [-116, 0], y in [0.7, 1.5): stays normal
  float out;
  std::memcpy(&out, &bits, 4);
  return x < -80.f ? 0.f : out;
}

// Softmax of one head's scores in place, times `vmul` (the value scale): the mask applied (additive, or false =
// -inf), the max subtracted, exp_poly (vectorised by the compiler), normalised; every key masked gives zeros.
void masked_softmax(float* __restrict sc, int64_t S, const bool* mb, const float* mf, float vmul) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (mf != nullptr) for (int64_t t = 0; t < S; ++t) sc[t] += mf[t];
  if (mb != nullptr) for (int64_t t = 0; t < S; ++t) sc[t] = mb[t] ? sc[t] : ninf;
  float m = ninf;
  for (int64_t t = 0; t < S; ++t) m = std::max(m, sc[t]);
  if (std::isinf(m) && m < 0) {
    std::fill(sc, sc + S, 0.f);
    return;
  }
  int64_t t0 = 0;
  float sum = 0.f;
#if defined(DSQ_AVX512)
  // the same polynomial 16 at a time (GCC leaves the loop below scalar: 20 % of the kernel at 8k)
  const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-80.f);
  __m512 vsum = _mm512_setzero_ps();
  for (; t0 + 16 <= S; t0 += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(sc + t0), vm);
    const __m512 xc = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), xc);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
    __m512 y = _mm512_set1_ps(1.38888889e-3f);
    for (const float c : {8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f, 0.5f, 1.f, 1.f})
      y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c));
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), _mm512_scalef_ps(y, n));
    _mm512_storeu_ps(sc + t0, y);
    vsum = _mm512_add_ps(vsum, y);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (int64_t t = t0; t < S; ++t) {
    sc[t] = exp_poly(sc[t] - m);
    sum += sc[t];
  }
  const float inv = vmul / sum;
  for (int64_t t = 0; t < S; ++t) sc[t] *= inv;
}

// One (batch row, KV head) of decode attention: key rows widened a block (kBlock rows) at a time into an
// L1-resident buffer, every query head of the group scored against the block; after the softmax, value rows
// widened the same way and accumulated. scores: rep x S, acc: rep x D, blk: kBlock x D, row: D.
//
// Generic (every build, any head dim): loops the compiler vectorises for the ISA it builds for (AVX2 + FMA, NEON,
// ...): keys widened transposed (a block's D x kBlock), so each score is an axpy over the block's tokens rather
// than a reduction over d.
void scores_generic(const uint8_t* krow, int64_t S, int64_t D, const float* qs, int64_t rep, bool e4m3,
                    const float* tab, float* scores, float* blk, float* row) {
  for (int64_t t0 = 0; t0 < S; t0 += kBlock) {
    const int64_t n = std::min(kBlock, S - t0);
    for (int64_t t = 0; t < n; ++t) {
      widen_row(krow + (t0 + t) * D, row, D, e4m3, tab);
      for (int64_t d = 0; d < D; ++d) blk[d * kBlock + t] = row[d];
    }
    for (int64_t r = 0; r < rep; ++r) {
      float* __restrict sc = scores + r * S + t0;
      for (int64_t t = 0; t < n; ++t) sc[t] = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qs[r * D + d];
        const float* __restrict col = blk + d * kBlock;
        for (int64_t t = 0; t < n; ++t) sc[t] += qd * col[t];
      }
    }
  }
}

void output_generic(const uint8_t* vrow, int64_t S, int64_t D, const float* scores, int64_t rep, bool e4m3,
                    const float* tab, float* acc, float* blk) {
  std::fill(acc, acc + rep * D, 0.f);
  for (int64_t t0 = 0; t0 < S; t0 += kBlock) {
    const int64_t n = std::min(kBlock, S - t0);
    for (int64_t t = 0; t < n; ++t) widen_row(vrow + (t0 + t) * D, blk + t * D, D, e4m3, tab);
    for (int64_t r = 0; r < rep; ++r) {
      float* __restrict a = acc + r * D;
      for (int64_t t = 0; t < n; ++t) {
        const float w = scores[r * S + t0 + t];
        const float* __restrict v = blk + t * D;
        for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
      }
    }
  }
}

#if defined(DSQ_AVX512)
// Four horizontal sums at once: (sum z0, sum z1, sum z2, sum z3).
inline __m128 reduce4(__m512 z0, __m512 z1, __m512 z2, __m512 z3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(z0, z1), _mm512_unpackhi_ps(z0, z1));  // z0 z1 pairs
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(z2, z3), _mm512_unpackhi_ps(z2, z3));
  const __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));  // z0 z1 z2 z3
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

// AVX-512, head dims DC x 16 (64, 128): each query head's query (scores) or accumulator (output) held in
// registers over the block, four dot products reduced at once.
template <int DC>
void scores_avx512(const uint8_t* krow, int64_t S, const float* qs, int64_t rep, bool e4m3, const float* tab,
                   float* scores, float* blk) {
  constexpr int64_t D = DC * 16;
  for (int64_t t0 = 0; t0 < S; t0 += kBlock) {
    const int64_t n = std::min(kBlock, S - t0);
    for (int64_t t = 0; t < n; ++t) widen_row(krow + (t0 + t) * D, blk + t * D, D, e4m3, tab);
    for (int64_t r = 0; r < rep; ++r) {
      __m512 qv[DC];
      for (int c = 0; c < DC; ++c) qv[c] = _mm512_loadu_ps(qs + r * D + c * 16);
      float* sc = scores + r * S + t0;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        __m512 z[4];
        for (int j = 0; j < 4; ++j) {
          z[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(blk + (t + j) * D));
          for (int c = 1; c < DC; ++c) z[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(blk + (t + j) * D + c * 16), z[j]);
        }
        _mm_storeu_ps(sc + t, reduce4(z[0], z[1], z[2], z[3]));
      }
      for (; t < n; ++t) sc[t] = dot(qs + r * D, blk + t * D, D);
    }
  }
}

template <int DC>
void output_avx512(const uint8_t* vrow, int64_t S, const float* scores, int64_t rep, bool e4m3, const float* tab,
                   float* acc, float* blk) {
  constexpr int64_t D = DC * 16;
  std::fill(acc, acc + rep * D, 0.f);
  for (int64_t t0 = 0; t0 < S; t0 += kBlock) {
    const int64_t n = std::min(kBlock, S - t0);
    for (int64_t t = 0; t < n; ++t) widen_row(vrow + (t0 + t) * D, blk + t * D, D, e4m3, tab);
    for (int64_t r = 0; r < rep; ++r) {
      __m512 av[DC];
      for (int c = 0; c < DC; ++c) av[c] = _mm512_loadu_ps(acc + r * D + c * 16);
      const float* p = scores + r * S + t0;
      for (int64_t t = 0; t < n; ++t) {
        const __m512 w = _mm512_set1_ps(p[t]);
        for (int c = 0; c < DC; ++c) av[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(blk + t * D + c * 16), av[c]);
      }
      for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + r * D + c * 16, av[c]);
    }
  }
}
#endif

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k8, double k_scale, const at::Tensor& v8,
                            double v_scale, const std::optional<at::Tensor>& mask_in, double scaling) {
  TORCH_CHECK(q.device().is_cpu() && k8.device().is_cpu() && v8.device().is_cpu(), "decode_attention: CPU tensors");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k8.dim() == 4 && v8.sizes() == k8.sizes(),
              "decode_attention: q (B, Hq, 1, D), k and v (B, Hkv, S, D), got ", q.sizes(), ", ", k8.sizes(), ", ",
              v8.sizes());
  const bool e4m3 = k8.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK((e4m3 || k8.scalar_type() == at::kFloat8_e5m2) && v8.scalar_type() == k8.scalar_type(),
              "decode_attention: k and v must be the same FP8 dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k8.size(1), S = k8.size(2);
  TORCH_CHECK(k8.size(0) == B && k8.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "decode_attention: shapes ",
              q.sizes(), " and ", k8.sizes(), " do not fit (B, D equal; Hq a multiple of Hkv)");
  for (const auto* t : {&k8, &v8})
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == D, "decode_attention: k and v need contiguous rows of D");
  at::Tensor mask;
  bool mask_bool = false;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == 1 &&
                mask.size(2) == 1 && mask.size(3) == S, "decode_attention: mask (1 or B, 1, 1, S), got ", mask.sizes());
    mask_bool = mask.scalar_type() == at::kBool;
    mask = mask_bool ? mask.contiguous() : mask.to(at::kFloat).contiguous();
  }
  const float post = e4m3 ? 256.f : 1.f;  // the widened rows hold value / post
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, 1, Hq, D}, q.options().dtype(at::kFloat));
  const int64_t rep = Hq / Hkv;
  float tab[256];
  for (int i = 0; i < 256; ++i) tab[i] = scaled(static_cast<uint8_t>(i), e4m3, 1.f);
  const auto* kb = reinterpret_cast<const uint8_t*>(k8.data_ptr());
  const auto* vb = reinterpret_cast<const uint8_t*>(v8.data_ptr());
  const float qmul = static_cast<float>(scaling) * static_cast<float>(k_scale) * post;
  const float vmul = static_cast<float>(v_scale) * post;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t a, int64_t b) {
    std::vector<float> qs(rep * D), scores(rep * S), acc(rep * D), blk(kBlock * D), row(D);
    for (int64_t bg = a; bg < b; ++bg) {
      const int64_t bi = bg / Hkv, g = bg % Hkv;
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qf.data_ptr<float>()[(bi * Hq + g * rep + r) * D + d] * qmul;
      const uint8_t* krow = kb + bi * k8.stride(0) + g * k8.stride(1);
      const uint8_t* vrow = vb + bi * v8.stride(0) + g * v8.stride(1);
      const bool* mb = mask.defined() && mask_bool ? mask.data_ptr<bool>() + (mask.size(0) == 1 ? 0 : bi * S) : nullptr;
      const float* mf = mask.defined() && !mask_bool ? mask.data_ptr<float>() + (mask.size(0) == 1 ? 0 : bi * S) : nullptr;
      float* o = out.data_ptr<float>() + bi * Hq * D;
#if defined(DSQ_AVX512)
      if (D == 64) scores_avx512<4>(krow, S, qs.data(), rep, e4m3, tab, scores.data(), blk.data());
      else if (D == 128) scores_avx512<8>(krow, S, qs.data(), rep, e4m3, tab, scores.data(), blk.data());
      else
#endif
        scores_generic(krow, S, D, qs.data(), rep, e4m3, tab, scores.data(), blk.data(), row.data());
      for (int64_t r = 0; r < rep; ++r) masked_softmax(scores.data() + r * S, S, mb, mf, vmul);
#if defined(DSQ_AVX512)
      if (D == 64) output_avx512<4>(vrow, S, scores.data(), rep, e4m3, tab, acc.data(), blk.data());
      else if (D == 128) output_avx512<8>(vrow, S, scores.data(), rep, e4m3, tab, acc.data(), blk.data());
      else
#endif
        output_generic(vrow, S, D, scores.data(), rep, e4m3, tab, acc.data(), blk.data());
      for (int64_t r = 0; r < rep; ++r) std::memcpy(o + (g * rep + r) * D, acc.data() + r * D, D * sizeof(float));
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ds_quant, m) {  // the library itself: fp8_gemm_cpu.cpp
  m.def("dequantize_fp8(Tensor x_fp8, float scale, ScalarType out_dtype, Tensor? out=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_fp8, float k_scale, Tensor v_fp8, float v_scale, Tensor? mask, "
        "float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(ds_quant, CPU, m) {
  m.impl("dequantize_fp8", &dequantize);
  m.impl("decode_attention", &decode_attention);
}
