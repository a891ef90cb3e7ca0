// The SIMD building blocks the CPU kernels share, one copy each: the 16-lane reduction of their
// numerical contracts (in every form a kernel needs), the 16-lane dot product, tail masks,
// bfloat16 widening and exp2. The target macros and the run-time choice of a path are isa.h's.
//
// The 16-lane contract (gemm.h, paged_attention.cpp, elementwise.cpp): a sum of n products
// runs in 16 lanes, product i in lane i mod 16 (fma, i ascending, each lane from +0.0f), then
// a fixed tree:  s8[l] = p[l] + p[l + 8]   (l < 8)
//                s4[l] = s8[l] + s8[l + 4] (l < 4)
//                s2[l] = s4[l] + s4[l + 2] (l < 2)
//                r     = s2[0] + s2[1]
// Every form below performs exactly these additions on the same operands, so a result is
// bit-identical whichever form (scalar, AVX2, AVX-512, sixteen at once) computed it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

// Hidden: a helper that is not inlined (an AVX-512 one called from portable code) is then
// called directly rather than through the PLT (rms_norm measured ~10% faster).
#pragma GCC visibility push(hidden)

namespace fastinfer_cpu {

// ---------------------------------------------------------------- portable
inline float tree16(const float* p) {
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = p[l] + p[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return s2[0] + s2[1];
}

// sum of a[i] * b[i], i < n, in the contract's order (std::fma rounds once, as the vector
// FMAs do); lanes past the last product are left as they are.
inline float dot16(const float* a, const float* b, int64_t n) {
  float p[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) p[l] = std::fma(a[i + l], b[i + l], p[l]);
  for (int l = 0; i + l < n; ++l) p[l] = std::fma(a[i + l], b[i + l], p[l]);
  return tree16(p);
}

// The float32 a bfloat16 stands for (its bits are the float's high half: exact).
inline float widen_bf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if FI_X86
// ---------------------------------------------------------------- AVX2
// The tree on lanes 0..7 (lo) and 8..15 (hi).
FI_TARGET_AVX2 inline float reduce16_avx2(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);                        // l, l + 8
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8),        // l, l + 4
                               _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));        // l, l + 2
  const __m128 r = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55));  // 0, 1
  return _mm_cvtss_f32(r);
}

// 8 bfloat16 at p widened to float32.
FI_TARGET_AVX2 inline __m256 widen_bf16_avx2(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// ---------------------------------------------------------------- AVX-512
// The first min(n, 16) lanes (n >= 0).
inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// The tree on one vector of 16 lane sums.
FI_TARGET_AVX512 inline float reduce16_avx512(__m512 a) {
  return reduce16_avx2(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

// Sixteen trees at once: lane j of the result is the tree of a[reduce16x16_slot(j)]. Tiles of
// 16 outputs (gemm.h) or 16 keys (paged attention) accumulate output j in that register, so the
// result comes out in their order.
constexpr int reduce16x16_slot(int j) { return j / 4 + 4 * (j % 4); }  // its own inverse

FI_TARGET_AVX512 inline __m512 reduce16x16_avx512(const __m512* a) {
  __m512 c[8], d[4], e[2];
  for (int j = 0; j < 8; ++j) {  // l, l + 8: quarters (0, 1) + (2, 3) of a[2j] and a[2j + 1]
    const __m512 u = a[2 * j], v = a[2 * j + 1];
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x44), _mm512_shuffle_f32x4(u, v, 0xEE));
  }
  for (int j = 0; j < 4; ++j) {  // l, l + 4: quarter k of d[j] belongs to a[4j + k]
    const __m512 u = c[2 * j], v = c[2 * j + 1];
    d[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD));
  }
  for (int j = 0; j < 2; ++j) {  // l, l + 2
    const __m512 u = d[2 * j], v = d[2 * j + 1];
    e[j] = _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x44), _mm512_shuffle_ps(u, v, 0xEE));
  }
  // 0, 1
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

// dot16 with AVX-512 (the masked tail FMA leaves the lanes past n as they are).
FI_TARGET_AVX512 inline float dot16_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 m = lanes16(n - i);
    acc = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i),
                                acc, m);
  }
  return reduce16_avx512(acc);
}

// 16 bfloat16 at p widened to float32.
FI_TARGET_AVX512 inline __m512 widen_bf16_avx512(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 2^x for x <= 0; 0 below -125 (and for -inf). Degree-7 Taylor polynomial of 2^f on
// |f| <= 1/2 (truncation error < 6e-9 relative) times 2^n built in the exponent bits.
FI_TARGET_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  // ln(2)^k / k!
  __m512 p = _mm512_set1_ps(1.5252733804059840e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}
#endif  // FI_X86

}  // namespace fastinfer_cpu

#pragma GCC visibility pop
