// Paged decode attention (one query token per sequence) with split-K over the sequence
// (flash-decoding). Torch-free: raw pointers and a cudaStream_t (see BUILD_NOTES.md).
//
// Semantics: fastinfer/ops/reference.py::paged_attention with one query per sequence. Sequence b's
// query q[b, h] attends to its context_lens[b] cached tokens (positions 0..ctx-1, stored in
// blocks block_tables[b]); query head h reads kv head h / (H / Hkv). Float32 accumulation.
//
// Kernel 1 (partition): grid (P, Hkv * group_chunks, B), 128 threads. A block owns the tokens
// [p * 512, min((p + 1) * 512, ctx)) of one sequence and one kv head, for up to GC query heads of
// that kv head (all of them when H / Hkv <= 8): each K/V row is read once for the group, with
// 16-byte loads by a "row group" of TPR = min(32, D * sizeof(T) / 16) lanes. Pass 1 writes the
// scores (log2 domain) of the partition to shared memory, then the softmax max and sum; pass 2
// accumulates p * V. P depends only on W * block_size, never on the context lengths, so a CUDA
// graph replays with other lengths; partitions at or past a sequence's end return at once.
// Kernel 2 (combine, only when P > 1): grid (H, B), rescales the partitions' partial sums by
// exp2(max_p - max) and divides by the combined denominator. With P == 1 kernel 1 writes the
// normalized output itself (the same floating-point operations as the combine of one partition,
// so results never depend on W).
//
// Robustness: context lengths are clamped to [0, W * block_size] and block ids to
// [0, num_blocks): bad metadata gives wrong numbers, never an out-of-bounds read. A sequence with
// context length 0 gets zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kPartition = FASTINFER_DECODE_PARTITION;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;  // elements per 16 bytes
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

// 16-bit types: a 16-byte vector holds 8 elements, unpacked two per 32-bit word by the
// type's own unpack2.
template <typename Self>
struct PairTraits {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    Self::unpack2(u.x, f);
    Self::unpack2(u.y, f + 2);
    Self::unpack2(u.z, f + 4);
    Self::unpack2(u.w, f + 6);
  }
};

template <>
struct Traits<__half> : PairTraits<Traits<__half>> {
  __device__ __forceinline__ static void unpack2(unsigned w, float* f) {
    __half2 h;
    *reinterpret_cast<unsigned*>(&h) = w;
    const float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
  }
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Traits<__nv_bfloat16> : PairTraits<Traits<__nv_bfloat16>> {
  // bfloat16 -> float is exact: the 16 bits are the high half of the float.
  __device__ __forceinline__ static void unpack2(unsigned w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ int64_t load_index(const void* p, int is64, int64_t i) {
  return is64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(p) + i))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + i));
}

// context_lens[b] clamped to [0, W * block_size].
__device__ __forceinline__ int64_t context_len(const FastinferDecodeParams& p, int b) {
  const int64_t max_ctx = p.max_blocks * p.block_size;
  const int64_t n = load_index(p.context_lens, p.cl_int64, static_cast<int64_t>(b) * p.cl_stride);
  return n < 0 ? 0 : (n > max_ctx ? max_ctx : n);
}

template <typename T, int D, int GC>
struct Shape {
  static constexpr int kVec = Traits<T>::kVec;
  static constexpr int kRowVecs = D / kVec;                          // 16-byte vectors per row
  static constexpr int kTpr = kRowVecs < 32 ? kRowVecs : 32;         // lanes per row group
  static constexpr int kVpt = kRowVecs / kTpr;                       // vectors per lane
  static constexpr int kEpt = kVpt * kVec;                           // elements per lane
  static constexpr int kGroupsPerWarp = 32 / kTpr;
  static constexpr int kGroups = kWarps * kGroupsPerWarp;            // rows in flight per step
  // rows per group per step (more rows in flight where registers allow)
  static constexpr int kUnroll = kVpt == 1 ? (GC <= 4 ? 8 : 4) : (GC <= 4 ? 4 : 2);
  static constexpr int kStep = kGroups * kUnroll;
  static constexpr int kSmemFloats = GC * kPartition > kWarps * GC * D ? GC * kPartition : kWarps * GC * D;
  static_assert(D % (kVec * kTpr) == 0, "head_dim must fill the row group");
  static_assert(kTpr * kGroupsPerWarp == 32, "row groups must tile a warp");
};

