// Writes a step's keys and values into the paged KV cache on the CPU (the native backend of
// ops.reshape_and_cache): float32 / bfloat16 / float16 rows in, float32 or bfloat16 caches
// (a cast) or quantized caches (int8 or fp8 e4m3 codes plus a float32 scale per token and kv
// head, quantized exactly as fastinfer/common/kv_format.py says; kv_format.h).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "kv_format.h"
#include "ops.h"

namespace fastinfer_cpu {
namespace {

// Row (t, h) of a [T, Hkv, D] tensor whose last dim is contiguous, as float32 in dst.
void load_row(const at::Tensor& x, int64_t t, int64_t h, float* dst) {
  const int64_t D = x.size(2), off = t * x.stride(0) + h * x.stride(1);
  switch (x.scalar_type()) {
    case at::kFloat: {
      const float* s = x.data_ptr<float>() + off;
      for (int64_t d = 0; d < D; ++d) dst[d] = s[d];
      break;
    }
    case at::kBFloat16: {
      const auto* s = x.data_ptr<c10::BFloat16>() + off;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(s[d]);
      break;
    }
    default: {
      const auto* s = x.data_ptr<c10::Half>() + off;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(s[d]);
    }
  }
}

void check_rows(const at::Tensor& x, const char* name, const at::Tensor& cache) {
  TORCH_CHECK(x.device().is_cpu(), "reshape_and_cache: ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                   x.scalar_type() == at::kHalf,
                   "reshape_and_cache: ", name, " must be float32, bfloat16 or float16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) == cache.size(2) && x.size(2) == cache.size(3) &&
                    (x.size(2) <= 1 || x.stride(2) == 1),
                    "reshape_and_cache: ", name, " must be [T, Hkv, D] = [T, ", cache.size(2),
                    ", ", cache.size(3), "] with a contiguous last dim, got shape ", x.sizes(),
                    " strides ", x.strides());
}

void write(const at::Tensor& x, const at::Tensor& cache, const c10::optional<at::Tensor>& scales,
           const char* name, const std::vector<int64_t>& slots) {
  const at::ScalarType ct = cache.scalar_type();
  const KvKind kind = kv_kind(ct);
  const int64_t Hkv = cache.size(2), D = cache.size(3);
  float* scale = nullptr;
  if (kv_quantized(kind)) {
    TORCH_CHECK_VALUE(scales.has_value() && scales->scalar_type() == at::kFloat &&
                      scales->dim() == 3 && scales->size(0) == cache.size(0) &&
                      scales->size(1) == cache.size(1) && scales->size(2) == Hkv &&
                      scales->is_contiguous() && scales->device().is_cpu(),
                      "reshape_and_cache: a ", ct, " cache needs ", name,
                      "_scale, float32 contiguous [num_blocks, block_size, Hkv]");
    scale = scales->data_ptr<float>();
  }
  std::vector<float> row(D);
  char* base = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < static_cast<int64_t>(slots.size()); ++t) {
    for (int64_t h = 0; h < Hkv; ++h) {
      load_row(x, t, h, row.data());
      const int64_t r = slots[t] * Hkv + h;  // row index in the flat [slots * Hkv, D] cache
      switch (kind) {
        case KvKind::kF32: {
          float* dst = reinterpret_cast<float*>(base) + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = row[d];
          break;
        }
        case KvKind::kBF16: {
          auto* dst = reinterpret_cast<c10::BFloat16*>(base) + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(row[d]);
          break;
        }
        default:
          scale[r] = kv_quantize_row(kind, row.data(), base + r * D, D);
      }
    }
  }
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                       const c10::optional<at::Tensor>& k_scale,
                       const c10::optional<at::Tensor>& v_scale) {
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    const at::ScalarType ct = c->scalar_type();
    TORCH_CHECK(c->device().is_cpu(), "reshape_and_cache: the caches must be CPU tensors");
    TORCH_CHECK_TYPE(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kChar ||
                     ct == at::kFloat8_e4m3fn,
                     "reshape_and_cache: caches must be float32, bfloat16, int8 or "
                     "float8_e4m3fn, got ", ct);
    TORCH_CHECK_VALUE(c->dim() == 4 && c->is_contiguous() && c->sizes() == k_cache.sizes(),
                      "reshape_and_cache: caches must be contiguous [num_blocks, block_size, Hkv, "
                      "D] of one shape, got ", c->sizes());
  }
  check_rows(key, "key", k_cache);
  check_rows(value, "value", v_cache);
  const int64_t T = key.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK_VALUE(value.size(0) == T && slot_mapping.dim() == 1 && slot_mapping.size(0) == T &&
                    slot_mapping.scalar_type() == at::kLong && slot_mapping.device().is_cpu(),
                    "reshape_and_cache: slot_mapping must be int64 [T] with T = ", T,
                    " rows of key and value");
  std::vector<int64_t> slots(T);
  for (int64_t t = 0; t < T; ++t) {
    slots[t] = slot_mapping.data_ptr<int64_t>()[t * slot_mapping.stride(0)];
    TORCH_CHECK_VALUE(slots[t] >= 0 && slots[t] < num_slots, "reshape_and_cache: slot_mapping[",
                      t, "] = ", slots[t], " is out of range [0, ", num_slots, ")");
  }
  write(key, k_cache, k_scale, "k", slots);
  write(value, v_cache, v_scale, "v", slots);
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> ()",
        &fastinfer_cpu::reshape_and_cache);
}
