// mlpconv on CUDA: relu(conv1x1(relu(conv1x1(relu(conv2d(x, W0, b0, stride, padding)), W1, b1)), W2, b2)),
// 1 to 3 stages, fused; and its backward.
//
// ================================================================================================
// One kernel does all the matrix work: _mlpconv_chain_kernel, a chain of up to 3 GEMM stages on a
// tile of BM = 64 "rows" (output pixels), everything after the first stage in shared memory:
//
//   stage 0:  acc[BM x N0] = A[BM x K0] * B0[K0 x N0], A gathered from an NHWC tensor on the fly
//             (implicit GEMM: no im2col tensor), K0 = kh*kw*C_src in (r, s, c) order, c fastest;
//   stage i:  acc[BM x Ni] = h_i[BM x K_i] * Bi, h_i = the previous stage's output tile, kept in
//             shared memory (in the data type, as torch rounds each conv's output);
//   epilogue per stage: + bias, then ReLU (forward) or the ReLU mask of a saved activation
//             (backward), or nothing (grad_x). The last stage writes the output once: NCHW,
//             NHWC rows, or per-block partial sums for the gap=True mean (reduced afterwards by
//             _mlpconv_gap_finalize_kernel in a fixed order: deterministic).
//
// Each stage runs its N in chunks of BN = 64 columns and its K in chunks of BK = 32, with the B
// chunk staged through shared memory (weights pre-packed into zero-padded [Kp][Np] matrices,
// Np a multiple of 64, so B loads need no bounds checks). The A (stage 0) and B chunks are
// double-buffered with cp.async (16-byte copies, zero-filled where the patch reads padding):
// step t + 1 loads while step t multiplies. Stage 0's A chunk is re-gathered for every
// 64-column chunk of N0 (from L1/L2: the tile was just read); that costs ceil(N0/64) - 1 extra
// gathers of the tile. Sources whose channel count is not a multiple of 16 bytes (e.g. the RGB
// input, Cin = 3) are gathered element by element with ordinary loads.
//
// The inner product of a BM x BN x BK step is a "math policy":
//   MathWmma16<half|bf16>  tensor cores, nvcuda::wmma 16x16x16, fp32 accumulators;
//   MathTf32               tensor cores for float32, wmma 16x16x8 precision::tf32 (inputs rounded
//                          to TF32 with __float_to_tf32), used ONLY when
//                          torch.backends.cudnn.allow_tf32 is true (convolutions follow the cuDNN
//                          flag);
//   MathSimt<T, Acc>       plain FMAs, 8x4 outputs per thread: float32 without TF32, float64, and
//                          every dtype when FASTNIN_CUDA_SIMT=1 (to tell a tensor-core bug from an
//                          algorithm bug on a GPU run).
// 4 warps (128 threads) per block; for wmma each warp owns a 32x32 quarter of the 64x64 tile.
//
// Wide channels (up to 1024 and beyond): a launch keeps the output of every stage but its last in
// shared memory, BM x (Np + pad) values each. The host packs consecutive stages into one launch
// while that fits the device's opt-in shared memory (227 KB on sm_90, 163 KB on sm_80), and
// otherwise SPLITS the chain: the launch ends after the stage that fits and writes that stage's
// output to a global NHWC rows tensor [M, Np] (in the data type), which the next launch reads as a
// 1x1 "convolution" source. What a split costs: one extra write and read of an M x C activation
// per split point (e.g. bf16 1024 channels at M = 128*6*6: 9.4 MB each way, a few us of bandwidth)
// and the launch; nothing else changes (same arithmetic, same rounding: results are bitwise the
// same as unsplit). Examples (bf16, BM = 64): 192/160/96 channels fuse all three stages (~77 KB);
// 1024/1024/1000 fuses stages 0+1 (h1 = 64 x 1032 x 2 B = 132 KB) and runs stage 2 alone; fp32 with
// 1024 channels runs every stage alone (one h tile = 263 KB). FASTNIN_CUDA_MLPCONV_SPLIT=1 forces
// one stage per launch (tests).
//
// Backward (the forward saves only x and out; intermediates are recomputed):
//   1. recompute h_1..h_{S-1} (and h_S when `out` is not given: gap=True or not kept) with the
//      forward chain, every stage also storing its tile to a global rows tensor H_i [M, Np_i];
//   2. G_S = grad_out (divided by Ho*Wo for gap) where out (or h_S) > 0 (torch's
//      threshold_backward: out <= 0 -> 0), into rows [M, Np_S];
//   3. G_i = (G_{i+1} W_i) * (H_i > 0), i = S-1..1: the same chain kernel, 1x1 stages with the
//      MASK epilogue, every stage storing G_i;
//   4. grad W_i = G_{i+1}^T X_i (X_0 = im2col(x), gathered again; X_i = H_i): _mlpconv_wgrad_kernel,
//      64x64 output tiles, the pixel sum split over gridDim.z slices into fp32 partial buffers that
//      _mlpconv_reduce_kernel adds in slice order (deterministic), writing W's layout and dtype;
//      grad b_i = column sums of G_i, _mlpconv_colsum_kernel + the same reduce;
//   5. grad_x = the transposed convolution of G_1 by W0 (only if requested): the chain kernel in
//      "dgrad" gather mode: row = input pixel (n, ih, iw), k = (r, s, c1), source
//      G_1[n, (ih + ph - r) / sh, (iw + pw - s) / sw, c1] when the division is exact and in range.
// Why not the per-tile partial weight gradients of a fully fused backward: a block's partial of
// grad W_i is C_{i+1} x C_i floats (4 MB at 1024 x 1024) per tile; materializing G_i / H_i (bf16)
// instead costs O(M x C) bytes and keeps the weight-gradient GEMMs long-K and deterministic.
// ================================================================================================
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.cuh"

