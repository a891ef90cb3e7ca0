// Batch-invariant GEMM machinery shared by the CPU linear kernels (float32 and quantized).
//
// y = x @ W.T (+ bias) with x float32 [M, K] and W [N, K] read through a *weight loader*, so
// one set of tiles serves float32 rows (linear_f32.cpp) and every quantized layout
// (linear_q.cpp): the loader turns W's storage into float32 lanes, the tiles do the rest.
//
// Reduction order (the contract every code path below follows bit for bit):
//   for each output y[m, n], 16 partial sums p[0..15] start at +0.0f;
//   for k0 = 0, 16, 32, ... < K:  p[l] = fma(x[m, k0 + l], w[n, k0 + l], p[l])  for l in 0..15,
//       where w is the loader's float32 value of W[n, k] and lanes with k0 + l >= K read
//       x = w = 0 (the same zero-filled FMA on every path);
//   then r = the fixed tree of simd.h over p[0..15];
//   y[m, n] = r (+ bias[n], one float add).
// The order depends only on K: never on M, on the row's position, on the tile an output
// lands in, on the thread count or on the instruction set picked at run time (AVX-512,
// AVX2+FMA and scalar paths give bit-identical results, provided the loader's three paths
// give the same float for each weight). Tails (rows beyond M, columns beyond N inside a
// micro-tile) are computed on a clamped (duplicated) row/column and not stored, so every
// stored element goes through the same instruction sequence.
//
// K is walked group by group (L::group_size(), a multiple of 16, or K itself for loaders
// without groups): at the start of each group the loader is told the group index, so a
// quantized loader can fetch that group's scale and offset once instead of per chunk. Only a
// loader whose group is K may have a K tail (K % 16 != 0); it then provides masked loads.
//
// Work is split over (row block, column block) tasks with at::parallel_for; every output
// element is written by exactly one task.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "simd.h"

namespace fastinfer_cpu {
namespace gemm {

template <class L>
struct Problem {
  const float* x;
  int64_t ldx;
  L w;                // the weight loader (holds W's storage and N)
  const float* bias;  // may be null
  float* y;           // element (m, n) lives at y[(m - y_m0) * ldy + (n - y_n0)]
  int64_t ldy;
  int64_t y_m0, y_n0;
  int64_t M, N, K;
};

// Writes a tile's results. out[r * C + c] holds the reduced dot product of row m0 + r and
// column n0 + c; only rows < M and columns < N are stored.
template <int R, int C, class L>
inline void store_tile(const Problem<L>& p, int64_t m0, int64_t n0, const float* out) {
  const int64_t nr = std::min<int64_t>(R, p.M - m0);
  const int64_t nc = std::min<int64_t>(C, p.N - n0);
  for (int64_t r = 0; r < nr; ++r) {
    float* yr = p.y + (m0 + r - p.y_m0) * p.ldy + (n0 - p.y_n0);
    const float* o = out + r * C;
    if (p.bias != nullptr) {
      const float* b = p.bias + n0;
      for (int64_t c = 0; c < nc; ++c) yr[c] = o[c] + b[c];
    } else {
      for (int64_t c = 0; c < nc; ++c) yr[c] = o[c];
    }
  }
}

inline int64_t group_of(int64_t K, int64_t G) { return G > 0 ? G : K; }

// ---------------------------------------------------------------- scalar reference path
// Portable; emulates the 16 lanes with std::fma (exact single rounding everywhere).
template <class L>
inline float dot_scalar(const Problem<L>& p, const float* x, typename L::Col col) {
  const int64_t K = p.K, G = group_of(K, p.w.group_size());
  float acc[16];
  for (int l = 0; l < 16; ++l) acc[l] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    p.w.begin_group(col, g0 / G);
    const int64_t gend = std::min(K, g0 + G);
    for (int64_t k0 = g0; k0 < gend; k0 += 16) {
      for (int l = 0; l < 16; ++l) {
        const int64_t k = k0 + l;
        const float xv = k < gend ? x[k] : 0.0f;
        const float wv = k < gend ? p.w.scalar(col, k) : 0.0f;
        acc[l] = std::fma(xv, wv, acc[l]);
      }
    }
  }
  return tree16(acc);
}

template <class L>
void block_scalar(const Problem<L>& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                  int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const typename L::Col col = p.w.col(n);
    for (int64_t m = m_begin; m < m_end; ++m) {
      float out = dot_scalar(p, p.x + m * p.ldx, col);
      store_tile<1, 1>(p, m, n, &out);
    }
  }
}

