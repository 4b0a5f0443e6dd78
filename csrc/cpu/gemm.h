// Row-major GEMM for the CPU kernels: MKL's Fortran sgemm_/dgemm_ (exported by libtorch_cpu) called
// directly, at::mm where a torch build does not export them. Called single-threaded from inside
// at::parallel_for (MKL runs sequentially inside an OpenMP region).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/sgemm.h"

// Fortran BLAS, as exported by libtorch_cpu (MKL) on the usual torch builds. Weak: where a torch
// build does not export them, they are null and gemm_rm() falls back to at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastnin::cpu {

// ---------------------------------------------------------------------------------------------
// GEMM on row-major matrices: C[M, N] = op(A)[M, K] op(B)[K, N] + beta * C, with op(X) = X or X^T
// (ta / tb), leading dimensions in elements. beta is 0 (C is not read: garbage or NaN there does
// not leak in) or 1.
// ---------------------------------------------------------------------------------------------
template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = ta ? at::from_blob(const_cast<T*>(A), {M, K}, {1, lda}, opt)
              : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  auto b = tb ? at::from_blob(const_cast<T*>(B), {K, N}, {1, ldb}, opt)
              : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (beta == T(0)) {
    c.copy_(at::mm(a, b));
  } else {
    c.add_(at::mm(a, b));
  }
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc, const NextOperands* next = nullptr) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == T(0)) {
      for (int64_t i = 0; i < M; ++i) std::fill_n(C + i * ldc, N, T(0));
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    // sgemm.h: fastnin's own, where the CPU has AVX-512. It runs on the calling thread only: a call
    // outside a parallel region with threads to spare (the weight-heavy calls' one tile) is MKL's,
    // which threads it.
    if (fast_sgemm_enabled() && (at::in_parallel_region() || at::get_num_threads() == 1)) {
      const float* b = B;
      int64_t ld = ldb;
      if (tb) {  // op(B) = B^T packed [K, N] first (MKL packs every call too)
        static thread_local std::vector<float> packed;
        if (static_cast<int64_t>(packed.size()) < K * N) packed.resize(K * N);
        transpose_pack(N, K, B, ldb, packed.data());
        b = packed.data();
        ld = N;
      }
      fast_sgemm(M, N, K, A, ta ? 1 : lda, ta ? lda : 1, b, ld, beta != T(0), C, ldc, next);
      return;
    }
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1)),
            lc = static_cast<int>(std::max<int64_t>(ldc, 1));
  const T one = T(1);
#ifndef FASTNIN_MLPCONV_NO_BLAS  // (defined only to test the fallback)
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tra, &trb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tra, &trb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
#endif
  gemm_fallback<T>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace fastnin::cpu
