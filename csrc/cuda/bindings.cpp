// Torch bindings of the CUDA kernels: check arguments (messages name them), then launch on
// the current stream. Registered as torch.ops.fastinfer_cuda.*.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

extern "C" cudaError_t fastinfer_reshape_and_cache(const void* key, const void* value, void* k_cache,
                                                   void* v_cache, const int64_t* slots,
                                                   int64_t num_tokens, int64_t row,
                                                   int64_t key_stride, int64_t value_stride,
                                                   int elem_size, cudaStream_t stream);

namespace {

void check_rows(const at::Tensor& t, const char* name, int64_t tokens, int64_t row) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == tokens && t.size(1) * t.size(2) == row, name,
              " must have shape [num_tokens, num_kv_heads, head_dim] = [", tokens, ", ", row, "], got ",
              t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              " must be contiguous within each token (stride over tokens may be larger)");
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                       at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous(), "k_cache must be a contiguous "
              "[num_blocks, block_size, num_kv_heads, head_dim] tensor, got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
              "v_cache must be contiguous with the shape of k_cache");
  const int64_t tokens = slot_mapping.size(0);
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  check_rows(key, "key", tokens, row);
  check_rows(value, "value", tokens, row);
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 CUDA tensor [num_tokens]");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "key/value dtype must match the cache dtype (", k_cache.scalar_type(), ")");
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaError_t err = fastinfer_reshape_and_cache(
      key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
      slot_mapping.data_ptr<int64_t>(), tokens, row, key.stride(0), value.stride(0),
      static_cast<int>(key.element_size()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "reshape_and_cache launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(fastinfer_cuda, m) {
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(fastinfer_cuda, CUDA, m) { m.impl("reshape_and_cache", &reshape_and_cache); }

// A plain Python module so `import fastinfer._C_cuda` loads the library (and registers the ops).
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                          "fastinfer CUDA kernels (torch.ops.fastinfer_cuda)",
                                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
