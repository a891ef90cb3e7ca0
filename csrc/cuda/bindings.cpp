// Torch bindings of the CUDA kernels: check arguments (messages name them), then launch on
// the current stream. Registered as torch.ops.fastinfer_cuda.*.
//
// Every check of shapes and dtypes comes before the device checks, and the ops are registered
// for the CPU dispatch key too: a CPU tensor reaches these checks (so they are testable without a
// GPU) and gets "<arg> must be a CUDA tensor", never a dispatcher error.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_type(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// `t` is a CUDA tensor on `device` (the device of `ref_name`).
void check_device(const at::Tensor& t, const char* name, const at::Device& device, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a ", t.device().type(), " tensor");
  TORCH_CHECK(t.device() == device, name, " must be on the device of ", ref_name, " (", device, "), got ",
              t.device());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// key / value: [num_tokens, num_kv_heads, head_dim] in the cache's dtype, each token's row
// contiguous (the stride over tokens may be larger, as in a slice of a fused qkv).
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& k_cache, int64_t tokens) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [num_tokens, num_kv_heads, head_dim], got ", t.dim(),
              "-D ", t.sizes());
  TORCH_CHECK(t.size(0) == tokens, name, ".size(0) (num_tokens) must equal slot_mapping.size(0) = ", tokens,
              ", got ", t.size(0));
  TORCH_CHECK(t.size(1) == k_cache.size(2), name, ".size(1) (num_kv_heads) must equal the cache's "
              "num_kv_heads = k_cache.size(2) = ", k_cache.size(2), ", got ", t.size(1));
  TORCH_CHECK(t.size(2) == k_cache.size(3), name, ".size(2) (head_dim) must equal the cache's head_dim = "
              "k_cache.size(3) = ", k_cache.size(3), ", got ", t.size(2));
  TORCH_CHECK(t.scalar_type() == k_cache.scalar_type(), name, " dtype must equal the cache dtype ",
              k_cache.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must be contiguous in its last dim (stride ",
              t.stride(2), ")");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == t.size(2), name, " must be contiguous within each token: "
              "stride(1) must be head_dim = ", t.size(2), ", got ", t.stride(1));
}