// This lane's 16-byte vectors of the rows of one step (kUnroll rows per row group, kGroups
// groups): token t = base + u * kGroups + rg of the partition, zeros past its last token.
template <typename S, typename T>
__device__ __forceinline__ void load_rows(uint4 (&out)[S::kUnroll][S::kVpt], const T* base_ptr,
                                          const int64_t* s_slot, int64_t row_stride, int base, int n_tok,
                                          int rg, int lir) {
#pragma unroll
  for (int u = 0; u < S::kUnroll; ++u) {
    const int t = base + u * S::kGroups + rg;
    if (t < n_tok) {
      const uint4* row = reinterpret_cast<const uint4*>(base_ptr + s_slot[t] * row_stride);
#pragma unroll
      for (int j = 0; j < S::kVpt; ++j) out[u][j] = __ldg(row + j * S::kTpr + lir);
    } else {
#pragma unroll
      for (int j = 0; j < S::kVpt; ++j) out[u][j] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T, int D, int GC>
__global__ void __launch_bounds__(kThreads, 4)
    decode_partition_kernel(const FastinferDecodeParams p) {
  using Tr = Traits<T>;
  using S = Shape<T, D, GC>;
  constexpr int VEC = S::kVec, TPR = S::kTpr, VPT = S::kVpt, EPT = S::kEpt;

  // Scores / probabilities [GC][kPartition] during the passes, then the per-warp partial
  // outputs [kWarps][GC][D] (after a barrier).
  __shared__ __align__(16) float s_buf[S::kSmemFloats];
  __shared__ int64_t s_slot[kPartition];  // cache row of each token of the partition
  __shared__ float s_max[kWarps][GC];
  __shared__ float s_sum[kWarps][GC];

  const int part = blockIdx.x;
  const int group_chunks = gridDim.y / p.num_kv_heads;
  const int kh = blockIdx.y / group_chunks;
  const int g0 = (blockIdx.y - kh * group_chunks) * GC;
  const int b = blockIdx.z;
  const int G = p.num_heads / p.num_kv_heads;
  const int gcount = G - g0 < GC ? G - g0 : GC;
  const int h0 = kh * G + g0;
  const bool direct = p.num_partitions == 1;

  const int64_t ctx = context_len(p, b);
  const int64_t start = static_cast<int64_t>(part) * kPartition;
  if (start >= ctx) {
    if (direct) {  // ctx == 0 (a padding row): zeros
      T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.num_heads + h0) * D;
      for (int i = threadIdx.x; i < gcount * D; i += kThreads) out[i] = Tr::from_float(0.f);
    }
    return;
  }
  const int n_tok = ctx - start < kPartition ? static_cast<int>(ctx - start) : kPartition;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lir = lane % TPR;                              // lane in row group
  const int rg = warp * S::kGroupsPerWarp + lane / TPR;   // row group

  // This lane's slice of the group's queries, pre-scaled into the log2 domain.
  float qf[GC][EPT];
  {
    const float qscale = p.scale * kLog2e;
    const T* qb = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_stride_seq;
#pragma unroll
    for (int gi = 0; gi < GC; ++gi) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          qf[gi][j * VEC + k] =
              gi < gcount ? Tr::to_float(qb[static_cast<int64_t>(h0 + gi) * p.q_stride_head + (j * TPR + lir) * VEC + k]) * qscale
                          : 0.f;
        }
      }
    }
  }

  // Cache slot of every token of the partition, once (no block-table load in the passes).
  {
    const int64_t bt_row = static_cast<int64_t>(b) * p.bt_stride;
    for (int t = threadIdx.x; t < n_tok; t += kThreads) {
      // 32-bit: positions are below W * block_size <= FASTINFER_DECODE_MAX_PARTITIONS * 512
      const int pos = static_cast<int>(start) + t;
      const int bi = pos / p.block_size;
      int64_t blk = load_index(p.block_tables, p.bt_int64, bt_row + bi);
      blk = blk < 0 ? 0 : (blk >= p.num_blocks ? p.num_blocks - 1 : blk);
      s_slot[t] = blk * p.block_size + (pos - bi * p.block_size);
    }
  }
  __syncthreads();

  const int64_t row_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // elements per cache slot
  const int64_t head_off = static_cast<int64_t>(kh) * D;
  const T* k_base = static_cast<const T*>(p.k_cache) + head_off;
  const T* v_base = static_cast<const T*>(p.v_cache) + head_off;

  // Pass 1: scores. The loop bound is uniform over the block (shuffles below need whole warps).
  for (int base = 0; base < n_tok; base += S::kStep) {
    uint4 kv[S::kUnroll][VPT];
    load_rows<S>(kv, k_base, s_slot, row_stride, base, n_tok, rg, lir);
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      float kf[EPT];
#pragma unroll
      for (int j = 0; j < VPT; ++j) Tr::unpack(kv[u][j], kf + j * VEC);
      const int t = base + u * S::kGroups + rg;
#pragma unroll
      for (int gi = 0; gi < GC; ++gi) {
        if (gi < gcount) {  // uniform over the block
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < EPT; ++e) dot = fmaf(qf[gi][e], kf[e], dot);
#pragma unroll
          for (int m = TPR / 2; m >= 1; m >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
          if (lir == 0 && t < n_tok) s_buf[gi * kPartition + t] = dot;
        }
      }
    }
  }
  __syncthreads();

  // Softmax over the partition: max, then p = exp2(score - max) in place, and the sum.
