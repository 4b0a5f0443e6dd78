// CPU kernels of fastnin::lrn and fastnin::lrn_backward (torch.nn.functional.local_response_norm).
//
//   d_c  = k + alpha/size * sum_{j = c - lo}^{c + hi} x_j^2,   lo = size/2, hi = (size-1)/2,
//          channels outside [0, C) counting as zero;
//   y_c  = x_c * d_c^-beta;
//   gx_c = g_c d_c^-beta - (2 alpha beta / size) x_c * sum_{j = c - hi}^{c + lo} t_j,
//          t_j = g_j x_j d_j^(-beta-1)   (the j whose window holds c), d recomputed from x.
//
// Layouts. The input is made dense in the layout of the output (channels_last for a 4-D
// channels_last input, else contiguous; what torch gives), then seen either as
//   * planar: [N, C, S], S = product of the dims after C. A task is (image, block of B spatial
//     positions); it walks the channels in order, reading each row x[n, p, s0:s0+B] from memory
//     once, keeping the squares of the last `w` rows in a small ring (w = the clipped window
//     length; 16-bit rows are also kept converted, fp32 rows are re-read from L1 when emitted)
//     and emitting channel c = p - hi as soon as its window is complete. For a full window of 5
//     (LRN's usual size; fp32 accumulation) the new row's squares, the window sum, d^-beta and
//     y_c come out of one loop over the row, with no sum row stored and read back (16x96x55x55
//     fp32 forward, 2 threads, builds alternated 6 times: 4.47-5.06 -> 3.79-3.83 ms in 4 runs,
//     5.0 and 7.0 ms in two disturbed ones). The backward walks the same way with rings
//     for x, x^2, t and g d^-beta and emits channel c when its t window is complete. Every input
//     element is read from memory once and every output written once.
//   * pixel: [N*S, C] rows (channels_last, or S == 1): a task is a run of pixels; each pixel's C
//     channels are loaded once into a zero-padded buffer and the window sums are w shifted
//     vector adds along C (for a window of 5, inside the d^-beta loop: 16x96x55x55 fp32 forward
//     4.20-4.39 -> 3.76-3.84 ms, builds alternated 5 times).
// The window sums are exact sums of the window's squares, recomputed for every channel (w adds
// per element out of L1), not a running add/subtract: a running sum cancels catastrophically in
// fp32 when a large value leaves the window (x = 1e4 next to x = 1: the 1e8 subtracted leaves
// the small square with no correct digit), and the recomputation is cheap next to the memory
// traffic for the windows LRN is used with (size 3 to 9). Both layouts add the same squares in
// the same order, so their results are bitwise identical. Cost grows as min(size, 2C - 1) adds
// per element for very wide windows.
//
// Numerics. fp32 accumulation for fp32/fp16/bf16 (the squares and window sums in fp32), fp64 for
// fp64. d = k + alpha/size * sum is formed in double and d^-beta computed there, then rounded
// once to fp32, so y has about torch's own error (x / powf(d, beta)) without a scalar libm pow
// per element: for beta = 0.75 by Newton steps on y^4 d^3 = 1 (three in fp32, one in fp64), for
// any other beta by a vectorizable exp2(-beta * log2 d) (fp64 polynomials, ~1e-10 relative).
// Lanes where d is 0, negative, Inf, NaN or out of the polynomials' range take std::pow, so
// those come out as torch's pow gives them.
//
// Vectorization: the per-task loops are plain loops over float rows that GCC vectorizes, compiled
// three times (AVX-512, AVX2 + FMA, baseline: see cpu_isa()) since the build has no -march.
// FMAs are explicit and contraction is off, so all variants, and vector bodies and their scalar
// remainders, round alike: results are bitwise identical whichever variant runs and whichever
// layout the input has (tests/test_lrn.py checks both). ATen's at::vec::Vectorized<float> is not
// used: compiled in an extension without ATen's CPU_CAPABILITY flags it is the generic array
// implementation, whose pow/exp/log call the scalar libm function per lane.
//
// Measured (2-core Xeon, AVX-512, loaded machine, 1 thread, 16x96x55x55 fp32, size 5): forward
// 34 ms with contraction off and no FMA, 11.6 ms with explicit FMAs in the polynomials; the
// beta = 0.75 path is ~15% faster again than the polynomial one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/attributes.h"

