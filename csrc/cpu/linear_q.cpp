// Batch-invariant linear on quantized weights for the CPU: y = x @ dequant(W).T + bias.
//
// W [N, K] is held in fastinfer's one quantized layout (fastinfer/common/packed.py): integer or
// fp8 codes in groups of G inputs along K, each group with a scale and an optional offset,
// both float32 or both float16 (GGUF's own fp16 fields, kept: fewer bytes read a token; every
// path widens them exactly, so the float16 form of a float32 weight computes the same bits).
// The weight a code stands for is
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
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "gemm.h"
#include "ops.h"

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

// W's storage, as every path below reads it.
struct QuantWeights {
  const uint8_t* codes;  // row n starts at codes + n * row_bytes
  int64_t row_bytes;
  const void* scales;    // [N, groups]: float32, or float16 bits when `half`
  const void* offsets;   // [N, groups] like scales, or null
  int64_t groups;        // K / G
  bool half;

  const uint8_t* code_row(int64_t n) const { return codes + n * row_bytes; }
  bool has_offsets() const { return offsets != nullptr; }
  // Element i of a scale-like array, widened to float32.
  float value(const void* a, int64_t i) const {
    return half ? static_cast<float>(static_cast<const c10::Half*>(a)[i]) : static_cast<const float*>(a)[i];
  }
  // Group g of row n: its scale, and its offset (0 without offsets).
  float scale(int64_t n, int64_t g) const { return value(scales, n * groups + g); }
  float offset(int64_t n, int64_t g) const {
    return offsets != nullptr ? value(offsets, n * groups + g) : 0.0f;
  }
};

// ---- The tile scaffold of QTileAvx512 and the AVX2 tiles (aq_tile_vnni, which never clamps,
// shares only store_acc). gemm::run_with splits the product into blocks over the threads and
// gemm::narrow_blocks walks a block in R x C tiles, calling Kernel::template tile<R, C>(p, m0,
// n0); the kernel clamps its rows with tile_row, points at its columns with tile_columns and
// hands its accumulators to store_acc (AVX-512). Rows past M and columns past N are clamped onto
// row M - 1 and column N - 1 (computed, never stored), so every stored output goes through the
// same instructions. Helpers the kernel calls rather than a scaffold calling the kernel: the
// VNNI kernel's target is wider than AVX-512, so a call into it could not be inlined; and the
// operands stay plain local arrays because the kernels' register allocation is sensitive to how
// they arrive (a struct of them measured 5-10% slower).
template <class W>
inline int64_t tile_row(const gemm::Problem<W>& p, int64_t m) {
  return std::min<int64_t>(m, p.M - 1);
}

// col[c], code[c]: the (clamped) index and the codes of column n0 + c, c < C.
template <int C, class W>
inline void tile_columns(const gemm::Problem<W>& p, int64_t n0, int64_t* col, const uint8_t** code) {
  // Column blocks are multiples of 16 (gemm::kColAlign): a tile never straddles two blocks.
  static_assert(gemm::kColAlign % C == 0, "tile width must divide the column block alignment");
  for (int c = 0; c < C; ++c) {
    col[c] = std::min<int64_t>(n0 + c, p.N - 1);
    code[c] = p.w.code_row(col[c]);
  }
}

#if FI_X86
// Reduces each accumulator of the tile with the contract's tree and stores the outputs.
template <int R, int C, class W>
FI_TARGET_AVX512 inline void store_acc(const gemm::Problem<W>& p, int64_t m0, int64_t n0,
                                       const __m512* acc) {
  float out[R * C];
  for (int i = 0; i < R * C; ++i) out[i] = reduce16_avx512(acc[i]);
  gemm::store_tile<R, C>(p, m0, n0, out);
}
#endif

template <int KIND>
struct QuantRows : QuantWeights {
  int64_t G;

