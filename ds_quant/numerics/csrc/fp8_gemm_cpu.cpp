// FP8 x FP8 -> out_dtype GEMM on CPU: y[m, n] = (sum_k x[m, k] * w[n, k]) * x_scale[m] * w_scale[n].
//
// What an FP8 GEMM computes (FP8 values, exact products, fp32 accumulation, scales applied after), fast on
// CPUs that have no FP8 arithmetic. Built by ds_quant/numerics/kernels.py with -march=native (with the other
// csrc/*.cpp, one library), so the ISA macros of fp8.h are the machine's. Paths, chosen by ops.py per call:
//
//   gemv    (small M, decode): memory-bound, so read one byte per weight and widen it in registers:
//           E4M3 byte -> fp16 bits by a 16-bit shift (value / 2^8, exact for normals and subnormals),
//           F16C / AVX-512 fp16 -> fp32, FMA. Several output rows per pass share each activation load, and the
//           next group of rows is prefetched while one runs.
//           For M > 4 each weight row group is widened once into a small buffer and reused by every row of x.
//   blocked (large M, prefill): compute-bound, so widen blocks of weight rows (exactly) to the dtype the
//           native GEMM is fastest in (bf16 where oneDNN has bf16 hardware, fp32 otherwise) and call at::mm on
//           each block; the whole weight is never widened at once, nothing is kept between calls.
//
// The widening (E4M3 and E5M2 bytes -> fp16 bits by shifts) is fp8.h's, shared with kv_cache_cpu.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fp8.h"  // DSQ_X86 / DSQ_AVX512 / DSQ_BF16DP, the FP8 widening

namespace {

using dsq::isa;
using dsq::widen1;

// ---- 16 lanes: one zmm (AVX-512) or two ymm (AVX2) ---------------------------------------------------------
#if defined(DSQ_AVX512)
struct V16 {
  __m512 v;
};
inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline float vsum(V16 a) { return _mm512_reduce_add_ps(a.v); }
#elif defined(DSQ_X86)
struct V16 {
  __m256 lo, hi;
};
inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline float vsum(V16 a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}
#else
struct V16 {
  float v[16];
};
inline V16 vzero() { V16 r; for (int i = 0; i < 16; ++i) r.v[i] = 0.f; return r; }
inline V16 vload(const float* p) { V16 r; for (int i = 0; i < 16; ++i) r.v[i] = p[i]; return r; }
inline void vstore(float* p, V16 a) { for (int i = 0; i < 16; ++i) p[i] = a.v[i]; }
inline V16 vfma(V16 a, V16 b, V16 c) { for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline float vsum(V16 a) { float s = 0.f; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
#endif

// 16 FP8 bytes -> 16 floats (value / post).
template <bool E4M3>
inline V16 widen16(const uint8_t* p) {
#if defined(DSQ_X86)
  const __m256i h = dsq::half_bits16(p, E4M3);
#if defined(DSQ_AVX512)
  return {_mm512_cvtph_ps(h)};
#else
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
#endif
#else
  V16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = widen1(p[i], E4M3);
  return r;
#endif
}

// A row of n FP8 bytes -> n floats (value / post, times `mul`).
template <bool E4M3>
void widen_row(const uint8_t* src, float* dst, int64_t n, float mul) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    V16 v = widen16<E4M3>(src + k);
#if defined(DSQ_AVX512)
    v.v = _mm512_mul_ps(v.v, _mm512_set1_ps(mul));
#elif defined(DSQ_X86)
    v.lo = _mm256_mul_ps(v.lo, _mm256_set1_ps(mul));
    v.hi = _mm256_mul_ps(v.hi, _mm256_set1_ps(mul));
#else
    for (int i = 0; i < 16; ++i) v.v[i] *= mul;
#endif
    vstore(dst + k, v);
  }
  for (; k < n; ++k) dst[k] = widen1(src[k], E4M3) * mul;
}

// float (exactly an FP8 value) -> bf16 bits: the low 16 bits are zero, so truncation is exact.
inline uint16_t float_to_bf16_exact(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

#if defined(DSQ_AVX512)
// FP8 -> bf16 by table: the bf16 bits of each of the 128 magnitudes, looked up 32 at a time with two 64-entry
// vpermi2w and a blend on bit 6, then the sign bit moved up: ~9 instructions per 32 weights, in order.
template <bool E4M3>
struct Bf16Table {
  __m512i q[4];
  Bf16Table() {
    alignas(64) uint16_t t[128];
    for (int m = 0; m < 128; ++m) t[m] = float_to_bf16_exact(widen1(static_cast<uint8_t>(m), E4M3) * (E4M3 ? 256.f : 1.f));
    for (int i = 0; i < 4; ++i) q[i] = _mm512_load_si512(t + 32 * i);
  }
};

template <bool E4M3>
inline __m512i widen32_bf16_exact(const uint8_t* p, const Bf16Table<E4M3>& tab) {
  const __m512i h = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i mag = _mm512_and_si512(h, _mm512_set1_epi16(0x7F));
  const __m512i lo = _mm512_permutex2var_epi16(tab.q[0], mag, tab.q[1]);  // index bits 5..0
  const __m512i hi = _mm512_permutex2var_epi16(tab.q[2], mag, tab.q[3]);
  const __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40)), lo, hi);
  return _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi16(0x80)), 8));
}
#endif