// No FMA contraction in this file: the vectorized loops and their scalar remainders must round
// alike, so that a result does not depend on where an element falls in a row (and both layouts
// give bitwise-identical results).
#pragma GCC optimize("fp-contract=off")

namespace {

// ISA variants of the task loops: AVX-512 (with DQ/BW/VL and FMA), AVX2 + FMA, and the baseline,
// picked once from ATen's CPU capability (so ATEN_CPU_CAPABILITY=avx2 / default selects them too,
// as for torch's own kernels) and what the CPU reports. GCC's target_clones cannot ask for two
// features in one clone, and its "avx2" clone has no FMA, which the polynomials below use.
// Every variant computes the same IEEE operations (FMAs are explicit, contraction is off), so the
// results are bitwise identical whichever runs.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTNIN_X86 1
#define FASTNIN_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))
#define FASTNIN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef FASTNIN_X86
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool fma = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (cap == "AVX512" && fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if ((cap == "AVX512" || cap == "AVX2") && fma && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kBase;
  }();
  return isa;
}

struct LrnParams {
  int64_t C;       // channels
  int64_t S;       // spatial positions per image (planar layout)
  int64_t lo, hi;  // window [c - lo, c + hi], clipped to C - 1 each side (the rest is zero padding)
  int64_t w;       // lo + hi + 1: rows a window spans, and the ring length
  double k, aos, neg_beta, coef;  // aos = alpha / size, coef = 2 alpha beta / size
  bool beta075;                    // beta == 0.75: the Newton path of dpow_each
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename A>
FASTNIN_INLINE void load_row(const T* __restrict src, A* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}

// Row `src` as accumulation-type values: src itself when T is already A (fp32, fp64: no copy, the
// row is read again from cache where needed), else its conversion in buf (fp16, bf16).
template <typename T, typename A>
FASTNIN_INLINE const A* row_view(const T* __restrict src, A* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}
template <typename T, typename A>
FASTNIN_INLINE const A* row_at(const T* src, const A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    return buf;
  }
}

template <typename T, typename A>
FASTNIN_INLINE void square_row(const A* __restrict x, A* __restrict sq, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sq[i] = x[i] * x[i];
}

// ---------------------------------------------------------------------------------------------
// d^-beta (and d^(-beta-1) for the backward) of a row of window sums, d = k + aos * sum.
// ---------------------------------------------------------------------------------------------

// d^nb for a positive normal double d via 2^(nb * log2 d); sets bad when d or the result is out
// of the range where the polynomials hold (the caller then redoes that lane with std::pow).
FASTNIN_INLINE double fast_pow(double d, double nb, int64_t& bad) {
  uint64_t bits;
  std::memcpy(&bits, &d, 8);
  // d = 2^e * m, m in [1, 2), then m in [sqrt(1/2), sqrt(2)). The exponent goes to a double
  // through the 2^52 trick (no int64 -> double conversion, which AVX-512F/AVX2 lack).
  const uint64_t mb = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
  const uint64_t eb = 0x4330000000000000ull | (bits >> 52);
  double m, e;
  std::memcpy(&m, &mb, 8);
  std::memcpy(&e, &eb, 8);
  e -= 4503599627370496.0 + 1023.0;
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e = big ? e + 1.0 : e;
  // ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| <= 0.1716: the series to s^11 is within 1e-10.
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 11;
  p = __builtin_fma(p, s2, 1.0 / 9);
  p = __builtin_fma(p, s2, 1.0 / 7);
  p = __builtin_fma(p, s2, 1.0 / 5);
  p = __builtin_fma(p, s2, 1.0 / 3);
  p = __builtin_fma(p, s2, 1.0);
  const double t = nb * __builtin_fma(s * p, 2.0 * 1.4426950408889634, e);  // nb * log2(d)
  // 2^t = 2^n * e^(f ln 2), n = round(t) (the 1.5 * 2^52 shifter), |f ln 2| <= 0.347: Taylor to
  // degree 9 is within 1e-11.
  const double shifter = 6755399441055744.0;
  const double tn = t + shifter;
  const double f = (t - (tn - shifter)) * 0.6931471805599453;
  double q = 1.0 / 362880;
  q = __builtin_fma(q, f, 1.0 / 40320);
  q = __builtin_fma(q, f, 1.0 / 5040);
  q = __builtin_fma(q, f, 1.0 / 720);
  q = __builtin_fma(q, f, 1.0 / 120);
  q = __builtin_fma(q, f, 1.0 / 24);
  q = __builtin_fma(q, f, 1.0 / 6);
  q = __builtin_fma(q, f, 0.5);
  q = __builtin_fma(q, f, 1.0);
  q = __builtin_fma(q, f, 1.0);
  uint64_t nbits, qb;
  std::memcpy(&nbits, &tn, 8);  // low bits: n (two's complement), so n << 52 is the exponent step
  std::memcpy(&qb, &q, 8);
  qb += nbits << 52;
  double r;
  std::memcpy(&r, &qb, 8);
  // Bitwise, not short-circuit, so that the loop stays branch-free (vectorizable); NaN fails every
  // ordered comparison and lands here too.
  bad |= static_cast<int64_t>(!(d >= DBL_MIN)) | static_cast<int64_t>(!(d <= DBL_MAX)) |
         static_cast<int64_t>(!(t > -1000.0)) | static_cast<int64_t>(!(t < 1000.0));
  return r;
}

// emit(i, r, d) for i < n: r = d^-beta in double, d = k + alpha/size * sum_at(i) (the caller rounds
// r once to fp32). Templates over the window sums' source and the consumer, so that the forward
// can form the sums and multiply by x in the same loop instead of storing rows and reading them
// back. sum_at(i) may be called twice for a lane (the std::pow fallback): it must be idempotent.
template <typename SumAt, typename Emit>
FASTNIN_INLINE void dpow_each(SumAt&& sum_at, int64_t n, const LrnParams& a, Emit&& emit) {
  const double k = a.k, aos = a.aos, nb = a.neg_beta;
  int64_t bad = 0;
  if (a.beta075) {
    // beta = 0.75 (AlexNet's, GoogLeNet's, torch's default): Newton's method on y^4 d^3 = 1,
    // y <- y (5 - y^4 d^3) / 4, whose relative error goes e -> ~2.5 e^2 per step: a first guess
    // from the exponent bits (within ~11%), three steps in fp32 (16 lanes: to ~1e-5) and a last
    // one in fp64 (to ~1e-9), then one rounding to fp32: at most 0.51 ulp from d^-0.75 (over
    // 6e5 values of d across fp32's range; a fourth fp32 step would make it 0.50 ulp and cost
    // ~10% more). No division and no libm call; (y d)^3 y is y^4 d^3 without leaving fp32's range.
    for (int64_t i = 0; i < n; ++i) {
      const double d = k + aos * static_cast<double>(sum_at(i));
      const float df = static_cast<float>(d);
      uint32_t db;
      std::memcpy(&db, &df, 4);
      // log2(y) = -0.75 log2(d): on the bits, y ~ 1.75 * bits(1.0f) - 0.75 * bits(d).
      const uint32_t yb = 1864368128u - (db >> 1) - (db >> 2);
      float y;
      std::memcpy(&y, &yb, 4);
      for (int it = 0; it < 3; ++it) {
        const float u = y * df;
        y = y * __builtin_fmaf(-0.25f, u * u * u * y, 1.25f);
      }
      const double yd = static_cast<double>(y);
      const double ud = yd * d;
      const double r = yd * __builtin_fma(-0.25, ud * ud * ud * yd, 1.25);
      emit(i, r, d);
      // d out of fp32's normal range (0, negative, Inf, NaN, tiny): std::pow below
      bad |= static_cast<int64_t>(!(d >= FLT_MIN)) | static_cast<int64_t>(!(d <= FLT_MAX));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double d = k + aos * static_cast<double>(sum_at(i));
      const double r = fast_pow(d, nb, bad);
      emit(i, r, d);
    }
  }
  if (bad) {
    for (int64_t i = 0; i < n; ++i) {
      const double d = k + aos * static_cast<double>(sum_at(i));
      const bool fast = a.beta075 ? (d >= FLT_MIN && d <= FLT_MAX)
                                  : (d >= DBL_MIN && d <= DBL_MAX && std::abs(nb * std::log2(d)) < 1000.0);
      if (!fast) {
        emit(i, std::pow(d, nb), d);
      }
    }
  }
}

// The backward's rows: dp[i] = d^-beta and dp1[i] = d^(-beta-1).
FASTNIN_INLINE void dpow_row(const float* __restrict sum, float* __restrict dp, float* __restrict dp1, int64_t n,
                             const LrnParams& a) {
  dpow_each([sum](int64_t i) FASTNIN_LAMBDA_INLINE { return sum[i]; }, n, a,
            [dp, dp1](int64_t i, double r, double d) FASTNIN_LAMBDA_INLINE {
    dp[i] = static_cast<float>(r);
    dp1[i] = static_cast<float>(r / d);
  });
}

// The forward's rows: y[i] = x[i] * d^-beta (d^-beta rounded to fp32 first).
template <typename T>
FASTNIN_INLINE void dpow_mul_row(const float* __restrict sum, const float* __restrict x, T* __restrict y, int64_t n,
                                 const LrnParams& a) {
  dpow_each([sum](int64_t i) FASTNIN_LAMBDA_INLINE { return sum[i]; }, n, a,
            [x, y](int64_t i, double r, double) FASTNIN_LAMBDA_INLINE {
    y[i] = static_cast<T>(x[i] * static_cast<float>(r));
  });
}
template <typename T>
FASTNIN_INLINE void dpow_mul_row(const double* __restrict sum, const double* __restrict x, T* __restrict y, int64_t n,
                                 const LrnParams& a) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(x[i] * std::pow(a.k + a.aos * sum[i], a.neg_beta));
}