  struct Col {
    const uint8_t* c;
    int64_t n;
    float scale, offset;
  };
  int64_t group_size() const { return G; }
  Col col(int64_t n) const { return {code_row(n), n, 0.0f, 0.0f}; }
  void begin_group(Col& c, int64_t g) const {
    c.scale = scale(c.n, g);
    c.offset = offset(c.n, g);
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
    if (KIND != kU4 || (k & 16) == 0) prefetch_weights(c.c + byte);
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
struct QTileAvx512 {
  template <int R, int C>
  FI_TARGET_AVX512 static void tile(const gemm::Problem<QuantRows<KIND>>& p, int64_t m0, int64_t n0) {
    const QuantRows<KIND>& w = p.w;
    const float* xr[R];
    int64_t col[C];
    const uint8_t* code[C];
    for (int r = 0; r < R; ++r) xr[r] = p.x + tile_row(p, m0 + r) * p.ldx;
    tile_columns<C>(p, n0, col, code);
    __m512 acc[R * C];
    for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t G = w.G;
    for (int64_t g = 0; g < w.groups; ++g) {
      __m512 s[C], o[C];
      for (int c = 0; c < C; ++c) {
        s[c] = _mm512_set1_ps(w.scale(col[c], g));
        o[c] = _mm512_set1_ps(w.offset(col[c], g));
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
    store_acc<R, C>(p, m0, n0, acc);
  }
};
#endif

// ================================================================ activation-quantized path
// For integer codes (u4, s8) on a K that is a multiple of 32, the inputs are quantized too, as
// llama.cpp does, so that the products are exact int8 dot products (VNNI on AVX-512):
//
//   1. Per row, per block of 32 inputs: amax = max |x|, dx = amax / 127, and
//      xq = nearbyint(x * (127 / amax)) in [-127, 127] (all zero for a zero block).
//   2. K is cut into chunks of 16 "lanes": 128 inputs for u4, 64 for s8 (the last chunk may
//      be shorter; its missing lanes hold zeros). For u4, lane l of a chunk covers block
//      b = l / 4 of the chunk and, in it, inputs 4j..4j+3 and 16+4j..16+4j+3 (j = l % 4): the
//      bytes a 64-byte code load puts in lane l. For s8, lane l covers inputs 4l..4l+3.
//   3. For output (m, n), 16 float partial sums p[l] start at +0.0f; for each chunk, lane l:
//        I = sum of code * xq over the lane's inputs          (int32, exact)
//        T = float(I) * DX[l]                                  (DX: dx of the lane's block)
//        p[l] = fma(T, S[l], p[l])                             (S: the scale of the lane's group)
//        p[l] = fma(U[l], O[l], p[l])  (with offsets only;    U = float(sum of the lane's xq) * DX,
//                                                              O: the offset of the lane's group)
//      where a missing lane has I = DX = U = 0 and reads the chunk's first group's S and O;
//   4. y[m, n] = the gemm.h tree over p (+ bias[n]).
// Every step is either exact or one IEEE operation in a fixed order, so the scalar and the
// VNNI paths give the same bits, and a row's result never depends on the other rows.
// Per chunk of K: what every path reads of it (one load per chunk for the VNNI tiles).
struct AqChunk {
  uint64_t cmask;   // its code bytes as a mask over 64 (a chunk holds 64, fewer at a ragged K)
  int32_t g0;       // its first group
  uint32_t gmask;   // the groups its lanes span, as a mask over 16
  int32_t gcnt;     // how many groups that is
  int32_t nbytes;   // its code bytes
  int32_t lanes;    // its valid lanes
};

struct AqTables {
  int kind;                   // kU4 or kS8
  int64_t K, G, groups, chunk, nchunks;
  std::vector<AqChunk> info;  // [nchunks]
  std::vector<int32_t> gidx;  // [nchunks, 16]: group of each lane minus g0 (0 for missing lanes)
  int32_t max_gcnt = 0;       // the most groups one chunk spans (the AVX2 tiles take <= 8)

  AqTables(int k, int64_t K_, int64_t G_) : kind(k), K(K_), G(G_), groups(K_ / G_) {
    chunk = kind == kU4 ? 128 : 64;
    nchunks = (K + chunk - 1) / chunk;
    for (int64_t q = 0; q < nchunks; ++q) {
      const int64_t start = q * chunk, n_in = std::min(chunk, K - start);
      const int valid = static_cast<int>(kind == kU4 ? 4 * (n_in / 32) : n_in / 4);
      const int64_t first = start / G;
      int64_t last = first;
      for (int l = 0; l < 16; ++l) {
        const int64_t in = start + (kind == kU4 ? 32 * (l / 4) : 4 * l);
        const int64_t g = l < valid ? in / G : first;
        gidx.push_back(static_cast<int32_t>(g - first));
        last = std::max(last, g);
      }
      const int32_t cnt = static_cast<int32_t>(last - first + 1);
      const int32_t nb = static_cast<int32_t>(kind == kU4 ? n_in / 2 : n_in);
      info.push_back({nb >= 64 ? ~0ULL : (1ULL << nb) - 1ULL, static_cast<int32_t>(first),
                      static_cast<uint32_t>((1u << cnt) - 1u), cnt, nb, valid});
      max_gcnt = std::max(max_gcnt, cnt);
    }
  }
  // Inputs (relative to the chunk) that lane l reads, for the scalar path and the preparation.
  int lane_inputs(int l, int valid, int64_t* in) const {
    if (l >= valid) return 0;
    if (kind == kU4) {
      const int b = l / 4, j = l % 4;
      for (int i = 0; i < 4; ++i) {
        in[i] = 32 * b + 4 * j + i;
        in[4 + i] = 32 * b + 16 + 4 * j + i;
      }
      return 8;
    }
    for (int i = 0; i < 4; ++i) in[i] = 4 * l + i;
    return 4;
  }
};

// Quantized rows: xq arranged per chunk as the code bytes are (u4: a chunk's low-nibble inputs
// of every block, then its high-nibble inputs), and per (row, chunk, lane) DX, U and, for s8,
// 128 * (sum of the lane's xq) (the VNNI path feeds s8 codes as code + 128).
struct AqRows {
  std::vector<int8_t> xq;     // [M, K]
  std::vector<float> dx, u;   // [M, nchunks, 16]
  std::vector<int32_t> corr;  // [M, nchunks, 16]
};

// Step 1 of the contract for one row: q[k] and the per-block dx d[b].
void aq_quantize_row_scalar(const float* xr, int64_t K, int8_t* q, float* d) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xr[32 * b + i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    d[b] = amax / 127.0f;
    for (int i = 0; i < 32; ++i) {
      const float v = std::nearbyint(xr[32 * b + i] * inv);
      q[32 * b + i] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
}

#if FI_X86
// The same bits with AVX-512: max is exact, 127 / amax and x * inv are one IEEE operation each,
// and the conversion rounds to nearest even as nearbyint does in the default rounding mode.
FI_TARGET_AVX512 inline __m128i aq_round16(__m512 v, __m512 inv) {
  const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 c = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c));
}

FI_TARGET_AVX512 void aq_quantize_row_avx512(const float* xr, int64_t K, int8_t* q, float* d) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 a = _mm512_loadu_ps(xr + 32 * b), c = _mm512_loadu_ps(xr + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    d[b] = amax / 127.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), aq_round16(a, vi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), aq_round16(c, vi));
  }
}
#endif

