// Run-time instruction-set dispatch shared by the CPU kernels of fastinfer._C_cpu.
//
// Kernels are compiled with portable flags; AVX2 / AVX-512 code paths carry per-function
// target attributes and are picked once per process from what the CPU supports, capped by a
// test hook (torch.ops.fastinfer_cpu.set_isa_cap) so tests can exercise every path.
#pragma once

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#define FI_X86 1
#else
#define FI_X86 0
#endif

#if FI_X86
// gcc 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_ps().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
// Per-function targets of the SIMD code paths (the files build with portable flags), one per
// Isa level below: each names the features detect_isa checks for its level.
#define FI_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FI_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define FI_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vnni,avx2,fma")))
#endif

namespace fastinfer_cpu {

// Where a kernel prefetches the weights it reads next: into L2, where the requests queue deeper
// than at L1. A decode step streams its weights from DRAM once: the default model's LM head
// (30 MB, cold) took 0.67 ms against 1.38 ms prefetched into L1, bf16 decode steps 1.2x faster
// (AMD EPYC, 2 threads); batched steps, whose weights serve many rows, measured the same either
// way.
inline void prefetch_weights(const void* p) {
  __builtin_prefetch(p, 0, 2);
}

// kAvx512Vnni adds AVX512-BW and VNNI (int8 dot products) to kAvx512; code that has no VNNI
// variant treats it as kAvx512 (compare with >=).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

inline Isa detect_isa() {
#if FI_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// Test hook: 0 = scalar, 1 = AVX2, 2 = AVX-512, 3 = AVX-512 VNNI; capped by what the CPU
// supports. One variable for the whole extension (C++17 inline variable), so the cap applies to
// every kernel.
inline int g_isa_cap = 3;

inline Isa current_isa() {
  static const Isa best = detect_isa();
  return static_cast<Isa>(std::min(static_cast<int>(best), g_isa_cap));
}

}  // namespace fastinfer_cpu
