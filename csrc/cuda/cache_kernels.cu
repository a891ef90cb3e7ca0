// Paged KV-cache write on the GPU: token t's key/value rows go to flat slot slot_mapping[t]
// of caches laid out [num_blocks * block_size, row] (row = num_kv_heads * head_dim elements).
// Torch-free: raw pointers, sizes and strides, and a cudaStream_t (see BUILD_NOTES.md).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t row,
                                         int64_t key_stride, int64_t value_stride) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padded token: nothing to store
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
                   int64_t value_stride, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int threads = row < 512 ? static_cast<int>((row + 31) / 32 * 32) : 512;
  reshape_and_cache_kernel<T><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache),
      static_cast<T*>(v_cache), slots, row, key_stride, value_stride);
  return cudaGetLastError();
}

}  // namespace

// Element size selects the copy width (values are moved, never converted).
extern "C" cudaError_t fastinfer_reshape_and_cache(const void* key, const void* value, void* k_cache,
                                                   void* v_cache, const int64_t* slots,
                                                   int64_t num_tokens, int64_t row,
                                                   int64_t key_stride, int64_t value_stride,
                                                   int elem_size, cudaStream_t stream) {
  switch (elem_size) {
    case 1: return launch<uint8_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, stream);
    case 2: return launch<uint16_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, stream);
    case 4: return launch<uint32_t>(key, value, k_cache, v_cache, slots, num_tokens, row, key_stride, value_stride, stream);
    default: return cudaErrorInvalidValue;
  }
}
