// fastnin's own float GEMM for the CPU kernels' tile products, where the CPU has AVX-512.
//
// Why not MKL's sgemm there: on an AMD EPYC (Zen 4) MKL takes its generic Zen path
// (mkl_blas_def_sgemm_kernel_0_zen), 92-101 GF/s per core on the tile shapes, and repacks both
// operands on every call (~8% of CIFAR block 2's fwd+bwd in its copy routines, ~3% more zeroing
// C for beta = 0). An 8x48 AVX-512 register block reading the operands where they lie ran
// 111-115 GF/s on the same shapes (sgemm.cpp has the numbers).
#pragma once

#include <cstdint>

namespace fastnin::cpu {

// Whether fast_sgemm runs on this CPU and is wanted: AVX-512F (checked once) and
// FASTNIN_CPU_GEMM not "mkl" (read on each call, like FASTNIN_CPU_CONV, so that the tests can run
// both paths in one process).
bool fast_sgemm_enabled();

// Memory the caller's next product will read: up to kMax ranges, brought into L2 while this
// product runs (see sgemm.cpp for why). Empty ranges are skipped.
struct NextOperands {
  static constexpr int kMax = 3;
  const void* p[kMax] = {};
  int64_t bytes[kMax] = {};
  int n = 0;
  // Appends the range [q, q + nbytes) (beyond kMax ranges: ignored, a prefetch is only a hint).
  void add(const void* q, int64_t nbytes) {
    if (n < kMax) p[n] = q, bytes[n++] = nbytes;
  }
};

// C[M, N] = A B (+ C when accumulate), float32, single-threaded. A's element (i, k) is
// A[i * rsa + k * csa] (row-major A: rsa = lda, csa = 1; A^T of a row-major [K, M]: rsa = 1,
// csa = lda). B is row-major [K, N] with leading dimension ldb, C row-major with ldc. Without
// accumulate C is only written (NaN there does not leak in). Each C element sums its K products
// in order k = 0, 1, ..., so results do not depend on M, N or the thread. Only where
// fast_sgemm_enabled(). next (optional): what the caller multiplies next, prefetched into L2.
void fast_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                int64_t ldb, bool accumulate, float* C, int64_t ldc, const NextOperands* next = nullptr);

// dst[K, N] (row-major, leading dimension N) = the transpose of src, a row-major [N, K] with
// leading dimension lds: packs op(B) = B^T for fast_sgemm.
void transpose_pack(int64_t N, int64_t K, const float* src, int64_t lds, float* dst);

}  // namespace fastnin::cpu
