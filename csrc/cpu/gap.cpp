// CPU kernels of fastnin::gap (global average pooling, [N, C, H, W] -> [N, C]) and fastnin::gap_backward.
//
// Forward: one pass over x, fp32 accumulation for fp32/fp16/bf16 (fp64 for fp64), the mean
// rounded once to x's dtype. fp16 sums never see fp16 range: a map of 60000s averages to 60000,
// not inf.
//   * contiguous: N*C rows of L = H*W contiguous elements, split over the threads. A row is summed
//     in blocks of 4096 elements, each over 32 independent lanes (vector registers: the lanes
//     keep the adds independent so that they pipeline, and each lane adds at most 128 values);
//     the blocks' sums are added into the row total, so a long row keeps fp32 accuracy (a flat
//     running fp32 sum stalls once the total is 2^24 times the addend). A row's remainder is one
//     masked full-width step and the lanes are added by a fixed tree (fp32: GCC vector types,
//     see gap_rows_f32), so results do not depend on the ISA or the thread count.
//   * channels_last: for each image, L rows of C contiguous channels: per-channel sums over the
//     pixels, vectorized along C, in blocks of 16 pixels added into the totals (two-level sums:
//     blocks of 256 measured 4.7e-7 relative error on 64x384x13x13 against torch's 1.6e-7;
//     blocks of 16 gave 1.6e-7 at the same speed). Tasks are (image, block of channels), so one
//     image still spreads over the threads.
// Backward: grad_x[n, c, h, w] = grad_out[n, c] / (H*W), a broadcast fill in the layout asked for
// (rows of one value for contiguous; for channels_last one precomputed C-vector copied per pixel).
//
// The loops are plain loops compiled for AVX-512, AVX2 and the baseline ISA, picked at load time
// (target_clones, as in mlpconv.cpp): the build has no -march.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTNIN_GAP_AVX512 1
#endif

#include "checks.h"
#include "cpu/attributes.h"

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kLanes = 32;
constexpr int64_t kRowBlock = 4096;  // elements per blocked partial sum (contiguous rows)
constexpr int64_t kPixBlock = 16;    // pixels per blocked partial sum (channels_last)

// GCC vector types for the fp32 row sums: the horizontal sum of the 32 lanes as a fixed tree of
// shuffles (the same tree as the generic loop below, so the same result); written as a plain
// loop GCC spilled the lanes and added them one by one, ~120 cycles per row, which for 13x13
// rows (169 elements) cost more than the loads.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

FASTNIN_INLINE float hsum(v16f a) {
  const v8f b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  const float d0 = c[0] + c[2], d1 = c[1] + c[3];
  return d0 + d1;
}

// Rows of fp32 that start off a 64-byte line (13x13 = 676 bytes: every row but one in 16) make
// every full-width load of gap_rows_f32 straddle two lines. From kAlignedRowMin elements on, a
// row is read instead as the aligned 16-float blocks that cover it, the first and last with the
// lanes outside the row set to zero: one line per load. On a 2-core AMD EPYC (Zen 4), the
// 64x384 forward from L3, 2 threads, medians of 400 calls, ms, straddling / aligned loads:
// 13x13 0.095 / 0.087, 14x14 0.109 / 0.105; 10x10 0.060 / 0.063 (too few blocks to pay for the
// two partial ones), 8x8 and 16x16 rows are aligned already.
constexpr int64_t kAlignedRowMin = 160;

// lane[j] = q[j] for lo <= j < hi, else 0: a partial block that would reach outside x (the first
// row of a misaligned x, the last row), read element by element. Cold, and takes no vector
// argument, so that every ISA clone can call it.
__attribute__((noinline, cold)) void fill_lanes(const float* q, int64_t lo, int64_t hi, float* lane) {
  for (int64_t j = 0; j < 16; ++j) lane[j] = j >= lo && j < hi ? q[j] : 0.0f;
}