void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.dim(), "-D ", k_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous(), "k_cache must be contiguous, got strides ", k_cache.strides());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(v_cache.is_contiguous(), "v_cache must be contiguous, got strides ", v_cache.strides());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache dtype must equal k_cache dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                       at::Tensor& v_cache, const at::Tensor& slot_mapping, bool check_slots) {
  check_cache_pair(k_cache, v_cache);
  TORCH_CHECK(slot_mapping.dim() == 1, "slot_mapping must be 1-D [num_tokens], got ", slot_mapping.dim(),
              "-D ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.is_contiguous(), "slot_mapping must be contiguous, got stride ",
              slot_mapping.stride(0));
  const int64_t tokens = slot_mapping.size(0);
  check_rows(key, "key", k_cache, tokens);
  check_rows(value, "value", k_cache, tokens);
  const int64_t es = k_cache.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4, "k_cache dtype must have 1, 2 or 4 bytes per element, got ",
              k_cache.scalar_type());

  check_device(key, "key", key.device(), "key");
  check_device(value, "value", key.device(), "key");
  check_device(k_cache, "k_cache", key.device(), "key");
  check_device(v_cache, "v_cache", key.device(), "key");
  check_device(slot_mapping, "slot_mapping", key.device(), "key");
  if (tokens == 0) return;

  const c10::cuda::CUDAGuard guard(key.device());
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  if (check_slots) {
    // One reduction and one host read: slots must lie in [-1, num_slots) (-1: padding).
    at::Tensor mm = at::empty({2}, slot_mapping.options());
    at::Tensor lo = mm.select(0, 0);
    at::Tensor hi = mm.select(0, 1);
    at::aminmax_out(lo, hi, slot_mapping);
    const at::Tensor host = mm.cpu();
    const int64_t mn = host.data_ptr<int64_t>()[0];
    const int64_t mx = host.data_ptr<int64_t>()[1];
    TORCH_CHECK(mx < num_slots, "slot_mapping holds slot ", mx, ", out of range: the cache has num_blocks * "
                "block_size = ", num_slots, " slots (valid slots: 0 .. ", num_slots - 1, ", or -1 for padding)");
    TORCH_CHECK(mn >= -1, "slot_mapping holds slot ", mn, ", out of range: slots must be >= -1 (-1 for "
                "padding) and < num_blocks * block_size = ", num_slots);
  }
  const cudaError_t err = fastinfer_reshape_and_cache(
      key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
      slot_mapping.data_ptr<int64_t>(), tokens, k_cache.size(2) * k_cache.size(3), key.stride(0),
      value.stride(0), num_slots, static_cast<int>(es), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "reshape_and_cache launch failed: ", cudaGetErrorString(err));
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [num_seqs, num_heads, head_dim] (one decode token per sequence), "
              "got ", q.dim(), "-D ", q.sizes());
  TORCH_CHECK(is_float_type(q.scalar_type()), "q dtype must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(q.size(2) <= 1 || q.stride(2) == 1, "q must be contiguous in its last dim (head_dim), got stride ",
              q.stride(2));
  check_cache_pair(k_cache, v_cache);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "k_cache dtype must equal q dtype ", q.scalar_type(),
              ", got ", k_cache.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "k_cache.size(3) (head_dim) must equal q.size(2) = ", D, ", got ",
              k_cache.size(3));
  TORCH_CHECK(fastinfer_decode_head_dim_supported(static_cast<int>(D)) && D <= 256,
              "head_dim must be 64, 128 or 256 for paged_decode_attention, got ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "q.size(1) (num_heads = ", H, ") must be a multiple of "
              "k_cache.size(2) (num_kv_heads = ", Hkv, ")");
  TORCH_CHECK(block_size > 0, "k_cache.size(1) (block_size) must be positive, got ", block_size);
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be 2-D [num_seqs, max_blocks], got ",
              block_tables.dim(), "-D ", block_tables.sizes());
  TORCH_CHECK(block_tables.size(0) == B, "block_tables.size(0) must equal q.size(0) (num_seqs) = ", B,
              ", got ", block_tables.size(0));
  TORCH_CHECK(is_index_type(block_tables.scalar_type()), "block_tables must be int32 or int64, got ",
              block_tables.scalar_type());
  TORCH_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1,
              "block_tables must be contiguous in its last dim, got strides ", block_tables.strides());
  TORCH_CHECK(context_lens.dim() == 1, "context_lens must be 1-D [num_seqs], got ", context_lens.dim(), "-D ",
              context_lens.sizes());
  TORCH_CHECK(context_lens.size(0) == B, "context_lens.size(0) must equal q.size(0) (num_seqs) = ", B,
              ", got ", context_lens.size(0));
  TORCH_CHECK(is_index_type(context_lens.scalar_type()), "context_lens must be int32 or int64, got ",
              context_lens.scalar_type());
  const int64_t W = block_tables.size(1);
  const int64_t P = fastinfer_decode_num_partitions(W, block_size);
  TORCH_CHECK(P <= FASTINFER_DECODE_MAX_PARTITIONS, "block_tables.size(1) * block_size = ", W * block_size,
              " tokens is over the ", int64_t{FASTINFER_DECODE_MAX_PARTITIONS} * FASTINFER_DECODE_PARTITION,
              " that paged_decode_attention takes");
  TORCH_CHECK(B <= 65535, "q.size(0) (num_seqs) must be at most 65535, got ", B);
  TORCH_CHECK(Hkv * ((H / Hkv + 7) / 8) <= 65535 && H <= 65535, "num_heads ", H, " is too large");

  check_device(q, "q", q.device(), "q");
  check_device(k_cache, "k_cache", q.device(), "q");
  check_device(v_cache, "v_cache", q.device(), "q");
  check_device(block_tables, "block_tables", q.device(), "q");
  check_device(context_lens, "context_lens", q.device(), "q");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  TORCH_CHECK(num_blocks > 0, "k_cache must hold at least one block, got shape ", k_cache.sizes());
  TORCH_CHECK(aligned16(k_cache.data_ptr()) && aligned16(v_cache.data_ptr()),
              "k_cache and v_cache must be 16-byte aligned");

  at::Tensor part_out, part_max, part_sum;
  FastinferDecodeParams p{};
  if (P > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_out = at::empty({B, H, P, D}, f32);
    part_max = at::empty({B, H, P}, f32);
    part_sum = at::empty({B, H, P}, f32);
    p.part_out = part_out.data_ptr<float>();
    p.part_max = part_max.data_ptr<float>();
    p.part_sum = part_sum.data_ptr<float>();
  }
  p.q = q.data_ptr();
  p.q_stride_seq = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr();
  p.bt_stride = block_tables.stride(0);
  p.bt_int64 = block_tables.scalar_type() == at::kLong;
  p.context_lens = context_lens.data_ptr();
  p.cl_stride = context_lens.stride(0);
  p.cl_int64 = context_lens.scalar_type() == at::kLong;
  p.out = out.data_ptr();
  p.num_seqs = static_cast<int>(B);
  p.num_heads = static_cast<int>(H);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.num_blocks = num_blocks;
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = W;
  p.num_partitions = static_cast<int>(P);
  p.scale = static_cast<float>(scale);
  p.dtype = q.scalar_type() == at::kFloat ? FASTINFER_F32 : (q.scalar_type() == at::kHalf ? FASTINFER_F16 : FASTINFER_BF16);
  const cudaError_t err = fastinfer_paged_decode_attention(&p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "paged_decode_attention launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY(fastinfer_cuda, m) {
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, bool check_slots=True) -> ()");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastinfer_cuda, CUDA, m) {
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("paged_decode_attention", &paged_decode_attention);
}

// The same functions for CPU tensors: they run the argument checks and raise "... must be a CUDA
// tensor" (the checks can be tested on a machine without a GPU).
TORCH_LIBRARY_IMPL(fastinfer_cuda, CPU, m) {
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("paged_decode_attention", &paged_decode_attention);
}

// A plain Python module so `import fastinfer._C_cuda` loads the library (and registers the ops).
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                          "fastinfer CUDA kernels (torch.ops.fastinfer_cuda)",
                                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