namespace {

using fastnin::cuda::acc_t;
using fastnin::cuda::ceil_div;
using fastnin::cuda::load_vec16;
using fastnin::cuda::round_up;
using fastnin::cuda::store_vec16;
using fastnin::cuda::Vec16;
using fastnin::cuda::vec16;

constexpr int BM = 64;   // rows (pixels) per block
constexpr int BN = 64;   // output columns per chunk; every channel count is padded to a multiple
constexpr int BK = 32;   // K per step
constexpr int NT = 128;  // threads per block (4 warps)
constexpr int WG_BM = 32;  // wgrad: pixels per step

enum Epi : int { kEpiRelu = 0, kEpiMask = 1, kEpiNone = 2 };
enum OutMode : int { kOutRows = 0, kOutNchw = 1, kOutGap = 2 };

__host__ __device__ constexpr size_t align128(size_t v) { return (v + 127) / 128 * 128; }

// ------------------------------------------------------------------------------------------------
// Gather geometry: rows m in [0, M) are pixels (n, a, b) of an Rh x Rw grid; the source is NHWC
// [N, Sh, Sw, Sc]; k in [0, K = kh*kw*Sc) is (r, s, c), c fastest.
//   conv  : source pixel (a*sh - ph + r, b*sw - pw + s)
//   dgrad : source pixel ((a + ph - r) / sh, (b + pw - s) / sw) when both divisions are exact
// ------------------------------------------------------------------------------------------------
struct Geom {
  int64_t M;
  int Rh, Rw;
  int Sh, Sw, Sc;
  int kh, kw, sh, sw, ph, pw;
  int K;
  int dgrad;
};

struct RowInfo {
  int64_t nbase;  // offset of the row's image in the source; -1: row out of range
  int h0, w0;     // conv: a*sh - ph, b*sw - pw; dgrad: a + ph, b + pw
};

__device__ __forceinline__ RowInfo make_row(const Geom& g, int64_t m, int64_t m_end) {
  RowInfo ri;
  if (m >= m_end) {
    ri.nbase = -1;
    ri.h0 = ri.w0 = 0;
    return ri;
  }
  const int64_t per = static_cast<int64_t>(g.Rh) * g.Rw;
  const int64_t n = m / per;
  const int64_t p = m - n * per;
  const int a = static_cast<int>(p / g.Rw);
  const int b = static_cast<int>(p - static_cast<int64_t>(a) * g.Rw);
  ri.nbase = n * g.Sh * g.Sw * static_cast<int64_t>(g.Sc);
  if (!g.dgrad) {
    ri.h0 = a * g.sh - g.ph;
    ri.w0 = b * g.sw - g.pw;
  } else {
    ri.h0 = a + g.ph;
    ri.w0 = b + g.pw;
  }
  return ri;
}

__device__ __forceinline__ void decompose_k(const Geom& g, int k, int& r, int& s, int& c) {
  const int rs = k / g.Sc;
  c = k - rs * g.Sc;
  r = rs / g.kw;
  s = rs - r * g.kw;
}

// The source offset of (row, k = (r, s, c)), or false where the patch reads padding.
__device__ __forceinline__ bool source_offset(const Geom& g, const RowInfo& ri, int r, int s, int c, int64_t& off) {
  if (ri.nbase < 0) return false;
  int th, tw;
  if (!g.dgrad) {
    th = ri.h0 + r;
    tw = ri.w0 + s;
  } else {
    th = ri.h0 - r;
    tw = ri.w0 - s;
    if (th < 0 || tw < 0) return false;
    if (g.sh != 1) {
      if (th % g.sh != 0) return false;
      th /= g.sh;
    }
    if (g.sw != 1) {
      if (tw % g.sw != 0) return false;
      tw /= g.sw;
    }
  }
  if (static_cast<unsigned>(th) >= static_cast<unsigned>(g.Sh) ||
      static_cast<unsigned>(tw) >= static_cast<unsigned>(g.Sw))
    return false;
  off = ri.nbase + (static_cast<int64_t>(th) * g.Sw + tw) * g.Sc + c;
  return true;
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return static_cast<T>(0.0f);
}

// 16-byte global -> shared copies that complete asynchronously (cp.async, sm_80+), with a zero
// fill when `pred` is false (src-size 0: nothing is read, `src` only has to be a valid address).
// Visible to the block after cp_async_wait<n>() (this thread's groups) and a __syncthreads().
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(pred ? 16 : 0) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = pred ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N of this thread's commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Row sources for gather_tile: a table in shared memory (the chain kernel: its 64 rows are fixed
// for the whole block), or rows m0 + i computed on the spot (the weight-gradient kernel, whose
// rows move every step: each thread decomposes only the 2 rows it loads).
struct TableRows {
  const RowInfo* t;
  __device__ __forceinline__ RowInfo get(const Geom&, int i) const { return t[i]; }
};
struct InlineRows {
  int64_t m0, m_end;
  __device__ __forceinline__ RowInfo get(const Geom& g, int i) const { return make_row(g, m0 + i, m_end); }
};

// dst[ROWS][LD] (cols [0, COLS)) = A[rows][k0 .. k0 + COLS), zeros outside the image / K / M.
// vec: Sc % (16 / sizeof(T)) == 0 and src 16-byte aligned, so a 16-byte run of k shares (r, s):
// cp.async, part of the caller's commit group. Otherwise plain element loads and stores.
template <int ROWS, int COLS, int LD, typename T, typename Rows>
__device__ __forceinline__ void gather_tile(const T* __restrict__ src, const Geom& g, const Rows& rows, int k0,
                                            T* dst, bool vec) {
  if (vec) {
    constexpr int V = vec16<T>();
    constexpr int VPR = COLS / V;
    static_assert(COLS % V == 0 && NT % VPR == 0, "gather tile shape");
    const int kv = threadIdx.x % VPR;
    const int k = k0 + kv * V;
    const bool kok = k < g.K;  // K % V == 0 here, so a vector is all in or all out
    int r = 0, s = 0, c = 0;
    if (kok) decompose_k(g, k, r, s, c);
    for (int i = threadIdx.x / VPR; i < ROWS; i += NT / VPR) {
      int64_t off = 0;
      const bool ok = kok && source_offset(g, rows.get(g, i), r, s, c, off);
      cp_async16(dst + i * LD + kv * V, ok ? src + off : src, ok);
    }
  } else {
    static_assert(NT % COLS == 0, "gather tile shape");
    const int kk = threadIdx.x % COLS;
    const int k = k0 + kk;
    const bool kok = k < g.K;
    int r = 0, s = 0, c = 0;
    if (kok) decompose_k(g, k, r, s, c);
    for (int i = threadIdx.x / COLS; i < ROWS; i += NT / COLS) {
      T v = zero_of<T>();
      int64_t off;
      if (kok && source_offset(g, rows.get(g, i), r, s, c, off)) v = src[off];
      dst[i * LD + kk] = v;
    }
  }
}

// dst[ROWS][LD] = src[r0 + i][c0 .. c0 + COLS) for r0 + i < rlimit, else zeros (cp.async). src rows
// have ld elements, ld * sizeof(T) and c0 * sizeof(T) multiples of 16, src 16-byte aligned.
template <int ROWS, int COLS, int LD, typename T>
__device__ __forceinline__ void load_rows_tile(const T* __restrict__ src, int64_t ld, int64_t r0, int64_t rlimit,
                                               int64_t c0, T* dst) {
  constexpr int V = vec16<T>();
  constexpr int VPR = COLS / V;
  static_assert(COLS % V == 0, "row tile shape");
  for (int idx = threadIdx.x; idx < ROWS * VPR; idx += NT) {
    const int i = idx / VPR;
    const int v = idx - i * VPR;
    const bool ok = r0 + i < rlimit;
    cp_async16(dst + i * LD + v * V, ok ? src + (r0 + i) * ld + c0 + v * V : src, ok);
  }
}

// ------------------------------------------------------------------------------------------------
// Math policies: acc (+)= A[64 x kdepth] * B[kdepth x 64], then store acc to C[64][ldc].
// A is row-major (A[i * lda + k]) or, with A_COL, column-major (A[k * lda + i]).
// ------------------------------------------------------------------------------------------------

template <typename T, typename Acc>
struct MathSimt {
  using Elem = T;
  using AccT = Acc;
  // thread (ty = tid / 16, tx = tid % 16) owns rows ty + 8 i (i < 8) and columns tx + 16 j (j < 4):
  // a warp reads 2 distinct A addresses (broadcast) and 16 consecutive B values per k.
  Acc acc[8][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
  }
  template <bool A_COL>
  __device__ __forceinline__ void mma(const T* A, int lda, const T* B, int ldb, int kdepth) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int kk = 0; kk < kdepth; ++kk) {
      Acc a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        a[i] = static_cast<Acc>(A_COL ? A[kk * lda + ty + 8 * i] : A[(ty + 8 * i) * lda + kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = static_cast<Acc>(B[kk * ldb + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(Acc* C, int64_t ldc) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) C[(ty + 8 * i) * ldc + tx + 16 * j] = acc[i][j];
  }
};

namespace wmma = nvcuda::wmma;

template <typename T>
struct WmmaElem;
template <>
struct WmmaElem<c10::Half> {
  using type = __half;
};
template <>
struct WmmaElem<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Tensor cores need sm_80 (bf16, tf32); the host never launches these below sm_80, and the
// device code is compiled to a trap there so that a TORCH_CUDA_ARCH_LIST with 7.x still builds.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#define FASTNIN_WMMA_OK 0
#else
#define FASTNIN_WMMA_OK 1
#endif

template <typename T>
struct MathWmma16 {
  using Elem = T;
  using AccT = float;
  using W = typename WmmaElem<T>::type;
  // warp w owns rows (w / 2) * 32 .. +32 and columns (w % 2) * 32 .. +32: 2 x 2 fragments.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ __forceinline__ void zero() {
#if FASTNIN_WMMA_OK
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#endif
  }
  template <bool A_COL>
  __device__ __forceinline__ void mma(const T* A, int lda, const T* B, int ldb, int kdepth) {
#if FASTNIN_WMMA_OK
    using ALayout = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    const W* Aw = reinterpret_cast<const W*>(A);
    const W* Bw = reinterpret_cast<const W*>(B);
    for (int kk = 0; kk < kdepth; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, ALayout> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], A_COL ? Aw + kk * lda + wr + 16 * i : Aw + (wr + 16 * i) * lda + kk, lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bw + kk * ldb + wc + 16 * j, ldb);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
#else
    __trap();
#endif
  }
  __device__ __forceinline__ void store(float* C, int64_t ldc) const {
#if FASTNIN_WMMA_OK
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(C + (wr + 16 * i) * ldc + wc + 16 * j, acc[i][j], static_cast<unsigned>(ldc),
                                wmma::mem_row_major);
#endif
  }
};

struct MathTf32 {
  using Elem = float;
  using AccT = float;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
  __device__ __forceinline__ void zero() {
#if FASTNIN_WMMA_OK
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#endif
  }
  template <bool A_COL>
  __device__ __forceinline__ void mma(const float* A, int lda, const float* B, int ldb, int kdepth) {
#if FASTNIN_WMMA_OK
    using ALayout = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    for (int kk = 0; kk < kdepth; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, ALayout> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], A_COL ? A + kk * lda + wr + 16 * i : A + (wr + 16 * i) * lda + kk, lda);
#pragma unroll
        for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], B + kk * ldb + wc + 16 * j, ldb);