// acc += lanes [lo, hi) of the 16 floats at q (64-byte aligned), the others zero; reads only
// [begin, end). (Vectors go in and out by reference: a vector return value is an ABI that
// differs between the ISA clones, and GCC warns about it even where the call is inlined.)
// The bounds compare as addresses (uintptr_t): q may lie before x, where pointer arithmetic and
// comparison would be undefined.
FASTNIN_INLINE void add_lanes(const float* q, int64_t lo, int64_t hi, const float* begin, const float* end,
                              v16f& acc) {
  const v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const uintptr_t qa = reinterpret_cast<uintptr_t>(q);
  v16f u;
  if (qa >= reinterpret_cast<uintptr_t>(begin) && qa + 64 <= reinterpret_cast<uintptr_t>(end)) {
    std::memcpy(&u, q, 64);
    // Two selects against splatted bounds (idx - idx + n): a combined (a & b) mask made GCC build
    // the vector lane by lane.
    const v16i lov = idx - idx + static_cast<int32_t>(lo), hiv = idx - idx + static_cast<int32_t>(hi);
    const v16f zero = {};
    u = idx >= lov ? u : zero;
    acc += idx < hiv ? u : zero;
    return;
  }
  float lane[16];
  fill_lanes(q, lo, hi, lane);  // reads only lanes [lo, hi): inside the row
  std::memcpy(&u, lane, 64);
  acc += u;
}

// The mean of the L elements at p: their sum as 16 lanes from the aligned blocks covering them,
// over 4 independent accumulators, added by hsum. NaN/Inf outside the row never enter: those
// lanes are selected away, not multiplied by zero.
FASTNIN_INLINE float row_mean_aligned(const float* p, int64_t L, const float* begin, const float* end) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(p);
  const int64_t off = static_cast<int64_t>((pa & 63) / sizeof(float));
  const float* q = reinterpret_cast<const float*>(pa & ~uintptr_t(63));  // may lie before x (row 0)
  const int64_t n = off + L;  // floats from q to the row's end
  v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
  add_lanes(q, off, std::min<int64_t>(n, 16), begin, end, a0);
  int64_t i = 16;
  for (; i + 48 <= n; i += 48) {
    v16f u, v, w;
    std::memcpy(&u, q + i, 64);
    std::memcpy(&v, q + i + 16, 64);
    std::memcpy(&w, q + i + 32, 64);
    a1 += u;
    a2 += v;
    a3 += w;
  }
  for (; i + 16 <= n; i += 16) {
    v16f u;
    std::memcpy(&u, q + i, 64);
    a1 += u;
  }
  if (i < n) add_lanes(q + i, 0, n - i, begin, end, a2);
  return hsum((a0 + a1) + (a2 + a3)) / static_cast<float>(L);
}

FASTNIN_INLINE void gap_rows_f32(const float* __restrict x, float* __restrict out, int64_t L, int64_t rows,
                                 int64_t r0, int64_t r1) {
  const float* const end = x + rows * L;
  if (L >= kAlignedRowMin && L <= kRowBlock) {
    for (int64_t r = r0; r < r1; ++r) out[r] = row_mean_aligned(x + r * L, L, x, end);
    return;
  }
  const v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t r = r0; r < r1; ++r) {
    const float* p = x + r * L;
    float total = 0.0f;
    for (int64_t b0 = 0; b0 < L; b0 += kRowBlock) {
      const int64_t b1 = std::min(L, b0 + kRowBlock);
      v16f a0 = {}, a1 = {};
      int64_t i = b0;
      for (; i + 32 <= b1; i += 32) {
        v16f u, v;
        std::memcpy(&u, p + i, 64);
        std::memcpy(&v, p + i + 16, 64);
        a0 += u;
        a1 += v;
      }
      const int64_t rem = b1 - i;
      if (rem > 0 && p + i + 32 <= end) {
        // The remainder as one full-width step: the loads run past the row into the next one
        // (still inside x) and a select drops those lanes, so NaN/Inf there cannot leak in.
        v16f u, v;
        std::memcpy(&u, p + i, 64);
        std::memcpy(&v, p + i + 16, 64);
        const v16i n = idx - idx + static_cast<int32_t>(rem);
        const v16f zero = {};
        a0 += idx < n ? u : zero;
        a1 += idx + 16 < n ? v : zero;
      } else {
        float lane[32] = {};
        for (int64_t j = 0; j < rem; ++j) lane[j] = p[i + j];
        v16f u, v;
        std::memcpy(&u, lane, 64);
        std::memcpy(&v, lane + 16, 64);
        a0 += u;
        a1 += v;
      }
      total += hsum(a0 + a1);
    }
    out[r] = total / static_cast<float>(L);
  }
}

