// A decoder's layers in one native call (the Llama family: pre-norm attention and gated MLP).
//
// Python's layer loop (fastinfer/model/llama.py, DecoderLayer) costs ~100 us of interpreter
// and dispatch time per layer and step; on a small model's decode step that is a third of the
// step. This op runs the same sequence of the same kernels, called directly, for every layer:
//
//   h, residual = rms_norm(h), h                  (first call, residual undefined)
//              or add_rms_norm(h, residual)
//   qkv = linear(h, qkv)  ->  q [T, H, D], k, v [T, Hkv, D]  (views of qkv)
//   rotary_embedding_(positions, q, k)   reshape_and_cache(k, v)   o = paged_attention(q)
//   h, residual = add_rms_norm(linear(o, o_proj), residual)
//   h = linear(silu_and_mul(linear(h, gate_up)), down)
//
// With `embed` given, `h` holds the step's token ids and the op first looks up their rows (a dense
// table, or a packed one dequantized by embedding_q, cast to the model's dtype = the norms'); with
// `final_norm`, the h it returns is add_rms_norm(h, residual, final_norm)[0]. A decode step is
// then one call from Python: each Python-level op costs 50-150 us of a decode step, its objects
// evicted from the caches by the step's weight stream.
//
// Its results are bit-identical to the loop's when the loop's ops pick the native kernels
// (tested for every weight kind and cache format). A linear is dense (kind -1: linear_f32 for
// float32 and bfloat16 weights, computed in float32 and cast back; at::linear, the reference's
// call, otherwise) or quantized (kind 0 u4, 1 s8, 2 e4m3: linear_q in float32, cast back).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops.h"