FASTNIN_INLINE void dpow_row(const double* __restrict sum, double* __restrict dp, double* __restrict dp1, int64_t n,
                             const LrnParams& a) {
  for (int64_t i = 0; i < n; ++i) {
    const double d = a.k + a.aos * sum[i];
    const double r = std::pow(d, a.neg_beta);
    dp[i] = r;
    dp1[i] = r / d;
  }
}

// sum[i] = sum over rows j in [j0, j1] of ring row j (row j lives at ring + (j % w) * ld).
template <typename A>
FASTNIN_INLINE void ring_sum(const A* __restrict ring, int64_t ld, int64_t w, int64_t j0, int64_t j1,
                             A* __restrict sum, int64_t n) {
  const A* r0 = ring + (j0 % w) * ld;
  for (int64_t i = 0; i < n; ++i) sum[i] = r0[i];
  for (int64_t j = j0 + 1; j <= j1; ++j) {
    const A* r = ring + (j % w) * ld;
    for (int64_t i = 0; i < n; ++i) sum[i] += r[i];
  }
}

// sum[c] = sum_{o < w} padded[c + o], c < n.
template <typename A>
FASTNIN_INLINE void shifted_sum(const A* __restrict padded, int64_t w, A* __restrict sum, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] = padded[c];
  for (int64_t o = 1; o < w; ++o) {
    const A* p = padded + o;
    for (int64_t c = 0; c < n; ++c) sum[c] += p[c];
  }
}