#pragma unroll
        for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
#else
    __trap();
#endif
  }
  __device__ __forceinline__ void store(float* C, int64_t ldc) const {
#if FASTNIN_WMMA_OK
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(C + (wr + 16 * i) * ldc + wc + 16 * j, acc[i][j], static_cast<unsigned>(ldc),
                                wmma::mem_row_major);
#endif
  }
};

// ------------------------------------------------------------------------------------------------
// Shared-memory layout of the chain kernel (the host computes the same numbers). Row pads of
// 16 bytes keep every row 16-byte aligned (vector stores), every wmma pointer 32-byte aligned and
// ldm a multiple of 8 (16-bit) / 4 (32-bit) elements, and shift rows across banks.
// ------------------------------------------------------------------------------------------------
template <typename T, typename Acc>
struct ChainLayout {
  static constexpr int LDA = BK + vec16<T>();
  static constexpr int LDB = BN + vec16<T>();
  static constexpr int LDC = BN + static_cast<int>(16 / sizeof(Acc));
  // A and B chunks are double-buffered: step t + 1 loads (cp.async) while step t multiplies.
  static constexpr int A_ELEMS = static_cast<int>(align128(static_cast<size_t>(BM) * LDA * sizeof(T)) / sizeof(T));
  static constexpr int B_ELEMS = static_cast<int>(align128(static_cast<size_t>(BK) * LDB * sizeof(T)) / sizeof(T));
  static constexpr size_t a_off = align128(BM * sizeof(RowInfo));
  static constexpr size_t b_off = a_off + 2 * static_cast<size_t>(A_ELEMS) * sizeof(T);
  static constexpr size_t c_off = b_off + 2 * static_cast<size_t>(B_ELEMS) * sizeof(T);
  static constexpr size_t h_off = c_off + align128(static_cast<size_t>(BM) * LDC * sizeof(Acc));
  __host__ __device__ static int ldh(int np) { return np + vec16<T>(); }
  __host__ __device__ static size_t hbytes(int np) { return align128(static_cast<size_t>(BM) * ldh(np) * sizeof(T)); }
  // nst stages in one launch: the outputs of the first nst - 1 stay in shared memory.
  static size_t total(int nst, int np0, int np1) {
    return h_off + (nst >= 2 ? hbytes(np0) : 0) + (nst >= 3 ? hbytes(np1) : 0);
  }
};

template <typename T, typename Acc>
struct StageArgs {
  const T* w;       // packed B, [Kp][Np]
  const Acc* bias;  // [Np] (zero-padded) or null
  const T* mask;    // kEpiMask: rows [M][Np] whose > 0 entries pass
  T* store;         // optional: also write this stage's output rows [M][Np] (not for the last stage)
  int Kp, Np, C;
  int epi;
};

template <typename T, typename Acc>
struct ChainArgs {
  const T* src;
  Geom g;
  int vec;  // 16-byte gathers
  int nst;
  StageArgs<T, Acc> st[3];
  // output of the last stage
  int out_mode;
  T* out;           // kOutRows: out[m * out_ld + col], col < out_ld; kOutNchw: out[(n * out_C + col) * P + p]
  int64_t out_ld;
  int64_t P;        // pixels per image (kOutNchw, kOutGap)
  int out_C;
  Acc* gap_part;    // kOutGap: [gridDim.x][gap_ipb][Np]
  int gap_ipb;
};

template <typename T, typename Acc>
__device__ __forceinline__ Acc stage_value(const StageArgs<T, Acc>& st, Acc v, int64_t m, bool mvalid, int col) {
  if (col >= st.C) return Acc(0);  // padding columns are exact zeros (even if x holds NaN)
  if (st.bias != nullptr) v += st.bias[col];
  if (st.epi == kEpiRelu) {
    v = v < Acc(0) ? Acc(0) : v;  // NaN stays NaN, as torch.relu
  } else if (st.epi == kEpiMask) {
    // torch's threshold_backward(grad, h, 0): h <= 0 -> 0, else grad (a NaN h passes grad).
    const bool pass = mvalid && !(static_cast<Acc>(st.mask[m * st.Np + col]) <= Acc(0));
    v = pass ? v : Acc(0);
  }
  return v;
}