// A row of n FP8 bytes -> n bf16 holding the exact values.
template <bool E4M3>
void widen_row_bf16(const uint8_t* src, uint16_t* dst, int64_t n) {
  int64_t k = 0;
#if defined(DSQ_AVX512)
  static const Bf16Table<E4M3> tab;
  for (; k + 32 <= n; k += 32) _mm512_storeu_si512(dst + k, widen32_bf16_exact<E4M3>(src + k, tab));
#endif
  for (; k < n; ++k) dst[k] = float_to_bf16_exact(widen1(src[k], E4M3) * (E4M3 ? 256.f : 1.f));
}

// ---- the small-M kernel --------------------------------------------------------------------------------------
inline void prefetch(const void* p) {
#if defined(DSQ_X86)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#elif defined(__GNUC__)
  __builtin_prefetch(p);
#endif
}

// Tile of MT rows of x times RT rows of w. `xf`: x widened to float, exact FP8 values (M, K).
// WBYTES: w read as FP8 bytes and widened in registers; otherwise `wf` holds rows widened once (value / post).
// `next`: the FP8 rows of the group after this one (nullptr: none), prefetched one cache line per row every 64
// bytes of k. A row of a 4096-wide layer is one 4 KB page, where hardware prefetchers stop, so without this every
// group starts RT cold streams: measured on a 32 MiB-L3 EPYC (4096^2, M=1, weights from DRAM) the GEMV streamed
// ~20 GB/s without and ~29.5 GB/s with it, where bf16 streams ~28-32 GB/s.
template <int MT, int RT, bool E4M3, bool WBYTES>
inline void tile(const float* xf, int64_t ldx, const uint8_t* w8, const float* wf, int64_t ldw, int64_t K,
                 float* acc_out /* [MT][RT] */, const uint8_t* next) {
  V16 acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = vzero();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next != nullptr && (k & 63) == 0)
      for (int r = 0; r < RT; ++r) prefetch(next + r * ldw + k);
    V16 w[RT];
    for (int r = 0; r < RT; ++r) w[r] = WBYTES ? widen16<E4M3>(w8 + r * ldw + k) : vload(wf + r * ldw + k);
    for (int m = 0; m < MT; ++m) {
      V16 xv = vload(xf + m * ldx + k);
      for (int r = 0; r < RT; ++r) acc[m][r] = vfma(xv, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < RT; ++r) {
      float s = vsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk)
        s += xf[m * ldx + kk] * (WBYTES ? widen1(w8[r * ldw + kk], E4M3) : wf[r * ldw + kk]);
      acc_out[m * RT + r] = s;
    }
  }
}

