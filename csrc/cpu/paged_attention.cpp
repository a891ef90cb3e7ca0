// Causal paged attention for the CPU: float32 or bfloat16 queries; float32, bfloat16 or
// quantized (int8 / fp8 e4m3 codes with a float32 scale per token and kv head, kv_format.h)
// caches, read as float(code) * scale; float32 math.
//
// Inputs: packed queries q [T, H, D]; paged caches k_cache, v_cache [num_blocks, block_size,
// Hkv, D]; per sequence i its queries q[qsl[i]:qsl[i+1]] are the last L_i of its n_i cached
// tokens (token p in block block_tables[i][p / block_size], slot p % block_size). Query j of
// sequence i sits at position n_i - L_i + j and attends keys 0 .. n_i - L_i + j; query head h
// reads kv head h / (H / Hkv). Output [T, H, D] in q's dtype.
//
// Numerical contract, per (query, head) row -- the order depends on nothing but the row's own
// position and D, so a row's result is bit-identical whatever the other rows of its sequence
// (the query chunking of prefill / continuation / decode), the other sequences of the batch,
// their order, the thread count and the work split:
//   qs = q * (scale * log2(e))                     (float32, one rounding per element)
//   keys are visited in tiles of 16 at absolute positions [16t, 16t + 16), t = 0, 1, ...;
//   a row skips the keys past its position (never read when past the sequence's length).
//   score of key c: dot(qs, k_c) in simd.h's 16-lane order (lanes over d mod 16, then its tree)
//   per tile: m' = max(m, max_c s_c); alpha = 2^(m - m'); p_c = 2^(s_c - m');
//       l = l * alpha + sum_c p_c (a fixed horizontal sum); acc = acc * alpha, then
//       acc = fma(p_c, v_c, acc) for the tile's keys in ascending order;
//   out = acc / l.
// The AVX-512 and portable paths each follow this order; they use different exp2
// implementations (a polynomial vs std::exp2), so they agree to ~1e-7 relative, not bit for bit.
//
// Work items are (sequence, kv heads, heads of their groups, chunk of queries): a decode step
// takes all kv heads of its sequence (whole cache rows are read in order), a prefill chunk of
// queries one kv head; rows of an item share every loaded key and value tile. Items run on
// at::parallel_for workers that take the next item from an atomic counter (costliest first);
// each output row is written by exactly one item. Only the split of the work depends on the
// batch and the thread count, never a row's arithmetic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa.h"
#include "kv_format.h"
#include "ops.h"
#include "simd.h"

namespace fastinfer_cpu {
namespace {

constexpr int kTile = 16;                 // keys per softmax tile (one vector of scores)
constexpr double kLog2e = 1.4426950408889634;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One key tile for a run of rows that share its keys (rows of one work item).
struct TileArgs {
  const float* const* q;   // [rows] pre-scaled float32 query rows, D floats each
  const int32_t* valid;    // [rows] keys of this tile the row attends, 1..kTile
  int64_t rows;
  const float* const* k;   // [kTile] key rows; entries past the last readable key are clamped
  const float* const* v;   // [kTile] value rows, same clamping
  int64_t D;
  float* m;                // [rows] running max of the scores (log2 units)
  float* l;                // [rows] running sum of 2^(score - m)
  float* acc;              // [rows, D] running weighted sum of values
};

// ---------------------------------------------------------------- portable path
// The tile's softmax update of row r from its scores s[0..nv) (max tmax), with std::exp2: the
// probabilities p, the row's new m and l; returns alpha, the factor on the row's acc (0 on the
// first tile, m = -inf). The portable and AVX2 tiles share it, so they give the same bits.
inline float softmax_step(const TileArgs& a, int64_t r, const float* s, int nv, float tmax, float* p) {
  const float m_new = std::max(a.m[r], tmax);
  const float alpha = std::exp2(a.m[r] - m_new);
  float sum = 0.0f;
  for (int c = 0; c < nv; ++c) {
    p[c] = std::exp2(s[c] - m_new);
    sum += p[c];
  }
  a.m[r] = m_new;
  a.l[r] = a.l[r] * alpha + sum;
  return alpha;
}

void tile_scalar(const TileArgs& a) {
  const int64_t D = a.D;
  float s[kTile], p[kTile];
  for (int64_t r = 0; r < a.rows; ++r) {
    const int nv = a.valid[r];
    float tmax = kNegInf;
    for (int c = 0; c < nv; ++c) {
      s[c] = dot16(a.q[r], a.k[c], D);
      tmax = std::max(tmax, s[c]);
    }
    const float alpha = softmax_step(a, r, s, nv, tmax, p);
    float* acc = a.acc + r * D;
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int c = 0; c < nv; ++c) {
      const float* v = a.v[c];
      for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(p[c], v[d], acc[d]);
    }
  }
}

void bf16_to_f32_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen_bf16(src[i]);
}