template <class Math>
__global__ void __launch_bounds__(NT, 1)
    _mlpconv_chain_kernel(const ChainArgs<typename Math::Elem, typename Math::AccT> p) {
  using T = typename Math::Elem;
  using Acc = typename Math::AccT;
  using L = ChainLayout<T, Acc>;
  extern __shared__ __align__(128) unsigned char smem[];
  RowInfo* sRow = reinterpret_cast<RowInfo*>(smem);
  T* sA = reinterpret_cast<T*>(smem + L::a_off);
  T* sB = reinterpret_cast<T*>(smem + L::b_off);
  Acc* sC = reinterpret_cast<Acc*>(smem + L::c_off);
  T* h0 = reinterpret_cast<T*>(smem + L::h_off);
  T* h1 = reinterpret_cast<T*>(smem + L::h_off + L::hbytes(p.st[0].Np));
  const int tid = threadIdx.x;
  const int64_t M = p.g.M;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;

  for (int i = tid; i < BM; i += NT) sRow[i] = make_row(p.g, m0 + i, M);
  __syncthreads();

  Math mth;
  for (int ls = 0; ls < p.nst; ++ls) {
    const StageArgs<T, Acc> st = p.st[ls];
    const bool last = ls == p.nst - 1;
    // stage 1 reads h0 (stage 0's output), stage 2 reads h1; stage 0 writes h0, stage 1 h1.
    const T* hin = ls == 1 ? h0 : h1;
    const int ldin = ls == 1 ? L::ldh(p.st[0].Np) : L::ldh(p.st[1].Np);
    T* hout = ls == 0 ? h0 : h1;
    const int ldout = L::ldh(st.Np);
    const int nk = st.Kp / BK;
    for (int n0 = 0; n0 < st.Np; n0 += BN) {
      mth.zero();
      // K steps, double-buffered: step t + 1's A (stage 0) and B chunks are in flight while step
      // t multiplies. A buffer is refilled only after the __syncthreads that ends the step which
      // last read it.
      auto issue = [&](int t) {
        const int buf = t & 1;
        if (ls == 0) {
          gather_tile<BM, BK, L::LDA>(p.src, p.g, TableRows{sRow}, t * BK, sA + buf * L::A_ELEMS, p.vec != 0);
        }
        load_rows_tile<BK, BN, L::LDB>(st.w, st.Np, static_cast<int64_t>(t) * BK, st.Kp, n0, sB + buf * L::B_ELEMS);
        cp_async_commit();
      };
      if (nk > 0) issue(0);
      for (int t = 0; t < nk; ++t) {
        if (t + 1 < nk) {
          issue(t + 1);
          cp_async_wait<1>();  // step t's group has landed (this thread's part)
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();  // ... and every thread's part
        const T* b = sB + (t & 1) * L::B_ELEMS;
        if (ls == 0) {
          mth.template mma<false>(sA + (t & 1) * L::A_ELEMS, L::LDA, b, L::LDB, BK);
        } else {
          mth.template mma<false>(hin + t * BK, ldin, b, L::LDB, BK);
        }
        __syncthreads();
      }
      mth.store(sC, L::LDC);
      __syncthreads();
      if (!last) {
        for (int idx = tid; idx < BM * BN; idx += NT) {
          const int i = idx / BN, j = idx % BN, col = n0 + j;
          const int64_t m = m0 + i;
          const bool mvalid = m < M;
          const T tv = static_cast<T>(stage_value(st, sC[i * L::LDC + j], m, mvalid, col));
          hout[i * ldout + col] = tv;
          if (st.store != nullptr && mvalid) st.store[m * st.Np + col] = tv;
        }
      } else if (p.out_mode == kOutRows) {
        for (int idx = tid; idx < BM * BN; idx += NT) {
          const int i = idx / BN, j = idx % BN, col = n0 + j;
          const int64_t m = m0 + i;
          if (m < M && col < p.out_ld)
            p.out[m * p.out_ld + col] = static_cast<T>(stage_value(st, sC[i * L::LDC + j], m, true, col));
        }
      } else if (p.out_mode == kOutNchw) {
        // consecutive threads take consecutive pixels: coalesced NCHW stores
        for (int idx = tid; idx < BM * BN; idx += NT) {
          const int i = idx % BM, j = idx / BM, col = n0 + j;
          const int64_t m = m0 + i;
          if (m < M && col < st.C) {
            const int64_t n = m / p.P;
            const int64_t pp = m - n * p.P;
            p.out[(n * p.out_C + col) * p.P + pp] = static_cast<T>(stage_value(st, sC[i * L::LDC + j], m, true, col));
          }
        }
      } else {
        // gap: thread j sums column j over the tile's rows in order, one partial per image met.
        if (tid < BN) {
          const int j = tid, col = n0 + j;
          const int64_t n_first = m0 / p.P;
          int64_t ncur = n_first;
          Acc s = Acc(0);
          for (int i = 0; i < BM; ++i) {
            const int64_t m = m0 + i;
            if (m >= M) break;
            const int64_t n = m / p.P;
            if (n != ncur) {
              p.gap_part[(static_cast<int64_t>(blockIdx.x) * p.gap_ipb + (ncur - n_first)) * st.Np + col] = s;
              s = Acc(0);
              ncur = n;
            }
            s += stage_value(st, sC[i * L::LDC + j], m, true, col);
          }
          p.gap_part[(static_cast<int64_t>(blockIdx.x) * p.gap_ipb + (ncur - n_first)) * st.Np + col] = s;
        }
      }
      __syncthreads();
    }
  }
}

// out[n, c] = (sum over the blocks that hold rows of image n, in block order) / P.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 1) _mlpconv_gap_finalize_kernel(const Acc* __restrict__ part, int ipb, int Np,
                                                                    int64_t N, int C, int64_t P, T* __restrict__ out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < N * C;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / C;
    const int c = static_cast<int>(e - n * C);
    const int64_t b_first = (n * P) / BM, b_last = ((n + 1) * P - 1) / BM;
    Acc s = Acc(0);
    for (int64_t b = b_first; b <= b_last; ++b) {
      const int64_t nf = (b * BM) / P;
      s += part[(b * ipb + (n - nf)) * Np + c];
    }
    out[e] = static_cast<T>(s / static_cast<Acc>(P));
  }
}

// ------------------------------------------------------------------------------------------------
// Weight gradients: part[z][o][k] = sum over pixels m of slice z of G[m][o] * X[m][k], X gathered
// like stage 0's A. Block (k tile, o tile, z): 64 x 64 outputs, WG_BM pixels per step.
// ------------------------------------------------------------------------------------------------
template <typename T, typename Acc>
struct WgradLayout {
  static constexpr int LDG = BN + vec16<T>();
  static constexpr int LDX = BN + vec16<T>();
  // double-buffered like the chain kernel
  static constexpr int G_ELEMS = static_cast<int>(align128(static_cast<size_t>(WG_BM) * LDG * sizeof(T)) / sizeof(T));
  static constexpr int X_ELEMS = static_cast<int>(align128(static_cast<size_t>(WG_BM) * LDX * sizeof(T)) / sizeof(T));
  static constexpr size_t x_off = 2 * static_cast<size_t>(G_ELEMS) * sizeof(T);
  static constexpr size_t total = x_off + 2 * static_cast<size_t>(X_ELEMS) * sizeof(T);
};

template <typename T, typename Acc>
struct WgradArgs {
  const T* g;  // rows [M][Op]
  int Op;
  const T* src;
  Geom geom;
  int vec;
  int64_t m_per_split;
  Acc* part;  // [P][Op][Kdp]
  int Kdp;
};

template <class Math>
__global__ void __launch_bounds__(NT, 1)
    _mlpconv_wgrad_kernel(const WgradArgs<typename Math::Elem, typename Math::AccT> p) {
  using T = typename Math::Elem;
  using Acc = typename Math::AccT;
  using L = WgradLayout<T, Acc>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sG = reinterpret_cast<T*>(smem);
  T* sX = reinterpret_cast<T*>(smem + L::x_off);
  const int k0 = blockIdx.x * BN;
  const int o0 = blockIdx.y * BN;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * p.m_per_split;
  const int64_t m_end = m_begin + p.m_per_split < p.geom.M ? m_begin + p.m_per_split : p.geom.M;
  const int64_t nsteps = m_end > m_begin ? ceil_div<int64_t>(m_end - m_begin, WG_BM) : 0;
  Math mth;
  mth.zero();
  auto issue = [&](int64_t t) {
    const int buf = static_cast<int>(t & 1);
    const int64_t mc = m_begin + t * WG_BM;
    load_rows_tile<WG_BM, BN, L::LDG>(p.g, p.Op, mc, m_end, o0, sG + buf * L::G_ELEMS);
    gather_tile<WG_BM, BN, L::LDX>(p.src, p.geom, InlineRows{mc, m_end}, k0, sX + buf * L::X_ELEMS, p.vec != 0);
    cp_async_commit();
  };
  if (nsteps > 0) issue(0);
  for (int64_t t = 0; t < nsteps; ++t) {
    if (t + 1 < nsteps) {
      issue(t + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = static_cast<int>(t & 1);
    // acc[o][k] += sum_m G[m][o] X[m][k]: A = G^T, i.e. sG read column-major.
    mth.template mma<true>(sG + buf * L::G_ELEMS, L::LDG, sX + buf * L::X_ELEMS, L::LDX, WG_BM);
    __syncthreads();
  }
  mth.store(p.part + (static_cast<int64_t>(blockIdx.z) * p.Op + o0) * p.Kdp + k0, p.Kdp);
}

// Column sums of rows [M][Op]: part[z][col] over the rows of slice z, in row order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(64) _mlpconv_colsum_kernel(const T* __restrict__ g, int Op, int64_t M,
                                                             int64_t rows_per_split, Acc* __restrict__ part) {
  const int col = blockIdx.x * 64 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < M ? r0 + rows_per_split : M;
  Acc s = Acc(0);
  for (int64_t r = r0; r < r1; ++r) s += static_cast<Acc>(g[r * Op + col]);
  part[static_cast<int64_t>(blockIdx.y) * Op + col] = s;
}

// out[o, ci, r, s] (strided) = sum_z part[z][o][k], k = (r * kw + s) * Cin + ci, slices in order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256) _mlpconv_reduce_kernel(const Acc* __restrict__ part, int P, int Op, int Kdp,
                                                              int O, int Kd, int Cin, int kw, T* __restrict__ out,
                                                              int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t total = static_cast<int64_t>(O) * Kd;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int o = static_cast<int>(e / Kd);
    const int k = static_cast<int>(e - static_cast<int64_t>(o) * Kd);
    Acc s = Acc(0);
    for (int z = 0; z < P; ++z) s += part[(static_cast<int64_t>(z) * Op + o) * Kdp + k];
    const int rs = k / Cin, ci = k - rs * Cin;
    const int r = rs / kw, sx = rs - r * kw;
    out[o * s0 + ci * s1 + r * s2 + sx * s3] = static_cast<T>(s);
  }
}