// Register budget: 16 accumulators of 16 lanes fit AVX-512's 32 zmm; AVX2 has 16 ymm and needs two per V16.
#if defined(DSQ_AVX512)
constexpr int kRT = 4, kMT = 4;
#else
constexpr int kRT = 4, kMT = 1;
#endif

struct Epilogue {
  const float* xs;  // (M) or (1)
  bool xs_rows;
  const float* ws;  // (N) or (1)
  bool ws_rows;
  float post;
  // (acc * post) * x_scale * w_scale, in the reference's order (post is a power of two: exact)
  float apply(float acc, int64_t m, int64_t n) const { return acc * post * xs[xs_rows ? m : 0] * ws[ws_rows ? n : 0]; }
};

template <typename OutT>
inline void store(OutT* y, int64_t ldy, int64_t m0, int64_t n0, int mt, int rt, const float* acc, int RT,
                  const Epilogue& ep) {
  for (int m = 0; m < mt; ++m)
    for (int r = 0; r < rt; ++r)
      y[(m0 + m) * ldy + n0 + r] = static_cast<OutT>(ep.apply(acc[m * RT + r], m0 + m, n0 + r));
}

// Dispatch a run-time tile height (1..kMT) to the templates.
template <int RT, bool E4M3, bool WBYTES>
inline void tile_m(int mt, const float* xf, int64_t ldx, const uint8_t* w8, const float* wf, int64_t ldw, int64_t K,
                   float* acc, const uint8_t* next) {
  switch (mt) {
#if defined(DSQ_AVX512)
    case 4: tile<4, RT, E4M3, WBYTES>(xf, ldx, w8, wf, ldw, K, acc, next); break;
    case 3: tile<3, RT, E4M3, WBYTES>(xf, ldx, w8, wf, ldw, K, acc, next); break;
    case 2: tile<2, RT, E4M3, WBYTES>(xf, ldx, w8, wf, ldw, K, acc, next); break;
#endif
    default: tile<1, RT, E4M3, WBYTES>(xf, ldx, w8, wf, ldw, K, acc, next); break;
  }
}

template <bool E4M3, typename OutT>
void gemv_impl(const float* xf, int64_t M, const uint8_t* w8, int64_t N, int64_t K, const Epilogue& ep, OutT* y) {
  const int64_t groups = (N + kRT - 1) / kRT;
  // Each row of x re-reads the weight row group from L1/L2 when it was widened once (M > kMT); for M <= kMT
  // one pass of the weight bytes serves every row of x.
  const bool widen_once = M > kMT;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<float> wbuf(widen_once ? kRT * K : 0);
    float acc[kMT * kRT];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kRT;
      const int rt = static_cast<int>(std::min<int64_t>(kRT, N - n0));
      const uint8_t* wrow = w8 + n0 * K;
      // the next full group of this thread's range, prefetched while this one runs (see tile)
      const uint8_t* next = g + 1 < g1 && n0 + 2 * kRT <= N ? wrow + kRT * K : nullptr;
      if (widen_once) {
        for (int r = 0; r < rt; ++r) {
          if (next != nullptr)
            for (int64_t k = 0; k < K; k += 64) prefetch(next + r * K + k);
          widen_row<E4M3>(wrow + r * K, wbuf.data() + r * K, K, 1.f);
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += kMT) {
        const int mt = static_cast<int>(std::min<int64_t>(kMT, M - m0));
        if (rt == kRT) {
          if (widen_once)
            tile_m<kRT, E4M3, false>(mt, xf + m0 * K, K, nullptr, wbuf.data(), K, K, acc, nullptr);
          else
            tile_m<kRT, E4M3, true>(mt, xf + m0 * K, K, wrow, nullptr, K, K, acc, m0 == 0 ? next : nullptr);
          store(y, N, m0, n0, mt, rt, acc, kRT, ep);
        } else {  // the last, partial group: one weight row at a time
          for (int r = 0; r < rt; ++r) {
            float a1[kMT];
            tile_m<1, E4M3, true>(mt, xf + m0 * K, K, wrow + r * K, nullptr, K, K, a1, nullptr);
            store(y, N, m0, n0 + r, mt, 1, a1, 1, ep);
          }
        }
      }
    }
  });
}

