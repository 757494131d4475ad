// What every ds_quant CPU kernel shares: the ISA it was built for (one macro convention) and the FP8 widening.
//
// The kernels are built with -march=native (ds_quant/numerics/kernels.py), or another -march for tests, and pick
// their code paths at compile time from these macros only:
//
//   DSQ_X86      AVX2 + F16C + FMA: 16 lanes as two ymm, F16C widening
//   DSQ_AVX512   DSQ_X86 + AVX-512 F/BW/DQ: 16 lanes as one zmm
//   DSQ_BF16DP   DSQ_AVX512 + AVX512_BF16 (vdpbf16ps)
//   (none)       portable C++: scalar widening, loops the compiler vectorises as it can
//
// Widening: E4M3 byte -> fp16 bits by a 16-bit shift (the fp16 number is value / 2^8, exact for normals and
// subnormals); E5M2 is the upper byte of fp16, so its widening is a plain shift. Either way the result is the exact
// value divided by `post` (2^8 for E4M3, 1 for E5M2), which callers fold into a scale. NaN encodings are never
// produced by the saturating casts ds_quant uses; they widen to whatever fp16 bits they make.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define DSQ_X86 1
#endif
#if defined(DSQ_X86) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define DSQ_AVX512 1
#endif
#if defined(DSQ_AVX512) && defined(__AVX512BF16__)
#define DSQ_BF16DP 1  // vdpbf16ps: two bf16 products per fp32 lane and instruction
#endif

namespace dsq {

// The ISA this build was compiled for (what -march found), for logs, errors and the bench.
static inline std::string isa() {
#if defined(DSQ_BF16DP)
  return "avx512_bf16";
#elif defined(DSQ_AVX512)
  return "avx512";
#elif defined(DSQ_X86)
  return "avx2";
#else
  return "portable";
#endif
}

// ---- one byte (tails, tables, portable builds) ---------------------------------------------------------------
static inline uint16_t fp8_to_half_bits(uint8_t b, bool e4m3) {
  if (!e4m3) return static_cast<uint16_t>(static_cast<uint16_t>(b) << 8);
  return static_cast<uint16_t>(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7));
}

static inline float half_bits_to_float(uint16_t h) {
  // IEEE half -> float, subnormals included (no F16C needed).
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // normalise the subnormal
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The widened value of one FP8 byte: value / post (exact).
static inline float widen1(uint8_t b, bool e4m3) { return half_bits_to_float(fp8_to_half_bits(b, e4m3)); }

// ---- vectors of bytes -> fp16 bits (then _mm*_cvtph_ps: exact) -----------------------------------------------
#if defined(DSQ_X86)
// 16 FP8 bytes -> 16 fp16 bit patterns (value / post) in the 16-bit lanes of a ymm. `e4m3` is a constant where
// the callers are templates on it, so the branch folds away.
static inline __m256i half_bits16(const uint8_t* p, bool e4m3) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return e4m3 ? _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7))
              : _mm256_slli_epi16(b, 8);
}

// 8 FP8 bytes -> 8 fp16 bit patterns (value / post) in an xmm: rows of 8 on AVX2 builds.
static inline __m128i half_bits8(const uint8_t* p, bool e4m3) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return e4m3 ? _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                             _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7))
              : _mm_slli_epi16(b, 8);
}
#endif

}  // namespace dsq
