// Element formats of the paged KV cache (fastinfer/common/kv_format.py is the contract): float32 or
// bfloat16 rows, or quantized rows -- int8 or fp8 e4m3fn codes with one float32 scale per
// (token, kv head). Quantizing and dequantizing here use the same float32 operations as the
// torch reference, so every backend writes and reads the same bits.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastinfer_cpu {

enum class KvKind { kF32 = 0, kBF16 = 1, kI8 = 2, kE4M3 = 3 };

// The format of a cache tensor of type t (float32, bfloat16, int8 or float8_e4m3fn; callers
// check t first).
inline KvKind kv_kind(c10::ScalarType t) {
  return t == c10::kFloat ? KvKind::kF32 : t == c10::kBFloat16 ? KvKind::kBF16
       : t == c10::kChar  ? KvKind::kI8  : KvKind::kE4M3;
}

inline bool kv_quantized(KvKind k) { return k == KvKind::kI8 || k == KvKind::kE4M3; }

inline float kv_qmax(KvKind k) { return k == KvKind::kI8 ? 127.0f : 448.0f; }

// float value of every e4m3fn byte (exact).
inline const float* e4m3_table() {
  static const auto* table = [] {
    auto* t = new float[256];
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table;
}

// dst[d] = float(code[d]) * scale for one quantized row of D codes.
inline void kv_dequantize_row(KvKind kind, const void* codes, float scale, float* dst, int64_t D) {
  if (kind == KvKind::kI8) {
    const auto* c = static_cast<const int8_t*>(codes);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(c[d]) * scale;
  } else {
    const float* table = e4m3_table();
    const auto* c = static_cast<const uint8_t*>(codes);
    for (int64_t d = 0; d < D; ++d) dst[d] = table[c[d]] * scale;
  }
}

// Quantizes one row of D float32 values: returns the scale (max|x| / qmax) and writes the
// codes (round half to even for int8, e4m3fn's round to nearest even for fp8, after a clamp
// to +-qmax). A zero row gets scale 0 and codes 0.
inline float kv_quantize_row(KvKind kind, const float* x, void* codes, int64_t D) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float qmax = kv_qmax(kind);
  const float scale = amax / qmax;
  const float div = scale > 0.0f ? scale : 1.0f;
  if (kind == KvKind::kI8) {
    auto* c = static_cast<int8_t*>(codes);
    for (int64_t d = 0; d < D; ++d)
      c[d] = static_cast<int8_t>(std::nearbyint(std::clamp(x[d] / div, -qmax, qmax)));
  } else {
    auto* c = static_cast<c10::Float8_e4m3fn*>(codes);
    for (int64_t d = 0; d < D; ++d) c[d] = c10::Float8_e4m3fn(std::clamp(x[d] / div, -qmax, qmax));
  }
  return scale;
}

}  // namespace fastinfer_cpu