// ---- the medium-M kernel on bf16 hardware ---------------------------------------------------------------------
// Compute-bound from M ~ 4: FP8 values are exact in bf16, so widen each weight row group once into bf16 (in
// registers, by table) and multiply with vdpbf16ps (fp32 accumulation), the same
// instruction oneDNN's bf16 GEMM uses, reading half the weight bytes it reads.
#if defined(DSQ_BF16DP)
// A row of n FP8 bytes -> n bf16 (exact values); n padded with zeros to a multiple of 32.
template <bool E4M3>
void widen_row_bf16dp(const uint8_t* src, uint16_t* dst, int64_t n, int64_t n_padded) {
  widen_row_bf16<E4M3>(src, dst, n);
  for (int64_t k = n; k < n_padded; ++k) dst[k] = 0;
}

template <int MT, int RT>
inline void tile_dp(const uint16_t* xb, const uint16_t* wb, int64_t ld, int64_t kp, float* acc_out) {
  __m512 acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 32) {
    __m512bh w[RT];
    for (int r = 0; r < RT; ++r) w[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wb + r * ld + k));
    for (int m = 0; m < MT; ++m) {
      __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + m * ld + k));
      for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, w[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc_out[m * RT + r] = _mm512_reduce_add_ps(acc[m][r]);
}

constexpr int kDpRT = 4, kDpMT = 4;

template <int RT>
inline void tile_dp_m(int mt, const uint16_t* xb, const uint16_t* wb, int64_t ld, int64_t kp, float* acc) {
  switch (mt) {
    case 4: tile_dp<4, RT>(xb, wb, ld, kp, acc); break;
    case 3: tile_dp<3, RT>(xb, wb, ld, kp, acc); break;
    case 2: tile_dp<2, RT>(xb, wb, ld, kp, acc); break;
    default: tile_dp<1, RT>(xb, wb, ld, kp, acc); break;
  }
}

template <bool E4M3, typename OutT>
void dp_impl(const uint8_t* x8, int64_t M, const uint8_t* w8, int64_t N, int64_t K, const Epilogue& ep, OutT* y) {
  const int64_t kp = (K + 31) / 32 * 32;
  std::vector<uint16_t> xb(M * kp);
  at::parallel_for(0, M, 16, [&](int64_t a, int64_t b) {
    for (int64_t m = a; m < b; ++m) widen_row_bf16dp<E4M3>(x8 + m * K, xb.data() + m * kp, K, kp);
  });
  const int64_t groups = (N + kDpRT - 1) / kDpRT;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    std::vector<uint16_t> wb(kDpRT * kp, 0);
    float acc[kDpMT * kDpRT];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kDpRT;
      const int rt = static_cast<int>(std::min<int64_t>(kDpRT, N - n0));
      const bool next = g + 1 < g1 && n0 + 2 * kDpRT <= N;  // prefetch the next group's rows (see tile)
      for (int r = 0; r < rt; ++r) {
        if (next)
          for (int64_t k = 0; k < K; k += 64) prefetch(w8 + (n0 + kDpRT + r) * K + k);
        widen_row_bf16dp<E4M3>(w8 + (n0 + r) * K, wb.data() + r * kp, K, kp);
      }
      for (int r = rt; r < kDpRT; ++r) std::fill(wb.begin() + r * kp, wb.begin() + (r + 1) * kp, 0);
      for (int64_t m0 = 0; m0 < M; m0 += kDpMT) {
        const int mt = static_cast<int>(std::min<int64_t>(kDpMT, M - m0));
        tile_dp_m<kDpRT>(mt, xb.data() + m0 * kp, wb.data(), kp, kp, acc);
        store(y, N, m0, n0, mt, rt, acc, kDpRT, ep);
      }
    }
  });
}
#endif

// ---- argument checks shared by both paths ----------------------------------------------------------------------
struct Args {
  int64_t M, N, K;
  bool e4m3;
  at::Tensor x, w, xs, ws;
};