#pragma unroll
  for (int gi = 0; gi < GC; ++gi) {
    float m = -INFINITY;
    if (gi < gcount) {
      for (int t = threadIdx.x; t < n_tok; t += kThreads) m = fmaxf(m, s_buf[gi * kPartition + t]);
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) s_max[warp][gi] = m;
    }
  }
  __syncthreads();
#pragma unroll
  for (int gi = 0; gi < GC; ++gi) {
    if (gi < gcount) {
      float m = s_max[0][gi];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_max[w][gi]);
      float sum = 0.f;
      for (int t = threadIdx.x; t < n_tok; t += kThreads) {
        const float e = exp2f(s_buf[gi * kPartition + t] - m);
        s_buf[gi * kPartition + t] = e;
        sum += e;
      }
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) s_sum[warp][gi] = sum;
    }
  }
  __syncthreads();

  // Pass 2: acc[g] = sum_t p[g][t] * V[t] over this lane's elements.
  float acc[GC][EPT];
#pragma unroll
  for (int gi = 0; gi < GC; ++gi)
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[gi][e] = 0.f;

  for (int base = 0; base < n_tok; base += S::kStep) {
    uint4 vv[S::kUnroll][VPT];
    load_rows<S>(vv, v_base, s_slot, row_stride, base, n_tok, rg, lir);
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      const int t = base + u * S::kGroups + rg;
      if (t < n_tok) {
        float vf[EPT];
#pragma unroll
        for (int j = 0; j < VPT; ++j) Tr::unpack(vv[u][j], vf + j * VEC);
#pragma unroll
        for (int gi = 0; gi < GC; ++gi) {
          if (gi < gcount) {
            const float pr = s_buf[gi * kPartition + t];
#pragma unroll
            for (int e = 0; e < EPT; ++e) acc[gi][e] = fmaf(pr, vf[e], acc[gi][e]);
          }
        }
      }
    }
  }

  // Sum the row groups of each warp (lanes with the same lir hold the same elements).