#if FI_X86
// ---------------------------------------------------------------- AVX2 path
// The portable path's operations, eight lanes at a time: the same scores (simd.h's 16-lane
// order), the same std::exp2 and the same per-element multiply and fmas, so the same bits.
// D is a multiple of 16 (the op checks it).
FI_TARGET_AVX2 inline float dot16_avx2(const float* a, const float* b, int64_t n) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi);
  }
  return reduce16_avx2(lo, hi);
}

// acc[d0 .. d0 + 8 NV) = acc * alpha, then += p_c * v_c for c < nv, in key order.
template <int NV>
FI_TARGET_AVX2 inline void pv_chunk_avx2(float* acc, const float* p, int nv, const float* const* v,
                                         int64_t d0, __m256 alpha) {
  __m256 o[NV];
  for (int i = 0; i < NV; ++i) o[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + d0 + 8 * i), alpha);
  for (int c = 0; c < nv; ++c) {
    const __m256 pc = _mm256_set1_ps(p[c]);
    const float* vc = v[c] + d0;
    for (int i = 0; i < NV; ++i) o[i] = _mm256_fmadd_ps(pc, _mm256_loadu_ps(vc + 8 * i), o[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + d0 + 8 * i, o[i]);
}

FI_TARGET_AVX2 void tile_avx2(const TileArgs& a) {
  const int64_t D = a.D;
  float s[kTile], p[kTile];
  for (int64_t r = 0; r < a.rows; ++r) {
    const int nv = a.valid[r];
    float tmax = kNegInf;
    for (int c = 0; c < nv; ++c) {
      s[c] = dot16_avx2(a.q[r], a.k[c], D);
      tmax = std::max(tmax, s[c]);
    }
    const float alpha = softmax_step(a, r, s, nv, tmax, p);
    float* acc = a.acc + r * D;
    const __m256 al = _mm256_set1_ps(alpha);
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) pv_chunk_avx2<8>(acc, p, nv, a.v, d0, al);
    if (D - d0 >= 32) { pv_chunk_avx2<4>(acc, p, nv, a.v, d0, al); d0 += 32; }
    if (D - d0 >= 16) pv_chunk_avx2<2>(acc, p, nv, a.v, d0, al);
  }
}

FI_TARGET_AVX2 void bf16_to_f32_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen_bf16_avx2(src + i));
  bf16_to_f32_scalar(src + i, dst + i, n - i);
}

// ---------------------------------------------------------------- AVX-512 path

// acc[d0 .. d0 + 16 NV) = acc * alpha, then += p_c * v_c for c < nv, in key order.
template <int NV>
FI_TARGET_AVX512 inline void pv_chunk(float* acc, const float* p, int nv,
                                      const float* const* v, int64_t d0, __m512 alpha) {
  __m512 o[NV];
  for (int i = 0; i < NV; ++i) o[i] = _mm512_mul_ps(_mm512_loadu_ps(acc + d0 + 16 * i), alpha);
  for (int c = 0; c < nv; ++c) {
    const __m512 pc = _mm512_set1_ps(p[c]);
    const float* vc = v[c] + d0;
    for (int i = 0; i < NV; ++i) o[i] = _mm512_fmadd_ps(pc, _mm512_loadu_ps(vc + 16 * i), o[i]);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + d0 + 16 * i, o[i]);
}

FI_TARGET_AVX512 void pv_row(float* acc, const float* p, int nv, const float* const* v,
                             int64_t D, __m512 alpha) {
  int64_t d0 = 0;
  for (; d0 + 128 <= D; d0 += 128) pv_chunk<8>(acc, p, nv, v, d0, alpha);
  if (D - d0 >= 64) { pv_chunk<4>(acc, p, nv, v, d0, alpha); d0 += 64; }
  if (D - d0 >= 32) { pv_chunk<2>(acc, p, nv, v, d0, alpha); d0 += 32; }
  if (D - d0 >= 16) pv_chunk<1>(acc, p, nv, v, d0, alpha);
}