Args check_args(const at::Tensor& x_fp8, const at::Tensor& w_fp8, const at::Tensor& x_scale,
                const at::Tensor& w_scale) {
  TORCH_CHECK(x_fp8.device().is_cpu() && w_fp8.device().is_cpu(), "ds_quant::fp8_gemm: CPU tensors only");
  TORCH_CHECK(x_fp8.dim() == 2 && w_fp8.dim() == 2, "ds_quant::fp8_gemm: x (M, K) and w (N, K), got ",
              x_fp8.sizes(), " and ", w_fp8.sizes());
  TORCH_CHECK(x_fp8.size(1) == w_fp8.size(1), "ds_quant::fp8_gemm: K mismatch ", x_fp8.sizes(), " vs ", w_fp8.sizes());
  const auto dt = w_fp8.scalar_type();
  TORCH_CHECK(dt == at::kFloat8_e4m3fn || dt == at::kFloat8_e5m2, "ds_quant::fp8_gemm: w must be float8_e4m3fn "
              "or float8_e5m2, got ", dt);
  TORCH_CHECK(x_fp8.scalar_type() == dt, "ds_quant::fp8_gemm: x and w must have the same FP8 dtype");
  Args a{x_fp8.size(0), w_fp8.size(0), x_fp8.size(1), dt == at::kFloat8_e4m3fn, x_fp8.contiguous(),
         w_fp8.contiguous(), x_scale.to(at::kFloat).contiguous().reshape(-1),
         w_scale.to(at::kFloat).contiguous().reshape(-1)};
  TORCH_CHECK(a.xs.numel() == 1 || a.xs.numel() == a.M, "ds_quant::fp8_gemm: x_scale must be () or (M, 1)");
  TORCH_CHECK(a.ws.numel() == 1 || a.ws.numel() == a.N, "ds_quant::fp8_gemm: w_scale must be () or (N,)");
  return a;
}

template <typename F>
void dispatch_out(at::ScalarType out_dtype, F&& f) {
  switch (out_dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "ds_quant::fp8_gemm: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  }
}

at::Tensor fp8_gemm_gemv(const at::Tensor& x_fp8, const at::Tensor& w_fp8, const at::Tensor& x_scale,
                         const at::Tensor& w_scale, at::ScalarType out_dtype) {
  Args a = check_args(x_fp8, w_fp8, x_scale, w_scale);
  at::Tensor y = at::empty({a.M, a.N}, x_fp8.options().dtype(out_dtype));
  if (a.M == 0 || a.N == 0) return y;
  if (a.K == 0) return y.zero_();
  // x widened once to exact float values (E4M3: value / 2^8, times 2^8).
  std::vector<float> xf(a.M * a.K);
  const auto* x8 = static_cast<const uint8_t*>(a.x.data_ptr());
  for (int64_t m = 0; m < a.M; ++m) {
    if (a.e4m3) widen_row<true>(x8 + m * a.K, xf.data() + m * a.K, a.K, 256.f);
    else widen_row<false>(x8 + m * a.K, xf.data() + m * a.K, a.K, 1.f);
  }
  Epilogue ep{a.xs.data_ptr<float>(), a.xs.numel() > 1, a.ws.data_ptr<float>(), a.ws.numel() > 1,
              a.e4m3 ? 256.f : 1.f};
  const auto* w8 = static_cast<const uint8_t*>(a.w.data_ptr());
  dispatch_out(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    auto* yp = static_cast<OutT*>(y.data_ptr());
    if (a.e4m3) gemv_impl<true, OutT>(xf.data(), a.M, w8, a.N, a.K, ep, yp);
    else gemv_impl<false, OutT>(xf.data(), a.M, w8, a.N, a.K, ep, yp);
  });
  return y;
}

