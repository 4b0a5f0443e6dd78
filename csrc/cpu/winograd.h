// Winograd F(2x2, 3x3) for the first stage of the CPU mlpconv when its stride is 1.
//
// Why: on the CPU the KxK stage of NiN's wider blocks is compute-bound (5x5 96->192 on 16x16 maps:
// 460,800 multiply-adds per output pixel against 73,728 for the two 1x1 stages after it), and a
// GEMM tile cannot beat oneDNN's direct convolution at the same multiply count (MKL sgemm ran at
// 135-175 GF/s per core here, oneDNN ~190). Winograd's minimal filtering cuts the multiplies:
// F(2x2, 3x3) computes a 2x2 output tile of a 3x3 filter with 16 instead of 36.
//
// Kernels other than 3x3 are split into 3x3 sub-kernels placed at even offsets (0, 2, 4, ...): per
// dimension of size r, ns = max(1, r / 2) sub-kernels, sub-kernel a taking kernel taps 2a and 2a+1,
// and 2a+2 too when it is the last one (a tap it does not take is zero in it). The sub-kernel at
// offset (2a, 2b) sees the input tile of output tile (ty + a, tx + b): at an even offset its
// transformed input is that of another tile already transformed. So the whole stage is, per
// transform point e in 4x4:
//     M_e[tiles, K1] = A_e[tiles, n_e*Cin] U_e[n_e*Cin, K1]
// with A_e the transformed input tiles of the shifted tiles side by side and U_e the transformed
// sub-kernels: one GEMM per point, 16 in all. A sub-kernel without a third tap is zero on the
// points of row or column 3 of its transform (G's last row is [0 0 1]), so point e takes only the
// n_e <= ns_h*ns_w sub-kernels that are not. A 5x5 kernel costs 9*4 + 6*2 + 1 = 49 multiplies per
// 2x2 output tile against 100 direct (2.04x fewer; 64 with the zero blocks), a 3x3 16 against 36
// (2.25x fewer).
//
// Why F(2x2, 3x3) and not the larger tiles with fewer multiplies (F(4x4, 3x3), F(2x2, 5x5)): their
// transforms have entries 2, 4, 1/6, 1/24..., which cost accuracy. Measured in float32 against
// float64 on the CIFAR NiN's 5x5 96->192 layer (ReLU'd randn input, He-scaled weights): F(2x2, 5x5)
// 5e-6 of max|y| (torch's own direct convolution 3.8e-7), F(4x4, 3x3) 8e-6 on the 3x3 192->192
// layer (torch 2.4e-7); the split F(2x2, 3x3) 3.6e-7 and 5.1e-7. F(2x2, 3x3)'s transforms hold only
// 0, +-1 and 1/2, so the input and output transforms round only in their additions, and the
// filter transform is done in double. This keeps the kernel within the tests' tolerance rule
// (2x torch's error against float64, plus one ulp).
//
// The backward is the exact adjoint of the same linear maps: with dM_e the adjoint output
// transform of the pre-activation gradient, dU_e += A_e^T dM_e (the weight gradient in the
// transformed domain, mapped back by G^T dU G in double at the end) and dA_e = dM_e U_e^T, whose
// adjoint input transform is scattered into grad_x. So the backward's multiplies shrink by the
// same factor as the forward's.
//
// Work items are runs of output pixels [q0, q1) (Tiling in mlpconv.cpp) that hold whole images or
// bands of an even number of output rows of one image, so that they hold whole 2x2 tiles. Layouts:
// x and grad_x NHWC; M, dM [16][Tmax][K1]; A, dA point after point, [Tmax][n_e*Cin] each; U, dU
// point after point, [n_e*Cin][K1] each, row pos_e(a, b) * Cin + c for sub-kernel (a, b).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/attributes.h"
#include "cpu/gemm.h"
#include "cpu/sgemm.h"
#include "cpu/vec.h"