#if FI_X86
// The same bits with AVX2 (the same operations as the AVX-512 version, eight lanes at a time).
FI_TARGET_AVX2 inline __m256i aq_round8(__m256 v, __m256 inv) {
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvttps_epi32(
      _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
}

FI_TARGET_AVX2 void aq_quantize_row_avx2(const float* xr, int64_t K, int8_t* q, float* d) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs_epi32 then packs_epi16 leave the 4-byte groups of i0..i3 as i0a i1a i2a i3a i0b i1b
  // i2b i3b (a: low half, b: high half of each); this puts them back in input order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xr + 32 * b + 8 * i);
    const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                    _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 0x55));
    const float amax = _mm_cvtss_f32(m4);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    d[b] = amax / 127.0f;
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i p01 = _mm256_packs_epi32(aq_round8(v[0], vi), aq_round8(v[1], vi));
    const __m256i p23 = _mm256_packs_epi32(aq_round8(v[2], vi), aq_round8(v[3], vi));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), bytes);
  }
}
#endif

void aq_prepare(const AqTables& t, const float* x, int64_t ldx, int64_t M, AqRows& rows) {
  const int64_t K = t.K, nc = t.nchunks;
  rows.xq.assign(M * K, 0);
  rows.dx.assign(M * nc * 16, 0.0f);
  rows.u.assign(M * nc * 16, 0.0f);
  rows.corr.assign(M * nc * 16, 0);
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d;
  q.resize(K);
  d.resize(K / 32);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
#if FI_X86
    if (current_isa() >= Isa::kAvx512)
      aq_quantize_row_avx512(xr, K, q.data(), d.data());
    else if (current_isa() == Isa::kAvx2)
      aq_quantize_row_avx2(xr, K, q.data(), d.data());
    else
#endif
      aq_quantize_row_scalar(xr, K, q.data(), d.data());
    int8_t* xq = rows.xq.data() + m * K;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t start = c * t.chunk, n_in = std::min(t.chunk, K - start);
      if (t.kind == kU4) {
        const int64_t nb = n_in / 32;
        for (int64_t b = 0; b < nb; ++b) {
          std::memcpy(xq + start + 16 * b, q.data() + start + 32 * b, 16);
          std::memcpy(xq + start + 16 * nb + 16 * b, q.data() + start + 32 * b + 16, 16);
        }
      } else {
        std::memcpy(xq + start, q.data() + start, n_in);
      }
      // Lane l's inputs sit at bytes 4l..4l+3 of the chunk (and, for u4, the same bytes of its
      // high-nibble half, n_in / 2 further on): see AqTables::lane_inputs.
      const int8_t* xc = xq + start;
      const int64_t half = n_in / 2;
      const int valid = t.info[c].lanes;
      for (int l = 0; l < valid; ++l) {
        int32_t sum = xc[4 * l] + xc[4 * l + 1] + xc[4 * l + 2] + xc[4 * l + 3];
        if (t.kind == kU4) sum += xc[half + 4 * l] + xc[half + 4 * l + 1] + xc[half + 4 * l + 2] + xc[half + 4 * l + 3];
        const float dxl = d[(start + (t.kind == kU4 ? 32 * (l / 4) : 4 * l)) / 32];
        const int64_t at = (m * nc + c) * 16 + l;
        rows.dx[at] = dxl;
        rows.u[at] = static_cast<float>(sum) * dxl;
        rows.corr[at] = 128 * sum;
      }
    }
  }
}

struct AqProblem : QuantWeights {
  const AqTables* t;
  const AqRows* rows;
  // gemm::Problem needs a loader type; the activation-quantized blocks read only these fields.
  int64_t group_size() const { return t->G; }
};

using AqGemm = gemm::Problem<AqProblem>;

// Scalar path of the contract above, lane by lane.
template <int KIND>
void aq_block_scalar(const AqGemm& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                     int64_t n_end) {
  const AqProblem& w = p.w;
  const AqTables& t = *w.t;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* code = w.code_row(n);
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int8_t* xq = w.rows->xq.data() + m * t.K;
      float acc[16];
      for (int l = 0; l < 16; ++l) acc[l] = 0.0f;
      for (int64_t c = 0; c < t.nchunks; ++c) {
        const int64_t start = c * t.chunk;
        const int valid = t.info[c].lanes;
        const int64_t nb = std::min(t.chunk, t.K - start) / 32;
        const int64_t at = (m * t.nchunks + c) * 16;
        for (int l = 0; l < 16; ++l) {
          int64_t in[8];
          const int cnt = t.lane_inputs(l, valid, in);
          int32_t dot = 0;
          for (int i = 0; i < cnt; ++i) {
            const int64_t k = start + in[i];
            int32_t cv;
            int8_t xv;
            if (KIND == kU4) {
              const uint8_t byte = code[(k >> 5) << 4 | (k & 15)];
              cv = (k & 16) ? (byte >> 4) : (byte & 15);
              // xq sits where the code byte's nibble does: low nibbles first, then high
              const int64_t r = k - start, b = r / 32, o = r % 32;
              xv = xq[start + (o < 16 ? 16 * b + o : 16 * nb + 16 * b + o - 16)];
            } else {
              cv = static_cast<int8_t>(code[k]);
              xv = xq[k];
            }
            dot += cv * xv;
          }
          const int64_t g = t.info[c].g0 + t.gidx[c * 16 + l];
          const float T = static_cast<float>(dot) * w.rows->dx[at + l];
          acc[l] = std::fma(T, w.scale(n, g), acc[l]);
          if (w.has_offsets()) acc[l] = std::fma(w.rows->u[at + l], w.offset(n, g), acc[l]);
        }
      }
      float out = tree16(acc);
      gemm::store_tile<1, 1>(p, m, n, &out);
    }
  }
}

#if FI_X86
// R rows x C columns, all inside the problem (aq_blocks_vnni sends the tails to narrower
// tiles), so the rows and the columns are each one base pointer and a stride: on a decode
// step (M = 1, K = 576) the per-pointer bookkeeping of clamped tiles cost more than the dot
// products. Each column's codes are unpacked once per chunk for all R rows; OFF: W has
// offsets; H: its scales and offsets are float16. PF > 0 prefetches the columns PF tiles ahead,
// chunk by chunk, into L2 (prefetch_weights; 8 tiles ahead measured no better than 3).
template <bool H>
FI_TARGET_AVX512_VNNI inline __m512 load_groups(const char* base, uint32_t gmask) {
  if (H) return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(gmask, base)));
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>(gmask), base);
}