// out[r] = mean of row r (L elements), rows [r0, r1) of the `rows` rows of x.
template <typename T>
FASTNIN_INLINE void gap_rows_impl(const T* __restrict x, T* __restrict out, int64_t L, int64_t rows, int64_t r0,
                                  int64_t r1) {
  using A = acc_t<T>;
  const T* const end = x + rows * L;
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * L;
    A total = A(0);
    for (int64_t b0 = 0; b0 < L; b0 += kRowBlock) {
      const int64_t b1 = std::min(L, b0 + kRowBlock);
      A lane[kLanes] = {};
      int64_t i = b0;
      for (; i + kLanes <= b1; i += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<A>(p[i + j]);
      }
      const int64_t rem = b1 - i;
      if (rem > 0 && p + i + kLanes <= end) {
        // The remainder as one full-width step: the loads run past the row into the next one
        // (still inside x) and a select drops those lanes, so NaN/Inf there cannot leak in. For
        // NiN's short rows (13x13, 6x6) this scalar tail was a third of the time.
        for (int64_t j = 0; j < kLanes; ++j) {
          const A v = static_cast<A>(p[i + j]);
          lane[j] += j < rem ? v : A(0);
        }
      } else {
        for (int64_t j = 0; j < rem; ++j) lane[j] += static_cast<A>(p[i + j]);
      }
      // Pairwise: 32 -> 16 -> ... -> 1 (a fixed order: results do not depend on the threads).
      for (int64_t h = kLanes / 2; h >= 1; h /= 2) {
        for (int64_t j = 0; j < h; ++j) lane[j] += lane[j + h];
      }
      total += lane[0];
    }
    out[r] = static_cast<T>(total / static_cast<A>(L));
  }
}

// channels_last: out[n, c0:c0+cb] = mean over the L pixels of image n; acc has 2 * cb entries.
template <typename T>
FASTNIN_INLINE void gap_cl_impl(const T* __restrict x, T* __restrict out, int64_t C, int64_t L, int64_t n,
                                int64_t c0, int64_t cb, acc_t<T>* __restrict acc) {
  using A = acc_t<T>;
  A* total = acc;
  A* blk = acc + cb;
  std::fill_n(total, cb, A(0));
  const T* xn = x + n * L * C + c0;
  for (int64_t p0 = 0; p0 < L; p0 += kPixBlock) {
    const int64_t p1 = std::min(L, p0 + kPixBlock);
    std::fill_n(blk, cb, A(0));
    for (int64_t p = p0; p < p1; ++p) {
      const T* row = xn + p * C;
      for (int64_t c = 0; c < cb; ++c) blk[c] += static_cast<A>(row[c]);
    }
    for (int64_t c = 0; c < cb; ++c) total[c] += blk[c];
  }
  T* o = out + n * C + c0;
  for (int64_t c = 0; c < cb; ++c) o[c] = static_cast<T>(total[c] / static_cast<A>(L));
}

// channels_last, fp32: gap_cl_impl's sums (the same blocks of kPixBlock pixels, so the same
// results) with the block and total sums of a chunk of W vectors of 16 channels held in registers.
// gap_cl_impl keeps them in an array: two loads and a store per 16 channels a pixel, where this
// does one load; on a 2-core AMD EPYC (Zen 4) its 64x384x13x13 forward took 0.17 ms against torch
// NCHW's 0.13 ms.
template <int W>
FASTNIN_INLINE void gap_cl_chunk_f32(const float* __restrict xn, float* __restrict o, int64_t C, int64_t L,
                                     float* __restrict total) {
  for (int w = 0; w < W; ++w) {
    const v16f z = {};
    std::memcpy(total + 16 * w, &z, 64);
  }
  for (int64_t p0 = 0; p0 < L; p0 += kPixBlock) {
    const int64_t p1 = std::min(L, p0 + kPixBlock);
    v16f blk[W] = {};
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = xn + p * C;
      for (int w = 0; w < W; ++w) {
        v16f u;
        std::memcpy(&u, row + 16 * w, 64);
        blk[w] += u;
      }
    }
    for (int w = 0; w < W; ++w) {
      v16f t;
      std::memcpy(&t, total + 16 * w, 64);
      t += blk[w];
      std::memcpy(total + 16 * w, &t, 64);
    }
  }
  const float len = static_cast<float>(L);
  for (int w = 0; w < W; ++w) {
    v16f t;
    std::memcpy(&t, total + 16 * w, 64);
    const v16f m = t / len;
    std::memcpy(o + 16 * w, &m, 64);
  }
}