// ---- vectorisable conversions for the epilogue -------------------------------------------------------------------
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_rne(float f) {  // round to nearest even, as c10::BFloat16 does for finite values
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void store_row(float* y, const float* v, int64_t n) { std::memcpy(y, v, n * sizeof(float)); }
inline void store_row(at::BFloat16* y, const float* __restrict v, int64_t n) {
  auto* __restrict d = reinterpret_cast<uint16_t*>(y);
  for (int64_t j = 0; j < n; ++j) d[j] = float_to_bf16_rne(v[j]);
}
inline void store_row(at::Half* y, const float* v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<at::Half>(v[j]);
}

// ---- the activation cast: x_hp / scale, clamped to +-limit, rounded to the nearest FP8 (ties to even) -----------
// One pass, the same numbers as torch's `(x.float() / scale).clamp_(-limit, limit).to(fp8)` (IEEE fp32 division,
// then round-to-nearest-even into the FP8 format), instead of four passes and four temporaries.
template <bool E4M3>
inline uint8_t float_to_fp8_rne(float v) {
  // Branch-free, so the loop below vectorises: both candidates are computed, one is selected.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normals: round the fp32 mantissa to 3 (E4M3) or 2 (E5M2) bits, ties to even; a carry steps the exponent
  // up, which is the right result. Subnormals: a fixed quantum of 2^-9 (E4M3) or 2^-16 (E5M2), rounded with the
  // 2^23 trick (exact round-to-nearest-even for 0 <= f < 2^23; no -ffast-math, so it is not folded away).
  constexpr int kShift = E4M3 ? 20 : 21;
  constexpr uint32_t kMinNormal = E4M3 ? 0x3C800000u : 0x38800000u;  // 2^-6, 2^-14
  constexpr uint32_t kRebias = E4M3 ? (120u << 3) : (112u << 2);       // fp32 exponent bias minus the format's
  const uint32_t r = a + ((1u << (kShift - 1)) - 1) + ((a >> kShift) & 1u);
  const uint32_t normal = ((r >> kShift) - kRebias) & 0x7Fu;
  float f;
  std::memcpy(&f, &a, 4);
  const float rf = (f * (E4M3 ? 512.f : 65536.f) + 8388608.f) - 8388608.f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(rf));
  uint32_t mag = a >= kMinNormal ? normal : sub;
  mag = a > 0x7F800000u ? 0x7Fu : mag;  // NaN stays NaN (0x7F is NaN in E4M3fn and in E5M2)
  return static_cast<uint8_t>(sign | mag);
}

template <typename T, bool E4M3>
void quantize_row(const T* __restrict x, float s, float limit, uint8_t* __restrict o, int64_t n) {
  // restrict + a local count: a uint8_t store may alias anything, and would otherwise stop the vectoriser
  for (int64_t k = 0; k < n; ++k) {
    float v = static_cast<float>(x[k]) / s;
    v = v < -limit ? -limit : (v > limit ? limit : v);  // NaN passes through, as clamp_ does
    o[k] = float_to_fp8_rne<E4M3>(v);
  }
}

template <typename T, bool E4M3>
void quantize_rows(const T* x, const float* scale, bool per_row, float limit, uint8_t* out, int64_t M, int64_t K) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [=](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row<T, E4M3>(x + m * K, scale[per_row ? m : 0], limit, out + m * K, K);
  });
}

at::Tensor quantize_fp8(const at::Tensor& x_hp, const at::Tensor& scale, double limit, at::ScalarType dtype) {
  TORCH_CHECK(x_hp.device().is_cpu() && x_hp.dim() == 2, "ds_quant::quantize_fp8: a 2-D CPU tensor, got ",
              x_hp.sizes());
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2, "ds_quant::quantize_fp8: FP8 dtype");
  at::Tensor x = x_hp.contiguous();
  at::Tensor sc = scale.to(at::kFloat).contiguous().reshape(-1);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(sc.numel() == 1 || sc.numel() == M, "ds_quant::quantize_fp8: scale must be () or (M, 1)");
  at::Tensor out = at::empty({M, K}, x.options().dtype(dtype));
  if (M == 0 || K == 0) return out;
  auto* o = static_cast<uint8_t*>(out.data_ptr());
  const float* sp = sc.data_ptr<float>();
  const bool rows = sc.numel() > 1;
  const float lim = static_cast<float>(limit);
  const bool e4m3 = dtype == at::kFloat8_e4m3fn;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    if (e4m3) quantize_rows<T, true>(xp, sp, rows, lim, o, M, K);
    else quantize_rows<T, false>(xp, sp, rows, lim, o, M, K);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "ds_quant::quantize_fp8: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