namespace fastinfer_cpu {
namespace {

struct LinearRef {
  const at::Tensor& weight;  // dense weight, or the codes of a packed one
  const c10::optional<at::Tensor>& scales;
  const c10::optional<at::Tensor>& offsets;
  const c10::optional<at::Tensor>& bias;
  int64_t kind, group_size;
  bool quantize_inputs;
};

at::Tensor apply(const LinearRef& l, const at::Tensor& x) {
  const bool f32 = x.scalar_type() == at::kFloat;
  c10::optional<at::Tensor> bias;
  if (l.bias.has_value() && l.bias->defined()) bias = f32 ? *l.bias : l.bias->to(at::kFloat).contiguous();
  if (l.kind < 0) {  // dense: float32, or bfloat16 widened in registers (cpu_native.linear_f32)
    if (f32) return linear_f32(x, l.weight, l.bias);
    if (l.weight.scalar_type() == at::kBFloat16)
      return linear_f32(x.to(at::kFloat), l.weight, bias).to(x.scalar_type());
    return at::linear(x, l.weight, l.bias);
  }
  if (f32) return linear_q(x, l.weight, *l.scales, l.offsets, l.kind, l.group_size, bias, l.quantize_inputs);
  return linear_q(x.to(at::kFloat), l.weight, *l.scales, l.offsets, l.kind, l.group_size, bias,
                  l.quantize_inputs)
      .to(x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decoder_layers(
    const at::Tensor& h_in, const c10::optional<at::Tensor>& residual_in, const at::Tensor& positions,
    const at::Tensor& cos_sin, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
    const at::Tensor& query_start_loc, const at::Tensor& context_lens, double attn_scale,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, at::TensorList norms,
    at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& scales,
    const c10::List<c10::optional<at::Tensor>>& offsets, const c10::List<c10::optional<at::Tensor>>& biases,
    at::IntArrayRef kinds, at::IntArrayRef group_sizes, at::IntArrayRef quantize_inputs,
    at::TensorList k_caches, at::TensorList v_caches, const c10::List<c10::optional<at::Tensor>>& k_scales,
    const c10::List<c10::optional<at::Tensor>>& v_scales, const c10::optional<at::Tensor>& embed,
    const c10::optional<at::Tensor>& embed_scales, const c10::optional<at::Tensor>& embed_offsets,
    int64_t embed_kind, int64_t embed_group, const c10::optional<at::Tensor>& final_norm) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK_VALUE(L > 0 && static_cast<int64_t>(v_caches.size()) == L &&
                        static_cast<int64_t>(k_scales.size()) == L && static_cast<int64_t>(v_scales.size()) == L,
                    "decoder_layers: one k/v cache and scale per layer, got ", k_caches.size(), ", ",
                    v_caches.size(), ", ", k_scales.size(), ", ", v_scales.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(norms.size()) == 2 * L,
                    "decoder_layers: two norm weights per layer (", 2 * L, "), got ", norms.size());
  for (size_t n : {weights.size(), scales.size(), offsets.size(), biases.size(), kinds.size(),
                   group_sizes.size(), quantize_inputs.size()})
    TORCH_CHECK_VALUE(static_cast<int64_t>(n) == 4 * L,
                      "decoder_layers: four linears per layer (qkv, o, gate_up, down): every linear "
                      "list needs ", 4 * L, " entries, got ", n);
  at::Tensor h = h_in, residual;
  if (embed.has_value() && embed->defined()) {
    TORCH_CHECK_VALUE(h_in.dim() == 1, "decoder_layers: with an embedding, h must be the token ids [T], got shape ",
                      h_in.sizes());
    if (embed_kind < 0) {
      h = at::embedding(*embed, h_in);
    } else {
      TORCH_CHECK_VALUE(embed_scales.has_value() && embed_scales->defined(),
                        "decoder_layers: a packed embedding (embed_kind ", embed_kind, ") needs its scales");
      h = embedding_q(h_in, *embed, *embed_scales, embed_offsets, embed_kind, embed_group);
      if (h.scalar_type() != norms[0].scalar_type()) h = h.to(norms[0].scalar_type());
    }
  }
  TORCH_CHECK_VALUE(h.dim() == 2 && num_heads > 0 && num_kv_heads > 0 && head_dim > 0,
                    "decoder_layers: h must be [T, hidden], got shape ", h.sizes());
  const int64_t T = h.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  // Copies of the optional lists' entries: c10::List hands out temporaries.
  std::vector<c10::optional<at::Tensor>> sc(scales.begin(), scales.end()), of(offsets.begin(), offsets.end()),
      bi(biases.begin(), biases.end()), ks(k_scales.begin(), k_scales.end()), vs(v_scales.begin(), v_scales.end());
  auto lin = [&](int64_t i) {
    return LinearRef{weights[i], sc[i], of[i], bi[i], kinds[i], group_sizes[i], quantize_inputs[i] != 0};
  };

  if (residual_in.has_value() && residual_in->defined()) residual = *residual_in;
  for (int64_t l = 0; l < L; ++l) {
    if (!residual.defined()) {
      residual = h;
      h = rms_norm(h, norms[2 * l], eps);
    } else {
      std::tie(h, residual) = add_rms_norm(h, residual, norms[2 * l], eps);
    }
    const at::Tensor qkv = apply(lin(4 * l), h);
    TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) == q_size + 2 * kv_size,
                      "decoder_layers: layer ", l, "'s qkv projection gives ", qkv.size(1),
                      " features, expected ", q_size + 2 * kv_size);
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
    const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
    rotary_embedding_(positions, q, k, cos_sin);
    reshape_and_cache(k, v, k_caches[l], v_caches[l], slot_mapping, ks[l], vs[l]);
    const at::Tensor o = paged_attention(q, k_caches[l], v_caches[l], block_tables, query_start_loc,
                                         context_lens, attn_scale, ks[l], vs[l]);
    std::tie(h, residual) = add_rms_norm(apply(lin(4 * l + 1), o.reshape({T, q_size})), residual,
                                         norms[2 * l + 1], eps);
    h = apply(lin(4 * l + 3), silu_and_mul(apply(lin(4 * l + 2), h)));
  }
  if (final_norm.has_value() && final_norm->defined()) {
    at::Tensor sum;
    std::tie(h, sum) = add_rms_norm(h, residual, *final_norm, eps);
    residual = sum;
  }
  return {h, residual};
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("decoder_layers(Tensor h, Tensor? residual, Tensor positions, Tensor cos_sin, Tensor slot_mapping, "
        "Tensor block_tables, Tensor query_start_loc, Tensor context_lens, float attn_scale, int num_heads, "
        "int num_kv_heads, int head_dim, float eps, Tensor[] norms, Tensor[] weights, Tensor?[] scales, "
        "Tensor?[] offsets, Tensor?[] biases, int[] kinds, int[] group_sizes, int[] quantize_inputs, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor?[] k_scales, Tensor?[] v_scales, Tensor? embed=None, "
        "Tensor? embed_scales=None, Tensor? embed_offsets=None, int embed_kind=-1, int embed_group=0, "
        "Tensor? final_norm=None) -> (Tensor, Tensor)",
        &fastinfer_cpu::decoder_layers);
}