namespace fastnin::cpu {

// The split of one kernel dimension of size r (see above).
inline int64_t wino_subkernels(int64_t r) { return std::max<int64_t>(1, r / 2); }
// Whether tap p (0..2) of sub-kernel a is kernel tap 2a + p.
inline bool wino_tap(int64_t r, int64_t ns, int64_t a, int64_t p) {
  return 2 * a + p < r && (p < 2 || a == ns - 1);
}

// ---------------------------------------------------------------------------------------------
// The transforms of one tile, vectorized over the channel axis (NHWC rows). Point e = 4 * xi + nu.
//   input    V = B^T d B    B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   output   Y = A^T M A    A^T = [1 1 1 0; 0 1 -1 -1]
//   filter   U = G g G^T    G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
// ---------------------------------------------------------------------------------------------

// Each transform runs over the channels in blocks of L lanes held in small local arrays: written
// as one loop over c with 16 input and 16 output streams, GCC kept it scalar (measured: the input
// transform took more time than the GEMMs on 32x192x8x8); fixed-length inner loops vectorize.

// V[16 q + e][c + l] for each destination q < nv, point e and lane l < L (a null V[16 q + e]: point
// e is not wanted there), from the 4x4 patch whose pixel (i, j) has its channels at d[4i + j] (a
// row of x, or zeros outside the image). Reading x through row pointers spares a copy of each
// patch (each input pixel is in 4 patches); writing the tile's transform to all its destinations
// (the split kernels' shifted copies) spares copying it there.
template <typename T, int L>
FASTNIN_INLINE void wino_input_block(const T* const* __restrict d, int64_t c, T* const* __restrict V, int nv) {
  T t[4][4][L];
  for (int j = 0; j < 4; ++j) {  // B^T d, column j
    const T* d0 = d[0 + j] + c;
    const T* d1 = d[4 + j] + c;
    const T* d2 = d[8 + j] + c;
    const T* d3 = d[12 + j] + c;
    for (int l = 0; l < L; ++l) {
      t[0][j][l] = d0[l] - d2[l];
      t[1][j][l] = d1[l] + d2[l];
      t[2][j][l] = d2[l] - d1[l];
      t[3][j][l] = d1[l] - d3[l];
    }
  }
  T v[16][L];
  for (int i = 0; i < 4; ++i) {  // (B^T d) B, row i
    for (int l = 0; l < L; ++l) {
      v[4 * i + 0][l] = t[i][0][l] - t[i][2][l];
      v[4 * i + 1][l] = t[i][1][l] + t[i][2][l];
      v[4 * i + 2][l] = t[i][2][l] - t[i][1][l];
      v[4 * i + 3][l] = t[i][1][l] - t[i][3][l];
    }
  }
  for (int q = 0; q < nv; ++q) {
    for (int e = 0; e < 16; ++e) {
      T* __restrict out = V[16 * q + e];
      if (out == nullptr) continue;
      for (int l = 0; l < L; ++l) out[c + l] = v[e][l];
    }
  }
}

// The adjoint: dd[(4i + j) * C + c] = (B dV B^T)[i][j] from dV[e * ldv + c].
template <typename T, int L>
FASTNIN_INLINE void wino_input_adjoint_block(const T* __restrict dV, int64_t ldv, int64_t C, T* __restrict dd) {
  T r[4][4][L];
  for (int nu = 0; nu < 4; ++nu) {  // B dV, column nu
    const T* v0 = dV + (0 + nu) * ldv;
    const T* v1 = dV + (4 + nu) * ldv;
    const T* v2 = dV + (8 + nu) * ldv;
    const T* v3 = dV + (12 + nu) * ldv;
    for (int l = 0; l < L; ++l) {
      r[0][nu][l] = v0[l];
      r[1][nu][l] = v1[l] - v2[l] + v3[l];
      r[2][nu][l] = v1[l] + v2[l] - v0[l];
      r[3][nu][l] = -v3[l];
    }
  }
  for (int i = 0; i < 4; ++i) {  // (B dV) B^T, row i
    for (int l = 0; l < L; ++l) {
      dd[(4 * i + 0) * C + l] = r[i][0][l];
      dd[(4 * i + 1) * C + l] = r[i][1][l] - r[i][2][l] + r[i][3][l];
      dd[(4 * i + 2) * C + l] = r[i][1][l] + r[i][2][l] - r[i][0][l];
      dd[(4 * i + 3) * C + l] = -r[i][3][l];
    }
  }
}

// y[i][j][k] (2x2, rows y00 y01 y10 y11) = (A^T M A)[i][j] from M[e * ldm + k].
template <typename T, int L>
FASTNIN_INLINE void wino_output_block(const T* __restrict M, int64_t ldm, T* __restrict y00, T* __restrict y01,
                                      T* __restrict y10, T* __restrict y11) {
  T t[2][4][L];
  for (int nu = 0; nu < 4; ++nu) {
    const T* m0 = M + (0 + nu) * ldm;
    const T* m1 = M + (4 + nu) * ldm;
    const T* m2 = M + (8 + nu) * ldm;
    const T* m3 = M + (12 + nu) * ldm;
    for (int l = 0; l < L; ++l) {
      t[0][nu][l] = m0[l] + m1[l] + m2[l];
      t[1][nu][l] = m1[l] - m2[l] - m3[l];
    }
  }
  for (int l = 0; l < L; ++l) {
    y00[l] = t[0][0][l] + t[0][1][l] + t[0][2][l];
    y01[l] = t[0][1][l] - t[0][2][l] - t[0][3][l];
    y10[l] = t[1][0][l] + t[1][1][l] + t[1][2][l];
    y11[l] = t[1][1][l] - t[1][2][l] - t[1][3][l];
  }
}

// The adjoint: dM[e * ldm + k] = (A dY A^T)[xi][nu] from the 2x2 gradients (rows past the map's
// edge point at zeros).
template <typename T, int L>
FASTNIN_INLINE void wino_output_adjoint_block(const T* __restrict g00, const T* __restrict g01,
                                              const T* __restrict g10, const T* __restrict g11, T* __restrict dM,
                                              int64_t ldm) {
  T s[4][2][L];
  for (int l = 0; l < L; ++l) {  // A dY
    s[0][0][l] = g00[l];
    s[0][1][l] = g01[l];
    s[1][0][l] = g00[l] + g10[l];
    s[1][1][l] = g01[l] + g11[l];
    s[2][0][l] = g00[l] - g10[l];
    s[2][1][l] = g01[l] - g11[l];
    s[3][0][l] = -g10[l];
    s[3][1][l] = -g11[l];
  }
  for (int xi = 0; xi < 4; ++xi) {  // (A dY) A^T, row xi
    for (int l = 0; l < L; ++l) {
      dM[(4 * xi + 0) * ldm + l] = s[xi][0][l];
      dM[(4 * xi + 1) * ldm + l] = s[xi][0][l] + s[xi][1][l];
      dM[(4 * xi + 2) * ldm + l] = s[xi][0][l] - s[xi][1][l];
      dM[(4 * xi + 3) * ldm + l] = -s[xi][1][l];
    }
  }
}

// Lanes per block: one AVX-512 register of the type.
template <typename T>
constexpr int wino_lanes = 64 / sizeof(T);

template <typename T>
FASTNIN_INLINE void wino_input_impl(const T* const* d, int64_t C, T* const* V, int nv) {
  constexpr int L = wino_lanes<T>;
  int64_t c = 0;
  for (; c + L <= C; c += L) wino_input_block<T, L>(d, c, V, nv);
  for (; c < C; ++c) wino_input_block<T, 1>(d, c, V, nv);
}
template <typename T>
FASTNIN_INLINE void wino_input_adjoint_impl(const T* dV, int64_t ldv, int64_t C, T* dd) {
  constexpr int L = wino_lanes<T>;
  int64_t c = 0;
  for (; c + L <= C; c += L) wino_input_adjoint_block<T, L>(dV + c, ldv, C, dd + c);
  for (; c < C; ++c) wino_input_adjoint_block<T, 1>(dV + c, ldv, C, dd + c);
}
template <typename T>
FASTNIN_INLINE void wino_output_impl(const T* M, int64_t ldm, int64_t K, T* y00, T* y01, T* y10, T* y11) {
  constexpr int L = wino_lanes<T>;
  int64_t k = 0;
  for (; k + L <= K; k += L) wino_output_block<T, L>(M + k, ldm, y00 + k, y01 + k, y10 + k, y11 + k);
  for (; k < K; ++k) wino_output_block<T, 1>(M + k, ldm, y00 + k, y01 + k, y10 + k, y11 + k);
}
template <typename T>
FASTNIN_INLINE void wino_output_adjoint_impl(const T* g00, const T* g01, const T* g10, const T* g11, int64_t K, T* dM,
                                             int64_t ldm) {
  constexpr int L = wino_lanes<T>;
  int64_t k = 0;
  for (; k + L <= K; k += L) wino_output_adjoint_block<T, L>(g00 + k, g01 + k, g10 + k, g11 + k, dM + k, ldm);
  for (; k < K; ++k) wino_output_adjoint_block<T, 1>(g00 + k, g01 + k, g10 + k, g11 + k, dM + k, ldm);
}

template <typename T>
inline void wino_input(const T* const* d, int64_t C, T* const* V, int nv) {
  wino_input_impl(d, C, V, nv);
}
template <typename T>
inline void wino_input_adjoint(const T* dV, int64_t ldv, int64_t C, T* dd) {
  wino_input_adjoint_impl(dV, ldv, C, dd);
}
template <typename T>
inline void wino_output(const T* M, int64_t ldm, int64_t K, T* y00, T* y01, T* y10, T* y11) {
  wino_output_impl(M, ldm, K, y00, y01, y10, y11);
}
template <typename T>
inline void wino_output_adjoint(const T* g00, const T* g01, const T* g10, const T* g11, int64_t K, T* dM,
                                int64_t ldm) {
  wino_output_adjoint_impl(g00, g01, g10, g11, K, dM, ldm);
}
template <>
FASTNIN_CLONES inline void wino_input<float>(const float* const* d, int64_t C, float* const* V, int nv) {
  wino_input_impl(d, C, V, nv);
}
template <>
FASTNIN_CLONES inline void wino_input_adjoint<float>(const float* dV, int64_t ldv, int64_t C, float* dd) {
  wino_input_adjoint_impl(dV, ldv, C, dd);
}
template <>
FASTNIN_CLONES inline void wino_output<float>(const float* M, int64_t ldm, int64_t K, float* y00, float* y01,
                                              float* y10, float* y11) {
  wino_output_impl(M, ldm, K, y00, y01, y10, y11);
}
template <>
FASTNIN_CLONES inline void wino_output_adjoint<float>(const float* g00, const float* g01, const float* g10,
                                                      const float* g11, int64_t K, float* dM, int64_t ldm) {
  wino_output_adjoint_impl(g00, g01, g10, g11, K, dM, ldm);
}

// The filter transform of one row of U: u[e][k] = (G g G^T)[xi][nu] (e = 4 xi + nu) for
// k < K1, from the rows g[p][q][k] of the 3x3 taps (contiguous along k, a row of zeros for a tap
// outside the kernel: see stage_taps), in double, rounded once to T.
template <typename T>
FASTNIN_INLINE void wino_filter_row_impl(const T* const (&g)[3][3], int64_t K1, T* const (&u)[16]) {
  constexpr int L = 8;
  auto block = [&](int64_t k, auto lanes) FASTNIN_LAMBDA_INLINE {
    constexpr int n = decltype(lanes)::value;
    double t[4][3][n];  // G g
    for (int q = 0; q < 3; ++q) {
      for (int l = 0; l < n; ++l) {
        const double g0 = g[0][q][k + l], g1 = g[1][q][k + l], g2 = g[2][q][k + l];
        t[0][q][l] = g0;
        t[1][q][l] = 0.5 * (g0 + g1 + g2);
        t[2][q][l] = 0.5 * (g0 - g1 + g2);
        t[3][q][l] = g2;
      }
    }
    // (G g) G^T. One loop per destination row: with the four stores in one loop GCC could not
    // rule out that the rows overlap and kept the loop scalar. (They may: the points a sub-kernel
    // does not take all go to one sink row, so no __restrict; each loop stores to one row and
    // reads only t, which vectorizes as it is.)
    for (int xi = 0; xi < 4; ++xi) {
      T* u0 = u[4 * xi + 0] + k;
      T* u1 = u[4 * xi + 1] + k;
      T* u2 = u[4 * xi + 2] + k;
      T* u3 = u[4 * xi + 3] + k;
      for (int l = 0; l < n; ++l) u0[l] = static_cast<T>(t[xi][0][l]);
      for (int l = 0; l < n; ++l) u1[l] = static_cast<T>(0.5 * (t[xi][0][l] + t[xi][1][l] + t[xi][2][l]));
      for (int l = 0; l < n; ++l) u2[l] = static_cast<T>(0.5 * (t[xi][0][l] - t[xi][1][l] + t[xi][2][l]));
      for (int l = 0; l < n; ++l) u3[l] = static_cast<T>(t[xi][2][l]);
    }
  };
  int64_t k = 0;
  for (; k + L <= K1; k += L) block(k, std::integral_constant<int, L>{});
  for (; k < K1; ++k) block(k, std::integral_constant<int, 1>{});
}
template <typename T>
inline void wino_filter_row(const T* const (&g)[3][3], int64_t K1, T* const (&u)[16]) {
  wino_filter_row_impl(g, K1, u);
}
template <>
FASTNIN_CLONES inline void wino_filter_row<float>(const float* const (&g)[3][3], int64_t K1, float* const (&u)[16]) {
  wino_filter_row_impl(g, K1, u);
}

// The adjoint of wino_filter_row: dst[p][q][k] = (G^T dU G)[p][q] for k < K1, from the 16 rows
// du[e][k], in double, rounded once to T.
template <typename T>
FASTNIN_INLINE void wino_filter_grad_row_impl(const T* const (&du)[16], int64_t K1, T* const (&dst)[3][3]) {
  constexpr int L = 8;
  auto block = [&](int64_t k, auto lanes) FASTNIN_LAMBDA_INLINE {
    constexpr int n = decltype(lanes)::value;
    double sm[3][4][n];  // G^T dU
    for (int nu = 0; nu < 4; ++nu) {
      for (int l = 0; l < n; ++l) {
        const double d0 = du[0 + nu][k + l], d1 = du[4 + nu][k + l], d2 = du[8 + nu][k + l],
                     d3 = du[12 + nu][k + l];
        sm[0][nu][l] = d0 + 0.5 * (d1 + d2);
        sm[1][nu][l] = 0.5 * (d1 - d2);
        sm[2][nu][l] = 0.5 * (d1 + d2) + d3;
      }
    }
    for (int p = 0; p < 3; ++p) {  // (G^T dU) G, one loop per destination row (as above)
      T* d0 = dst[p][0] + k;
      T* d1 = dst[p][1] + k;
      T* d2 = dst[p][2] + k;
      for (int l = 0; l < n; ++l) d0[l] = static_cast<T>(sm[p][0][l] + 0.5 * (sm[p][1][l] + sm[p][2][l]));
      for (int l = 0; l < n; ++l) d1[l] = static_cast<T>(0.5 * (sm[p][1][l] - sm[p][2][l]));
      for (int l = 0; l < n; ++l) d2[l] = static_cast<T>(0.5 * (sm[p][1][l] + sm[p][2][l]) + sm[p][3][l]);
    }
  };
  int64_t k = 0;
  for (; k + L <= K1; k += L) block(k, std::integral_constant<int, L>{});
  for (; k < K1; ++k) block(k, std::integral_constant<int, 1>{});
}
template <typename T>
inline void wino_filter_grad_row(const T* const (&du)[16], int64_t K1, T* const (&dst)[3][3]) {
  wino_filter_grad_row_impl(du, K1, dst);
}
template <>
FASTNIN_CLONES inline void wino_filter_grad_row<float>(const float* const (&du)[16], int64_t K1,
                                                      float* const (&dst)[3][3]) {
  wino_filter_grad_row_impl(du, K1, dst);
}

// The weight <-> tap-row transposes around the filter transforms: loc[t * K1 + k] = w[k * sk +
// off[t]] for taps t < nt (and back). The transforms run along k, the weight's slowest axis, so a
// block of input channels is staged first as rows contiguous along k, instead of reading the
// weight in place through its strides (one element per output channel, 9.6 KB apart for 5x5
// 96 -> 192). The forward pays the filter transform on every training step (the weights change).
// Measured on CIFAR block 2's layer (5x5 96 -> 192) on one 16x16 image, forced Winograd, 2
// threads, medians: forward with a weight changed before each call 1.93-2.27 -> 1.21-1.23 ms
// (0.63-0.69 ms with a fixed weight), forward + backward 5.31-5.45 -> 3.82-3.86 ms; this and
// vectorizing the rows' stores (wino_filter_row) together. Blocks of 16 output channels: 16
// weight rows are read at a time, each row's run of taps consumed in order.
template <typename T>
void stage_taps(const T* w, int64_t sk, const int64_t* off, int64_t nt, int64_t K1, T* loc) {
  constexpr int64_t B = 16;
  for (int64_t k0 = 0; k0 < K1; k0 += B) {
    const int64_t nb = std::min(B, K1 - k0);
    for (int64_t t = 0; t < nt; ++t) {
      const T* src = w + k0 * sk + off[t];
      T* dst = loc + t * K1 + k0;
      for (int64_t l = 0; l < nb; ++l) dst[l] = src[l * sk];
    }
  }
}
template <typename T>
void unstage_taps(const T* loc, int64_t nt, int64_t K1, T* w, int64_t sk, const int64_t* off) {
  constexpr int64_t B = 16;
  for (int64_t k0 = 0; k0 < K1; k0 += B) {
    const int64_t nb = std::min(B, K1 - k0);
    for (int64_t t = 0; t < nt; ++t) {
      const T* src = loc + t * K1 + k0;
      T* dst = w + k0 * sk + off[t];
      for (int64_t l = 0; l < nb; ++l) dst[l * sk] = src[l];
    }
  }
}

// Per-thread buffers.
template <typename T>
struct WinoWork {
  std::vector<T> A, V, M, dA, d, zero, czero;
  std::vector<T*> dst;
};

// Weight-sized scratch (n elements): in `keep`, a buffer a thread keeps from call to call, when
// it is at most kKeepBytes (then the next call skips the allocation and its page faults); in
// `own`, freed by its owner, when larger, so that a huge layer leaves no huge buffer behind.
constexpr int64_t kKeepBytes = int64_t(32) << 20;
template <typename T>
inline T* kept_or_own(std::vector<T>& keep, std::vector<T>& own, int64_t n) {
  return n * static_cast<int64_t>(sizeof(T)) <= kKeepBytes ? buf(keep, n) : buf(own, n);
}

// Transformed weights a thread keeps from call to call, most recently used first, each with the
// weight's elements it came from (in memory order) and what they mean (kh, kw, Cin, K1, strides):
// a call whose weight matches an entry byte for byte reuses its U instead of transforming again.
// That is the backward after its forward (every training step) and every inference call with
// fixed weights. The comparison is of the values themselves, not of a pointer or a version
// counter: a weight changed in place through .data keeps both. At most kKeepBytes in all; the
// least recently used entries go first, their storage reused (no page faults for a fresh buffer).
template <typename T>
struct UCacheEntry {
  std::vector<int64_t> key;
  std::vector<T> w, U;
  int64_t bytes() const { return static_cast<int64_t>((w.capacity() + U.capacity()) * sizeof(T)); }
};
template <typename T>
std::list<UCacheEntry<T>>& u_cache() {
  static thread_local std::list<UCacheEntry<T>> cache;
  return cache;
}

// ---------------------------------------------------------------------------------------------
// The first stage of one mlpconv call (stride 1), for a given weight.
// ---------------------------------------------------------------------------------------------
template <typename T>
class Winograd {
 public:
  // w0: [K1, Cin, kh, kw]; tmax: the most 2x2 tiles a work item holds.
  Winograd(const MlpconvShape& s, const at::Tensor& w0, int64_t tmax)
      : s_(s), K1_(s.C[0]), C_(s.Cin), tmax_(tmax) {
    nsh_ = wino_subkernels(s.kh);
    nsw_ = wino_subkernels(s.kw);
    nb_ = nsh_ * nsw_;
    tw_ = (s.Wo + 1) / 2;
    gw_ = tw_ + nsw_ - 1;
    // Point e's GEMM takes only the sub-kernels whose transform is not identically zero there: a
    // sub-kernel without a third tap (g2 = 0) has U = 0 on the points whose row or column is 3
    // (G's last row is [0 0 1]), and that point's weight gradient flows only to the missing tap.
    // For 5x5 that leaves 49 of the 64 blocks (2.04x fewer multiplies than direct, not 1.56x).
    auto active = [](int64_t r, int64_t ns, int64_t a, int64_t p) { return p < 3 || wino_tap(r, ns, a, 2); };
    pos_.assign(16 * nb_, -1);
    direct_ = nb_ == 1;
    for (int e = 0; e < 16; ++e) {
      int64_t n = 0;
      for (int64_t a = 0; a < nsh_; ++a) {
        for (int64_t b = 0; b < nsw_; ++b) {
          if (active(s.kh, nsh_, a, e / 4) && active(s.kw, nsw_, b, e % 4)) pos_[e * nb_ + a * nsw_ + b] = n++;
        }
      }
      koff_[e + 1] = koff_[e] + n * C_;
      direct_ = direct_ && n == 1;
    }
    Kw_ = koff_[16];
    // U_e[pos_e(a, b) * Cin + c][k] = (G g_ab G^T)[xi][nu], in double, then rounded once. The
    // loops run along k over a block of input channels at a time, staged from the weight's own
    // strides (any layout) as rows contiguous along k (stage_taps). A whole permuted copy first
    // ([kh][kw][Cin][K1]) went through TensorIterator's transposing copy at ~1 ns per element,
    // 0.2-0.6 ms a call on NiN's blocks; reading the weight in place along k, 1.4 ms on block 2.
    const at::Tensor w = w0.to(c10::CppTypeToScalarType<T>::value);
    const T* wp = w.data_ptr<T>();
    const int64_t sk = w.stride(0), sc = w.stride(1), sy = w.stride(2), sx = w.stride(3);
    // U lives in the thread's cache (u_cache) when it and the weight fit in kKeepBytes and the
    // weight is dense, else in a buffer this object owns. A fresh 2-5 MB buffer per call cost
    // ~1150 page faults (CIFAR block 3 backward 10.4-10.8 -> 9.9-10.2 ms). One Winograd object per
    // thread at a time (one per mlpconv call): the next one may reuse the storage.
    T* up = nullptr;
    bool hit = false;
    const int64_t wn = w.numel();
    if (w.is_non_overlapping_and_dense() && (wn + Kw_ * K1_) * static_cast<int64_t>(sizeof(T)) <= kKeepBytes) {
      up = cached(std::vector<int64_t>{s.kh, s.kw, C_, K1_, sk, sc, sy, sx}, wp, wn, hit);
    } else {
      up = buf(u_own_, Kw_ * K1_);
    }
    U_ = up;
    if (hit) return;  // already transformed
    const int64_t K1 = K1_;
    over_channel_blocks(sc, sy, sx, [&](int64_t c0, int64_t nc, T* loc, T* zero, T* sink, const int64_t* off) {
      stage_taps(wp, sk, off, nc * s.kh * s.kw, K1, loc);
      for (int64_t cl = 0; cl < nc; ++cl) {
        for (int64_t ab = 0; ab < nb_; ++ab) {
          const T* g[3][3];
          tap_rows<const T*>(loc, cl, ab, zero, g);
          T* u[16];
          for (int e = 0; e < 16; ++e) {
            const int64_t p = pos_[e * nb_ + ab];
            u[e] = p < 0 ? sink : up + (koff_[e] + p * C_ + c0 + cl) * K1;
          }
          wino_filter_row<T>(g, K1, u);
        }
      }
    });
  }