FI_TARGET_AVX512 void tile_avx512(const TileArgs& a) {
  const int64_t D = a.D;
  // k[i]: the key whose partials accumulate in register i, so the scores come out in key order
  const float* k[kTile];
  for (int i = 0; i < kTile; ++i) k[i] = a.k[reduce16x16_slot(i)];
  alignas(64) float p[kTile];
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* q = a.q[r];
    __m512 part[kTile];
    for (int i = 0; i < kTile; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d0);
      for (int i = 0; i < kTile; ++i)
        part[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[i] + d0), part[i]);
    }
    const int nv = a.valid[r];
    const __m512 s =
        _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), lanes16(nv), reduce16x16_avx512(part));
    const float m_old = a.m[r];
    const float m_new = std::max(m_old, _mm512_reduce_max_ps(s));
    const __m512 pv = exp2_avx512(_mm512_sub_ps(s, _mm512_set1_ps(m_new)));
    const __m512 alpha = exp2_avx512(_mm512_set1_ps(m_old - m_new));
    _mm512_store_ps(p, pv);
    a.m[r] = m_new;
    a.l[r] = _mm512_cvtss_f32(_mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(a.l[r]), alpha),
                                            _mm512_set1_ps(_mm512_reduce_add_ps(pv))));
    pv_row(a.acc + r * D, p, nv, a.v, D, alpha);
  }
}

FI_TARGET_AVX512 void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen_bf16_avx512(src + i));
  bf16_to_f32_scalar(src + i, dst + i, n - i);
}
#endif  // FI_X86

struct Kernels {
  void (*tile)(const TileArgs&);
  void (*bf16_to_f32)(const uint16_t*, float*, int64_t);
};

Kernels pick_kernels() {
#if FI_X86
  if (current_isa() >= Isa::kAvx512) return {tile_avx512, bf16_to_f32_avx512};
  if (current_isa() == Isa::kAvx2) return {tile_avx2, bf16_to_f32_avx2};
#endif
  return {tile_scalar, bf16_to_f32_scalar};
}

// ---------------------------------------------------------------- driver
struct Problem {
  const char* q;           // element (t, h, d) at q + ((t * q_s0 + h * q_s1) + d) * esize
  int64_t q_s0, q_s1;
  const char* k;           // caches, contiguous [num_blocks, bs, Hkv, D]
  const char* v;
  KvKind kv;               // the caches' element format
  const float* ks;         // quantized caches: scales [num_blocks, bs, Hkv] (else null)
  const float* vs;
  char* out;               // [T, H, D] contiguous, q's dtype
  bool bf16;               // q and out are bfloat16 (else float32)
  int64_t esize;
  int64_t bs, H, Hkv, G, D;
  const void* bt;          // block table [B, W], int32 or int64, strides bt_s0, bt_s1
  bool bt64;
  int64_t bt_s0, bt_s1;
  const int64_t* qsl;      // [B + 1]
  const int64_t* ctx;      // [B]
  float qscale;            // scale * log2(e)
};

inline int64_t block_id(const Problem& p, int64_t seq, int64_t j) {
  const int64_t off = seq * p.bt_s0 + j * p.bt_s1;
  return p.bt64 ? static_cast<const int64_t*>(p.bt)[off]
                : static_cast<int64_t>(static_cast<const int32_t*>(p.bt)[off]);
}

// Rows of an item are ordered (kv head, query, head of the group): the rows of one kv head
// are contiguous, and among them the rows that see a key tile form a suffix.
struct Item {
  int64_t seq;
  int64_t kv0, kvn;  // kv heads [kv0, kv0 + kvn)
  int64_t h0, hn;    // heads kvh * G + [h0, h0 + hn) of each kv head's group
  int64_t q0, qn;    // the sequence's queries [q0, q0 + qn)
  int64_t cost;      // attended (row, key) pairs
  int64_t rows() const { return kvn * qn * hn; }
};

// Per-worker buffers, sized for the largest item.
struct Scratch {
  std::vector<float> qbuf, acc, m, l, kv;
  std::vector<const float*> qptr;
  std::vector<int32_t> valid;
  std::vector<int64_t> tok;
  Scratch(int64_t rows, int64_t D)
      : qbuf(rows * D), acc(rows * D), m(rows), l(rows), kv(2 * kTile * D), qptr(rows),
        valid(rows), tok(kTile) {}
};