template <int KIND, bool OFF, bool H, int R, int C, int PF = 3>
FI_TARGET_AVX512_VNNI void aq_tile_vnni(const AqGemm& p, int64_t m0, int64_t n0) {
  const AqProblem& w = p.w;
  const AqTables& t = *w.t;
  const AqRows& rows = *w.rows;
  const int64_t K = t.K, rs = t.nchunks * 16, cb = w.row_bytes, gs = w.groups;
  const int8_t* xq = rows.xq.data() + m0 * K;
  const float* dx = rows.dx.data() + m0 * rs;
  const float* ur = rows.u.data() + m0 * rs;
  const int32_t* cr = rows.corr.data() + m0 * rs;
  const uint8_t* code = w.code_row(n0);
  // scales and offsets as bytes: a row's groups take gb of them, group g starts at g * es
  constexpr int64_t es = H ? 2 : 4;
  const int64_t gb = gs * es;
  const char* sc = static_cast<const char*>(w.scales) + n0 * gb;
  const char* of = OFF ? static_cast<const char*>(w.offsets) + n0 * gb : nullptr;
  const AqChunk* info = t.info.data();
  const bool ahead = PF > 0 && n0 + (PF + 1) * C <= p.N;
  __m512 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // A chunk is 64 code bytes for both kinds (128 u4 inputs, 64 s8 ones).
  for (int64_t ch = 0; ch < t.nchunks; ++ch) {
    const AqChunk ci = info[ch];
    const __m512i gidx = _mm512_loadu_si512(t.gidx.data() + ch * 16);
    __m512i lo[C], hi[C];
    __m512 s[C], o[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      if (ahead) {
        prefetch_weights(code + (PF * C + c) * cb + ch * 64);
        prefetch_weights(sc + (PF * C + c) * gb + ci.g0 * es);
        if (OFF) prefetch_weights(of + (PF * C + c) * gb + ci.g0 * es);
      }
      const __m512i v = _mm512_maskz_loadu_epi8(ci.cmask, code + c * cb + ch * 64);
      if (KIND == kU4) {
        lo[c] = _mm512_and_si512(v, nib);
        hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      } else {
        lo[c] = _mm512_xor_si512(v, flip);  // s8 code + 128, an unsigned byte
      }
      s[c] = _mm512_permutexvar_ps(gidx, load_groups<H>(sc + c * gb + ci.g0 * es, ci.gmask));
      if (OFF) o[c] = _mm512_permutexvar_ps(gidx, load_groups<H>(of + c * gb + ci.g0 * es, ci.gmask));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 DX = _mm512_loadu_ps(dx + r * rs + ch * 16);
      const __m512 U = OFF ? _mm512_loadu_ps(ur + r * rs + ch * 16) : _mm512_setzero_ps();
      if (KIND == kU4) {  // a chunk's low-nibble inputs, then its high-nibble ones
        const int8_t* x = xq + r * K + ch * 128;
        const __m512i xl = _mm512_maskz_loadu_epi8(ci.cmask, x);
        const __m512i xh = _mm512_maskz_loadu_epi8(ci.cmask, x + ci.nbytes);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const __m512i I = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], xl), hi[c], xh);
          __m512& a = acc[r * C + c];
          a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(I), DX), s[c], a);
          if (OFF) a = _mm512_fmadd_ps(U, o[c], a);
        }
      } else {  // dot(code + 128, xq) - 128 * sum(xq) = dot(code, xq), exactly
        const __m512i xv = _mm512_maskz_loadu_epi8(ci.cmask, xq + r * K + ch * 64);
        const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(cr + r * rs + ch * 16));
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const __m512i I = _mm512_dpbusd_epi32(base, lo[c], xv);
          __m512& a = acc[r * C + c];
          a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(I), DX), s[c], a);
          if (OFF) a = _mm512_fmadd_ps(U, o[c], a);
        }
      }
    }
  }
  store_acc<R, C>(p, m0, n0, acc);
}

// Rows m0..m0+R-1 of columns [n, n_end): tiles C wide, then one column at a time.
template <int KIND, bool OFF, bool H, int R, int C>
inline void aq_strip_vnni(const AqGemm& p, int64_t m0, int64_t n, int64_t n_end) {
  for (; n + C <= n_end; n += C) aq_tile_vnni<KIND, OFF, H, R, C>(p, m0, n);
  for (; n < n_end; ++n) aq_tile_vnni<KIND, OFF, H, R, 1, 0>(p, m0, n);
}