FASTNIN_INLINE void gap_cl_f32(const float* __restrict x, float* __restrict out, int64_t C, int64_t L, int64_t n,
                               int64_t c0, int64_t cb, float* __restrict acc) {
  const float* xn = x + n * L * C + c0;
  float* o = out + n * C + c0;
  int64_t c = 0;
  for (; c + 128 <= cb; c += 128) gap_cl_chunk_f32<8>(xn + c, o + c, C, L, acc);
  for (; c + 64 <= cb; c += 64) gap_cl_chunk_f32<4>(xn + c, o + c, C, L, acc);
  for (; c + 16 <= cb; c += 16) gap_cl_chunk_f32<1>(xn + c, o + c, C, L, acc);
  // Fewer than 16 channels left: the array version on them (its sums are the same).
  if (c < cb) gap_cl_impl<float>(x, out, C, L, n, c0 + c, cb - c, acc);
}

#ifdef FASTNIN_GAP_AVX512
// channels_last, fp32, AVX-512: gap_cl_impl's sums (blocks of kPixBlock pixels added into the
// totals, so bitwise the same results) with up to 24 vectors (384 channels) of block sums in
// registers, so that an image's pixel rows are read once, front to back, in one pass.
// gap_cl_chunk_f32 splits them into chunks of at most 8 vectors (GCC's vector types spilled at
// 24), each a pass over the pixels reading part of every row. On a 2-core AMD EPYC (Zen 4), the
// 64x384x13x13 forward from L3, 2 threads, medians of 400 calls over 3 runs: 0.112-0.120 ->
// 0.093-0.100 ms.
template <int W>
__attribute__((target("avx512f"), always_inline)) inline void gap_cl_pass_avx512(const float* __restrict xn,
                                                                                  float* __restrict o, int64_t C,
                                                                                  int64_t L, float* __restrict total) {
#pragma GCC unroll 24
  for (int w = 0; w < W; ++w) _mm512_storeu_ps(total + 16 * w, _mm512_setzero_ps());
  for (int64_t p0 = 0; p0 < L; p0 += kPixBlock) {
    const int64_t p1 = std::min(L, p0 + kPixBlock);
    __m512 blk[W];
#pragma GCC unroll 24
    for (int w = 0; w < W; ++w) blk[w] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = xn + p * C;
#pragma GCC unroll 24
      for (int w = 0; w < W; ++w) blk[w] = _mm512_add_ps(blk[w], _mm512_loadu_ps(row + 16 * w));
    }
#pragma GCC unroll 24
    for (int w = 0; w < W; ++w) {
      _mm512_storeu_ps(total + 16 * w, _mm512_add_ps(_mm512_loadu_ps(total + 16 * w), blk[w]));
    }
  }
  const __m512 len = _mm512_set1_ps(static_cast<float>(L));
#pragma GCC unroll 24
  for (int w = 0; w < W; ++w) _mm512_storeu_ps(o + 16 * w, _mm512_div_ps(_mm512_loadu_ps(total + 16 * w), len));
}

__attribute__((target("avx512f"))) void gap_cl_f32_avx512(const float* __restrict x, float* __restrict out, int64_t C,
                                                          int64_t L, int64_t n, int64_t c0, int64_t cb,
                                                          float* __restrict acc) {
  const float* xn = x + n * L * C + c0;
  float* o = out + n * C + c0;
  int64_t c = 0;
  for (; c + 384 <= cb; c += 384) gap_cl_pass_avx512<24>(xn + c, o + c, C, L, acc);
  const int64_t v = (cb - c) / 16;  // whole vectors left: one pass of that many
  switch (v) {
#define FASTNIN_GAP_PASS(k) \
  case k:                   \
    gap_cl_pass_avx512<k>(xn + c, o + c, C, L, acc); \
    break;
    FASTNIN_GAP_PASS(1) FASTNIN_GAP_PASS(2) FASTNIN_GAP_PASS(3) FASTNIN_GAP_PASS(4) FASTNIN_GAP_PASS(5)
    FASTNIN_GAP_PASS(6) FASTNIN_GAP_PASS(7) FASTNIN_GAP_PASS(8) FASTNIN_GAP_PASS(9) FASTNIN_GAP_PASS(10)
    FASTNIN_GAP_PASS(11) FASTNIN_GAP_PASS(12) FASTNIN_GAP_PASS(13) FASTNIN_GAP_PASS(14) FASTNIN_GAP_PASS(15)
    FASTNIN_GAP_PASS(16) FASTNIN_GAP_PASS(17) FASTNIN_GAP_PASS(18) FASTNIN_GAP_PASS(19) FASTNIN_GAP_PASS(20)
    FASTNIN_GAP_PASS(21) FASTNIN_GAP_PASS(22) FASTNIN_GAP_PASS(23)
#undef FASTNIN_GAP_PASS
    default:
      break;
  }
  c += 16 * v;
  // Fewer than 16 channels left: the array version on them (its sums are the same).
  if (c < cb) gap_cl_impl<float>(x, out, C, L, n, c0 + c, cb - c, acc);
}
#endif