#if FI_X86
// ---------------------------------------------------------------- AVX2 + FMA path
// One output = two 8-lane accumulators (lanes 0..7 and 8..15 of the contract).

FI_TARGET_AVX2 inline __m256i tail_mask_avx2(int64_t rem) {  // rem in 1..8 lanes valid
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), idx);
}

// R rows x C columns, R * C <= 4 outputs (8 ymm accumulators).
template <int R, int C, class L>
FI_TARGET_AVX2 void tile_avx2(const Problem<L>& p, int64_t m0, int64_t n0) {
  const float* xr[R];
  typename L::Col wc[C];
  for (int r = 0; r < R; ++r) xr[r] = p.x + std::min<int64_t>(m0 + r, p.M - 1) * p.ldx;
  for (int c = 0; c < C; ++c) wc[c] = p.w.col(std::min<int64_t>(n0 + c, p.N - 1));
  __m256 lo[R * C], hi[R * C];
  for (int i = 0; i < R * C; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  const int64_t K = p.K, G = group_of(K, p.w.group_size());
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    for (int c = 0; c < C; ++c) p.w.begin_group(wc[c], g0 / G);
    const int64_t gend = std::min(K, g0 + G);
    int64_t k = g0;
    for (; k + 16 <= gend; k += 16) {
      __m256 xl[R], xh[R];
      for (int r = 0; r < R; ++r) {
        xl[r] = _mm256_loadu_ps(xr[r] + k);
        xh[r] = _mm256_loadu_ps(xr[r] + k + 8);
      }
      for (int c = 0; c < C; ++c) {
        __m256 wl, wh;
        p.w.avx2(wc[c], k, wl, wh);
        for (int r = 0; r < R; ++r) {
          lo[r * C + c] = _mm256_fmadd_ps(xl[r], wl, lo[r * C + c]);
          hi[r * C + c] = _mm256_fmadd_ps(xh[r], wh, hi[r * C + c]);
        }
      }
    }
    if (k < gend) {
      const int64_t rem = gend - k;  // 1..15
      const __m256i ml = tail_mask_avx2(std::min<int64_t>(rem, 8));
      const bool has_hi = rem > 8;
      const __m256i mh = tail_mask_avx2(has_hi ? rem - 8 : 1);
      __m256 xl[R], xh[R];
      for (int r = 0; r < R; ++r) {
        xl[r] = _mm256_maskload_ps(xr[r] + k, ml);
        xh[r] = has_hi ? _mm256_maskload_ps(xr[r] + k + 8, mh) : _mm256_setzero_ps();
      }
      for (int c = 0; c < C; ++c) {
        __m256 wl, wh;
        p.w.avx2_tail(wc[c], k, ml, has_hi, mh, wl, wh);
        for (int r = 0; r < R; ++r) {
          lo[r * C + c] = _mm256_fmadd_ps(xl[r], wl, lo[r * C + c]);
          hi[r * C + c] = _mm256_fmadd_ps(xh[r], wh, hi[r * C + c]);
        }
      }
    }
  }
  float out[R * C];
  for (int i = 0; i < R * C; ++i) out[i] = reduce16_avx2(lo[i], hi[i]);
  store_tile<R, C>(p, m0, n0, out);
}

template <int R, int C, class L>
FI_TARGET_AVX2 void block_avx2_t(const Problem<L>& p, int64_t m_begin, int64_t m_end,
                                 int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += C)
    for (int64_t m = m_begin; m < m_end; m += R) tile_avx2<R, C>(p, m, n);
}

template <class L>
void block_avx2(const Problem<L>& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                int64_t n_end) {
  if (m_end - m_begin == 1) {
    block_avx2_t<1, 4>(p, m_begin, m_end, n_begin, n_end);
  } else {
    block_avx2_t<2, 2>(p, m_begin, m_end, n_begin, n_end);
  }
}

// ---------------------------------------------------------------- AVX-512 path