void load_query(const Problem& p, int64_t t, int64_t h, float* dst) {
  const char* src = p.q + (t * p.q_s0 + h * p.q_s1) * p.esize;
  if (p.bf16) {
    const auto* s = reinterpret_cast<const c10::BFloat16*>(src);
    for (int64_t d = 0; d < p.D; ++d) dst[d] = static_cast<float>(s[d]) * p.qscale;
  } else {
    const auto* s = reinterpret_cast<const float*>(src);
    for (int64_t d = 0; d < p.D; ++d) dst[d] = s[d] * p.qscale;
  }
}

void store_row(const Problem& p, int64_t t, int64_t h, const float* acc, float l) {
  const int64_t off = (t * p.H + h) * p.D;
  if (p.bf16) {
    auto* o = reinterpret_cast<c10::BFloat16*>(p.out) + off;
    for (int64_t d = 0; d < p.D; ++d) o[d] = c10::BFloat16(acc[d] / l);
  } else {
    float* o = reinterpret_cast<float*>(p.out) + off;
    for (int64_t d = 0; d < p.D; ++d) o[d] = acc[d] / l;
  }
}

// tok[c]: element offset of token t0 + c (kv head 0) in the caches, for c < nk; entries
// c >= nk repeat the last readable token, so no slot past the sequence is ever read.
void tile_tokens(const Problem& p, int64_t seq, int64_t t0, int64_t nk, int64_t* tok) {
  int64_t j = t0 / p.bs, slot = t0 % p.bs;
  int64_t blk = block_id(p, seq, j);
  for (int64_t c = 0; c < nk; ++c) {
    tok[c] = (blk * p.bs + slot) * p.Hkv * p.D;
    if (++slot == p.bs && c + 1 < nk) {
      slot = 0;
      blk = block_id(p, seq, ++j);
    }
  }
  for (int64_t c = nk; c < kTile; ++c) tok[c] = tok[nk - 1];
}

// Points k[c], v[c] at the tile's tokens for kv head kvh (converted to float32 in `buf` for
// bf16 and quantized caches: float(code) * scale).
void gather_head(const Problem& p, const Kernels& kern, const int64_t* tok, int64_t nk,
                 int64_t kvh, float* buf, const float** k, const float** v) {
  const int64_t off = kvh * p.D;
  for (int64_t c = 0; c < kTile; ++c) {
    if (p.kv != KvKind::kF32) {
      if (c < nk && p.kv == KvKind::kBF16) {
        kern.bf16_to_f32(reinterpret_cast<const uint16_t*>(p.k) + tok[c] + off, buf + c * p.D, p.D);
        kern.bf16_to_f32(reinterpret_cast<const uint16_t*>(p.v) + tok[c] + off,
                         buf + (kTile + c) * p.D, p.D);
      } else if (c < nk) {  // one-byte codes; the row's scale sits at its element offset / D
        const int64_t row = (tok[c] + off) / p.D;
        kv_dequantize_row(p.kv, p.k + tok[c] + off, p.ks[row], buf + c * p.D, p.D);
        kv_dequantize_row(p.kv, p.v + tok[c] + off, p.vs[row], buf + (kTile + c) * p.D, p.D);
      }
      const int64_t cc = std::min<int64_t>(c, nk - 1);
      k[c] = buf + cc * p.D;
      v[c] = buf + (kTile + cc) * p.D;
    } else {
      k[c] = reinterpret_cast<const float*>(p.k) + tok[c] + off;
      v[c] = reinterpret_cast<const float*>(p.v) + tok[c] + off;
    }
  }
}