// A block in tiles 4 columns wide: up to 6 rows (decode, a verification step's drafts) in one
// tile of their height, so each column is unpacked once; more rows in 4 x 4 tiles, the last 1-3
// rows in a tile of their own height. (4 columns against 2, AMD EPYC, 2 threads, the default
// model's 30 gate_up + down: 5 rows 1.6x faster, 3-4 rows 1.1x, 32 and 256 rows 1.13-1.15x.)
template <int KIND, bool OFF, bool H>
void aq_blocks_vnni(const AqGemm& p, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const int64_t rows = m_end - m_begin;
  switch (rows) {
    case 1: return aq_strip_vnni<KIND, OFF, H, 1, 4>(p, m_begin, n_begin, n_end);
    case 2: return aq_strip_vnni<KIND, OFF, H, 2, 4>(p, m_begin, n_begin, n_end);
    case 3: return aq_strip_vnni<KIND, OFF, H, 3, 4>(p, m_begin, n_begin, n_end);
    case 4: return aq_strip_vnni<KIND, OFF, H, 4, 4>(p, m_begin, n_begin, n_end);
    case 5: return aq_strip_vnni<KIND, OFF, H, 5, 4>(p, m_begin, n_begin, n_end);
    case 6: return aq_strip_vnni<KIND, OFF, H, 6, 4>(p, m_begin, n_begin, n_end);
    default: break;
  }
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int64_t n1 = std::min(n + 4, n_end);
    int64_t m = m_begin;
    for (; m + 4 <= m_end; m += 4) aq_strip_vnni<KIND, OFF, H, 4, 4>(p, m, n, n1);
    switch (m_end - m) {
      case 1: aq_strip_vnni<KIND, OFF, H, 1, 4>(p, m, n, n1); break;
      case 2: aq_strip_vnni<KIND, OFF, H, 2, 4>(p, m, n, n1); break;
      case 3: aq_strip_vnni<KIND, OFF, H, 3, 4>(p, m, n, n1); break;
      default: break;
    }
  }
}
#endif

// ---- s8 codes with one scale per output channel (groups == 1) and no offsets: int8 RTN's
// layout, and the embedding / LM head of int8 and fp8. The scale is then common to the whole
// row, so it is applied once per output instead of once per chunk; steps 3-4 become
//   p[l] = fma(float(I), DX[l], p[l])   for each chunk, lane l (I exact, as above)
//   y[m, n] = tree16(p) * scale[n] (+ bias[n]).
// Three instructions per 64 multiply-adds on VNNI (one dot product, one conversion, one fma),
// with every accumulator in a register: about twice the rate of the general tiles on prefill.
inline bool per_channel(int64_t kind, int64_t groups, const void* offsets) {
  return kind == kS8 && groups == 1 && offsets == nullptr;
}

void pc_block_scalar(const AqGemm& p, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const AqProblem& w = p.w;
  const AqTables& t = *w.t;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* code = reinterpret_cast<const int8_t*>(w.code_row(n));
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int8_t* xq = w.rows->xq.data() + m * t.K;
      float acc[16] = {};
      for (int64_t c = 0; c < t.nchunks; ++c) {
        const int64_t start = c * t.chunk;
        const float* DX = w.rows->dx.data() + (m * t.nchunks + c) * 16;
        for (int l = 0; l < t.info[c].lanes; ++l) {
          int32_t dot = 0;
          for (int i = 0; i < 4; ++i) dot += code[start + 4 * l + i] * xq[start + 4 * l + i];
          acc[l] = std::fma(static_cast<float>(dot), DX[l], acc[l]);
        }
      }
      float out = tree16(acc) * w.scale(n, 0);
      gemm::store_tile<1, 1>(p, m, n, &out);
    }
  }
}

#if FI_X86
// Rows m0..m0+R-1 and columns n0..n0+C-1, all inside the problem (the block walk sends tails
// to narrower tiles, so that no pointer is clamped and the row pointers are one base + stride).
template <int R, int C, int PF = 3>
FI_TARGET_AVX512_VNNI void pc_tile_vnni(const AqGemm& p, int64_t m0, int64_t n0) {
  const AqProblem& w = p.w;
  const AqTables& t = *w.t;
  const int64_t K = t.K, rs = t.nchunks * 16, cb = w.row_bytes;
  const int8_t* xq = w.rows->xq.data() + m0 * K;
  const float* dx = w.rows->dx.data() + m0 * rs;
  const int32_t* cr = w.rows->corr.data() + m0 * rs;
  const uint8_t* code = w.code_row(n0);
  const bool ahead = PF > 0 && n0 + (PF + 1) * C <= p.N;
  __m512 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t ch = 0, start = 0; ch < t.nchunks; ++ch, start += 64) {
    const int nbytes = t.info[ch].nbytes;
    const __mmask64 cmask = nbytes >= 64 ? ~0ULL : ((1ULL << nbytes) - 1ULL);
    __m512i cv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      if (ahead) prefetch_weights(code + (PF * C + c) * cb + start);
      cv[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(cmask, code + c * cb + start), flip);  // code + 128
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_maskz_loadu_epi8(cmask, xq + r * K + start);
      const __m512 DX = _mm512_loadu_ps(dx + r * rs + ch * 16);
      // dot(code + 128, xq) - 128 * sum(xq) = dot(code, xq), exactly
      const __m512i base = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(cr + r * rs + ch * 16));
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c)
        acc[r * C + c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base, cv[c], xv)), DX, acc[r * C + c]);
    }
  }
  float out[R * C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = reduce16_avx512(acc[r * C + c]) * w.scale(n0 + c, 0);
  gemm::store_tile<R, C>(p, m0, n0, out);
}

void pc_blocks_vnni(const AqGemm& p, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const int64_t rows = m_end - m_begin;
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    if (rows == 1) {
      pc_tile_vnni<1, 4>(p, m_begin, n);
    } else if (rows == 2) {
      pc_tile_vnni<2, 4>(p, m_begin, n);
    } else {
      int64_t m = m_begin;
      for (; m + 4 <= m_end; m += 4) pc_tile_vnni<4, 4>(p, m, n);
      if (m_end - m == 3) pc_tile_vnni<3, 4>(p, m, n);
      else if (m_end - m == 2) pc_tile_vnni<2, 4>(p, m, n);
      else if (m_end - m == 1) pc_tile_vnni<1, 4>(p, m, n);
    }
  }
  for (; n < n_end; ++n)
    for (int64_t m = m_begin; m < m_end; ++m) pc_tile_vnni<1, 1, 0>(p, m, n);
}
#endif