// ---------------------------------------------------------------------------------------------
// planar layout [N, C, S]: tasks are (image, block of B positions), t = n * nsb + sb
// ---------------------------------------------------------------------------------------------

template <typename T>
FASTNIN_INLINE void lrn_fwd_planar_impl(const T* __restrict x, T* __restrict y, const LrnParams& a, int64_t B,
                                        int64_t t0, int64_t t1, acc_t<T>* ws) {
  using A = acc_t<T>;
  const int64_t C = a.C, S = a.S, w = a.w, lo = a.lo, hi = a.hi;
  const int64_t nsb = (S + B - 1) / B;
  A* xr = ws;          // [w][B] x rows
  A* sq = xr + w * B;  // [w][B] their squares
  A* sum = sq + w * B;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / nsb, s0 = (t - n * nsb) * B;
    const int64_t nb = std::min(B, S - s0);
    const T* xn = x + n * C * S + s0;
    T* yn = y + n * C * S + s0;
    for (int64_t p = 0; p < C + hi; ++p) {
      const int64_t c = p - hi;  // its window [c - lo, c + hi] ends at p (or at C - 1)
      const int64_t j0 = std::max<int64_t>(0, c - lo), j1 = std::min(C - 1, p);
      if constexpr (std::is_same_v<A, float>) {
        if (w == 5 && c >= 0 && j1 == p && j1 - j0 == 4) {
          // A full window of 5 (LRN's usual size): row p squared, the window summed, d^-beta and
          // y in one loop, the sums in ring_sum's order; bitwise what the general path gives.
          const A* xp = row_view(xn + p * S, xr + (p % w) * B, nb);
          A* sqp = sq + (p % w) * B;
          const A *r0 = sq + (j0 % w) * B, *r1 = sq + ((j0 + 1) % w) * B, *r2 = sq + ((j0 + 2) % w) * B,
                  *r3 = sq + ((j0 + 3) % w) * B;
          const A* xc = row_at(xn + c * S, xr + (c % w) * B);
          T* yc = yn + c * S;
          dpow_each(
              [=](int64_t i) FASTNIN_LAMBDA_INLINE {
                const A q = xp[i] * xp[i];
                sqp[i] = q;
                return (((r0[i] + r1[i]) + r2[i]) + r3[i]) + q;
              },
              nb, a,
              [=](int64_t i, double r, double) FASTNIN_LAMBDA_INLINE {
                yc[i] = static_cast<T>(xc[i] * static_cast<float>(r));
              });
          continue;
        }
      }
      if (p < C) square_row<T>(row_view(xn + p * S, xr + (p % w) * B, nb), sq + (p % w) * B, nb);
      if (c < 0) continue;
      ring_sum(sq, B, w, j0, j1, sum, nb);
      dpow_mul_row<T>(sum, row_at(xn + c * S, xr + (c % w) * B), yn + c * S, nb, a);
    }
  }
}

