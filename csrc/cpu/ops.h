// The CPU ops of fastinfer._C_cpu as C++ functions, for kernels that chain them without a trip
// through Python (decoder.cpp). Each is also registered as torch.ops.fastinfer_cpu.<name>; the
// contracts are documented where they are defined and on their Python wrappers (ops/backends/cpu_native.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastinfer_cpu {

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

at::Tensor linear_q(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size,
                    const std::optional<at::Tensor>& bias, bool quantize_inputs);

at::Tensor embedding_q(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offsets, int64_t kind, int64_t group_size);

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                           const at::Tensor& context_lens, double scale,
                           const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale);

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                       const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps);

at::Tensor silu_and_mul(const at::Tensor& x);

void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos_sin);

}  // namespace fastinfer_cpu
