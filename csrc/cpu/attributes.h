// Function attributes shared by the CPU kernels.
//
// FASTNIN_INLINE: the generic bodies of the per-tile loops, inlined into each ISA variant.
// FASTNIN_CLONES: a float leaf function compiled for AVX-512, AVX2 and the baseline ISA and picked
// at load time (GCC target_clones), since the build has no -march (the machine that builds and the
// one that runs may differ). Other compilers get the baseline only.
#pragma once

#define FASTNIN_INLINE inline __attribute__((always_inline))
// A lambda inside a FASTNIN_INLINE body: without it GCC may emit the lambda as its own function,
// compiled for the baseline ISA only, not for the clone that calls it (seen: the Winograd filter
// transforms' per-block lambdas, 22% of a forward with changing weights, in SSE2).
#define FASTNIN_LAMBDA_INLINE __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTNIN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTNIN_CLONES
#endif

namespace fastnin::cpu {
// Whether this CPU runs AVX-512F, for the kernels written with its intrinsics (sgemm.cpp, the GAP
// channels_last pass): checked once per process.
inline bool cpu_has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}
}  // namespace fastnin::cpu
