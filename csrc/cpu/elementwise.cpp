// The small per-token ops of a decoder layer, natively (issue 11: once the weights are small,
// ~600 small torch ops per decode step decide single-stream speed). float32 or bfloat16
// rows (the last dim contiguous), float32 math, the input dtype out:
//
//   rms_norm(x, w, eps)                 y = w * dt(x * 1 / sqrt(mean(x^2) + eps))
//   add_rms_norm(x, r, w, eps)          r' = dt(x + r); y = rms_norm(r', w, eps); returns (y, r')
//   silu_and_mul(x [.., 2d])            y = dt(silu(x[:d]) * x[d:])
//   rotary_embedding_(pos, q, k, cs)    q, k rotated in place (rotate-half "neox" layout)
//
// Each row is computed alone in an order that depends only on its length (the sum of squares
// in simd.h's 16-lane order), so results never depend on the batch. The AVX-512 and
// portable paths follow the same order; silu's exp differs between them by a few ulp
// (a polynomial vs std::exp2), as in the attention kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "ops.h"
#include "simd.h"

namespace fastinfer_cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(c10::BFloat16* p, int64_t i, float v) { p[i] = c10::BFloat16(v); }
// Rounds a float32 value to the dtype T and back (what torch's cast of an intermediate does).
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const c10::BFloat16*) { return static_cast<float>(c10::BFloat16(v)); }

#if FI_X86
// silu(g) * u for 16 values: t = 2^(-|g| log2 e) <= 1; silu = g / (1 + t) for g >= 0 and
// g t / (1 + t) below.
FI_TARGET_AVX512 void silu_mul_avx512(const float* g, const float* u, float* out, int64_t n) {
  const __m512 c = _mm512_set1_ps(static_cast<float>(-kLog2e));
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = lanes16(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 t = exp2_avx512(_mm512_mul_ps(_mm512_abs_ps(gv), c));
    const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(gv, neg, gv, t);
    const __m512 s = _mm512_div_ps(num, _mm512_add_ps(one, t));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, uv));
  }
}
#endif

void silu_mul_scalar(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::exp2(std::fabs(g[i]) * static_cast<float>(-kLog2e));
    const float num = g[i] < 0.0f ? g[i] * t : g[i];
    out[i] = num / (1.0f + t) * u[i];
  }
}

bool use_avx512() {
#if FI_X86
  return current_isa() >= Isa::kAvx512;
#else
  return false;
#endif
}

float sum_squares(const float* x, int64_t n) {
#if FI_X86
  if (use_avx512()) return dot16_avx512(x, x, n);
#endif
  return dot16(x, x, n);
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
#if FI_X86
  if (use_avx512()) return silu_mul_avx512(g, u, out, n);
#endif
  silu_mul_scalar(g, u, out, n);
}

// The index of the first maximum of x[0..n) (n >= 1), as torch.argmax gives it: NaN counts as
// the greatest value (the first NaN wins), -0.0 equals +0.0.
int64_t argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

#if FI_X86
// Two passes: the maximum (and whether there is a NaN), then its first index.
FI_TARGET_AVX512 int64_t argmax_avx512(const float* x, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = lowest;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_mask_loadu_ps(lowest, lanes16(n - i), x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (nan) return argmax_scalar(x, n);
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes16(n - i), _mm512_maskz_loadu_ps(lanes16(n - i), x + i),
                                                  top, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // unreachable: the maximum is one of the values
}
#endif

// Rows [M, H] of x (and r), row stride ld, over parallel chunks of rows.
template <typename F>
void for_rows(int64_t M, int64_t cost_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row));
  at::parallel_for(0, M, grain, [&](int64_t b, int64_t e) { for (int64_t m = b; m < e; ++m) f(m); });
}

// One float32 row: v = x (+ r, stored in sum), y = w * (v * inv), inv = 1 / sqrt(mean(v^2) + eps).
// The AVX-512 and scalar loops do the same float operations in the same order per element.
#if FI_X86
FI_TARGET_AVX512 void rms_row_avx512(const float* x, const float* r, float* sum, const float* w, float* out,
                                     int64_t H, float eps) {
  const float* v = x;
  if (r != nullptr) {
    for (int64_t i = 0; i < H; i += 16) {
      const __mmask16 m = lanes16(H - i);
      _mm512_mask_storeu_ps(sum + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, r + i)));
    }
    v = sum;
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(dot16_avx512(v, v, H) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes16(H - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i),
                                                    _mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + i), inv)));
  }
}
#endif