#pragma unroll
  for (int gi = 0; gi < GC; ++gi) {
    if (gi < gcount) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
#pragma unroll
        for (int m = TPR; m < 32; m <<= 1) acc[gi][e] += __shfl_xor_sync(0xffffffffu, acc[gi][e], m);
      }
    }
  }
  __syncthreads();  // every warp is done reading the probabilities: s_buf becomes [kWarps][GC][D]
  if (lane < TPR) {
#pragma unroll
    for (int gi = 0; gi < GC; ++gi) {
      if (gi < gcount) {
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          float* dst = s_buf + (warp * GC + gi) * D + (j * TPR + lir) * VEC;
#pragma unroll
          for (int k = 0; k < VEC; k += 4) {
            *reinterpret_cast<float4*>(dst + k) = make_float4(acc[gi][j * VEC + k], acc[gi][j * VEC + k + 1],
                                                              acc[gi][j * VEC + k + 2], acc[gi][j * VEC + k + 3]);
          }
        }
      }
    }
  }
  __syncthreads();

  const int64_t bh0 = static_cast<int64_t>(b) * p.num_heads + h0;
  for (int i = threadIdx.x; i < gcount * D; i += kThreads) {
    const int gi = i / D;
    const int d = i - gi * D;
    float o = 0.f;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      o += s_buf[(w * GC + gi) * D + d];
      sum += s_sum[w][gi];
    }
    if (direct) {
      static_cast<T*>(p.out)[(bh0 + gi) * D + d] = Tr::from_float(o / sum);
    } else {
      const int64_t pi = (bh0 + gi) * p.num_partitions + part;
      p.part_out[pi * D + d] = o;
      if (d == 0) {
        float m = s_max[0][gi];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_max[w][gi]);
        p.part_max[pi] = m;
        p.part_sum[pi] = sum;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const FastinferDecodeParams p) {
  extern __shared__ float s_w[];  // [num_partitions]: exp2(max_p - max)
  __shared__ float s_red[kCombineWarps];
  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int D = p.head_dim;
  const int P = p.num_partitions;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  T* out = static_cast<T*>(p.out) + bh * D;

  const int64_t ctx = context_len(p, b);
  const int np = static_cast<int>((ctx + kPartition - 1) / kPartition);
  if (np == 0) {
    for (int d = threadIdx.x; d < D; d += kCombineThreads) out[d] = Traits<T>::from_float(0.f);
    return;
  }
  const float* pmax = p.part_max + bh * P;
  const float* psum = p.part_sum + bh * P;
  const float* pout = p.part_out + bh * P * D;

  float m = -INFINITY;
  for (int i = threadIdx.x; i < np; i += kCombineThreads) m = fmaxf(m, pmax[i]);
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) s_red[warp] = m;
  __syncthreads();
  m = s_red[0];
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) m = fmaxf(m, s_red[w]);
  __syncthreads();  // s_red is reused below

  float sum = 0.f;
  for (int i = threadIdx.x; i < np; i += kCombineThreads) {
    const float w = exp2f(pmax[i] - m);
    s_w[i] = w;
    sum += psum[i] * w;
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) s_red[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += s_red[w];

  for (int d = threadIdx.x; d < D; d += kCombineThreads) {
    float o = 0.f;
    for (int i = 0; i < np; ++i) o += pout[static_cast<int64_t>(i) * D + d] * s_w[i];
    out[d] = Traits<T>::from_float(o / sum);
  }
}

template <typename T, int D, int GC>
cudaError_t launch_gc(const FastinferDecodeParams& p, int group_chunks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_partitions), static_cast<unsigned>(p.num_kv_heads * group_chunks),
                  static_cast<unsigned>(p.num_seqs));
  decode_partition_kernel<T, D, GC><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_partitions == 1) return err;
  const dim3 cgrid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
  // (rounded up to 16 bytes: ptxas may read the weights 3 or 4 at a time)
  const size_t smem = static_cast<size_t>((p.num_partitions + 3) / 4 * 4) * sizeof(float);
  decode_combine_kernel<T><<<cgrid, kCombineThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_d(const FastinferDecodeParams& p, cudaStream_t stream) {
  const int G = p.num_heads / p.num_kv_heads;
  if (G <= 1) return launch_gc<T, D, 1>(p, 1, stream);
  if (G <= 2) return launch_gc<T, D, 2>(p, 1, stream);
  if (G <= 4) return launch_gc<T, D, 4>(p, 1, stream);
  return launch_gc<T, D, 8>(p, (G + 7) / 8, stream);
}

template <typename T>
cudaError_t launch_t(const FastinferDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_d<T, 64>(p, stream);
    case 128: return launch_d<T, 128>(p, stream);
    case 256: return launch_d<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int64_t fastinfer_decode_num_partitions(int64_t max_blocks, int64_t block_size) {
  const int64_t n = (max_blocks * block_size + kPartition - 1) / kPartition;
  return n < 1 ? 1 : n;
}

extern "C" int fastinfer_decode_head_dim_supported(int head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

extern "C" cudaError_t fastinfer_paged_decode_attention(const FastinferDecodeParams* params, cudaStream_t stream) {
  const FastinferDecodeParams& p = *params;
  if (p.num_seqs == 0 || p.num_heads == 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.num_partitions < 1 ||
      p.num_partitions > FASTINFER_DECODE_MAX_PARTITIONS || p.block_size <= 0 || p.num_blocks <= 0) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case FASTINFER_F32: return launch_t<float>(p, stream);
    case FASTINFER_F16: return launch_t<__half>(p, stream);
    case FASTINFER_BF16: return launch_t<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
