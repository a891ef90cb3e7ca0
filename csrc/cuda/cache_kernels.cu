// Paged KV-cache write on the GPU: token t's key/value rows go to flat slot slot_mapping[t]
// of caches laid out [num_blocks * block_size, row] (row = num_kv_heads * head_dim elements).
// Torch-free: raw pointers, sizes and strides, and a cudaStream_t (see BUILD_NOTES.md).
// Slots outside [0, num_slots) are skipped (negative: a padded token), so a bad slot never writes
// out of bounds (the binding can also check the slots and raise).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

// T: the unit moved per thread (the element type, or uint4 when rows and strides allow 16-byte
// copies); row and strides are in units of T.
template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t row,
                                         int64_t key_stride, int64_t value_stride, int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0 || slot >= num_slots) return;  // padded token (or a bad slot): nothing to store
  const T* k = key + t * key_stride;
  const T* v = value + t * value_stride;
  T* kd = k_cache + slot * row;
  T* vd = v_cache + slot * row;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    kd[i] = k[i];
    vd[i] = v[i];
  }
}

template <typename T>
cudaError_t launch(const void* key, const void* value, void* k_cache, void* v_cache,
                   const int64_t* slots, int64_t num_tokens, int64_t row, int64_t key_stride,
                   int64_t value_stride, int64_t num_slots, cudaStream_t stream) {
  const int threads = row < 512 ? static_cast<int>((row + 31) / 32 * 32) : 512;
  reshape_and_cache_kernel<T><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache),
      static_cast<T*>(v_cache), slots, row, key_stride, value_stride, num_slots);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

// Element size selects the copy width (values are moved, never converted); 16-byte copies when
// the rows, the token strides and the pointers allow them.
extern "C" cudaError_t fastinfer_reshape_and_cache(const void* key, const void* value, void* k_cache,
                                                   void* v_cache, const int64_t* slots,
                                                   int64_t num_tokens, int64_t row,
                                                   int64_t key_stride, int64_t value_stride,
                                                   int64_t num_slots, int elem_size, cudaStream_t stream) {
  if (num_tokens == 0 || row == 0) return cudaSuccess;
  if (num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t row_bytes = row * elem_size;
  if (row_bytes % 16 == 0 && (key_stride * elem_size) % 16 == 0 && (value_stride * elem_size) % 16 == 0 &&
      aligned16(key) && aligned16(value) && aligned16(k_cache) && aligned16(v_cache)) {
    return launch<uint4>(key, value, k_cache, v_cache, slots, num_tokens, row_bytes / 16,
                         key_stride * elem_size / 16, value_stride * elem_size / 16, num_slots, stream);
  }
  switch (elem_size) {
    case 1: return launch<uint8_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, num_slots, stream);
    case 2: return launch<uint16_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, num_slots, stream);
    case 4: return launch<uint32_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, num_slots, stream);
    default: return cudaErrorInvalidValue;
  }
}