#if FI_X86
// ---- AVX2 tiles of the activation-quantized contracts (AVX2 machines, and AVX-512 ones
// without VNNI). A chunk's 16 lanes are two halves of 8 (its code bytes 0..31 and 32..63); the
// tile walks all of K for lanes 0..7, then again for lanes 8..15, each half with its own 8-lane
// accumulators, so a column's codes are decoded once per half for all R rows. The exact int32
// sums of each lane come from maddubs (unsigned x signed byte pairs) and madd with ones: u4
// codes 0..15 against xq, |pair| <= 2 * 15 * 127; s8 codes as |code| against xq carrying the
// code's sign, |pair| <= 2 * 128 * 127; neither saturates 16 bits. The float steps are the
// contract's, lane by lane, so results equal the scalar and VNNI paths bit for bit.

// n (0, 16 or 32) bytes at p, zeros above: a chunk half holds 32 code bytes, or 16 or none in
// the last chunk of a K that is not a multiple of the chunk.
FI_TARGET_AVX2 inline __m256i load_half_avx2(const void* p, int n) {
  if (n >= 32) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  if (n >= 16)
    return _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(static_cast<const __m128i*>(p)), 0);
  return _mm256_setzero_si256();
}

// Code bytes of half h of a chunk holding `nbytes`.
inline int half_bytes(int nbytes, int h) { return std::clamp(nbytes - 32 * h, 0, 32); }

// 8 exact int32 lane sums of code * xq: u4 (lo, hi: a half's low and high nibbles) against
// xl, xh; s8 (lo: the codes) against xl.
template <int KIND>
FI_TARGET_AVX2 inline __m256i lane_dots_avx2(__m256i lo, __m256i hi, __m256i xl, __m256i xh) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (KIND == kU4)
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
  (void)xh;
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(lo), _mm256_sign_epi8(xl, lo)), ones);
}

// xq[r], dx[r] and (when ur is given) ur[r]: the quantized inputs, DX and U of row m0 + r of
// the tile, r < R (clamped like tile_row).
template <int R>
inline void aq_tile_rows(const AqGemm& p, int64_t m0, const int8_t** xq, const float** dx, const float** ur) {
  const AqTables& t = *p.w.t;
  const AqRows& rows = *p.w.rows;
  const int64_t rs = t.nchunks * 16;
  for (int r = 0; r < R; ++r) {
    const int64_t m = tile_row(p, m0 + r);
    xq[r] = rows.xq.data() + m * t.K;
    dx[r] = rows.dx.data() + m * rs;
    if (ur != nullptr) ur[r] = rows.u.data() + m * rs;
  }
}

// Groups g0..g0+cnt-1 (cnt <= 8) of row n of a scale-like array, widened, zeros above.
FI_TARGET_AVX2 inline __m256 groups_avx2(const QuantWeights& w, const void* a, int64_t n, int64_t g0, int cnt) {
  alignas(32) float v[8] = {};
  for (int i = 0; i < cnt; ++i) v[i] = w.value(a, n * w.groups + g0 + i);
  return _mm256_load_ps(v);
}

template <int KIND>
struct AqTileAvx2 {
  template <int R, int C>
  FI_TARGET_AVX2 static void tile(const AqGemm& p, int64_t m0, int64_t n0) {
    const AqProblem& w = p.w;
    const AqTables& t = *w.t;
    const int8_t* xq[R];
    const float* dx[R];
    const float* ur[R];
    aq_tile_rows<R>(p, m0, xq, dx, ur);
    int64_t col[C];
    const uint8_t* code[C];
    tile_columns<C>(p, n0, col, code);
    const bool has_off = w.has_offsets();
    const __m256i nib = _mm256_set1_epi8(0x0F);
    __m256 half_acc[2][R * C];
    for (int h = 0; h < 2; ++h) {
      __m256 acc[R * C];
      for (int i = 0; i < R * C; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t ch = 0; ch < t.nchunks; ++ch) {
        const int nbytes = t.info[ch].nbytes, nb = half_bytes(nbytes, h);
        if (nb == 0) continue;  // lanes with no inputs add nothing (their DX and U are 0)
        const int64_t start = ch * t.chunk, lane0 = ch * 16 + 8 * h;
        const int64_t cb = (KIND == kU4 ? start / 2 : start) + 32 * h;
        const int gcnt = t.info[ch].gcnt;
        const __m256i gidx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.gidx.data() + lane0));
        const int64_t g0 = t.info[ch].g0;
        for (int c = 0; c < C; ++c) {
          const __m256i v = load_half_avx2(code[c] + cb, nb);
          const __m256i lo = KIND == kU4 ? _mm256_and_si256(v, nib) : v;
          const __m256i hi = KIND == kU4 ? _mm256_and_si256(_mm256_srli_epi16(v, 4), nib) : v;
          const __m256 s = _mm256_permutevar8x32_ps(groups_avx2(w, w.scales, col[c], g0, gcnt), gidx);
          const __m256 o = has_off ? _mm256_permutevar8x32_ps(groups_avx2(w, w.offsets, col[c], g0, gcnt), gidx)
                                   : _mm256_setzero_ps();
          for (int r = 0; r < R; ++r) {
            const int8_t* xr = xq[r] + start + 32 * h;
            const __m256i xl = load_half_avx2(xr, nb);
            // u4: a chunk's high-nibble inputs follow its low-nibble ones (nbytes further on)
            const __m256i xh = KIND == kU4 ? load_half_avx2(xr + nbytes, nb) : xl;
            const __m256i I = lane_dots_avx2<KIND>(lo, hi, xl, xh);
            const __m256 T = _mm256_mul_ps(_mm256_cvtepi32_ps(I), _mm256_loadu_ps(dx[r] + lane0));
            __m256& a = acc[r * C + c];
            a = _mm256_fmadd_ps(T, s, a);
            if (has_off) a = _mm256_fmadd_ps(_mm256_loadu_ps(ur[r] + lane0), o, a);
          }
        }
      }
      for (int i = 0; i < R * C; ++i) half_acc[h][i] = acc[i];
    }
    float out[R * C];
    for (int i = 0; i < R * C; ++i) out[i] = reduce16_avx2(half_acc[0][i], half_acc[1][i]);
    gemm::store_tile<R, C>(p, m0, n0, out);
  }
};

