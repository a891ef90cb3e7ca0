// Batch-invariant linear on quantized weights for the CPU: y = x @ dequant(W).T + bias.
//
// W [N, K] is held in fastinfer's one quantized layout (fastinfer/ops/packed.py): integer or
// fp8 codes in groups of G inputs along K, each group with a float32 scale and an optional
// float32 offset. The weight a code stands for is
//     w[n, k] = fma(code[n, k], scale[n, k / G], offset[n, k / G])   (offset 0 when absent)
// computed in registers (never stored), one correctly rounded float32 per weight, identical on
// the AVX-512, AVX2 and scalar paths. The tiles of gemm.h then apply the float32 linear's
// reduction contract, so each output's reduction order depends only on K: a row's result is
// bit-identical whatever else is in the batch, its position, the thread count and the ISA.
//
// Code kinds (the `kind` argument):
//   0  u4:   unsigned 4-bit codes 0..15, two a byte; in each run of 32 inputs, byte j holds
//            input j in its low nibble and input j + 16 in its high nibble (GGUF Q4_0/Q4_1
//            order); G is a multiple of 32.
//   1  s8:   signed 8-bit codes, one a byte; G is a multiple of 16.
//   2  e4m3: fp8 e4m3fn codes, one a byte; G is a multiple of 16 (K for per-channel scales).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemm.h"

namespace fastinfer_cpu {
namespace {

enum Kind : int64_t { kU4 = 0, kS8 = 1, kE4M3 = 2 };

// e4m3fn bits (sign, 4 exponent bits with bias 7, 3 mantissa bits) -> float32, exactly.
inline float e4m3_to_float(uint8_t b) {
  const uint32_t mag = b & 0x7Fu;
  float v;
  if (mag < 8) {
    v = static_cast<float>(mag) * 0.001953125f;  // subnormal: m * 2^-9
  } else {
    const uint32_t bits = (mag << 20) + (120u << 23);
    std::memcpy(&v, &bits, sizeof v);
  }
  return (b & 0x80u) ? -v : v;
}

template <int KIND>
struct QuantRows {
  const uint8_t* codes;  // row n starts at codes + n * row_bytes
  int64_t row_bytes;
  const float* scales;   // [N, K / G]
  const float* offsets;  // [N, K / G] or null
  int64_t groups;        // K / G
  int64_t G;

  struct Col {
    const uint8_t* c;
    const float* s;
    const float* o;
    float scale, offset;
  };
  int64_t group_size() const { return G; }
  Col col(int64_t n) const {
    return {codes + n * row_bytes, scales + n * groups,
            offsets != nullptr ? offsets + n * groups : nullptr, 0.0f, 0.0f};
  }
  void begin_group(Col& c, int64_t g) const {
    c.scale = c.s[g];
    c.offset = c.o != nullptr ? c.o[g] : 0.0f;
  }
  static float code(const Col& c, int64_t k) {
    if (KIND == kU4) {
      const uint8_t b = c.c[((k >> 5) << 4) + (k & 15)];
      return static_cast<float>((k & 16) ? (b >> 4) : (b & 15));
    } else if (KIND == kS8) {
      return static_cast<float>(static_cast<int8_t>(c.c[k]));
    } else {
      return e4m3_to_float(c.c[k]);
    }
  }
  float scalar(const Col& c, int64_t k) const { return std::fma(code(c, k), c.scale, c.offset); }

#if FI_X86
  // ---- AVX2: 16 weights as two halves of 8.
  FI_TARGET_AVX2 static __m256 e4m3_avx2(__m256i v) {
    const __m256i mag = _mm256_and_si256(v, _mm256_set1_epi32(0x7F));
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0.001953125f));
    const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
    const __m256 value = _mm256_blendv_ps(normal, sub, is_sub);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(value, _mm256_castsi256_ps(sign));
  }
  FI_TARGET_AVX2 static __m256 codes8_avx2(const Col& c, int64_t k) {  // inputs k..k+7
    if (KIND == kU4) {
      const __m128i b = _mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(c.c + ((k >> 5) << 4) + (k & 15)));
      const __m256i v = _mm256_cvtepu8_epi32(b);
      const __m256i q = (k & 16) ? _mm256_srli_epi32(v, 4)
                                 : _mm256_and_si256(v, _mm256_set1_epi32(15));
      return _mm256_cvtepi32_ps(q);
    } else if (KIND == kS8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c.c + k));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    } else {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c.c + k));
      return e4m3_avx2(_mm256_cvtepu8_epi32(b));
    }
  }
  FI_TARGET_AVX2 void avx2(const Col& c, int64_t k, __m256& lo, __m256& hi) const {
    const __m256 s = _mm256_set1_ps(c.scale), o = _mm256_set1_ps(c.offset);
    lo = _mm256_fmadd_ps(codes8_avx2(c, k), s, o);
    hi = _mm256_fmadd_ps(codes8_avx2(c, k + 8), s, o);
  }
  FI_TARGET_AVX2 void avx2_tail(const Col&, int64_t, __m256i, bool, __m256i, __m256& lo,
                                __m256& hi) const {
    lo = hi = _mm256_setzero_ps();  // unreachable: groups are whole multiples of 16
  }

  // ---- AVX-512: 16 weights at once.
  FI_TARGET_AVX512 static __m512 e4m3_avx512(__m512i v) {
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi32(0x7F));
    const __m512 normal = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
    const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0.001953125f));
    const __mmask16 is_sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
    const __m512 value = _mm512_mask_blend_ps(is_sub, normal, sub);
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
  }
  FI_TARGET_AVX512 __m512 avx512(const Col& c, int64_t k) const {
    __m512 q;
    if (KIND == kU4) {
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c.c + ((k >> 5) << 4))));
      q = _mm512_cvtepi32_ps((k & 16) ? _mm512_srli_epi32(v, 4)
                                      : _mm512_and_si512(v, _mm512_set1_epi32(15)));
    } else if (KIND == kS8) {
      q = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c.c + k))));
    } else {
      q = e4m3_avx512(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c.c + k))));
    }
    return _mm512_fmadd_ps(q, _mm512_set1_ps(c.scale), _mm512_set1_ps(c.offset));
  }
  FI_TARGET_AVX512 __m512 avx512_tail(const Col&, int64_t, __mmask16) const {
    return _mm512_setzero_ps();  // unreachable: groups are whole multiples of 16
  }
  FI_TARGET_AVX512 void prefetch(const Col& c, int64_t k) const {
    const int64_t byte = KIND == kU4 ? k >> 1 : k;
    if (KIND != kU4 || (k & 16) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(c.c + byte), _MM_HINT_T0);
  }