// grad_x rows [r0, r1) of L elements (contiguous layout): row r = n * C + c gets g[n, c] / L.
template <typename T>
FASTNIN_INLINE void gap_bwd_rows_impl(const T* __restrict g, int64_t gs0, int64_t gs1, T* __restrict gx, int64_t C,
                                      int64_t L, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / C, c = r - n * C;
    const T v = static_cast<T>(static_cast<A>(g[n * gs0 + c * gs1]) / static_cast<A>(L));
    T* row = gx + r * L;
    for (int64_t i = 0; i < L; ++i) row[i] = v;
  }
}

// Pixels [q0, q1) of a channels_last grad_x ([N*L][C] rows): pixel q gets its image's row of C
// values, v[q / L], copied 64 bytes at a time from L1. glibc's memcpy per 1536-byte row (C = 384
// fp32) took twice the NCHW fill's time: 0.55 vs 0.28 ms for 64x384x13x13.
FASTNIN_INLINE void gap_bwd_cl_impl(const char* v, char* gx, int64_t row_bytes, int64_t L, int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const char* src = v + (q / L) * row_bytes;
    char* dst = gx + q * row_bytes;
    int64_t i = 0;
    for (; i + 64 <= row_bytes; i += 64) {
      v16f u;
      std::memcpy(&u, src + i, 64);
      std::memcpy(dst + i, &u, 64);
    }
    if (i < row_bytes) std::memcpy(dst + i, src + i, row_bytes - i);
  }
}
FASTNIN_CLONES void gap_bwd_cl(const char* v, char* gx, int64_t row_bytes, int64_t L, int64_t q0, int64_t q1) {
  gap_bwd_cl_impl(v, gx, row_bytes, L, q0, q1);
}

template <typename T>
void gap_rows(const T* x, T* out, int64_t L, int64_t rows, int64_t r0, int64_t r1) {
  gap_rows_impl(x, out, L, rows, r0, r1);
}
template <typename T>
void gap_cl(const T* x, T* out, int64_t C, int64_t L, int64_t n, int64_t c0, int64_t cb, acc_t<T>* acc) {
  gap_cl_impl(x, out, C, L, n, c0, cb, acc);
}
template <typename T>
void gap_bwd_rows(const T* g, int64_t gs0, int64_t gs1, T* gx, int64_t C, int64_t L, int64_t r0, int64_t r1) {
  gap_bwd_rows_impl(g, gs0, gs1, gx, C, L, r0, r1);
}

#define FASTNIN_GAP_CLONES(T)                                                                                    \
  template <>                                                                                                    \
  FASTNIN_CLONES void gap_rows<T>(const T* x, T* out, int64_t L, int64_t rows, int64_t r0, int64_t r1) {         \
    gap_rows_impl(x, out, L, rows, r0, r1);                                                                      \
  }                                                                                                              \
  template <>                                                                                                    \
  FASTNIN_CLONES void gap_cl<T>(const T* x, T* out, int64_t C, int64_t L, int64_t n, int64_t c0, int64_t cb,     \
                                float* acc) {                                                                    \
    gap_cl_impl(x, out, C, L, n, c0, cb, acc);                                                                   \
  }                                                                                                              \
  template <>                                                                                                    \
  FASTNIN_CLONES void gap_bwd_rows<T>(const T* g, int64_t gs0, int64_t gs1, T* gx, int64_t C, int64_t L,         \
                                      int64_t r0, int64_t r1) {                                                  \
    gap_bwd_rows_impl(g, gs0, gs1, gx, C, L, r0, r1);                                                            \
  }

FASTNIN_GAP_CLONES(c10::Half)
FASTNIN_GAP_CLONES(c10::BFloat16)
#undef FASTNIN_GAP_CLONES

template <>
FASTNIN_CLONES void gap_rows<float>(const float* x, float* out, int64_t L, int64_t rows, int64_t r0, int64_t r1) {
  gap_rows_f32(x, out, L, rows, r0, r1);
}
template <>
FASTNIN_CLONES void gap_cl<float>(const float* x, float* out, int64_t C, int64_t L, int64_t n, int64_t c0,
                                  int64_t cb, float* acc) {
  gap_cl_f32(x, out, C, L, n, c0, cb, acc);
}
template <>
FASTNIN_CLONES void gap_bwd_rows<float>(const float* g, int64_t gs0, int64_t gs1, float* gx, int64_t C, int64_t L,
                                        int64_t r0, int64_t r1) {
  gap_bwd_rows_impl(g, gs0, gs1, gx, C, L, r0, r1);
}

