// Torch-free entry points of the CUDA kernels (raw pointers, sizes, a cudaStream_t), shared by
// the .cu files (bare nvcc) and the torch bindings (bindings.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// Paged decode attention splits each sequence into partitions of this many tokens
// (flash-decoding); the number of partitions of a launch is ceil(W * block_size / this).
#define FASTINFER_DECODE_PARTITION 512

// Largest number of partitions the combine kernel takes (its weights live in shared memory).
#define FASTINFER_DECODE_MAX_PARTITIONS 12288

extern "C" {

// Copies key/value rows [num_tokens, row] (token strides key_stride / value_stride, in
// elements; rows contiguous) into caches [num_slots, row] at slots[t]. Slots outside
// [0, num_slots) are skipped (negative = padding). Values are moved, never converted.
cudaError_t fastinfer_reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                                        const int64_t* slots, int64_t num_tokens, int64_t row,
                                        int64_t key_stride, int64_t value_stride, int64_t num_slots,
                                        int elem_size, cudaStream_t stream);

enum FastinferDType { FASTINFER_F32 = 0, FASTINFER_F16 = 1, FASTINFER_BF16 = 2 };

struct FastinferDecodeParams {
  const void* q;            // [B, H, D], last dim contiguous
  int64_t q_stride_seq;     // elements
  int64_t q_stride_head;    // elements
  const void* k_cache;      // [num_blocks, block_size, Hkv, D] contiguous, 16-byte aligned
  const void* v_cache;
  const void* block_tables; // [B, W] int32 or int64, last dim contiguous
  int64_t bt_stride;        // elements between rows
  int bt_int64;
  const void* context_lens; // [B] int32 or int64
  int64_t cl_stride;
  int cl_int64;
  void* out;                // [B, H, D] contiguous, q's dtype
  float* part_out;          // [B, H, P, D] float32 (only when P > 1)
  float* part_max;          // [B, H, P]
  float* part_sum;          // [B, H, P]
  int num_seqs;             // B
  int num_heads;            // H
  int num_kv_heads;         // Hkv
  int head_dim;             // D
  int64_t num_blocks;
  int block_size;
  int64_t max_blocks;       // W
  int num_partitions;       // P = ceil(W * block_size / FASTINFER_DECODE_PARTITION), at least 1
  float scale;
  int dtype;                // FastinferDType
};

// Number of partitions for a block table of width W (at least 1).
int64_t fastinfer_decode_num_partitions(int64_t max_blocks, int64_t block_size);

// True for the head dims the decode kernel is built for (64, 128, 256).
int fastinfer_decode_head_dim_supported(int head_dim);

// Launches the partition kernel (and the combine kernel when num_partitions > 1).
cudaError_t fastinfer_paged_decode_attention(const FastinferDecodeParams* params, cudaStream_t stream);

}  // extern "C"