  int64_t u_size() const { return Kw_ * K1_; }

  // Builds U_e^T ([K1][kw(e)] per point) for the input gradient's products dA_e = dM_e U_e^T,
  // where those are fastnin's own GEMM (sgemm.h): it reads its B operand in place, so without
  // this each work item would transpose all of U again. Once per backward call (~U's size).
  void prepare_transposed() {
    if constexpr (std::is_same_v<T, float>) {
      if (!fastnin::cpu::fast_sgemm_enabled()) return;
      // Kept by the calling thread from call to call, like the dU and weight-gradient stores: a
      // fresh 2.4-3.6 MB vector per backward (CIFAR blocks 3 and 2) cost its page faults and zeroing.
      static thread_local std::vector<T> ut_store;
      T* ut = kept_or_own(ut_store, ut_, Kw_ * K1_);
      at::parallel_for(0, 16, 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          transpose_pack(kw(static_cast<int>(e)), K1_, U_ + koff_[e] * K1_, K1_, ut + koff_[e] * K1_);
        }
      });
      UT_ = ut;
    }
  }

 private:
  // The U of the cache entry for (key, the wn elements at wp), hit = true; else of a new entry
  // (evicting as needed), to be filled, hit = false.
  T* cached(std::vector<int64_t> key, const T* wp, int64_t wn, bool& hit) {
    auto& cache = u_cache<T>();
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->key == key && static_cast<int64_t>(it->w.size()) == wn &&
          std::memcmp(it->w.data(), wp, wn * sizeof(T)) == 0) {
        cache.splice(cache.begin(), cache, it);
        hit = true;
        return cache.front().U.data();
      }
    }
    const int64_t need = (wn + Kw_ * K1_) * static_cast<int64_t>(sizeof(T));
    int64_t total = need;
    for (const auto& e : cache) total += e.bytes();
    UCacheEntry<T> entry;  // takes the storage of the last entry evicted
    while (!cache.empty() && total > kKeepBytes) {
      total -= cache.back().bytes();
      entry = std::move(cache.back());
      cache.pop_back();
    }
    entry.key = std::move(key);
    entry.w.assign(wp, wp + wn);
    entry.U.resize(Kw_ * K1_);
    cache.push_front(std::move(entry));
    return cache.front().U.data();
  }

 public:

  // wk.A = the transformed input tiles of pixels [q0, q1) (NHWC x).
  void transform_input(const T* x, int64_t q0, int64_t q1, WinoWork<T>& wk) const {
    T* A = buf(wk.A, tmax_ * Kw_);
    const T* zeros = wino_zeros(wk);
    std::vector<T*>& dst = wk.dst;
    dst.resize(16 * nb_);
    for_each_segment(q0, q1, [&](int64_t n, int64_t ty0, int64_t ty1, int64_t row0, int64_t) {
      for (int64_t gy = ty0; gy < ty1 + nsh_ - 1; ++gy) {
        for (int64_t gx = 0; gx < gw_; ++gx) {
          const T* d[16];
          patch_rows(x, n, gy, gx, zeros, d);
          // The grid tile is block (a, b) of the GEMM row of tile (gy - a, gx - b) (unsplit: the
          // grid tiles are the GEMM rows).
          int nv = 0;
          for (int64_t a = 0; a < nsh_; ++a) {
            const int64_t ty = gy - a;
            if (ty < ty0 || ty >= ty1) continue;
            for (int64_t b = 0; b < nsw_; ++b) {
              const int64_t tx = gx - b;
              if (tx < 0 || tx >= tw_) continue;
              const int64_t row = row0 + (ty - ty0) * tw_ + tx;
              for (int e = 0; e < 16; ++e) {
                const int64_t p = pos_[e * nb_ + a * nsw_ + b];
                dst[16 * nv + e] = p < 0 ? nullptr : A + tmax_ * koff_[e] + row * kw(e) + p * C_;
              }
              ++nv;
            }
          }
          if (nv > 0) wino_input(d, C_, dst.data(), nv);
        }
      }
    });
  }

  // z[rows, K1] = the stage's pre-activation (no bias) of pixels [q0, q1), from wk.A.
  void multiply_output(int64_t q0, int64_t q1, WinoWork<T>& wk, T* z) const {
    const int64_t nt = tiles(q0, q1);
    const T* A = wk.A.data();
    T* M = buf(wk.M, 16 * tmax_ * K1_);
    T* scratch = buf(wk.zero, 4 * K1_);  // outputs past the map's edge go here
    const T* U = U_;
    // Each product prefetches the next point's operands into L2 (sgemm.cpp, Prefetcher).
    for (int e = 0; e < 16; ++e) {  // a point no sub-kernel takes (K = 0) gets zeros
      NextOperands next;
      if (e + 1 < 16) {
        next.add(A + tmax_ * koff_[e + 1], a_bytes(e + 1, nt));
        next.add(U + koff_[e + 1] * K1_, w_bytes(e + 1));
      }
      gemm_rm<T>(false, false, nt, K1_, kw(e), A + tmax_ * koff_[e], kw(e), U + koff_[e] * K1_, K1_, T(0),
                 M + e * tmax_ * K1_, K1_, &next);
    }
    for_each_segment(q0, q1, [&](int64_t, int64_t ty0, int64_t ty1, int64_t row0, int64_t pix0) {
      for (int64_t ty = ty0; ty < ty1; ++ty) {
        for (int64_t tx = 0; tx < tw_; ++tx) {
          T* y[4];
          pixel_rows(z, pix0, ty0, ty, tx, K1_, scratch, y);
          wino_output(M + (row0 + (ty - ty0) * tw_ + tx) * K1_, tmax_ * K1_, K1_, y[0], y[1], y[2], y[3]);
        }
      }
    });
  }

  // The backward of pixels [q0, q1), after transform_input on them: g [rows, K1] is the gradient
  // of the pre-activation. dU (if not null) += A^T dM; gx (NHWC, if not null) += the input
  // gradient. Uses wk.M for dM.
  // dU_init: dU holds garbage to overwrite (the first item of a chunk) rather than a sum to add to.
  void backward(const T* g, int64_t q0, int64_t q1, WinoWork<T>& wk, T* dU, T* gx, bool dU_init = false) const {
    const int64_t nt = tiles(q0, q1);
    T* dM = buf(wk.M, 16 * tmax_ * K1_);
    // Pixels past the map's edge contribute zero gradients: 4 zero rows (read only).
    T* zeros = buf(wk.zero, 4 * K1_);
    std::fill_n(zeros, 4 * K1_, T(0));
    for_each_segment(q0, q1, [&](int64_t, int64_t ty0, int64_t ty1, int64_t row0, int64_t pix0) {
      for (int64_t ty = ty0; ty < ty1; ++ty) {
        for (int64_t tx = 0; tx < tw_; ++tx) {
          T* y[4];
          pixel_rows(const_cast<T*>(g), pix0, ty0, ty, tx, K1_, zeros, y);
          wino_output_adjoint<T>(y[0], y[1], y[2], y[3], K1_, dM + (row0 + (ty - ty0) * tw_ + tx) * K1_,
                                 tmax_ * K1_);
        }
      }
    });
    const T* A = wk.A.data();
    const T* U = U_;
    // Tried on CIFAR block 2 (2 threads, builds alternated, not kept): the dU and dA products
    // interleaved point by point, so that dM_e is still in L2 for its second use (fwd+bwd medians
    // 72.4 / 72.1 / 70.7 vs 70.5 / 71.2 / 72.4 ms); each group of 16 products as one MKL
    // cblas_sgemm_batch call (backward 52.1 / 49.5 / 47.7 vs 50.3 / 47.9 / 45.4 ms).
    // Each product prefetches the next one's operands into L2 (sgemm.cpp, Prefetcher): the next
    // point's, and after the last dU product the first dA product's.
    const int64_t dm_bytes = nt * K1_ * static_cast<int64_t>(sizeof(T));  // dM_e's rows
    // The operands of point e's dA product: dM_e and U_e^T.
    const auto dA_operands = [&](int e) {
      NextOperands n;
      if (gx != nullptr && UT_ != nullptr) {
        n.add(dM + e * tmax_ * K1_, dm_bytes);
        n.add(UT_ + koff_[e] * K1_, w_bytes(e));
      }
      return n;
    };
    if (dU != nullptr) {
      for (int e = 0; e < 16; ++e) {
        NextOperands next;
        if (e + 1 < 16) {
          next.add(A + tmax_ * koff_[e + 1], a_bytes(e + 1, nt));
          next.add(dM + (e + 1) * tmax_ * K1_, dm_bytes);
          next.add(dU + koff_[e + 1] * K1_, w_bytes(e + 1));
        } else {
          next = dA_operands(0);
        }
        gemm_rm<T>(true, false, kw(e), K1_, nt, A + tmax_ * koff_[e], kw(e), dM + e * tmax_ * K1_, K1_,
                   dU_init ? T(0) : T(1), dU + koff_[e] * K1_, K1_, &next);
      }
    }
    if (gx == nullptr) return;
    T* dA = buf(wk.dA, tmax_ * Kw_);
    for (int e = 0; e < 16; ++e) {
      if (UT_ != nullptr) {
        const NextOperands next = e + 1 < 16 ? dA_operands(e + 1) : NextOperands();
        gemm_rm<T>(false, false, nt, kw(e), K1_, dM + e * tmax_ * K1_, K1_, UT_ + koff_[e] * K1_, kw(e), T(0),
                   dA + tmax_ * koff_[e], kw(e), &next);
      } else {
        gemm_rm<T>(false, true, nt, kw(e), K1_, dM + e * tmax_ * K1_, K1_, U + koff_[e] * K1_, K1_, T(0),
                   dA + tmax_ * koff_[e], kw(e));
      }
    }
    T* dd = buf(wk.d, 16 * C_);
    for_each_segment(q0, q1, [&](int64_t n, int64_t ty0, int64_t ty1, int64_t row0, int64_t) {
      const int64_t gy1 = ty1 + nsh_ - 1;
      // Direct: one block per point, dA is dV ([16][tmax][C]).
      const T* dV = dA + row0 * C_;
      int64_t ldv = tmax_ * C_;
      if (!direct_) {
        // dV of a grid tile = the sum of the dA blocks of the tiles whose shifted copies it is.
        ldv = (gy1 - ty0) * gw_ * C_;
        T* acc = buf(wk.V, 16 * ldv);
        std::fill_n(acc, 16 * ldv, T(0));
        for (int e = 0; e < 16; ++e) {
          for (int64_t ty = ty0; ty < ty1; ++ty) {
            for (int64_t tx = 0; tx < tw_; ++tx) {
              const T* src = dA + tmax_ * koff_[e] + (row0 + (ty - ty0) * tw_ + tx) * kw(e);
              for (int64_t a = 0; a < nsh_; ++a) {
                for (int64_t b = 0; b < nsw_; ++b) {
                  const int64_t p = pos_[e * nb_ + a * nsw_ + b];
                  if (p < 0) continue;
                  T* dst = acc + e * ldv + ((ty - ty0 + a) * gw_ + tx + b) * C_;
                  add_to<T>(dst, src + p * C_, C_);
                }
              }
            }
          }
        }
        dV = acc;
      }
      for (int64_t gy = ty0; gy < gy1; ++gy) {
        for (int64_t gx0 = 0; gx0 < gw_; ++gx0) {
          wino_input_adjoint(dV + ((gy - ty0) * gw_ + gx0) * C_, ldv, C_, dd);
          scatter_patch(dd, n, gy, gx0, gx);
        }
      }
    });
  }

  // The kernel gradient, from dU summed over all work items, into gw[k * sk + c * sc + y * sy +
  // x * sx] (any layout: the caller's grad_w itself where its dtype is T, so that no permuting
  // copy follows). Each sub-kernel gradient is G^T dU G (in double), and each kernel tap belongs
  // to exactly one sub-kernel, so the staged block is fully written before it goes out.
  void weight_grad(const T* dU, T* gw, int64_t sk, int64_t sc, int64_t sy, int64_t sx) const {
    const int64_t K1 = K1_;
    over_channel_blocks(sc, sy, sx, [&](int64_t c0, int64_t nc, T* loc, T* zero, T* sink, const int64_t* off) {
      for (int64_t cl = 0; cl < nc; ++cl) {
        for (int64_t ab = 0; ab < nb_; ++ab) {
          T* dst[3][3];
          tap_rows<T*>(loc, cl, ab, sink, dst);
          const T* du[16];
          for (int e = 0; e < 16; ++e) {
            const int64_t p = pos_[e * nb_ + ab];
            du[e] = p < 0 ? zero : dU + (koff_[e] + p * C_ + c0 + cl) * K1;
          }
          wino_filter_grad_row<T>(du, K1, dst);
        }
      }
      unstage_taps(loc, nc * s_.kh * s_.kw, K1, gw, sk, off);
    });
  }

 private:
  // fn(c0, nc, loc, zero, sink, off) for blocks of input channels [c0, c0 + nc), in parallel:
  // loc has room for the block's taps staged as rows of K1 (row (cl * kh + y) * kw + x, see
  // stage_taps), off[t] is row t's weight offset (strides sc, sy, sx), zero a row of K1 zeros
  // (read only) and sink a row to write away. ~128 KB of rows per block (L2-resident), and at
  // least one block per thread.
  template <typename F>
  void over_channel_blocks(int64_t sc, int64_t sy, int64_t sx, F&& fn) const {
    const int64_t taps = s_.kh * s_.kw, K1 = K1_;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t cb = std::max<int64_t>(1, (int64_t(128) << 10) / (taps * K1 * static_cast<int64_t>(sizeof(T))));
    cb = std::min(cb, std::max<int64_t>(1, (C_ + threads - 1) / threads));
    at::parallel_for(0, (C_ + cb - 1) / cb, 1, [&](int64_t bb, int64_t be) {
      std::vector<T> loc((cb * taps + 2) * K1, T(0));
      std::vector<int64_t> off(cb * taps);
      T* zero = loc.data() + cb * taps * K1;
      T* sink = zero + K1;
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t c0 = blk * cb, nc = std::min(cb, C_ - c0);
        for (int64_t cl = 0; cl < nc; ++cl) {
          for (int64_t y = 0; y < s_.kh; ++y) {
            for (int64_t x = 0; x < s_.kw; ++x) off[(cl * s_.kh + y) * s_.kw + x] = (c0 + cl) * sc + y * sy + x * sx;
          }
        }
        fn(c0, nc, loc.data(), zero, sink, off.data());
      }
    });
  }

  // rows[p][q]: the staged row (over_channel_blocks) of tap (p, q) of sub-kernel ab for channel cl
  // of the block, or `none` where the sub-kernel has no such tap.
  template <typename P>
  void tap_rows(T* loc, int64_t cl, int64_t ab, P none, P (&rows)[3][3]) const {
    const int64_t a = ab / nsw_, b = ab % nsw_;
    for (int p = 0; p < 3; ++p) {
      for (int q = 0; q < 3; ++q) {
        const bool tap = wino_tap(s_.kh, nsh_, a, p) && wino_tap(s_.kw, nsw_, b, q);
        rows[p][q] = tap ? loc + ((cl * s_.kh + 2 * a + p) * s_.kw + 2 * b + q) * K1_ : none;
      }
    }
  }

  // fn(n, ty0, ty1, row0, pix0) for each image n in [q0, q1): its output tile rows [ty0, ty1),
  // whose tiles are GEMM rows row0.. and whose pixels start at row pix0 of the item.
  template <typename F>
  void for_each_segment(int64_t q0, int64_t q1, F&& fn) const {
    const int64_t HW = s_.Ho * s_.Wo;
    int64_t row = 0;
    for (int64_t q = q0; q < q1;) {
      const int64_t n = q / HW, r0 = q % HW, r1 = std::min(HW, r0 + (q1 - q));
      const int64_t ty0 = r0 / s_.Wo / 2, ty1 = ((r1 + s_.Wo - 1) / s_.Wo + 1) / 2;
      fn(n, ty0, ty1, row, q - q0);
      row += (ty1 - ty0) * tw_;
      q += r1 - r0;
    }
  }

  int64_t tiles(int64_t q0, int64_t q1) const {
    int64_t nt = 0;
    for_each_segment(q0, q1, [&](int64_t, int64_t ty0, int64_t ty1, int64_t, int64_t) { nt += (ty1 - ty0) * tw_; });
    TORCH_INTERNAL_ASSERT(nt <= tmax_, "winograd: a work item holds ", nt, " tiles, more than ", tmax_);
    return nt;
  }

  // The rows of the 2x2 pixels of tile (ty, tx) in a [rows, K] buffer whose row pix0 is pixel
  // (2 ty0, 0); pixels past the map's edge get rows of `outside` (4 rows of K).
  void pixel_rows(T* base, int64_t pix0, int64_t ty0, int64_t ty, int64_t tx, int64_t K, T* outside,
                  T* y[4]) const {
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
        y[2 * i + j] = (oy < s_.Ho && ox < s_.Wo) ? base + (pix0 + (oy - 2 * ty0) * s_.Wo + ox) * K
                                                  : outside + (2 * i + j) * K;
      }
    }
  }

  // d[4i + j] = &x[n, 2 gy - ph + i, 2 gx - pw + j, 0], or `zeros` (C zeros) outside the image.
  void patch_rows(const T* x, int64_t n, int64_t gy, int64_t gx, const T* zeros, const T* d[16]) const {
    const int64_t iy0 = 2 * gy - s_.ph, ix0 = 2 * gx - s_.pw;
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t iy = iy0 + i;
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t ix = ix0 + j;
        d[4 * i + j] = (iy >= 0 && iy < s_.H && ix >= 0 && ix < s_.W) ? x + ((n * s_.H + iy) * s_.W + ix) * C_ : zeros;
      }
    }
  }

  // C_ zeros (read only).
  const T* wino_zeros(WinoWork<T>& wk) const {
    if (static_cast<int64_t>(wk.czero.size()) < C_) wk.czero.assign(C_, T(0));
    return wk.czero.data();
  }

  // gx[n, 2 gy - ph + i, 2 gx - pw + j, c] += dd[(4i + j) * C + c] inside the image.
  void scatter_patch(const T* dd, int64_t n, int64_t gy, int64_t gx0, T* gx) const {
    const int64_t iy0 = 2 * gy - s_.ph, ix0 = 2 * gx0 - s_.pw;
    const int64_t jlo = std::min<int64_t>(4, std::max<int64_t>(0, -ix0));
    const int64_t jhi = std::max(jlo, std::min<int64_t>(4, s_.W - ix0));
    if (jhi <= jlo) return;
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t iy = iy0 + i;
      if (iy < 0 || iy >= s_.H) continue;
      T* dst = gx + ((n * s_.H + iy) * s_.W + ix0 + jlo) * C_;
      const T* src = dd + (4 * i + jlo) * C_;
      add_to<T>(dst, src, (jhi - jlo) * C_);
    }
  }

  // Point e's GEMM depth: its blocks times Cin.
  int64_t kw(int e) const { return koff_[e + 1] - koff_[e]; }
  // Bytes of point e's first nt rows of A, and of a [kw(e), K1] block (U_e, U_e^T, dU_e).
  int64_t a_bytes(int e, int64_t nt) const { return nt * kw(e) * static_cast<int64_t>(sizeof(T)); }
  int64_t w_bytes(int e) const { return kw(e) * K1_ * static_cast<int64_t>(sizeof(T)); }

  MlpconvShape s_;
  int64_t K1_, C_, tmax_;
  int64_t nsh_ = 1, nsw_ = 1, nb_ = 1, tw_ = 0, gw_ = 0;
  // pos_[e * nb_ + a * nsw_ + b]: the block of sub-kernel (a, b) in point e's GEMM rows, -1 where
  // it takes no part there; koff_[e]: point e's first row in the [sum_e kw(e)] row space of A, U
  // (times tmax_ resp. K1_); Kw_ = koff_[16]. direct_: one block per point (unsplit kernel).
  std::vector<int64_t> pos_;
  int64_t koff_[17] = {0};
  int64_t Kw_ = 0;
  bool direct_ = true;
  const T* U_ = nullptr;  // [Kw][K1] (point e at row koff_[e]), in a thread_local store or u_own_
  std::vector<T> u_own_;
  const T* UT_ = nullptr;  // U_e^T [K1][kw(e)] at koff_[e] * K1 (prepare_transposed), or null
  std::vector<T> ut_;
};

}  // namespace fastnin::cpu
