// Batch-invariant float32 linear for the CPU: y = x @ w.T + bias.
//
// The tiles, the reduction order (the batch-invariance contract) and the work split live in
// gemm.h; this file gives them float32 (or bfloat16) weight rows and binds the op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"
#include "ops.h"
#include "simd.h"

namespace fastinfer_cpu {
namespace {

// Weight loader for float32 rows W[N, K] (row stride ldw): one group spanning K, so the
// tiles see exactly the float32 values and handle a K tail with masked loads.
struct F32Rows {
  const float* w;
  int64_t ldw;
  struct Col {
    const float* p;
  };
  int64_t group_size() const { return 0; }  // one group: all of K
  Col col(int64_t n) const { return {w + n * ldw}; }
  void begin_group(Col&, int64_t) const {}
  float scalar(const Col& c, int64_t k) const { return c.p[k]; }
#if FI_X86
  FI_TARGET_AVX2 void avx2(const Col& c, int64_t k, __m256& lo, __m256& hi) const {
    lo = _mm256_loadu_ps(c.p + k);
    hi = _mm256_loadu_ps(c.p + k + 8);
  }
  FI_TARGET_AVX2 void avx2_tail(const Col& c, int64_t k, __m256i ml, bool has_hi, __m256i mh,
                                __m256& lo, __m256& hi) const {
    lo = _mm256_maskload_ps(c.p + k, ml);
    hi = has_hi ? _mm256_maskload_ps(c.p + k + 8, mh) : _mm256_setzero_ps();
  }
  FI_TARGET_AVX512 __m512 avx512(const Col& c, int64_t k) const {
    return _mm512_loadu_ps(c.p + k);
  }
  FI_TARGET_AVX512 __m512 avx512_tail(const Col& c, int64_t k, __mmask16 m) const {
    return _mm512_maskz_loadu_ps(m, c.p + k);
  }
  FI_TARGET_AVX512 void prefetch(const Col& c, int64_t k) const {
    prefetch_weights(c.p + k);
  }
#endif
};

// Weight loader for bfloat16 rows: each weight widened to the float32 it stands for (exact: the
// bf16 bits are the high half of the float's), so the float32 linear's contract holds as is and
// a bfloat16 model's linears are batch-invariant too (oneDNN's bfloat16 matmul is not: K = 1536
// rows change with the batch from M = 128 on). Half the bytes of float32 on decode.
struct BF16Rows {
  const uint16_t* w;
  int64_t ldw, K;
  struct Col {
    const uint16_t* p;
  };
  int64_t group_size() const { return 0; }
  Col col(int64_t n) const { return {w + n * ldw}; }
  void begin_group(Col&, int64_t) const {}
  float scalar(const Col& c, int64_t k) const { return widen_bf16(c.p[k]); }
#if FI_X86
  FI_TARGET_AVX2 void avx2(const Col& c, int64_t k, __m256& lo, __m256& hi) const {
    lo = widen_bf16_avx2(c.p + k);
    hi = widen_bf16_avx2(c.p + k + 8);
  }
  FI_TARGET_AVX2 void avx2_tail(const Col& c, int64_t k, __m256i, bool, __m256i, __m256& lo, __m256& hi) const {
    alignas(32) uint16_t buf[16] = {};  // the K tail (< 16 weights) through a zero-padded copy
    std::memcpy(buf, c.p + k, sizeof(uint16_t) * static_cast<size_t>(K - k));
    lo = widen_bf16_avx2(buf);
    hi = widen_bf16_avx2(buf + 8);
  }
  FI_TARGET_AVX512 __m512 avx512(const Col& c, int64_t k) const { return widen_bf16_avx512(c.p + k); }
  FI_TARGET_AVX512 __m512 avx512_tail(const Col& c, int64_t k, __mmask16) const {
    alignas(32) uint16_t buf[16] = {};
    std::memcpy(buf, c.p + k, sizeof(uint16_t) * static_cast<size_t>(K - k));
    return widen_bf16_avx512(buf);
  }
  FI_TARGET_AVX512 void prefetch(const Col& c, int64_t k) const {
    prefetch_weights(c.p + k);
  }
#endif
};

}  // namespace

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias) {
  // Type errors raise TypeError, shape/layout errors ValueError, device errors RuntimeError.
  TORCH_CHECK(x.device().is_cpu(), "linear_f32: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(w.device().is_cpu(), "linear_f32: weight must be a CPU tensor, got ", w.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "linear_f32: x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
                   "linear_f32: weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "linear_f32: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, "linear_f32: weight must be 2-D [N, K], got shape ",
                    w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, "linear_f32: weight must be [N, K] with K = x.shape[-1] = ",
                    K, ", got shape ", w.sizes());
  TORCH_CHECK_VALUE(x.stride(1) == 1 || K <= 1,
                    "linear_f32: x rows must be contiguous (x.stride(1) == 1), got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(w.stride(1) == 1 || K <= 1,
                    "linear_f32: weight rows must be contiguous (weight.stride(1) == 1), got "
                    "strides ", w.strides());
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "linear_f32: bias must be a CPU tensor, got ", b.device());
    TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat, "linear_f32: bias must be float32, got ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N,
                      "linear_f32: bias must be 1-D [N] with N = weight.shape[0] = ", N,
                      ", got shape ", b.sizes());
    TORCH_CHECK_VALUE(b.stride(0) == 1 || N <= 1,
                      "linear_f32: bias must be contiguous (bias.stride(0) == 1), got stride ",
                      b.stride(0));
    bias_ptr = b.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  const int64_t ldx = M > 1 ? x.stride(0) : K, ldw = N > 1 ? w.stride(0) : K;
  if (w.scalar_type() == at::kBFloat16) {
    gemm::run(gemm::make_problem(x.data_ptr<float>(), ldx,
                                 BF16Rows{reinterpret_cast<const uint16_t*>(w.data_ptr()), ldw, K}, bias_ptr,
                                 y.data_ptr<float>(), M, N, K));
  } else {
    gemm::run(gemm::make_problem(x.data_ptr<float>(), ldx, F32Rows{w.data_ptr<float>(), ldw}, bias_ptr,
                                 y.data_ptr<float>(), M, N, K));
  }
  return y;
}

// Names the code path in use ("avx512_vnni", "avx512", "avx2", "scalar").
std::string isa_name() {
  switch (current_isa()) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Caps the code path (3 = AVX-512 VNNI, 2 = AVX-512, 1 = AVX2, 0 = scalar) for tests; returns
// the path in use.
std::string set_isa_cap(int64_t cap) {
  TORCH_CHECK(cap >= 0 && cap <= 3, "set_isa_cap: cap must be 0, 1, 2 or 3, got ", cap);
  g_isa_cap = static_cast<int>(cap);
  return isa_name();
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY(fastinfer_cpu, m) {
  // Catch-all kernels: the device/dtype checks above give the error messages.
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
        &fastinfer_cpu::linear_f32);
  m.def("isa_name() -> str", &fastinfer_cpu::isa_name);
  m.def("set_isa_cap(int cap) -> str", &fastinfer_cpu::set_isa_cap);
}

// A bare Python module so `import fastinfer._C_cpu` loads the library and runs the
// registrations above; the ops live under torch.ops.fastinfer_cpu.
extern "C" PyMODINIT_FUNC PyInit__C_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cpu",
                                          "fastinfer CPU kernels (torch.ops.fastinfer_cpu)",
                                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