void run_item(const Problem& p, const Kernels& kern, const Item& it, Scratch& s) {
  const int64_t D = p.D, hn = it.hn, per_kv = it.qn * hn, rows = it.rows();
  const int64_t start = p.qsl[it.seq] + it.q0;  // row of the item's first query in q
  const int64_t first =                           // and its position in the sequence
      p.ctx[it.seq] - (p.qsl[it.seq + 1] - p.qsl[it.seq]) + it.q0;
  auto head = [&](int64_t r) { return (it.kv0 + r / per_kv) * p.G + it.h0 + r % hn; };
  auto query = [&](int64_t r) { return start + (r % per_kv) / hn; };
  for (int64_t r = 0; r < rows; ++r) {
    load_query(p, query(r), head(r), s.qbuf.data() + r * D);
    s.qptr[r] = s.qbuf.data() + r * D;
    s.m[r] = kNegInf;
    s.l[r] = 0.0f;
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, 0.0f);
  const float* k[kTile];
  const float* v[kTile];
  const int64_t kmax = first + it.qn;  // keys visible to the item's last query
  for (int64_t t0 = 0; t0 < kmax; t0 += kTile) {
    const int64_t nk = std::min<int64_t>(kTile, kmax - t0);
    tile_tokens(p, it.seq, t0, nk, s.tok.data());
    const int64_t r0 = std::max<int64_t>(0, t0 - first) * hn;  // first row (per kv head) seeing it
    for (int64_t r = r0; r < per_kv; ++r)
      s.valid[r] = static_cast<int32_t>(std::min<int64_t>(kTile, first + r / hn + 1 - t0));
    for (int64_t j = 0; j < it.kvn; ++j) {
      gather_head(p, kern, s.tok.data(), nk, it.kv0 + j, s.kv.data(), k, v);
      const int64_t b = j * per_kv + r0;
      TileArgs a{s.qptr.data() + b, s.valid.data() + r0, per_kv - r0, k, v, D,
                 s.m.data() + b, s.l.data() + b, s.acc.data() + b * D};
      kern.tile(a);
    }
  }
  for (int64_t r = 0; r < rows; ++r) store_row(p, query(r), head(r), s.acc.data() + r * D, s.l[r]);
}

// Splits the batch into items whose rows' accumulators fit in ~16 KiB: short query runs
// (decode) take every kv head of their sequence (whole cache rows stream in order), long ones
// one kv head per chunk of queries. While there are fewer than two items a thread, items are
// split per kv head; then, while some thread would have none, per query head.
std::vector<Item> make_items(const Problem& p, int64_t B, int64_t threads) {
  const int64_t max_rows = std::max<int64_t>(p.G, 4096 / p.D);
  const int64_t qb = std::max<int64_t>(1, max_rows / p.G);
  std::vector<Item> items;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t L = p.qsl[i + 1] - p.qsl[i], pos0 = p.ctx[i] - L;
    if (L > 0 && L * p.H <= max_rows) {
      items.push_back({i, 0, p.Hkv, 0, p.G, 0, L, L * p.H * (pos0 + L)});
      continue;
    }
    for (int64_t q0 = 0; q0 < L; q0 += qb) {
      const int64_t qn = std::min(qb, L - q0);
      for (int64_t kvh = 0; kvh < p.Hkv; ++kvh)
        items.push_back({i, kvh, 1, 0, p.G, q0, qn, qn * p.G * (pos0 + q0 + qn)});
    }
  }
  auto few = [&] { return static_cast<int64_t>(items.size()) < 2 * threads; };
  if (few() && p.Hkv > 1) {
    std::vector<Item> split;
    for (const Item& it : items)
      for (int64_t j = 0; j < it.kvn; ++j)
        split.push_back({it.seq, it.kv0 + j, 1, it.h0, it.hn, it.q0, it.qn, it.cost / it.kvn});
    items.swap(split);
  }
  // Then, while still fewer than two a thread, items of several queries (a verification step's
  // drafts, a short continuation) are cut into two runs of queries; every row keeps its group.
  for (bool cut = true; few() && cut;) {
    cut = false;
    std::vector<Item> split;
    for (const Item& it : items) {
      if (it.qn < 2) {
        split.push_back(it);
        continue;
      }
      const int64_t a = it.qn / 2;
      split.push_back({it.seq, it.kv0, it.kvn, it.h0, it.hn, it.q0, a, it.cost * a / it.qn});
      split.push_back({it.seq, it.kv0, it.kvn, it.h0, it.hn, it.q0 + a, it.qn - a, it.cost - it.cost * a / it.qn});
      cut = true;
    }
    items.swap(split);
  }
  // Per query head only while some thread would have no item: the heads of a group read the
  // same keys and values, which a decode step brings from DRAM (measured on a 3-kv-head model
  // at 2 threads: 3 items of 3 heads beat 9 of one by 10-35% in a decode step at ~470 keys).
  if (static_cast<int64_t>(items.size()) < threads && p.G > 1) {
    std::vector<Item> split;
    for (const Item& it : items)
      for (int64_t h = 0; h < it.hn; ++h)
        split.push_back({it.seq, it.kv0, 1, it.h0 + h, 1, it.q0, it.qn, it.cost / it.hn});
    items.swap(split);
  }
  // Costliest first, so the dynamic schedule ends with short items.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