at::Tensor fp8_gemm_dp(const at::Tensor& x_fp8, const at::Tensor& w_fp8, const at::Tensor& x_scale,
                       const at::Tensor& w_scale, at::ScalarType out_dtype) {
#if defined(DSQ_BF16DP)
  Args a = check_args(x_fp8, w_fp8, x_scale, w_scale);
  at::Tensor y = at::empty({a.M, a.N}, x_fp8.options().dtype(out_dtype));
  if (a.M == 0 || a.N == 0) return y;
  if (a.K == 0) return y.zero_();
  Epilogue ep{a.xs.data_ptr<float>(), a.xs.numel() > 1, a.ws.data_ptr<float>(), a.ws.numel() > 1, 1.f};
  const auto* x8 = static_cast<const uint8_t*>(a.x.data_ptr());
  const auto* w8 = static_cast<const uint8_t*>(a.w.data_ptr());
  dispatch_out(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    auto* yp = static_cast<OutT*>(y.data_ptr());
    if (a.e4m3) dp_impl<true, OutT>(x8, a.M, w8, a.N, a.K, ep, yp);
    else dp_impl<false, OutT>(x8, a.M, w8, a.N, a.K, ep, yp);
  });
  return y;
#else
  TORCH_CHECK(false, "ds_quant::fp8_gemm_dp needs avx512_bf16 (this build: ", isa(), ")");
#endif
}

// ---- the large-M path ------------------------------------------------------------------------------------------
// rows [r0, r1) of an FP8 (rows, K) matrix -> dst (r1 - r0, K) in gemm dtype, exact values.
void widen_rows(const uint8_t* src, int64_t K, int64_t r0, int64_t r1, at::Tensor& dst, bool e4m3) {
  const bool bf16 = dst.scalar_type() == at::kBFloat16;
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const uint8_t* s = src + r * K;
      if (bf16) {
        auto* d = reinterpret_cast<uint16_t*>(dst.data_ptr()) + (r - r0) * K;
        if (e4m3) widen_row_bf16<true>(s, d, K);
        else widen_row_bf16<false>(s, d, K);
      } else {
        float* d = dst.data_ptr<float>() + (r - r0) * K;
        if (e4m3) widen_row<true>(s, d, K, 256.f);
        else widen_row<false>(s, d, K, 1.f);
      }
    }
  });
}