// G_S[m][c] = grad_out (/ P for gap) where !(h_S <= 0), h_S from `out` (strided) or rows [M][Np].
template <typename T>
struct GoutArgs {
  const T* gout;
  int64_t gs0, gs1, gs2, gs3;  // [N, C, Ho, Wo] strides, or [N, C] for gap
  const T* out;                // strided [N, C, Ho, Wo], or null
  int64_t os0, os1, os2, os3;
  const T* hrows;              // rows [M][Np] when out is null
  T* g;                        // rows [M][Np]
  int64_t M, P;
  int Wo, C, Np;
  int gap;
};

template <typename T>
__global__ void __launch_bounds__(256, 1) _mlpconv_gout_kernel(const GoutArgs<T> a) {
  using A = acc_t<T>;
  const int64_t total = a.M * a.Np;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / a.Np;
    const int c = static_cast<int>(e - m * a.Np);
    T v = zero_of<T>();
    if (c < a.C) {
      const int64_t n = m / a.P;
      const int64_t pp = m - n * a.P;
      const int64_t oh = pp / a.Wo, ow = pp - (pp / a.Wo) * a.Wo;
      const T gv = a.gap ? static_cast<T>(static_cast<A>(a.gout[n * a.gs0 + c * a.gs1]) / static_cast<A>(a.P))
                         : a.gout[n * a.gs0 + c * a.gs1 + oh * a.gs2 + ow * a.gs3];
      const T hv = a.out != nullptr ? a.out[n * a.os0 + c * a.os1 + oh * a.os2 + ow * a.os3] : a.hrows[e];
      if (!(static_cast<A>(hv) <= A(0))) v = gv;
    }
    a.g[e] = v;
  }
}

// ================================================================================================
// Host side
// ================================================================================================

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Whether torch lets its float32 convolutions use TF32: the conv setting itself. torch >= 2.9's
// per-op flags (torch.backends.cudnn.conv.fp32_precision, torch.backends.fp32_precision) can
// leave conv, rnn and the legacy cudnn flag disagreeing, and then the argument-less
// allowTF32CuDNN() throws, as torch.backends.cudnn.allow_tf32 does. Its argument has been an
// optional Float32Op, a string (the first releases of that API) or nothing (before it): the type
// of the member function picks the call, so the source compiles against each.
template <typename F>
struct Tf32QueryArg {
  using type = void;
};
template <typename C, typename A>
struct Tf32QueryArg<bool (C::*)(A) const> {
  using type = std::decay_t<A>;
};
template <typename T>
struct IsOptional : std::false_type {};
template <typename T>
struct IsOptional<std::optional<T>> : std::true_type {};

template <typename Ctx>
bool conv_allows_tf32(const Ctx& ctx) {
  using Arg = typename Tf32QueryArg<decltype(&Ctx::allowTF32CuDNN)>::type;
  if constexpr (IsOptional<Arg>::value) {
    return ctx.allowTF32CuDNN(Arg::value_type::CONV);
  } else if constexpr (std::is_same_v<Arg, std::string>) {
    return ctx.allowTF32CuDNN("conv");
  } else {
    return ctx.allowTF32CuDNN();
  }
}

// Tensor cores: 16-bit types always, float32 only when torch allows TF32 for convolutions
// (conv_allows_tf32), never float64; FASTNIN_CUDA_SIMT=1 turns them off.
bool use_tensor_cores(at::ScalarType t) {
  if (fastnin::cuda::env_flag("FASTNIN_CUDA_SIMT")) return false;
  if (t == at::kDouble) return false;
  if (fastnin::cuda::device_major() < 8) return false;
  if (t == at::kFloat) return conv_allows_tf32(at::globalContext());
  return true;
}

// One static opt-in flag per kernel (Kernel is a template argument) and device.
template <auto Kernel, typename Args>
void launch_with_smem(const Args& args, dim3 grid, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    // Raise the kernel's dynamic shared-memory limit once per device, to the device maximum
    // (idempotent: concurrent launches never see a smaller limit than they need).
    static std::once_flag flags[64];
    const int dev = fastnin::cuda::current_device();
    TORCH_CHECK(dev < 64, "fastnin: device index ", dev, " out of range");
    std::call_once(flags[dev], [] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          fastnin::cuda::max_smem_optin()));
    });
  }
  Kernel<<<grid, NT, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_chain(const ChainArgs<T, acc_t<T>>& a, bool tc, size_t smem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(a.g.M, BM)));
  if constexpr (std::is_same<T, double>::value) {
    launch_with_smem<_mlpconv_chain_kernel<MathSimt<double, double>>>(a, grid, smem, stream);
  } else if constexpr (std::is_same<T, float>::value) {
    if (tc) {
      launch_with_smem<_mlpconv_chain_kernel<MathTf32>>(a, grid, smem, stream);
    } else {
      launch_with_smem<_mlpconv_chain_kernel<MathSimt<float, float>>>(a, grid, smem, stream);
    }
  } else {
    if (tc) {
      launch_with_smem<_mlpconv_chain_kernel<MathWmma16<T>>>(a, grid, smem, stream);
    } else {
      launch_with_smem<_mlpconv_chain_kernel<MathSimt<T, float>>>(a, grid, smem, stream);
    }
  }
}

template <typename T>
void launch_wgrad(const WgradArgs<T, acc_t<T>>& a, bool tc, dim3 grid, cudaStream_t stream) {
  const size_t smem = WgradLayout<T, acc_t<T>>::total;
  if constexpr (std::is_same<T, double>::value) {
    launch_with_smem<_mlpconv_wgrad_kernel<MathSimt<double, double>>>(a, grid, smem, stream);
  } else if constexpr (std::is_same<T, float>::value) {
    if (tc) {
      launch_with_smem<_mlpconv_wgrad_kernel<MathTf32>>(a, grid, smem, stream);
    } else {
      launch_with_smem<_mlpconv_wgrad_kernel<MathSimt<float, float>>>(a, grid, smem, stream);
    }
  } else {
    if (tc) {
      launch_with_smem<_mlpconv_wgrad_kernel<MathWmma16<T>>>(a, grid, smem, stream);
    } else {
      launch_with_smem<_mlpconv_wgrad_kernel<MathSimt<T, float>>>(a, grid, smem, stream);
    }
  }
}

unsigned grid_1d(int64_t work, int threads) {
  return fastnin::cuda::grid_for(work, threads, static_cast<int64_t>(fastnin::cuda::sm_count()) * 16);
}

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v < (int64_t(1) << 30), "mlpconv: ", what, " = ", v,
              " is beyond what the CUDA kernels index with 32-bit integers (< 2^30)");
  return static_cast<int>(v);
}

// ---- weight / bias packing (small ATen copies; zero padding makes the B loads bound-free) ------

// Forward stage 0: B[(r * kw + s) * Cin + ci][c1] = W0[c1, ci, r, s], [roundup(K, BK)][roundup(C1, BN)].
at::Tensor pack_w0(const at::Tensor& w) {
  const int64_t C1 = w.size(0), Cin = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t K = kh * kw * Cin;
  at::Tensor b = at::zeros({round_up<int64_t>(K, BK), round_up<int64_t>(C1, BN)}, w.options());
  if (K > 0) b.narrow(0, 0, K).narrow(1, 0, C1).copy_(w.permute({2, 3, 1, 0}).reshape({K, C1}));
  return b;
}

// Forward 1x1 stage: B[i][o] = W[o, i], [roundup(Ci, BN)][roundup(Co, BN)].
at::Tensor pack_w1x1_fwd(const at::Tensor& w) {
  const int64_t Co = w.size(0), Ci = w.size(1);
  at::Tensor b = at::zeros({round_up<int64_t>(Ci, BN), round_up<int64_t>(Co, BN)}, w.options());
  b.narrow(0, 0, Ci).narrow(1, 0, Co).copy_(w.reshape({Co, Ci}).t());
  return b;
}

// Backward through a 1x1 stage (grad of its input): B[o][i] = W[o, i], [roundup(Co, BN)][roundup(Ci, BN)].
at::Tensor pack_w1x1_bwd(const at::Tensor& w) {
  const int64_t Co = w.size(0), Ci = w.size(1);
  at::Tensor b = at::zeros({round_up<int64_t>(Co, BN), round_up<int64_t>(Ci, BN)}, w.options());
  b.narrow(0, 0, Co).narrow(1, 0, Ci).copy_(w.reshape({Co, Ci}));
  return b;
}