void run_attention(const Problem& p, int64_t B) {
  const Kernels kern = pick_kernels();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const std::vector<Item> items = make_items(p, B, threads);
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  int64_t max_rows = 0, work = 0;
  for (const Item& it : items) {
    max_rows = std::max(max_rows, it.rows());
    work += it.cost;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    Scratch s(max_rows, p.D);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) run_item(p, kern, items[i], s);
  };
  // Below ~64K multiply-adds a fork/join costs more than it saves.
  if (threads == 1 || n == 1 || work * p.D < 64 * 1024) {
    worker(0, 1);
  } else {
    at::parallel_for(0, std::min(threads, n), 1, worker);
  }
}

// ---------------------------------------------------------------- binding
std::vector<int64_t> int_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.device().is_cpu(), "paged_attention: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   "paged_attention: ", name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, "paged_attention: ", name,
                    " must be 1-D of size ", size, ", got shape ", t.sizes());
  std::vector<int64_t> out(size);
  for (int64_t i = 0; i < size; ++i)
    out[i] = t.scalar_type() == at::kInt ? t.data_ptr<int32_t>()[i * t.stride(0)]
                                         : t.data_ptr<int64_t>()[i * t.stride(0)];
  return out;
}

bool quantized_dtype(at::ScalarType t) { return t == at::kChar || t == at::kFloat8_e4m3fn; }

void check_cache(const at::Tensor& c, const char* name, const at::Tensor& q) {
  TORCH_CHECK(c.device().is_cpu(), "paged_attention: ", name, " must be a CPU tensor, got ",
              c.device());
  TORCH_CHECK_TYPE(c.scalar_type() == q.scalar_type() || quantized_dtype(c.scalar_type()),
                   "paged_attention: ", name, " must have q's dtype ", q.scalar_type(),
                   " or be quantized (int8, float8_e4m3fn), got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.dim() == 4, "paged_attention: ", name,
                    " must be 4-D [num_blocks, block_size, Hkv, D], got shape ", c.sizes());
  TORCH_CHECK_VALUE(c.size(3) == q.size(2), "paged_attention: ", name, " must have D = ",
                    q.size(2), " (q.shape[2]), got shape ", c.sizes());
  TORCH_CHECK_VALUE(c.is_contiguous(), "paged_attention: ", name, " must be contiguous");
}

// Checks the sequence layout and every block id a sequence will read.
void check_sequences(const Problem& p, int64_t B, int64_t T, int64_t W, int64_t num_blocks) {
  TORCH_CHECK_VALUE(p.qsl[0] == 0 && p.qsl[B] == T, "paged_attention: query_start_loc must run "
                    "from 0 to q.shape[0] = ", T, ", got ", p.qsl[0], " .. ", p.qsl[B]);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t L = p.qsl[i + 1] - p.qsl[i], n = p.ctx[i];
    TORCH_CHECK_VALUE(L >= 0, "paged_attention: query_start_loc must be non-decreasing, got ",
                      p.qsl[i], " then ", p.qsl[i + 1], " at sequence ", i);
    TORCH_CHECK_VALUE(n >= L, "paged_attention: context_lens[", i, "] = ", n,
                      " must be >= the sequence's query count ", L);
    const int64_t used = L == 0 ? 0 : (n + p.bs - 1) / p.bs;
    TORCH_CHECK_VALUE(used <= W, "paged_attention: block_tables has ", W, " columns but "
                      "sequence ", i, " needs ", used, " blocks for ", n, " tokens");
    for (int64_t j = 0; j < used; ++j) {
      const int64_t b = block_id(p, i, j);
      TORCH_CHECK_VALUE(b >= 0 && b < num_blocks, "paged_attention: block_tables[", i, "][", j,
                        "] = ", b, " is out of range [0, ", num_blocks, ")");
    }
  }
}