template <typename T>
FASTNIN_INLINE void lrn_bwd_planar_impl(const T* __restrict g, const T* __restrict x, T* __restrict gx,
                                        const LrnParams& a, int64_t B, int64_t t0, int64_t t1, acc_t<T>* ws) {
  using A = acc_t<T>;
  const int64_t C = a.C, S = a.S, w = a.w, lo = a.lo, hi = a.hi, span = lo + hi;
  const int64_t nsb = (S + B - 1) / B;
  const A coef = static_cast<A>(a.coef);
  A* xr = ws;          // [w][B] x rows
  A* sq = xr + w * B;  // [w][B] x^2
  A* tr = sq + w * B;  // [w][B] t_j = g_j x_j d_j^(-beta-1)
  A* ar = tr + w * B;  // [w][B] g_j d_j^-beta
  A* sum = ar + w * B;
  A* dp = sum + B;
  A* dp1 = dp + B;
  A* gb = dp1 + B;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / nsb, s0 = (t - n * nsb) * B;
    const int64_t nb = std::min(B, S - s0);
    const int64_t off = n * C * S + s0;
    // Step p: load x_p; finish j = p - hi (its x window [j - lo, p] is loaded): t_j and a_j;
    // then finish c = p - span, whose t window [c - hi, c + lo = j] is complete. The oldest row
    // read at step p is p - span, so rings of w = span + 1 rows suffice.
    for (int64_t p = 0; p < C + span; ++p) {
      if (p < C) square_row<T>(row_view(x + off + p * S, xr + (p % w) * B, nb), sq + (p % w) * B, nb);
      const int64_t j = p - hi;
      if (j >= 0 && j < C) {
        ring_sum(sq, B, w, std::max<int64_t>(0, j - lo), std::min(C - 1, p), sum, nb);
        dpow_row(sum, dp, dp1, nb, a);
        const A* gj = row_view(g + off + j * S, gb, nb);
        const A* xj = row_at(x + off + j * S, xr + (j % w) * B);
        A* tj = tr + (j % w) * B;
        A* aj = ar + (j % w) * B;
        for (int64_t i = 0; i < nb; ++i) {
          tj[i] = gj[i] * xj[i] * dp1[i];
          aj[i] = gj[i] * dp[i];
        }
      }
      const int64_t c = p - span;
      if (c < 0) continue;
      ring_sum(tr, B, w, std::max<int64_t>(0, c - hi), std::min(C - 1, c + lo), sum, nb);
      const A* xc = row_at(x + off + c * S, xr + (c % w) * B);
      const A* ac = ar + (c % w) * B;
      T* gc = gx + off + c * S;
      for (int64_t i = 0; i < nb; ++i) gc[i] = static_cast<T>(ac[i] - coef * xc[i] * sum[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pixel layout [P, C] (channels_last, or S == 1): tasks are pixels q, row q at q * C
// ---------------------------------------------------------------------------------------------

template <typename T>
FASTNIN_INLINE void lrn_fwd_pixel_impl(const T* __restrict x, T* __restrict y, const LrnParams& a, int64_t q0,
                                       int64_t q1, acc_t<T>* ws) {
  using A = acc_t<T>;
  const int64_t C = a.C, w = a.w, lo = a.lo;
  A* xb = ws;
  A* sqp = xb + C;  // [lo zeros | C squares | hi zeros]
  A* sum = sqp + C + w - 1;
  std::fill_n(sqp, C + w - 1, A(0));
  for (int64_t q = q0; q < q1; ++q) {
    const A* xq = row_view(x + q * C, xb, C);
    square_row<T>(xq, sqp + lo, C);
    T* yq = y + q * C;
    if constexpr (std::is_same_v<A, float>) {
      if (w == 5) {  // the sums in shifted_sum's order, formed inside the d^-beta loop (as planar)
        dpow_each(
            [sqp](int64_t c) FASTNIN_LAMBDA_INLINE {
              return (((sqp[c] + sqp[c + 1]) + sqp[c + 2]) + sqp[c + 3]) + sqp[c + 4];
            },
            C, a,
            [xq, yq](int64_t c, double r, double) FASTNIN_LAMBDA_INLINE {
              yq[c] = static_cast<T>(xq[c] * static_cast<float>(r));
            });
        continue;
      }
    }
    shifted_sum(sqp, w, sum, C);
    dpow_mul_row<T>(sum, xq, yq, C, a);
  }
}

template <typename T>
FASTNIN_INLINE void lrn_bwd_pixel_impl(const T* __restrict g, const T* __restrict x, T* __restrict gx,
                                       const LrnParams& a, int64_t q0, int64_t q1, acc_t<T>* ws) {
  using A = acc_t<T>;
  const int64_t C = a.C, w = a.w, lo = a.lo, hi = a.hi;
  const A coef = static_cast<A>(a.coef);
  A* xb = ws;
  A* gb = xb + C;
  A* sqp = gb + C;            // [lo zeros | x^2 | hi zeros]
  A* tp = sqp + C + w - 1;    // [hi zeros | t | lo zeros]
  A* sum = tp + C + w - 1;
  A* dp = sum + C;
  A* dp1 = dp + C;
  std::fill_n(sqp, C + w - 1, A(0));
  std::fill_n(tp, C + w - 1, A(0));
  for (int64_t q = q0; q < q1; ++q) {
    const A* xq = row_view(x + q * C, xb, C);
    const A* gq = row_view(g + q * C, gb, C);
    square_row<T>(xq, sqp + lo, C);
    shifted_sum(sqp, w, sum, C);
    dpow_row(sum, dp, dp1, C, a);
    A* t = tp + hi;
    for (int64_t c = 0; c < C; ++c) {
      t[c] = gq[c] * xq[c] * dp1[c];
      dp[c] = gq[c] * dp[c];  // a_c
    }
    shifted_sum(tp, w, sum, C);  // sum_{j = c - hi}^{c + lo} t_j
    T* gxq = gx + q * C;
    for (int64_t c = 0; c < C; ++c) gxq[c] = static_cast<T>(dp[c] - coef * xq[c] * sum[c]);
  }
}

// Non-inline entry points of the task loops, one per ISA variant (see cpu_isa()).
#ifdef FASTNIN_X86
#define FASTNIN_LRN_VARIANT(fn, impl, attr, params, args) \
  template <typename T>                                   \
  attr void fn params {                                   \
    impl args;                                            \
  }
#define FASTNIN_LRN_ENTRY(name, params, args)                                          \
  FASTNIN_LRN_VARIANT(name##_avx512, name##_impl, FASTNIN_TARGET_AVX512, params, args) \
  FASTNIN_LRN_VARIANT(name##_avx2, name##_impl, FASTNIN_TARGET_AVX2, params, args)     \
  FASTNIN_LRN_VARIANT(name##_base, name##_impl, , params, args)                        \
  template <typename T>                                                                \
  void name params {                                                                   \
    switch (cpu_isa()) {                                                               \
      case Isa::kAvx512:                                                               \
        return name##_avx512<T> args;                                                  \
      case Isa::kAvx2:                                                                 \
        return name##_avx2<T> args;                                                    \
      default:                                                                         \
        return name##_base<T> args;                                                    \
    }                                                                                  \
  }
#else
#define FASTNIN_LRN_ENTRY(name, params, args) \
  template <typename T>                       \
  void name params {                          \
    name##_impl args;                         \
  }
#endif

FASTNIN_LRN_ENTRY(lrn_fwd_planar,
                  (const T* x, T* y, const LrnParams& a, int64_t B, int64_t t0, int64_t t1, acc_t<T>* ws),
                  (x, y, a, B, t0, t1, ws))
FASTNIN_LRN_ENTRY(lrn_bwd_planar,
                  (const T* g, const T* x, T* gx, const LrnParams& a, int64_t B, int64_t t0, int64_t t1,
                   acc_t<T>* ws),
                  (g, x, gx, a, B, t0, t1, ws))
FASTNIN_LRN_ENTRY(lrn_fwd_pixel, (const T* x, T* y, const LrnParams& a, int64_t q0, int64_t q1, acc_t<T>* ws),
                  (x, y, a, q0, q1, ws))
FASTNIN_LRN_ENTRY(lrn_bwd_pixel,
                  (const T* g, const T* x, T* gx, const LrnParams& a, int64_t q0, int64_t q1, acc_t<T>* ws),
                  (g, x, gx, a, q0, q1, ws))
#undef FASTNIN_LRN_ENTRY
#undef FASTNIN_LRN_VARIANT

// ---------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------

LrnParams make_params(int64_t C, int64_t S, int64_t size, double alpha, double beta, double k) {
  LrnParams a;
  a.C = C;
  a.S = S;
  a.lo = std::min<int64_t>(size / 2, std::max<int64_t>(C - 1, 0));
  a.hi = std::min<int64_t>((size - 1) / 2, std::max<int64_t>(C - 1, 0));
  a.w = a.lo + a.hi + 1;
  a.k = k;
  a.aos = alpha / static_cast<double>(size);
  a.neg_beta = -beta;
  a.coef = 2.0 * alpha * beta / static_cast<double>(size);
  a.beta075 = beta == 0.75;
  return a;
}

// Block width of the planar walk: the rings (`rings` arrays of w rows) plus a few rows of B
// accumulators stay within 32 KB (L1: 32 KB on Zen 4, 48 KB on Sapphire Rapids). 16..512. The
// budget was 24 KB (fp32 size-5 forward: B = 256): on a 2-core AMD EPYC (Zen 4), B = 512 ran the
// 16x96x55x55 NCHW forward in 5.8-6.2 ms against 7.1 ms (python -m fastnin.bench --ops lrn,
// builds alternated twice; the other LRN rows within noise). Each row's fixed costs (the ring
// indices, the calls, the tail) then spread over twice the positions.
int64_t planar_block(const LrnParams& a, int64_t rings, int64_t acc_bytes) {
  const int64_t budget = 32 * 1024;
  int64_t B = 512;
  while (B > 16 && (rings * a.w + 4) * B * acc_bytes > budget) B /= 2;
  return std::min<int64_t>(B, std::max<int64_t>(16, ((a.S + 15) / 16) * 16));
}

// f(i0, i1, ws) over [0, n) in chunks of `chunk`, which the threads claim one at a time from a
// shared counter (each with its own workspace of ws_size elements), instead of at::parallel_for's
// fixed halves: on a shared machine, where one thread often runs late, the others take over its
// chunks. Every chunk's output depends only on its inputs, so results do not depend on which
// thread ran what.
template <typename A, typename F>
void parallel_chunks(int64_t n, int64_t chunk, int64_t ws_size, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(nchunks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<A> ws(ws_size);
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      f(c * chunk, std::min(n, (c + 1) * chunk), ws.data());
    }
  });
}

// The layout the kernels see: planar unless the data is [N, S, C] (channels_last) or S == 1.
struct LrnLayout {
  c10::MemoryFormat fmt;
  bool pixel;
  int64_t N, C, S;
};

LrnLayout lrn_layout(const at::Tensor& x) {
  LrnLayout l;
  l.fmt = fastnin::lrn_format(x);
  l.N = x.size(0);
  l.C = x.size(1);
  l.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) l.S *= x.size(d);
  l.pixel = l.fmt == c10::MemoryFormat::ChannelsLast || l.S == 1;
  return l;
}

at::Tensor lrn_cpu(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  fastnin::check_lrn_args(x, size);
  const LrnLayout l = lrn_layout(x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(l.fmt));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(l.fmt);
  const LrnParams a = make_params(l.C, l.S, size, alpha, beta, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (l.pixel) {
      const int64_t P = l.N * l.S;
      // x row, padded squares, sums (lrn_fwd_pixel_impl)
      parallel_chunks<A>(P, std::max<int64_t>(1, 8192 / l.C), 3 * l.C + a.w - 1, [&](int64_t q0, int64_t q1, A* ws) {
        lrn_fwd_pixel<scalar_t>(xp, yp, a, q0, q1, ws);
      });
    } else {
      const int64_t B = planar_block(a, 2, sizeof(A));
      const int64_t tasks = l.N * ((l.S + B - 1) / B);
      // the x and square rings, a sum row (lrn_fwd_planar_impl)
      parallel_chunks<A>(tasks, 1, (2 * a.w + 1) * B, [&](int64_t t0, int64_t t1, A* ws) {
        lrn_fwd_planar<scalar_t>(xp, yp, a, B, t0, t1, ws);
      });
    }
  });
  return y;
}

at::Tensor lrn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, int64_t size, double alpha,
                            double beta, double k) {
  fastnin::check_lrn_args(x, size);
  fastnin::check_same(grad_out, x, "lrn_backward", "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "lrn_backward: grad_out must have x's shape ", x.sizes(),
                    ", got ", grad_out.sizes());
  const LrnLayout l = lrn_layout(x);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(l.fmt));
  if (gx.numel() == 0) return gx;
  const at::Tensor xc = x.contiguous(l.fmt);
  const at::Tensor gc = grad_out.contiguous(l.fmt);
  const LrnParams a = make_params(l.C, l.S, size, alpha, beta, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (l.pixel) {
      const int64_t P = l.N * l.S;
      parallel_chunks<A>(P, std::max<int64_t>(1, 4096 / l.C), 7 * l.C + 2 * a.w, [&](int64_t q0, int64_t q1, A* ws) {
        lrn_bwd_pixel<scalar_t>(gp, xp, gxp, a, q0, q1, ws);
      });
    } else {
      const int64_t B = planar_block(a, 4, sizeof(A));
      const int64_t tasks = l.N * ((l.S + B - 1) / B);
      parallel_chunks<A>(tasks, 1, (4 * a.w + 4) * B, [&](int64_t t0, int64_t t1, A* ws) {
        lrn_bwd_planar<scalar_t>(gp, xp, gxp, a, B, t0, t1, ws);
      });
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CPU, m) {
  m.impl("lrn", &lrn_cpu);
  m.impl("lrn_backward", &lrn_backward_cpu);
}