// grad_x: B[(r * kw + s) * C1p + c1][ci] = W0[c1, ci, r, s], [kh * kw * C1p][roundup(Cin, BN)].
at::Tensor pack_w0_dgrad(const at::Tensor& w) {
  const int64_t C1 = w.size(0), Cin = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t C1p = round_up<int64_t>(C1, BN);
  at::Tensor b = at::zeros({kh, kw, C1p, round_up<int64_t>(Cin, BN)}, w.options());
  b.narrow(2, 0, C1).narrow(3, 0, Cin).copy_(w.permute({2, 3, 0, 1}));
  return b.view({kh * kw * C1p, b.size(3)});
}

at::Tensor pack_bias(const std::optional<at::Tensor>& bias, int64_t C, const at::TensorOptions& opt) {
  at::Tensor b = at::zeros({round_up<int64_t>(C, BN)}, opt.dtype(acc_dtype(opt.dtype().toScalarType())));
  if (bias.has_value() && bias->defined()) b.narrow(0, 0, C).copy_(*bias);
  return b;
}

// ---- chains ----------------------------------------------------------------------------------

template <typename T>
struct StageDesc {
  const T* w;
  const acc_t<T>* bias;
  int Kp, Np, C, epi;
  const T* mask;
  T* store;
};

template <typename T>
struct OutDesc {
  int mode;
  T* out;
  int64_t ld;  // kOutRows
  int64_t P;   // kOutNchw / kOutGap
  int C;       // kOutNchw / kOutGap
  T* gap_out;  // kOutGap: [N][C]
  int64_t N;
};

// Greedy launch plan: as many consecutive stages per launch as the shared memory allows.
std::vector<std::pair<int, int>> plan_launches(const std::vector<int>& np, size_t (*smem_of)(int, int, int)) {
  const size_t limit = static_cast<size_t>(fastnin::cuda::max_smem_optin());
  const bool force_split = fastnin::cuda::env_flag("FASTNIN_CUDA_MLPCONV_SPLIT");
  std::vector<std::pair<int, int>> plan;
  const int S = static_cast<int>(np.size());
  for (int s = 0; s < S;) {
    int e = s + 1;
    while (!force_split && e < S && e - s < 3) {
      const int nst = e + 1 - s;
      if (smem_of(nst, np[s], nst >= 3 ? np[s + 1] : 0) > limit) break;
      ++e;
    }
    TORCH_CHECK(smem_of(e - s, np[s], e - s >= 3 ? np[s + 1] : 0) <= limit, "mlpconv: this GPU allows ", limit,
                " bytes of shared memory per block; the CUDA kernels need ", smem_of(e - s, np[s], 0),
                " (they are built for sm_80 / sm_90)");
    plan.emplace_back(s, e);
    s = e;
  }
  return plan;
}

template <typename T>
size_t chain_smem(int nst, int np0, int np1) {
  return ChainLayout<T, acc_t<T>>::total(nst, np0, np1);
}

// Run stages[0..S) on rows given by `g` (the first stage gathers from src), writing the last
// stage's output as `out` says. Launch boundaries go through global rows tensors (the stage's
// `store` if it has one, else a temporary).
template <typename T>
void run_chain(const T* src, const Geom& g, std::vector<StageDesc<T>> stages, const OutDesc<T>& out, bool tc,
               const at::TensorOptions& opt, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int S = static_cast<int>(stages.size());
  std::vector<int> np;
  for (const auto& st : stages) np.push_back(st.Np);
  const auto plan = plan_launches(np, &chain_smem<T>);
  std::vector<at::Tensor> temps;
  const T* cur_src = src;
  Geom cur_g = g;
  for (const auto& [s, e] : plan) {
    ChainArgs<T, Acc> a{};
    a.src = cur_src;
    a.g = cur_g;
    const int V = vec16<T>();
    a.vec = (cur_g.Sc % V == 0) && fastnin::cuda::aligned16(cur_src);
    a.nst = e - s;
    for (int i = s; i < e; ++i) {
      StageArgs<T, Acc>& st = a.st[i - s];
      st.w = stages[i].w;
      st.bias = stages[i].bias;
      st.mask = stages[i].mask;
      st.store = i < e - 1 ? stages[i].store : nullptr;
      st.Kp = stages[i].Kp;
      st.Np = stages[i].Np;
      st.C = stages[i].C;
      st.epi = stages[i].epi;
    }
    // The unused h buffer offsets still read st[0].Np / st[1].Np: keep them sane.
    for (int i = a.nst; i < 3; ++i) a.st[i].Np = a.st[0].Np;
    if (e == S) {
      a.out_mode = out.mode;
      a.out = out.out;
      a.out_ld = out.ld;
      a.P = out.P;
      a.out_C = out.C;
    } else {
      // split point: this launch's last stage goes to rows [M][Np] that the next launch gathers.
      T* rows = stages[e - 1].store;
      if (rows == nullptr) {
        temps.push_back(at::empty({cur_g.M, np[e - 1]}, opt));
        rows = temps.back().template mutable_data_ptr<T>();
      }
      a.out_mode = kOutRows;
      a.out = rows;
      a.out_ld = np[e - 1];
    }
    at::Tensor gap_part;
    if (a.out_mode == kOutGap) {
      a.gap_ipb = static_cast<int>(std::min<int64_t>(out.N, (BM - 1) / out.P + 2));
      const int64_t blocks = ceil_div<int64_t>(cur_g.M, BM);
      gap_part = at::empty({blocks, a.gap_ipb, np[S - 1]}, opt.dtype(acc_dtype(opt.dtype().toScalarType())));
      a.gap_part = gap_part.template mutable_data_ptr<Acc>();
    }
    launch_chain<T>(a, tc, chain_smem<T>(a.nst, a.st[0].Np, a.nst >= 3 ? a.st[1].Np : 0), stream);
    if (a.out_mode == kOutGap) {
      const int64_t work = out.N * out.C;
      _mlpconv_gap_finalize_kernel<T, Acc><<<grid_1d(work, 256), 256, 0, stream>>>(
          gap_part.template const_data_ptr<Acc>(), a.gap_ipb, np[S - 1], out.N, out.C, out.P, out.gap_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (e < S) {
      // the next launch reads this launch's rows as a 1x1 convolution of the Ho x Wo grid
      cur_src = a.out;
      cur_g.Sh = g.Rh;
      cur_g.Sw = g.Rw;
      cur_g.Sc = np[e - 1];
      cur_g.kh = cur_g.kw = cur_g.sh = cur_g.sw = 1;
      cur_g.ph = cur_g.pw = 0;
      cur_g.K = np[e - 1];
      cur_g.dgrad = 0;
    }
  }
}

// Geometry of the forward convolution over x (NHWC, contiguous channels_last).
Geom conv_geom(const fastnin::MlpconvShape& s) {
  Geom g{};
  g.M = s.N * s.Ho * s.Wo;
  g.Rh = checked_int(s.Ho, "output height");
  g.Rw = checked_int(s.Wo, "output width");
  g.Sh = checked_int(s.H, "input height");
  g.Sw = checked_int(s.W, "input width");
  g.Sc = checked_int(s.Cin, "input channels");
  g.kh = checked_int(s.kh, "kernel height");
  g.kw = checked_int(s.kw, "kernel width");
  g.sh = checked_int(s.sh, "stride");
  g.sw = checked_int(s.sw, "stride");
  g.ph = checked_int(s.ph, "padding");
  g.pw = checked_int(s.pw, "padding");
  checked_int(s.H + 2 * s.ph + s.sh, "padded input height + stride");
  checked_int(s.W + 2 * s.pw + s.sw, "padded input width + stride");
  g.K = checked_int(s.kh * s.kw * s.Cin, "kh * kw * Cin");
  g.dgrad = 0;
  return g;
}

// rows [M][C] (M = N * Ho * Wo) read as a 1x1 convolution source.
Geom rows_geom(const fastnin::MlpconvShape& s, int C) {
  Geom g{};
  g.M = s.N * s.Ho * s.Wo;
  g.Rh = g.Sh = static_cast<int>(s.Ho);
  g.Rw = g.Sw = static_cast<int>(s.Wo);
  g.Sc = C;
  g.kh = g.kw = g.sh = g.sw = 1;
  g.ph = g.pw = 0;
  g.K = C;
  g.dgrad = 0;
  return g;
}

int padded(int64_t c) { return static_cast<int>(round_up<int64_t>(c, BN)); }

template <typename T>
struct Packs {
  std::vector<at::Tensor> w, b;
};

template <typename T>
Packs<T> pack_forward(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases, int stages) {
  Packs<T> p;
  for (int i = 0; i < stages; ++i) {
    p.w.push_back(i == 0 ? pack_w0(weights[0]) : pack_w1x1_fwd(weights[i]));
    p.b.push_back(pack_bias(biases[i], weights[i].size(0), weights[i].options()));
  }
  return p;
}

template <typename T>
std::vector<StageDesc<T>> forward_stages(const fastnin::MlpconvShape& s, const Packs<T>& pk, int stages) {
  std::vector<StageDesc<T>> st;
  for (int i = 0; i < stages; ++i) {
    StageDesc<T> d{};
    d.w = pk.w[i].template const_data_ptr<T>();
    d.bias = pk.b[i].template const_data_ptr<acc_t<T>>();
    d.Kp = static_cast<int>(pk.w[i].size(0));
    d.Np = static_cast<int>(pk.w[i].size(1));
    d.C = checked_int(s.C[i], "channels");
    d.epi = kEpiRelu;
    st.push_back(d);
  }
  return st;
}

template <typename T>
void mlpconv_forward_impl(const at::Tensor& xs, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases, const fastnin::MlpconvShape& s, bool gap,
                          at::Tensor& out, cudaStream_t stream) {
  const int S = static_cast<int>(s.stages());
  const bool tc = use_tensor_cores(xs.scalar_type());
  const Packs<T> pk = pack_forward<T>(weights, biases, S);
  const Geom g = conv_geom(s);
  OutDesc<T> od{};
  od.P = s.Ho * s.Wo;
  od.C = static_cast<int>(s.Cout());
  od.N = s.N;
  if (gap) {
    od.mode = kOutGap;
    od.gap_out = out.mutable_data_ptr<T>();
  } else if (out.is_contiguous()) {
    od.mode = kOutNchw;
    od.out = out.mutable_data_ptr<T>();
  } else {
    od.mode = kOutRows;  // channels_last: rows [M][Cout]
    od.out = out.mutable_data_ptr<T>();
    od.ld = s.Cout();
  }
  run_chain<T>(xs.const_data_ptr<T>(), g, forward_stages<T>(s, pk, S), od, tc, xs.options(), stream);
}

at::Tensor mlpconv_cuda(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool gap) {
  const fastnin::MlpconvShape s = fastnin::check_mlpconv_args(x, weights, biases, stride, padding);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = gap ? at::empty({s.N, s.Cout()}, x.options())
                       : at::empty({s.N, s.Cout(), s.Ho, s.Wo},
                                   x.options().memory_format(fastnin::mlpconv_output_format(x, weights[0])));
  if (out.numel() == 0) return out;
  const at::Tensor xs = x.contiguous(c10::MemoryFormat::ChannelsLast);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlpconv_cuda", [&] {
    mlpconv_forward_impl<scalar_t>(xs, weights, biases, s, gap, out, stream);
  });
  return out;
}