#endif
};

#if FI_X86
// ---- AVX-512 blocks for quantized weights. The generic gemm.h tiles keep 16 columns' loader
// state live at once, which spills; here a tile is R rows x C columns with C <= 4, walked
// group by group, and each column's codes are decoded once per chunk for all R rows. Each
// output still accumulates exactly like the contract (16 lanes, K in order, fma) and is
// reduced with the same tree, so results equal the other paths bit for bit.
template <int KIND>
FI_TARGET_AVX512 inline float reduce16(__m512 a) {
  return gemm::reduce16_avx2(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

template <int R, int C, int KIND>
FI_TARGET_AVX512 void qtile_avx512(const gemm::Problem<QuantRows<KIND>>& p, int64_t m0, int64_t n0) {
  // Column blocks are multiples of 16 (gemm::kColAlign): a tile never straddles two blocks.
  static_assert(gemm::kColAlign % C == 0, "tile width must divide the column block alignment");
  const QuantRows<KIND>& w = p.w;
  const float* xr[R];
  const uint8_t* code[C];
  const float* srow[C];
  const float* orow[C];
  for (int r = 0; r < R; ++r) xr[r] = p.x + std::min<int64_t>(m0 + r, p.M - 1) * p.ldx;
  for (int c = 0; c < C; ++c) {
    const int64_t n = std::min<int64_t>(n0 + c, p.N - 1);
    code[c] = w.codes + n * w.row_bytes;
    srow[c] = w.scales + n * w.groups;
    orow[c] = w.offsets != nullptr ? w.offsets + n * w.groups : nullptr;
  }
  __m512 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t G = w.G;
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 s[C], o[C];
    for (int c = 0; c < C; ++c) {
      s[c] = _mm512_set1_ps(srow[c][g]);
      o[c] = orow[c] != nullptr ? _mm512_set1_ps(orow[c][g]) : _mm512_setzero_ps();
    }
    const int64_t k_end = (g + 1) * G;
    if (KIND == kU4) {
      for (int64_t k = g * G; k < k_end; k += 32) {  // one 16-byte run: inputs k..k+31
        __m512 x0[R], x1[R];
        for (int r = 0; r < R; ++r) {
          x0[r] = _mm512_loadu_ps(xr[r] + k);
          x1[r] = _mm512_loadu_ps(xr[r] + k + 16);
        }
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(code[c] + (k >> 1))));
          const __m512 w0 = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), s[c], o[c]);
          const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s[c], o[c]);
          for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(x0[r], w0, acc[r * C + c]);
          for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(x1[r], w1, acc[r * C + c]);
        }
      }
    } else {
      for (int64_t k = g * G; k < k_end; k += 16) {
        __m512 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(xr[r] + k);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(code[c] + k)));
          const __m512 q = KIND == kS8 ? _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24))
                                       : QuantRows<KIND>::e4m3_avx512(v);
          const __m512 wv = _mm512_fmadd_ps(q, s[c], o[c]);
          for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(xv[r], wv, acc[r * C + c]);
        }
      }
    }
  }
  float out[R * C];
  for (int i = 0; i < R * C; ++i) out[i] = reduce16<KIND>(acc[i]);
  gemm::store_tile<R, C>(p, m0, n0, out);
}

template <int R, int C, int KIND>
FI_TARGET_AVX512 void qblock_avx512_t(const gemm::Problem<QuantRows<KIND>>& p, int64_t m_begin,
                                      int64_t m_end, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += C)
    for (int64_t m = m_begin; m < m_end; m += R) qtile_avx512<R, C, KIND>(p, m, n);
}