// One channels_last task: gap_cl, or for fp32 where `wide` its AVX-512 version.
template <typename T>
void gap_cl_task(const T* x, T* out, int64_t C, int64_t L, int64_t n, int64_t c0, int64_t cb, acc_t<T>* acc, bool) {
  gap_cl<T>(x, out, C, L, n, c0, cb, acc);
}
template <>
void gap_cl_task<float>(const float* x, float* out, int64_t C, int64_t L, int64_t n, int64_t c0, int64_t cb,
                        float* acc, bool wide) {
#ifdef FASTNIN_GAP_AVX512
  if (wide) {
    gap_cl_f32_avx512(x, out, C, L, n, c0, cb, acc);
    return;
  }
#endif
  (void)wide;
  gap_cl<float>(x, out, C, L, n, c0, cb, acc);
}

at::Tensor gap_cpu(const at::Tensor& x) {
  fastnin::check_gap_args(x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  at::Tensor out = at::empty({N, C}, x.options());
  if (out.numel() == 0) return out;
  const bool cl = x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gap_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (!cl) {
      // ~32K elements per chunk at least: below that the threads cost more than they save.
      const int64_t grain = std::max<int64_t>(1, 32768 / L);
      at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) { gap_rows<scalar_t>(xp, op, L, N * C, r0, r1); });
    } else {
      // Channel blocks of <= 256 (a multiple of 16 where C allows): tasks (n, block).
      // fp32 with AVX-512: blocks of <= 384 channels (one pass over an image's rows), else 256.
      const bool wide = std::is_same_v<scalar_t, float> && fastnin::cpu::cpu_has_avx512f();
      const int64_t bmax = wide ? 384 : 256;
      // At least as many tasks as threads where C allows (one image: its channel blocks).
      const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
      const int64_t nblk = std::min(std::max((C + bmax - 1) / bmax, (threads + N - 1) / N), (C + 15) / 16);
      const int64_t cb = std::min(C, ((C + nblk - 1) / nblk + 15) / 16 * 16);
      const int64_t nb = (C + cb - 1) / cb;
      const int64_t grain = std::max<int64_t>(1, 32768 / (L * cb));
      at::parallel_for(0, N * nb, grain, [&](int64_t t0, int64_t t1) {
        std::vector<A> acc(2 * cb);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / nb, c0 = (t - n * nb) * cb;
          gap_cl_task<scalar_t>(xp, op, C, L, n, c0, std::min(cb, C - c0), acc.data(), wide);
        }
      });
    }
  });
  return out;
}

at::Tensor gap_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef input_size, bool channels_last) {
  fastnin::check_gap_backward_args(grad_out, input_size);
  const int64_t N = input_size[0], C = input_size[1], L = input_size[2] * input_size[3];
  at::Tensor gx = at::empty(input_size, grad_out.options().memory_format(
                                            channels_last ? c10::MemoryFormat::ChannelsLast
                                                          : c10::MemoryFormat::Contiguous));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "gap_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const int64_t s0 = grad_out.stride(0), s1 = grad_out.stride(1);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (!channels_last) {
      const int64_t grain = std::max<int64_t>(1, 32768 / L);
      at::parallel_for(0, N * C, grain,
                       [&](int64_t r0, int64_t r1) { gap_bwd_rows<scalar_t>(gp, s0, s1, gxp, C, L, r0, r1); });
    } else {
      // The [N, C] values once, then one C-vector copy per pixel of [N, H, W, C].
      std::vector<scalar_t> v(N * C);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          v[n * C + c] = static_cast<scalar_t>(static_cast<A>(gp[n * s0 + c * s1]) / static_cast<A>(L));
        }
      }
      const int64_t grain = std::max<int64_t>(1, 32768 / C);
      at::parallel_for(0, N * L, grain, [&](int64_t q0, int64_t q1) {
        gap_bwd_cl(reinterpret_cast<const char*>(v.data()), reinterpret_cast<char*>(gxp),
                   C * static_cast<int64_t>(sizeof(scalar_t)), L, q0, q1);
      });
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CPU, m) {
  m.impl("gap", &gap_cpu);
  m.impl("gap_backward", &gap_backward_cpu);
}