void rms_row_scalar(const float* x, const float* r, float* sum, const float* w, float* out, int64_t H,
                    float eps) {
  const float* v = x;
  if (r != nullptr) {
    for (int64_t i = 0; i < H; ++i) sum[i] = x[i] + r[i];
    v = sum;
  }
  const float inv = 1.0f / std::sqrt(dot16(v, v, H) / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (v[i] * inv);
}

template <typename T>
void rms_rows(const T* x, int64_t ldx, const T* r, int64_t ldr, T* sum_out, const T* w, T* out,
              int64_t M, int64_t H, float eps) {
  if constexpr (std::is_same_v<T, float>) {  // in place, no buffer: a decode step's 60 norms
    for_rows(M, H, [&](int64_t m) {
      const float* rr = r != nullptr ? r + m * ldr : nullptr;
      float* s = sum_out != nullptr ? sum_out + m * H : nullptr;
#if FI_X86
      if (use_avx512()) return rms_row_avx512(x + m * ldx, rr, s, w, out + m * H, H, eps);
#endif
      rms_row_scalar(x + m * ldx, rr, s, w, out + m * H, H, eps);
    });
    return;
  }
  for_rows(M, H, [&](int64_t m) {
    std::vector<float> buf(H);
    for (int64_t i = 0; i < H; ++i) {
      float v = load_f(x + m * ldx, i);
      if (r != nullptr) v = round_to(v + load_f(r + m * ldr, i), x);  // the residual add in dt
      buf[i] = v;
    }
    if (sum_out != nullptr)
      for (int64_t i = 0; i < H; ++i) store_f(sum_out + m * H, i, buf[i]);
    const float inv = 1.0f / std::sqrt(sum_squares(buf.data(), H) / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i)
      store_f(out + m * H, i, load_f(w, i) * round_to(buf[i] * inv, x));
  });
}

void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ",
                   name, " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), op, ": ", name,
                    " must be 2-D [M, H] with a contiguous last dim, got shape ", x.sizes(),
                    " strides ", x.strides());
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& r,
                                             const at::Tensor& w, double eps) {
  const char* op = r.has_value() ? "add_rms_norm" : "rms_norm";
  check_rows(x, op, "x");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() && w.dim() == 1 && w.size(0) == H &&
                   w.is_contiguous() && w.device().is_cpu(),
                   op, ": weight must be a contiguous [", H, "] CPU tensor of x's dtype ",
                   x.scalar_type(), ", got ", w.scalar_type(), " ", w.sizes());
  at::Tensor out = at::empty({M, H}, x.options());
  at::Tensor sum;
  if (r.has_value()) {
    check_rows(*r, op, "residual");
    TORCH_CHECK_TYPE(r->scalar_type() == x.scalar_type() && r->sizes() == x.sizes(), op,
                     ": residual must have x's dtype and shape ", x.sizes());
    sum = at::empty({M, H}, x.options());
  }
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    rms_rows<float>(x.data_ptr<float>(), x.stride(0), r ? r->data_ptr<float>() : nullptr,
                    r ? r->stride(0) : 0, r ? sum.data_ptr<float>() : nullptr, w.data_ptr<float>(),
                    out.data_ptr<float>(), M, H, e);
  } else {
    using B = c10::BFloat16;
    rms_rows<B>(x.data_ptr<B>(), x.stride(0), r ? r->data_ptr<B>() : nullptr, r ? r->stride(0) : 0,
                r ? sum.data_ptr<B>() : nullptr, w.data_ptr<B>(), out.data_ptr<B>(), M, H, e);
  }
  return {out, sum};
}

template <typename T>
void silu_rows(const T* x, int64_t ld, T* out, int64_t M, int64_t d) {
  for_rows(M, 8 * d, [&](int64_t m) {
    std::vector<float> g(d), u(d), y(d);
    for (int64_t i = 0; i < d; ++i) {
      g[i] = load_f(x + m * ld, i);
      u[i] = load_f(x + m * ld, d + i);
    }
    silu_mul(g.data(), u.data(), y.data(), d);
    for (int64_t i = 0; i < d; ++i) store_f(out + m * d, i, y[i]);
  });
}

#if FI_X86
// One float32 row's rotation, 16 pairs at a time: the scalar loop's multiplies and adds, each
// rounded (the build keeps them unfused), so the same bits.
FI_TARGET_AVX512 void rotate_row_avx512(float* row, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = lanes16(half - i);
    const __m512 x1 = _mm512_maskz_loadu_ps(m, row + i), x2 = _mm512_maskz_loadu_ps(m, row + half + i);
    const __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, s + i);
    _mm512_mask_storeu_ps(row + i, m, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
    _mm512_mask_storeu_ps(row + half + i, m, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)));
  }
}
#endif