// Scales of a quantized cache: float32, contiguous [num_blocks, block_size, Hkv].
const float* cache_scales(const c10::optional<at::Tensor>& s, const char* name,
                          const at::Tensor& cache) {
  TORCH_CHECK_VALUE(s.has_value(), "paged_attention: a ", cache.scalar_type(), " cache needs ",
                    name, " (float32 [num_blocks, block_size, Hkv])");
  TORCH_CHECK(s->device().is_cpu(), "paged_attention: ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(s->scalar_type() == at::kFloat, "paged_attention: ", name,
                   " must be float32, got ", s->scalar_type());
  TORCH_CHECK_VALUE(s->dim() == 3 && s->size(0) == cache.size(0) && s->size(1) == cache.size(1) &&
                    s->size(2) == cache.size(2) && s->is_contiguous(),
                    "paged_attention: ", name, " must be contiguous [num_blocks, block_size, Hkv] = ",
                    cache.sizes().slice(0, 3), ", got shape ", s->sizes());
  return s->data_ptr<float>();
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                           double scale, const c10::optional<at::Tensor>& k_scale,
                           const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_attention: q must be a CPU tensor, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
                   "paged_attention: q must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3, "paged_attention: q must be 3-D [T, H, D], got shape ",
                    q.sizes());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(D > 0 && D % 16 == 0, "paged_attention: q's head size D must be a positive "
                    "multiple of 16, got ", D);
  TORCH_CHECK_VALUE(q.stride(2) == 1, "paged_attention: q's last dim must be contiguous "
                    "(q.stride(2) == 1), got strides ", q.strides());
  check_cache(k_cache, "k_cache", q);
  check_cache(v_cache, "v_cache", q);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "paged_attention: v_cache must have "
                    "k_cache's shape ", k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), "paged_attention: v_cache "
                   "must have k_cache's dtype ", k_cache.scalar_type(), ", got ",
                   v_cache.scalar_type());
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(bs > 0, "paged_attention: k_cache's block_size must be positive, got shape ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(H > 0 && Hkv > 0 && H % Hkv == 0, "paged_attention: q's head count ", H,
                    " must be a multiple of the caches' kv head count ", Hkv);
  TORCH_CHECK(block_tables.device().is_cpu(), "paged_attention: block_tables must be a CPU "
              "tensor, got ", block_tables.device());
  TORCH_CHECK_TYPE(block_tables.scalar_type() == at::kInt ||
                   block_tables.scalar_type() == at::kLong,
                   "paged_attention: block_tables must be int32 or int64, got ",
                   block_tables.scalar_type());
  TORCH_CHECK_VALUE(block_tables.dim() == 2, "paged_attention: block_tables must be 2-D "
                    "[B, W], got shape ", block_tables.sizes());
  const int64_t B = block_tables.size(0), W = block_tables.size(1);
  const std::vector<int64_t> qsl = int_vector(query_start_loc, "query_start_loc", B + 1);
  const std::vector<int64_t> ctx = int_vector(context_lens, "context_lens", B);
  TORCH_CHECK_VALUE(std::isfinite(scale), "paged_attention: scale must be finite, got ", scale);

  at::Tensor out = at::empty({T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  Problem p;
  p.q = static_cast<const char*>(q.data_ptr());
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.k = static_cast<const char*>(k_cache.data_ptr());
  p.v = static_cast<const char*>(v_cache.data_ptr());
  p.out = static_cast<char*>(out.data_ptr());
  p.kv = kv_kind(k_cache.scalar_type());
  p.ks = kv_quantized(p.kv) ? cache_scales(k_scale, "k_scale", k_cache) : nullptr;
  p.vs = kv_quantized(p.kv) ? cache_scales(v_scale, "v_scale", v_cache) : nullptr;
  p.bf16 = q.scalar_type() == at::kBFloat16;
  p.esize = q.element_size();
  p.bs = bs;
  p.H = H;
  p.Hkv = Hkv;
  p.G = H / Hkv;
  p.D = D;
  p.bt = block_tables.data_ptr();
  p.bt64 = block_tables.scalar_type() == at::kLong;
  p.bt_s0 = block_tables.stride(0);
  p.bt_s1 = block_tables.stride(1);
  p.qsl = qsl.data();
  p.ctx = ctx.data();
  p.qscale = static_cast<float>(scale * kLog2e);
  check_sequences(p, B, T, W, num_blocks);
  run_attention(p, B);
  return out;
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor context_lens, float scale, Tensor? k_scale=None, "
        "Tensor? v_scale=None) -> Tensor",
        &fastinfer_cpu::paged_attention);
}