// R rows x C columns with R * C == 16: 16 zmm accumulators, R + C loads per 16 FMAs.
// PF: also prefetch the next column strip's weights (first row tile of a strip only).
template <int R, int C, bool PF, class L>
FI_TARGET_AVX512 void tile_avx512(const Problem<L>& p, int64_t m0, int64_t n0) {
  static_assert(R * C == 16, "tile must hold 16 outputs");
  const float* xr[R];
  typename L::Col wc[C];
  typename L::Col wn[C];
  for (int r = 0; r < R; ++r) xr[r] = p.x + std::min<int64_t>(m0 + r, p.M - 1) * p.ldx;
  for (int c = 0; c < C; ++c) wc[c] = p.w.col(std::min<int64_t>(n0 + c, p.N - 1));
  if (PF) {
    for (int c = 0; c < C; ++c) wn[c] = p.w.col(std::min<int64_t>(n0 + C + c, p.N - 1));
  }
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t K = p.K, G = group_of(K, p.w.group_size());
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    for (int c = 0; c < C; ++c) p.w.begin_group(wc[c], g0 / G);
    const int64_t gend = std::min(K, g0 + G);
    int64_t k = g0;
    for (; k + 16 <= gend; k += 16) {
      if (PF) {
        for (int c = 0; c < C; ++c) p.w.prefetch(wn[c], k);
      }
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(xr[r] + k);
      for (int c = 0; c < C; ++c) {
        const __m512 wv = p.w.avx512(wc[c], k);
        for (int r = 0; r < R; ++r) {
          const int i = reduce16x16_slot(r * C + c);
          acc[i] = _mm512_fmadd_ps(xv[r], wv, acc[i]);
        }
      }
    }
    if (k < gend) {
      const __mmask16 m = lanes16(gend - k);
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, xr[r] + k);
      for (int c = 0; c < C; ++c) {
        const __m512 wv = p.w.avx512_tail(wc[c], k, m);
        for (int r = 0; r < R; ++r) {
          const int i = reduce16x16_slot(r * C + c);
          acc[i] = _mm512_fmadd_ps(xv[r], wv, acc[i]);
        }
      }
    }
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, reduce16x16_avx512(acc));
  store_tile<R, C>(p, m0, n0, out);
}

template <int R, int C, class L>
FI_TARGET_AVX512 void block_avx512_t(const Problem<L>& p, int64_t m_begin, int64_t m_end,
                                     int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += C) {
    tile_avx512<R, C, true>(p, m_begin, n);
    for (int64_t m = m_begin + R; m < m_end; m += R) tile_avx512<R, C, false>(p, m, n);
  }
}

template <class L>
void block_avx512(const Problem<L>& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                  int64_t n_end) {
  const int64_t rows = m_end - m_begin;
  if (rows == 1) {
    block_avx512_t<1, 16>(p, m_begin, m_end, n_begin, n_end);
  } else if (rows == 2) {
    block_avx512_t<2, 8>(p, m_begin, m_end, n_begin, n_end);
  } else {
    block_avx512_t<4, 4>(p, m_begin, m_end, n_begin, n_end);
  }
}
#endif  // FI_X86

// Column multiple a block must respect so blocks never split a micro-tile needlessly.
constexpr int64_t kColAlign = 16;
constexpr int64_t kMaxColBlock = 64;
constexpr int64_t kMaxRowBlock = 256;

// A Problem for y = x @ W.T (+ bias) with y a contiguous [M, N] output.
template <class L>
Problem<L> make_problem(const float* x, int64_t ldx, L w, const float* bias, float* y, int64_t M,
                        int64_t N, int64_t K) {
  Problem<L> p;
  p.x = x;
  p.ldx = ldx;
  p.w = w;
  p.bias = bias;
  p.y = y;
  p.ldy = N;
  p.y_m0 = 0;
  p.y_n0 = 0;
  p.M = M;
  p.N = N;
  p.K = K;
  return p;
}

// Walks a block in narrow R x C tiles (C divides kColAlign, so a tile never straddles two
// column blocks): 1 x 4 for one row, 2 x 4 for two, 4 x 2 otherwise, the last 1 to 3 rows of
// those in one tile of their own height (a 4-row tile over clamped rows would compute rows
// only to drop them: 5 rows, a sequence verifying 4 drafts, cost as much as 8). A tile's height
// never changes an output's bits. ``Tiles::template tile<R, C>(p, m, n)`` computes one tile.
template <class Tiles, class L>
void narrow_blocks(const Problem<L>& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                   int64_t n_end) {
  const int64_t rows = m_end - m_begin;
  if (rows == 1) {
    for (int64_t n = n_begin; n < n_end; n += 4) Tiles::template tile<1, 4>(p, m_begin, n);
    return;
  }
  if (rows == 2) {
    for (int64_t n = n_begin; n < n_end; n += 4) Tiles::template tile<2, 4>(p, m_begin, n);
    return;
  }
  const int64_t full = m_begin + rows / 4 * 4;
  for (int64_t n = n_begin; n < n_end; n += 2) {
    for (int64_t m = m_begin; m < full; m += 4) Tiles::template tile<4, 2>(p, m, n);
    switch (m_end - full) {
      case 1: Tiles::template tile<1, 2>(p, full, n); break;
      case 2: Tiles::template tile<2, 2>(p, full, n); break;
      case 3: Tiles::template tile<3, 2>(p, full, n); break;
      default: break;
    }
  }
}