// x [T, heads, D] (strides s0, s1, last dim contiguous), rotated in place at positions pos.
template <typename T>
void rotate(T* x, int64_t s0, int64_t s1, int64_t T_, int64_t heads, int64_t D, const int64_t* pos,
            const float* cs) {
  const int64_t half = D / 2;
  for_rows(T_, heads * D, [&](int64_t t) {
    const float* c = cs + pos[t] * D;
    const float* s = c + half;
    for (int64_t h = 0; h < heads; ++h) {
      T* row = x + t * s0 + h * s1;
#if FI_X86
      if (std::is_same<T, float>::value && use_avx512()) {
        rotate_row_avx512(reinterpret_cast<float*>(row), c, s, half);
        continue;
      }
#endif
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load_f(row, i), x2 = load_f(row, half + i);
        // two roundings per product, then the sum (the reference's order; no contraction)
        const volatile float a = x1 * c[i], b = x2 * s[i], a2 = x2 * c[i], b2 = x1 * s[i];
        store_f(row, i, a - b);
        store_f(row, half + i, a2 + b2);
      }
    }
  });
}

void rotary_one(const at::Tensor& x, const char* name, const int64_t* pos, const at::Tensor& cs) {
  TORCH_CHECK(x.device().is_cpu(), "rotary_embedding: ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                   "rotary_embedding: ", name, " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) == cs.size(1) && x.size(2) % 2 == 0 &&
                    x.stride(2) == 1,
                    "rotary_embedding: ", name, " must be [T, heads, D] with D = ", cs.size(1),
                    " (even) and a contiguous last dim, got shape ", x.sizes(), " strides ",
                    x.strides());
  const int64_t T_ = x.size(0), heads = x.size(1), D = x.size(2);
  if (x.scalar_type() == at::kFloat)
    rotate<float>(x.data_ptr<float>(), x.stride(0), x.stride(1), T_, heads, D, pos,
                  cs.data_ptr<float>());
  else
    rotate<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0), x.stride(1), T_, heads, D, pos,
                          cs.data_ptr<float>());
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return std::get<0>(norm_impl(x, c10::nullopt, w, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps) {
  return norm_impl(x, residual, w, eps);
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul", "x");
  const int64_t M = x.size(0), d = x.size(1) / 2;
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0, "silu_and_mul: x's last dim must be even, got ", x.size(1));
  at::Tensor out = at::empty({M, d}, x.options());
  if (x.scalar_type() == at::kFloat)
    silu_rows<float>(x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), M, d);
  else
    silu_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0),
                             out.data_ptr<c10::BFloat16>(), M, d);
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "argmax_rows: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "argmax_rows: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1,
                    "argmax_rows: x must be [M, V] with V >= 1 and contiguous rows, got shape ", x.sizes(),
                    " and strides ", x.strides());
  const int64_t M = x.size(0), V = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  for_rows(M, V, [&](int64_t m) {
#if FI_X86
    if (use_avx512()) {
      o[m] = argmax_avx512(p + m * ld, V);
      return;
    }
#endif
    o[m] = argmax_scalar(p + m * ld, V);
  });
  return out;
}

void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos_sin) {
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                   positions.is_contiguous() && positions.device().is_cpu(),
                   "rotary_embedding: positions must be a contiguous int64 [T] CPU tensor");
  TORCH_CHECK_TYPE(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 &&
                   cos_sin.is_contiguous() && cos_sin.device().is_cpu(),
                   "rotary_embedding: cos_sin must be a contiguous float32 [max_pos, D] CPU tensor");
  TORCH_CHECK_VALUE(q.size(0) == positions.size(0) && k.size(0) == positions.size(0),
                    "rotary_embedding: q and k must have one row per position (", positions.size(0),
                    "), got ", q.size(0), " and ", k.size(0));
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t)
    TORCH_CHECK_VALUE(pos[t] >= 0 && pos[t] < cos_sin.size(0), "rotary_embedding: positions[", t,
                      "] = ", pos[t], " is out of range [0, ", cos_sin.size(0), ")");
  rotary_one(q, "q", pos, cos_sin);
  rotary_one(k, "k", pos, cos_sin);
}

}  // namespace fastinfer_cpu

TORCH_LIBRARY_FRAGMENT(fastinfer_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &fastinfer_cpu::rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &fastinfer_cpu::add_rms_norm);
  m.def("silu_and_mul(Tensor x) -> Tensor", &fastinfer_cpu::silu_and_mul);
  m.def("argmax_rows(Tensor x) -> Tensor", &fastinfer_cpu::argmax_rows);
  m.def("rotary_embedding_(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_sin) -> ()",
        &fastinfer_cpu::rotary_embedding_);
}