// ---- backward ------------------------------------------------------------------------------------

// grad of a weight (or, with kh = kw = 1 and Cin = 1, Kd = 1, a bias) from rows G [M][Op] and the
// gathered X: out = sum_m G[m][o] X[m][k].
template <typename T>
void weight_grad(const at::Tensor& G, int O, const T* src, const Geom& geom, int Kd, int Cin, int kw, at::Tensor& gw,
                 bool tc, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (gw.numel() == 0) return;  // Cin == 0
  const int Op = static_cast<int>(G.size(1));
  const int Kdp = static_cast<int>(round_up<int64_t>(Kd, BN));
  const int64_t M = geom.M;
  const int64_t tiles = static_cast<int64_t>(Kdp / BN) * (Op / BN);
  // Split the pixel sum over enough slices for ~2 blocks per SM, each slice >= 256 pixels.
  int64_t P = ceil_div<int64_t>(2 * fastnin::cuda::sm_count(), tiles);
  P = std::max<int64_t>(1, std::min<int64_t>({P, ceil_div<int64_t>(M, 256), 65535}));
  const int64_t m_per_split = round_up<int64_t>(ceil_div<int64_t>(M, P), WG_BM);
  P = ceil_div<int64_t>(M, m_per_split);
  at::Tensor part = at::empty({P, Op, Kdp}, G.options().dtype(acc_dtype(G.scalar_type())));
  WgradArgs<T, Acc> a{};
  a.g = G.const_data_ptr<T>();
  a.Op = Op;
  a.src = src;
  a.geom = geom;
  a.vec = (geom.Sc % vec16<T>() == 0) && fastnin::cuda::aligned16(src);
  a.m_per_split = m_per_split;
  a.part = part.mutable_data_ptr<Acc>();
  a.Kdp = Kdp;
  TORCH_CHECK(Op / BN <= 65535, "mlpconv: too many output channels for the CUDA weight-gradient grid");
  launch_wgrad<T>(a, tc, dim3(Kdp / BN, Op / BN, static_cast<unsigned>(P)), stream);
  const int64_t work = static_cast<int64_t>(O) * Kd;
  _mlpconv_reduce_kernel<T, Acc><<<grid_1d(work, 256), 256, 0, stream>>>(
      part.const_data_ptr<Acc>(), static_cast<int>(P), Op, Kdp, O, Kd, Cin, kw, gw.mutable_data_ptr<T>(), gw.stride(0),
      gw.stride(1), gw.stride(2), gw.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bias_grad(const at::Tensor& G, int C, at::Tensor& gb, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int Op = static_cast<int>(G.size(1));
  const int64_t M = G.size(0);
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(M, 1024), 1024));
  const int64_t rps = ceil_div<int64_t>(M, P);
  at::Tensor part = at::empty({P, Op}, G.options().dtype(acc_dtype(G.scalar_type())));
  _mlpconv_colsum_kernel<T, Acc><<<dim3(Op / 64, static_cast<unsigned>(P)), 64, 0, stream>>>(
      G.const_data_ptr<T>(), Op, M, rps, part.mutable_data_ptr<Acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _mlpconv_reduce_kernel<T, Acc><<<grid_1d(C, 256), 256, 0, stream>>>(
      part.const_data_ptr<Acc>(), static_cast<int>(P), Op, 1, C, 1, 1, 1, gb.mutable_data_ptr<T>(), gb.stride(0), 0, 0,
      0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void mlpconv_backward_impl(const at::Tensor& grad_out, const at::Tensor& xs, at::TensorList weights,
                           const c10::List<std::optional<at::Tensor>>& biases, const std::optional<at::Tensor>& out,
                           const fastnin::MlpconvShape& s, bool gap, bool need_x, bool need_w, bool need_b,
                           at::Tensor& gx, std::vector<at::Tensor>& gws, std::vector<at::Tensor>& gbs,
                           cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int S = static_cast<int>(s.stages());
  const bool tc = use_tensor_cores(xs.scalar_type());
  const at::TensorOptions opt = xs.options();
  const int64_t M = s.N * s.Ho * s.Wo;
  std::vector<int> np;
  for (int i = 0; i < S; ++i) np.push_back(padded(s.C[i]));
  const bool have_out = !gap && out.has_value() && out->defined();
  (void)conv_geom(s);  // validates every size the kernels index with 32-bit integers

  // 1. recompute H_i = h_{i+1} rows for i < S_rec
  const int S_rec = have_out ? S - 1 : S;
  std::vector<at::Tensor> H(S);
  for (int i = 0; i < S_rec; ++i) H[i] = at::empty({M, np[i]}, opt);
  if (S_rec > 0) {
    const Packs<T> pk = pack_forward<T>(weights, biases, S_rec);
    auto st = forward_stages<T>(s, pk, S_rec);
    for (int i = 0; i < S_rec; ++i) st[i].store = H[i].template mutable_data_ptr<T>();
    OutDesc<T> od{};
    od.mode = kOutRows;
    od.out = H[S_rec - 1].template mutable_data_ptr<T>();
    od.ld = np[S_rec - 1];
    run_chain<T>(xs.const_data_ptr<T>(), conv_geom(s), st, od, tc, opt, stream);
  }

  // 2. G_S from grad_out and the last ReLU's mask
  std::vector<at::Tensor> G(S);
  for (int i = 0; i < S; ++i) G[i] = at::empty({M, np[i]}, opt);
  {
    GoutArgs<T> a{};
    a.gout = grad_out.const_data_ptr<T>();
    a.gs0 = grad_out.stride(0);
    a.gs1 = grad_out.stride(1);
    if (!gap) {
      a.gs2 = grad_out.stride(2);
      a.gs3 = grad_out.stride(3);
    }
    if (have_out) {
      a.out = out->const_data_ptr<T>();
      a.os0 = out->stride(0);
      a.os1 = out->stride(1);
      a.os2 = out->stride(2);
      a.os3 = out->stride(3);
    } else {
      a.hrows = H[S - 1].template const_data_ptr<T>();
    }
    a.g = G[S - 1].template mutable_data_ptr<T>();
    a.M = M;
    a.P = s.Ho * s.Wo;
    a.Wo = static_cast<int>(s.Wo);
    a.C = static_cast<int>(s.C[S - 1]);
    a.Np = np[S - 1];
    a.gap = gap ? 1 : 0;
    _mlpconv_gout_kernel<T><<<grid_1d(M * np[S - 1], 256), 256, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 3. G_{i-1} = (G_i W_i) * (H_{i-1} > 0), i = S-1 .. 1, one chain
  if (S >= 2) {
    std::vector<at::Tensor> wb;
    std::vector<StageDesc<T>> st;
    for (int i = S - 1; i >= 1; --i) {
      wb.push_back(pack_w1x1_bwd(weights[i]));
      StageDesc<T> d{};
      d.w = wb.back().template const_data_ptr<T>();
      d.bias = nullptr;
      d.Kp = np[i];
      d.Np = np[i - 1];
      d.C = static_cast<int>(s.C[i - 1]);
      d.epi = kEpiMask;
      d.mask = H[i - 1].template const_data_ptr<T>();
      d.store = G[i - 1].template mutable_data_ptr<T>();
      st.push_back(d);
    }
    OutDesc<T> od{};
    od.mode = kOutRows;
    od.out = G[0].template mutable_data_ptr<T>();
    od.ld = np[0];
    run_chain<T>(G[S - 1].template const_data_ptr<T>(), rows_geom(s, np[S - 1]), st, od, tc, opt, stream);
  }

  // 4. weight and bias gradients
  if (need_w) {
    for (int i = 0; i < S; ++i) {
      if (i == 0) {
        weight_grad<T>(G[0], static_cast<int>(s.C[0]), xs.const_data_ptr<T>(), conv_geom(s),
                       static_cast<int>(s.kh * s.kw * s.Cin), static_cast<int>(s.Cin), static_cast<int>(s.kw), gws[0],
                       tc, stream);
      } else {
        weight_grad<T>(G[i], static_cast<int>(s.C[i]), H[i - 1].template const_data_ptr<T>(), rows_geom(s, np[i - 1]),
                       static_cast<int>(s.C[i - 1]), static_cast<int>(s.C[i - 1]), 1, gws[i], tc, stream);
      }
    }
  }
  if (need_b) {
    for (int i = 0; i < S; ++i) {
      if (gbs[i].numel() > 0) bias_grad<T>(G[i], static_cast<int>(s.C[i]), gbs[i], stream);
    }
  }

  // 5. grad_x: transposed convolution of G_0 by W0 (gather form)
  if (need_x && gx.numel() > 0) {
    const at::Tensor wd = pack_w0_dgrad(weights[0]);
    Geom g{};
    g.M = s.N * s.H * s.W;
    g.Rh = static_cast<int>(s.H);
    g.Rw = static_cast<int>(s.W);
    g.Sh = static_cast<int>(s.Ho);
    g.Sw = static_cast<int>(s.Wo);
    g.Sc = np[0];
    g.kh = static_cast<int>(s.kh);
    g.kw = static_cast<int>(s.kw);
    g.sh = static_cast<int>(s.sh);
    g.sw = static_cast<int>(s.sw);
    g.ph = static_cast<int>(s.ph);
    g.pw = static_cast<int>(s.pw);
    g.K = checked_int(s.kh * s.kw * np[0], "kh * kw * padded C1");
    g.dgrad = 1;
    StageDesc<T> d{};
    d.w = wd.const_data_ptr<T>();
    d.bias = nullptr;
    d.Kp = g.K;  // a multiple of BN, hence of BK
    d.Np = static_cast<int>(wd.size(1));
    d.C = static_cast<int>(s.Cin);
    d.epi = kEpiNone;
    OutDesc<T> od{};
    od.P = s.H * s.W;
    od.C = static_cast<int>(s.Cin);
    if (gx.is_contiguous()) {
      od.mode = kOutNchw;
    } else {
      od.mode = kOutRows;
      od.ld = s.Cin;
    }
    od.out = gx.mutable_data_ptr<T>();
    run_chain<T>(G[0].template const_data_ptr<T>(), g, {d}, od, tc, opt, stream);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlpconv_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, const std::optional<at::Tensor>& out, at::IntArrayRef stride,
    at::IntArrayRef padding, bool gap, std::array<bool, 3> output_mask) {
  const fastnin::MlpconvShape s = fastnin::check_mlpconv_args(x, weights, biases, stride, padding);
  fastnin::check_floating(grad_out, "mlpconv_backward", "grad_out");
  fastnin::check_same(grad_out, x, "mlpconv_backward", "grad_out");
  if (gap) {
    TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == s.N && grad_out.size(1) == s.Cout(),
                      "mlpconv_backward: grad_out must have shape [", s.N, ", ", s.Cout(), "], got ", grad_out.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.Cout() &&
                          grad_out.size(2) == s.Ho && grad_out.size(3) == s.Wo,
                      "mlpconv_backward: grad_out must have shape [", s.N, ", ", s.Cout(), ", ", s.Ho, ", ", s.Wo,
                      "], got ", grad_out.sizes());
  }
  const bool have_out = !gap && out.has_value() && out->defined();
  if (have_out) {
    fastnin::check_same(*out, x, "mlpconv_backward", "out");
    TORCH_CHECK_VALUE(out->sizes() == grad_out.sizes(), "mlpconv_backward: out has shape ", out->sizes(),
                      " but grad_out has ", grad_out.sizes());
  }
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  c10::cuda::CUDAGuard guard(x.device());
  const int S = static_cast<int>(s.stages());

  const auto gx_format = fastnin::mlpconv_output_format(x, weights[0]);
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options().memory_format(gx_format)) : at::empty({0}, x.options());
  std::vector<at::Tensor> gws, gbs;
  if (need_w)
    for (int i = 0; i < S; ++i) gws.push_back(at::empty_like(weights[i]));
  if (need_b) {
    for (int i = 0; i < S; ++i) {
      const std::optional<at::Tensor> b = biases[i];
      gbs.push_back(b.has_value() && b->defined() ? at::empty_like(*b) : at::empty({0}, x.options()));
    }
  }
  if (!need_x && !need_w && !need_b) return {gx, gws, gbs};
  const int64_t M = s.N * s.Ho * s.Wo;
  if (M == 0) {
    // no pixels: every gradient is an empty sum (grad_x is empty too, N == 0)
    for (auto& t : gws) t.zero_();
    for (auto& t : gbs) t.zero_();
    return {gx, gws, gbs};
  }
  const at::Tensor xs = x.contiguous(c10::MemoryFormat::ChannelsLast);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlpconv_backward_cuda", [&] {
    mlpconv_backward_impl<scalar_t>(grad_out, xs, weights, biases, out, s, gap, need_x, need_w, need_b, gx, gws, gbs,
                                    stream);
  });
  return {gx, gws, gbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CUDA, m) {
  m.impl("mlpconv", &mlpconv_cuda);
  m.impl("mlpconv_backward", &mlpconv_backward_cuda);
}