// The per-channel contract (pc_block_scalar's) in the same halves.
struct PcTileAvx2 {
  template <int R, int C>
  FI_TARGET_AVX2 static void tile(const AqGemm& p, int64_t m0, int64_t n0) {
    const AqProblem& w = p.w;
    const AqTables& t = *w.t;
    const int8_t* xq[R];
    const float* dx[R];
    aq_tile_rows<R>(p, m0, xq, dx, nullptr);
    int64_t col[C];
    const uint8_t* code[C];
    tile_columns<C>(p, n0, col, code);
    __m256 half_acc[2][R * C];
    for (int h = 0; h < 2; ++h) {
      __m256 acc[R * C];
      for (int i = 0; i < R * C; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t ch = 0; ch < t.nchunks; ++ch) {
        const int nb = half_bytes(t.info[ch].nbytes, h);
        if (nb == 0) continue;
        const int64_t at = ch * 64 + 32 * h, lane0 = ch * 16 + 8 * h;
        for (int c = 0; c < C; ++c) {
          const __m256i v = load_half_avx2(code[c] + at, nb);
          for (int r = 0; r < R; ++r) {
            const __m256i I = lane_dots_avx2<kS8>(v, v, load_half_avx2(xq[r] + at, nb), v);
            __m256& a = acc[r * C + c];
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_loadu_ps(dx[r] + lane0), a);
          }
        }
      }
      for (int i = 0; i < R * C; ++i) half_acc[h][i] = acc[i];
    }
    float out[R * C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        out[r * C + c] = reduce16_avx2(half_acc[0][r * C + c], half_acc[1][r * C + c]) * w.scale(col[c], 0);
    gemm::store_tile<R, C>(p, m0, n0, out);
  }
};
#endif

// True when the activation-quantized contract applies: integer codes and whole 32-blocks.
inline bool aq_applies(int64_t kind, int64_t K) { return kind != kE4M3 && K % 32 == 0; }

#if FI_X86
// The VNNI block walk for W's offsets and scale width.
template <int KIND>
gemm::BlockFn<AqProblem> aq_vnni_fn(bool offsets, bool half) {
  if (offsets) return half ? aq_blocks_vnni<KIND, true, true> : aq_blocks_vnni<KIND, true, false>;
  return half ? aq_blocks_vnni<KIND, false, true> : aq_blocks_vnni<KIND, false, false>;
}
#endif

template <int KIND>
void run_aq(const float* x, int64_t ldx, const QuantWeights& qw, int64_t G, const float* bias, float* y,
            int64_t M, int64_t N, int64_t K) {
  // Tables depend only on (kind, K, G): built once per shape and kept (a model has a handful).
  thread_local std::vector<std::unique_ptr<AqTables>> cache;
  const AqTables* found = nullptr;
  for (const auto& c : cache)
    if (c->K == K && c->G == G) found = c.get();
  if (found == nullptr) {
    cache.push_back(std::make_unique<AqTables>(KIND, K, G));
    found = cache.back().get();
  }
  const AqTables& tables = *found;
  thread_local AqRows rows;  // reused: no allocation per call once warm
  aq_prepare(tables, x, ldx, M, rows);
  const AqProblem w{qw, &tables, &rows};
  const AqGemm p = gemm::make_problem(x, ldx, w, bias, y, M, N, K);
  const bool pc = per_channel(KIND, tables.groups, qw.offsets);
  gemm::BlockFn<AqProblem> fn = pc ? pc_block_scalar : aq_block_scalar<KIND>;
#if FI_X86
  if (current_isa() >= Isa::kAvx512Vnni)
    fn = pc ? pc_blocks_vnni : aq_vnni_fn<KIND>(qw.has_offsets(), qw.half);
  else if (current_isa() >= Isa::kAvx2 && tables.max_gcnt <= 8)
    fn = pc ? gemm::narrow_blocks<PcTileAvx2, AqProblem> : gemm::narrow_blocks<AqTileAvx2<KIND>, AqProblem>;
#endif
  gemm::run_with(p, fn);
}

template <int KIND>
void run_kind(const float* x, int64_t ldx, const QuantWeights& qw, int64_t G, const float* bias, float* y,
              int64_t M, int64_t N, int64_t K) {
  const QuantRows<KIND> w{qw, G};
  const auto p = gemm::make_problem(x, ldx, w, bias, y, M, N, K);
#if FI_X86
  gemm::run(p, gemm::narrow_blocks<QTileAvx512<KIND>, QuantRows<KIND>>);
#else
  gemm::run(p);
#endif
}

}  // namespace