template <class L>
using BlockFn = void (*)(const Problem<L>&, int64_t, int64_t, int64_t, int64_t);

template <class L>
void run_with(const Problem<L>& p, BlockFn<L> fn);

// Runs the product with the block functions of the ISA in use; a loader may bring its own
// AVX-512 blocks (they must keep the reduction contract above).
template <class L>
void run(const Problem<L>& p, BlockFn<L> avx512_blocks = nullptr) {
  BlockFn<L> fn = block_scalar<L>;
  const Isa isa = current_isa();
#if FI_X86
  if (isa >= Isa::kAvx512) fn = avx512_blocks != nullptr ? avx512_blocks : block_avx512<L>;
  else if (isa == Isa::kAvx2) fn = block_avx2<L>;
#endif
  (void)isa;
  (void)avx512_blocks;
  run_with(p, fn);
}

// Splits the product into (row block, column block) tasks over the threads and runs ``fn`` on
// each; every output is written by exactly one task.
template <class L>
void run_with(const Problem<L>& p, BlockFn<L> fn) {
  if (p.M == 0 || p.N == 0) return;

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Row blocks: small batches keep every row in one block so W streams once per call.
  // Large batches: a block of X (rows x K floats) that stays in L2 while W strips pass.
  int64_t mb = p.M;
  if (p.M > 64) {
    // Equal row blocks of at most ~256 KiB of X each (multiples of 4 rows).
    const int64_t budget = (256 * 1024) / (4 * std::max<int64_t>(p.K, 1));
    const int64_t mb_max = std::clamp<int64_t>(budget / 4 * 4, 16, kMaxRowBlock);
    const int64_t blocks = (p.M + mb_max - 1) / mb_max;
    mb = std::min<int64_t>(((p.M + blocks - 1) / blocks + 3) / 4 * 4, kMaxRowBlock);
  }
  const int64_t m_blocks = (p.M + mb - 1) / mb;
  // Column blocks of 64 columns, halved (down to 16) until every thread has a few tasks.
  int64_t nb = kMaxColBlock;
  while (nb > kColAlign && m_blocks * ((p.N + nb - 1) / nb) < threads * 8) nb /= 2;
  const int64_t n_blocks = (p.N + nb - 1) / nb;
  const int64_t tasks = m_blocks * n_blocks;

  // With a long output row stride, the rows of a tile map to the same cache sets (e.g.
  // 49152 floats = 48 * 4 KiB): stage a task's outputs in a small contiguous buffer.
  const bool stage = mb > 4 && p.N * 4 >= 4096;
  auto body = [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kMaxRowBlock * kMaxColBlock];
    for (int64_t t = begin; t < end; ++t) {
      // Consecutive tasks walk the rows of one column block: W block reused from cache.
      const int64_t nbi = t / m_blocks, mbi = t % m_blocks;
      const int64_t m0 = mbi * mb, m1 = std::min(p.M, m0 + mb);
      const int64_t n0 = nbi * nb, n1 = std::min(p.N, n0 + nb);
      if (!stage) {
        fn(p, m0, m1, n0, n1);
        continue;
      }
      Problem<L> q = p;
      q.y = buf;
      q.ldy = n1 - n0;
      q.y_m0 = m0;
      q.y_n0 = n0;
      fn(q, m0, m1, n0, n1);
      for (int64_t m = m0; m < m1; ++m)
        std::memcpy(p.y + m * p.ldy + n0, buf + (m - m0) * q.ldy, sizeof(float) * (n1 - n0));
    }
  };
  // Below ~256K multiply-adds a fork/join costs more than it saves.
  const int64_t macs = p.M * p.N * std::max<int64_t>(p.K, 1);
  if (tasks == 1 || threads == 1 || macs < 256 * 1024) {
    body(0, tasks);
  } else {
    at::parallel_for(0, tasks, 1, body);
  }
}

}  // namespace gemm
}  // namespace fastinfer_cpu