template <int KIND>
void qblock_avx512(const gemm::Problem<QuantRows<KIND>>& p, int64_t m_begin, int64_t m_end,
                   int64_t n_begin, int64_t n_end) {
  const int64_t rows = m_end - m_begin;
  if (rows == 1) {
    qblock_avx512_t<1, 4, KIND>(p, m_begin, m_end, n_begin, n_end);
  } else if (rows == 2) {
    qblock_avx512_t<2, 4, KIND>(p, m_begin, m_end, n_begin, n_end);
  } else {
    qblock_avx512_t<4, 2, KIND>(p, m_begin, m_end, n_begin, n_end);
  }
}
#endif

template <int KIND>
void run_kind(const float* x, int64_t ldx, const uint8_t* codes, int64_t row_bytes,
              const float* scales, const float* offsets, int64_t G, const float* bias, float* y,
              int64_t M, int64_t N, int64_t K) {
  gemm::Problem<QuantRows<KIND>> p;
  p.x = x;
  p.ldx = ldx;
  p.w = QuantRows<KIND>{codes, row_bytes, scales, offsets, K / G, G};
  p.bias = bias;
  p.y = y;
  p.ldy = N;
  p.y_m0 = 0;
  p.y_n0 = 0;
  p.M = M;
  p.N = N;
  p.K = K;
#if FI_X86
  gemm::run(p, qblock_avx512<KIND>);
#else
  gemm::run(p);
#endif
}

at::Tensor linear_q(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size,
                    const std::optional<at::Tensor>& bias) {
  // Type errors raise TypeError, shape/layout errors ValueError, device errors RuntimeError.
  for (const at::Tensor* t : {&x, &codes, &scales})
    TORCH_CHECK(t->device().is_cpu(), "linear_q: every tensor must be on the CPU, got ",
                t->device());
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "linear_q: kind must be 0 (u4), 1 (s8) or 2 (e4m3), got ",
                    kind);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "linear_q: x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && codes.dim() == 2,
                    "linear_q: x must be [M, K] and codes [N, K or K/2], got shapes ", x.sizes(),
                    " and ", codes.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  const at::ScalarType want = kind == kU4 ? at::kByte
                              : kind == kS8 ? at::kChar
                                            : at::ScalarType::Float8_e4m3fn;
  TORCH_CHECK_TYPE(codes.scalar_type() == want || (kind == kE4M3 && codes.scalar_type() == at::kByte),
                   "linear_q: codes of kind ", kind, " must be ", want, ", got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(K > 0 && group_size > 0 && K % group_size == 0 &&
                        group_size % (kind == kU4 ? 32 : 16) == 0,
                    "linear_q: group_size must divide K = ", K, " and be a multiple of ",
                    kind == kU4 ? 32 : 16, ", got ", group_size);
  const int64_t row_bytes = kind == kU4 ? K / 2 : K;
  TORCH_CHECK_VALUE(codes.size(1) == row_bytes && codes.is_contiguous(),
                    "linear_q: codes must be contiguous [N, ", row_bytes, "], got shape ",
                    codes.sizes());
  const int64_t groups = K / group_size;
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "linear_q: scales must be float32");
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == groups &&
                        scales.is_contiguous(),
                    "linear_q: scales must be contiguous [N, K / group_size] = [", N, ", ",
                    groups, "], got shape ", scales.sizes());
  const float* off_ptr = nullptr;
  if (offsets.has_value() && offsets->defined()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK(o.device().is_cpu(), "linear_q: offsets must be on the CPU");
    TORCH_CHECK_TYPE(o.scalar_type() == at::kFloat, "linear_q: offsets must be float32");
    TORCH_CHECK_VALUE(o.sizes() == scales.sizes() && o.is_contiguous(),
                      "linear_q: offsets must be contiguous and shaped like scales, got shape ",
                      o.sizes());
    off_ptr = o.data_ptr<float>();
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "linear_q: bias must be on the CPU");
    TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat, "linear_q: bias must be float32");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N && b.is_contiguous(),
                      "linear_q: bias must be contiguous [N] with N = ", N, ", got shape ",
                      b.sizes());
    bias_ptr = b.data_ptr<float>();
  }
  TORCH_CHECK_VALUE(x.stride(1) == 1, "linear_q: x rows must be contiguous, got strides ",
                    x.strides());
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scales.data_ptr<float>();
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  if (kind == kU4)
    run_kind<kU4>(xp, ldx, c, row_bytes, s, off_ptr, group_size, bias_ptr, yp, M, N, K);
  else if (kind == kS8)
    run_kind<kS8>(xp, ldx, c, row_bytes, s, off_ptr, group_size, bias_ptr, yp, M, N, K);
  else
    run_kind<kE4M3>(xp, ldx, c, row_bytes, s, off_ptr, group_size, bias_ptr, yp, M, N, K);
  return y;
}

}  // namespace
}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("linear_q(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int kind, "
        "int group_size, Tensor? bias=None) -> Tensor",
        &fastinfer_cpu::linear_q);
}