at::Tensor fp8_gemm_blocked(const at::Tensor& x_fp8, const at::Tensor& w_fp8, const at::Tensor& x_scale,
                            const at::Tensor& w_scale, at::ScalarType out_dtype, at::ScalarType gemm_dtype,
                            int64_t block_n) {
  Args a = check_args(x_fp8, w_fp8, x_scale, w_scale);
  TORCH_CHECK(gemm_dtype == at::kBFloat16 || gemm_dtype == at::kFloat, "ds_quant::fp8_gemm_blocked: gemm_dtype "
              "must be bfloat16 or float32");
  TORCH_CHECK(block_n > 0, "ds_quant::fp8_gemm_blocked: block_n must be positive");
  at::Tensor y = at::empty({a.M, a.N}, x_fp8.options().dtype(out_dtype));
  if (a.M == 0 || a.N == 0) return y;
  if (a.K == 0) return y.zero_();
  auto opts = x_fp8.options().dtype(gemm_dtype);
  at::Tensor xw = at::empty({a.M, a.K}, opts);
  widen_rows(static_cast<const uint8_t*>(a.x.data_ptr()), a.K, 0, a.M, xw, a.e4m3);
  // Blocks of at most block_n rows and, with several threads, at least ~4 per thread, so small layers (N = 192
  // kv projections) still keep every thread busy: multiples of 16 rows.
  const int64_t threads = at::get_num_threads();
  const int64_t per_block = threads > 1 ? (a.N + 4 * threads - 1) / (4 * threads) : a.N;
  const int64_t nb = std::min({block_n, a.N, std::max<int64_t>(16, (per_block + 15) / 16 * 16)});
  const float* xs = a.xs.data_ptr<float>();
  const float* ws = a.ws.data_ptr<float>();
  const bool xs_rows = a.xs.numel() > 1, ws_rows = a.ws.numel() > 1;
  const auto* w8 = static_cast<const uint8_t*>(a.w.data_ptr());
  const int64_t blocks = (a.N + nb - 1) / nb;
  // Each thread owns whole blocks: widens its weight rows into its own buffer (hot in its L2), multiplies them
  // with a single-threaded native GEMM (nested parallelism is off inside at::parallel_for), and scales its
  // slice of the output. No block waits for another, and no thread reads another's widened rows.
  dispatch_out(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    auto* yp = static_cast<OutT*>(y.data_ptr());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor wb = at::empty({nb, a.K}, opts);
      at::Tensor part = at::empty({a.M, nb}, opts);
      std::vector<float> row(nb);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * nb, nn = std::min(nb, a.N - n0);
        at::Tensor wblk = nn == nb ? wb : wb.narrow(0, 0, nn);
        at::Tensor pblk = nn == nb ? part : at::empty({a.M, nn}, opts);
        widen_rows(w8, a.K, n0, n0 + nn, wblk, a.e4m3);
        at::mm_out(pblk, xw, wblk.t());
        const float* wsn = ws + (ws_rows ? n0 : 0);
        for (int64_t m = 0; m < a.M; ++m) {
          const float sx = xs[xs_rows ? m : 0];
          if (pblk.scalar_type() == at::kBFloat16) {
            const auto* p = reinterpret_cast<const uint16_t*>(pblk.data_ptr()) + m * nn;
            for (int64_t j = 0; j < nn; ++j) row[j] = bf16_bits_to_float(p[j]);
          } else {
            std::memcpy(row.data(), pblk.data_ptr<float>() + m * nn, nn * sizeof(float));
          }
          // (acc * x_scale) * w_scale, in the reference's order
          if (ws_rows) for (int64_t j = 0; j < nn; ++j) row[j] = row[j] * sx * wsn[j];
          else for (int64_t j = 0; j < nn; ++j) row[j] = row[j] * sx * wsn[0];
          store_row(yp + m * a.N + n0, row.data(), nn);
        }
      }
    });
  });
  return y;
}

}  // namespace

// The one TORCH_LIBRARY of namespace ds_quant; the other sources add theirs with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(ds_quant, m) {
  m.def("fp8_gemm_gemv(Tensor x_fp8, Tensor w_fp8, Tensor x_scale, Tensor w_scale, ScalarType out_dtype) -> Tensor");
  m.def("fp8_gemm_blocked(Tensor x_fp8, Tensor w_fp8, Tensor x_scale, Tensor w_scale, ScalarType out_dtype, "
        "ScalarType gemm_dtype, int block_n) -> Tensor");
  m.def("fp8_gemm_dp(Tensor x_fp8, Tensor w_fp8, Tensor x_scale, Tensor w_scale, ScalarType out_dtype) -> Tensor");
  m.def("quantize_fp8(Tensor x_hp, Tensor scale, float limit, ScalarType dtype) -> Tensor");
  m.def("cpu_kernel_isa() -> str", [] { return isa(); });
}

TORCH_LIBRARY_IMPL(ds_quant, CPU, m) {
  m.impl("fp8_gemm_gemv", &fp8_gemm_gemv);
  m.impl("fp8_gemm_blocked", &fp8_gemm_blocked);
  m.impl("fp8_gemm_dp", &fp8_gemm_dp);
  m.impl("quantize_fp8", &quantize_fp8);
}