namespace {

// Checks a packed weight's tensors (K inputs a row) and views them as QuantWeights; `op` names
// the caller in the errors. Type errors raise TypeError, shape/layout errors ValueError, device
// errors RuntimeError.
QuantWeights quant_weights(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size,
                           int64_t K) {
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), op,
              ": every tensor must be on the CPU, got ", codes.device(), " and ", scales.device());
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, op, ": kind must be 0 (u4), 1 (s8) or 2 (e4m3), got ", kind);
  TORCH_CHECK_VALUE(codes.dim() == 2, op, ": codes must be [N, K or K/2], got shape ", codes.sizes());
  const int64_t N = codes.size(0);
  const at::ScalarType want = kind == kU4 ? at::kByte
                              : kind == kS8 ? at::kChar
                                            : at::ScalarType::Float8_e4m3fn;
  TORCH_CHECK_TYPE(codes.scalar_type() == want || (kind == kE4M3 && codes.scalar_type() == at::kByte),
                   op, ": codes of kind ", kind, " must be ", want, ", got ", codes.scalar_type());
  TORCH_CHECK_VALUE(K > 0 && group_size > 0 && K % group_size == 0 &&
                        group_size % (kind == kU4 ? 32 : 16) == 0,
                    op, ": group_size must divide K = ", K, " and be a multiple of ",
                    kind == kU4 ? 32 : 16, ", got ", group_size);
  const int64_t row_bytes = kind == kU4 ? K / 2 : K;
  TORCH_CHECK_VALUE(codes.size(1) == row_bytes && codes.is_contiguous(),
                    op, ": codes must be contiguous [N, ", row_bytes, "], got shape ", codes.sizes());
  const int64_t groups = K / group_size;
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK_TYPE(half || scales.scalar_type() == at::kFloat,
                   op, ": scales must be float32 or float16, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == groups &&
                        scales.is_contiguous(),
                    op, ": scales must be contiguous [N, K / group_size] = [", N, ", ", groups,
                    "], got shape ", scales.sizes());
  const void* off_ptr = nullptr;
  if (offsets.has_value() && offsets->defined()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK(o.device().is_cpu(), op, ": offsets must be on the CPU");
    TORCH_CHECK_TYPE(o.scalar_type() == scales.scalar_type(), op, ": offsets must have the scales' dtype ",
                     scales.scalar_type(), ", got ", o.scalar_type());
    TORCH_CHECK_VALUE(o.sizes() == scales.sizes() && o.is_contiguous(),
                      op, ": offsets must be contiguous and shaped like scales, got shape ", o.sizes());
    off_ptr = o.data_ptr();
  }
  return {static_cast<const uint8_t*>(codes.data_ptr()), row_bytes, scales.data_ptr(), off_ptr, groups, half};
}

// Row n of the weight, dequantized as the reference does: code * scale, then + offset (two
// roundings; no add without offsets, so a -0.0 stays -0.0).
template <int KIND>
void dequantize_row(const QuantWeights& qw, int64_t n, int64_t K, int64_t G, float* out) {
  using Rows = QuantRows<KIND>;
  const typename Rows::Col c{qw.code_row(n), n, 0.0f, 0.0f};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const float s = qw.scale(n, g0 / G);
    if (qw.has_offsets()) {
      const float o = qw.offset(n, g0 / G);
      for (int64_t k = g0; k < g0 + G; ++k) out[k] = Rows::code(c, k) * s + o;
    } else {
      for (int64_t k = g0; k < g0 + G; ++k) out[k] = Rows::code(c, k) * s;
    }
  }
}

}  // namespace

at::Tensor linear_q(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size,
                    const std::optional<at::Tensor>& bias, bool quantize_inputs) {
  // Type errors raise TypeError, shape/layout errors ValueError, device errors RuntimeError.
  TORCH_CHECK(x.device().is_cpu(), "linear_q: every tensor must be on the CPU, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "linear_q: x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "linear_q: x must be [M, K], got shape ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  const QuantWeights qw = quant_weights("linear_q", codes, scales, offsets, kind, group_size, K);
  const int64_t N = codes.size(0);
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
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bool aq = quantize_inputs && aq_applies(kind, K);
  if (aq && kind == kU4)
    run_aq<kU4>(xp, ldx, qw, group_size, bias_ptr, yp, M, N, K);
  else if (aq)
    run_aq<kS8>(xp, ldx, qw, group_size, bias_ptr, yp, M, N, K);
  else if (kind == kU4)
    run_kind<kU4>(xp, ldx, qw, group_size, bias_ptr, yp, M, N, K);
  else if (kind == kS8)
    run_kind<kS8>(xp, ldx, qw, group_size, bias_ptr, yp, M, N, K);
  else
    run_kind<kE4M3>(xp, ldx, qw, group_size, bias_ptr, yp, M, N, K);
  return y;
}

// Rows `ids` [T] of a packed table [V, K], dequantized to float32 [T, K] bit for bit as
// PackedWeight.dequantize(rows=ids) (the reference's quantized_embedding). An id outside
// [0, V) raises IndexError.
at::Tensor embedding_q(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size) {
  TORCH_CHECK(ids.device().is_cpu(), "embedding_q: ids must be on the CPU, got ", ids.device());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "embedding_q: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, "embedding_q: ids must be 1-D [T], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(codes.dim() == 2, "embedding_q: codes must be [V, K or K/2], got shape ", codes.sizes());
  const int64_t K = kind == kU4 ? 2 * codes.size(1) : codes.size(1), V = codes.size(0), T = ids.size(0);
  const QuantWeights qw = quant_weights("embedding_q", codes, scales, offsets, kind, group_size, K);
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_INDEX(id[t] >= 0 && id[t] < V, "embedding_q: id ", id[t], " is out of range for a table of ",
                      V, " rows");
  at::Tensor out = at::empty({T, K}, scales.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (kind == kU4)
        dequantize_row<kU4>(qw, id[t], K, group_size, o + t * K);
      else if (kind == kS8)
        dequantize_row<kS8>(qw, id[t], K, group_size, o + t * K);
      else
        dequantize_row<kE4M3>(qw, id[t], K, group_size, o + t * K);
    }
  };
  if (T * K < 65536)
    rows(0, T);  // a decode step's few rows: no parallel region
  else
    at::parallel_for(0, T, std::max<int64_t>(1, 65536 / K), rows);
  return out;
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("linear_q(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int kind, "
        "int group_size, Tensor? bias=None, bool quantize_inputs=False) -> Tensor",
        &fastinfer_cpu::linear_q);
  m.def("embedding_q(Tensor ids, Tensor codes, Tensor scales, Tensor? offsets, int kind, int group_size) -> Tensor",
        &fastinfer_cpu::embedding_q);
}
