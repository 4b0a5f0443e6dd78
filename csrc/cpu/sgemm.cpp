// fastnin's float GEMM for the CPU tile products (see sgemm.h for why).
//
// The register block is 8 rows x 48 columns of C (24 zmm accumulators): per k, 3 loads of B's row
// segment and 8 broadcasts of A's column segment feed 24 FMAs. Neither operand is packed: B's
// 48-column panel (K x 192 bytes) is reused from L1/L2 by every 8-row block, A's 8 rows are read
// once per panel. Measured alone on the AMD EPYC (Zen 4, 1 thread, operands hot, best of 7), in
// GF/s, MKL sgemm vs this, against 8x48 the other blocks tried:
//   M128 N192 K384 (Winograd forward):      100.7 vs 114.9  (14x32: 110.5, 6x64: 111.8)
//   A^T, M384 N192 K128 (Winograd dU):       98.8 vs 111.2  (14x32: 107.8, 6x64: 110.8)
//   M128 N384 K192, B^T packed (dA):        101.0 vs 112.3  (14x32: 107.9, 6x64: 109.3)
//   M512 N192 K192 (1x1 stage):             100.8 vs 112.2  (14x32: 108.4, 6x64: 111.7)
// Columns past a multiple of 48 go through masked loads and stores; rows past a multiple of 8
// through smaller blocks.
#include "cpu/sgemm.h"

#include "cpu/attributes.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTNIN_HAVE_AVX512_SGEMM 1
#endif

namespace fastnin::cpu {

#ifdef FASTNIN_HAVE_AVX512_SGEMM
namespace {

constexpr int kMR = 8;   // rows of a register block
constexpr int kNV = 3;   // zmm vectors (16 floats) across: 48 columns
constexpr int kNR = 16 * kNV;
// How many rows of B ahead the first row block of a panel prefetches (see panel()).
constexpr int64_t kPrefetchRows = 16;

// C[0:MR, 0:16 NV] (= or +=) sum_k a(i, k) B[k, :], masks m[v] on the columns of vector v.
// PREFETCH_B: also fetch B's row segment kPrefetchRows ahead into L1.
// pf: pfn cache lines of the next product's operands to bring into L2 (Prefetcher).
template <int MR, int NV, bool MASKED, bool PREFETCH_B = false>
__attribute__((target("avx512f,fma,prfchw"))) inline void block(int64_t K, const float* A, int64_t rsa, int64_t csa,
                                                         const float* B, int64_t ldb, float* C, int64_t ldc,
                                                         bool accumulate, const __mmask16* m, const char* pf,
                                                         int64_t pfn) {
  // Every loop over the rows i or the vectors v is unrolled in full (the pragmas): the
  // accumulators stay in registers only where each index into c is a constant. GCC left the
  // MASKED blocks' epilogue loops rolled, so c lived on the stack there, and every FMA of the k
  // loop read and wrote it (masked panels: ~2.5x the time per multiply-add; CIFAR block 1, whose
  // 192 -> 160 stage ends in a 16-column panel, channels_last forward 21.8-23.8 -> 20.7-21.2 ms,
  // builds alternated 3 times).
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_setzero_ps();
  }
  if (accumulate) {  // C's lines on their way while the products run (the Winograd dU sums: -6%)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 16 * v), _MM_HINT_T0);
    }
  } else {
    // C's lines fetched for writing while the products run, so that the stores at the end do not
    // wait for them (the Winograd M_e and dA_e blocks lie in L3 by then). Builds alternated 6
    // times, medians: CIFAR block 2 fwd+bwd channels_last 126.7 -> 124.7 ms, forward 31.9 -> 31.2
    // ms; block 3 fwd+bwd 23.3 -> 23.1 (channels_last), 23.0 -> 21.7 ms (NCHW).
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) __builtin_prefetch(C + i * ldc + 16 * v, 1, 3);
    }
  }
  // One line a k step, two while they last where the share exceeds K (it never exceeds 2K).
  const int64_t pf2 = pfn > K ? pfn - K : 0;
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    const float* brow = B + k * ldb;
    if (k < pfn) {
      _mm_prefetch(pf + 64 * k, _MM_HINT_T1);
      if (k < pf2) _mm_prefetch(pf + 64 * (K + k), _MM_HINT_T1);
    }
    if (PREFETCH_B && k + kPrefetchRows < K) {
      // NV lines, one more when the segment is not line-aligned.
      const char* p = reinterpret_cast<const char*>(brow + kPrefetchRows * ldb);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) _mm_prefetch(p + 64 * v, _MM_HINT_T0);
      _mm_prefetch(p + 64 * NV - 4, _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      b[v] = MASKED ? _mm512_maskz_loadu_ps(m[v], brow + 16 * v) : _mm512_loadu_ps(brow + 16 * v);
    }
    const float* a = A + k * csa;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * rsa]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(av, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* crow = C + i * ldc;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (MASKED) {
        if (accumulate) c[i][v] = _mm512_add_ps(c[i][v], _mm512_maskz_loadu_ps(m[v], crow + 16 * v));
        _mm512_mask_storeu_ps(crow + 16 * v, m[v], c[i][v]);
      } else {
        if (accumulate) c[i][v] = _mm512_add_ps(c[i][v], _mm512_loadu_ps(crow + 16 * v));
        _mm512_storeu_ps(crow + 16 * v, c[i][v]);
      }
    }
  }
}

// The next product's operands (NextOperands), brought into L2 while this product runs: the
// register blocks of this one each take an equal share of their cache lines, one contiguous run
// within one range, and issue one prefetcht1 a k step (two where the share exceeds K).
//
// Why: the Winograd products of a work item (winograd.h) run point after point, and each point's
// operands (CIFAR block 2: A_e 196 KB, U_e 295 KB, the dU_e it adds into 295 KB) lie in L3 when its
// product starts, since the 16 points' 6-9 MB do not fit the 1 MB L2. Timed inside the forward
// (AMD EPYC, Zen 4), the same product ran at 89-92 GF/s on its first call and 107-108 when
// repeated at once with its operands in L2. The prefetches spread over one product (~0.2 ms, ~8K
// lines) ask ~0.3 bytes a cycle of L3, and the next point's operands plus the live part of this
// one's fit L2. In place, CIFAR block 2 fwd+bwd channels_last (2 threads, 4 alternations in one
// build, GF/s per thread): the Winograd weight-gradient sums 81.5-87.1 -> 92.6-97.5, the other
// Winograd products 94.9-104.0 -> 101.2-105.2, the call 109.8-122.5 -> 108.3-117.4 ms.
class Prefetcher {
 public:
  Prefetcher(const NextOperands* next, int64_t blocks, int64_t K) {
    if (next == nullptr || blocks == 0) return;
    int64_t lines = 0;
    for (int r = 0; r < next->n; ++r) {
      if (next->p[r] == nullptr || next->bytes[r] <= 0) continue;
      // The first line may begin before the range: a prefetch never faults.
      const uintptr_t a = reinterpret_cast<uintptr_t>(next->p[r]) & ~uintptr_t(63);
      const uintptr_t e = reinterpret_cast<uintptr_t>(next->p[r]) + next->bytes[r];
      p_[n_] = reinterpret_cast<const char*>(a);
      left_[n_] = static_cast<int64_t>((e - a + 63) / 64);
      lines += left_[n_++];
    }
    // A block's share: one line more than the even split, so that the shares cut short at the end
    // of a range do not leave much for the last blocks; at most 2K (two lines a k step).
    share_ = std::min<int64_t>(lines / blocks + 1 + n_, 2 * K);
  }
  void take(const char*& p, int64_t& n) {
    while (r_ < n_ && left_[r_] == 0) ++r_;
    if (r_ == n_) {
      p = nullptr;
      n = 0;
      return;
    }
    n = std::min(share_, left_[r_]);
    p = p_[r_];
    p_[r_] += 64 * n;
    left_[r_] -= n;
  }

 private:
  const char* p_[NextOperands::kMax] = {};
  int64_t left_[NextOperands::kMax] = {};
  int n_ = 0, r_ = 0;
  int64_t share_ = 0;
};

// One panel of columns (NV vectors) over all M rows: 8-row blocks, then the remaining rows.
// The first block prefetches B's rows: it is the one that brings the panel in from L3 or memory
// (the later blocks find it in L1/L2), and in the tile products it is cold there: the Winograd
// U_e and U_e^T (663 KB a point on CIFAR block 2) are read once per work item. The hardware
// prefetchers leave that first pass stalling on the strided rows. Measured with the products'
// shapes rotating over 8 operand sets per thread (not in L2), 2 threads, medians of 8-10 runs,
// GF/s per thread before / after: forward M128 N192 K864 92.7 / 101.2, dA M128 N864 K192
// 78.9 / 92.7, dU (A^T) M864 N192 K128 83.2 / 86.1; with hot operands unchanged (+-1%).
// Prefetching in every block instead cost the dU product ~2%, whose B (dM_e) is hot. In place,
// CIFAR block 2 channels_last (2 threads, builds alternated 5 times): forward medians 28.5-29.9
// -> 27.0-29.0 ms; the products timed inside the fwd+bwd call, GF/s per thread, 3 runs: forward
// 88.6-93.7 -> 89.6-98.0, the rest +-3%; the whole fwd+bwd within the noise.
template <int NV, bool MASKED>
__attribute__((target("avx512f,fma,prfchw"))) void panel(int64_t M, int64_t K, const float* A, int64_t rsa, int64_t csa,
                                                  const float* B, int64_t ldb, bool accumulate, float* C,
                                                  int64_t ldc, const __mmask16* m, Prefetcher& pf) {
  int64_t i = 0;
  const char* p = nullptr;
  int64_t n = 0;
  if (M >= kMR) {
    pf.take(p, n);
    block<kMR, NV, MASKED, true>(K, A, rsa, csa, B, ldb, C, ldc, accumulate, m, p, n);
    i = kMR;
  }
  for (; i + kMR <= M; i += kMR) {
    pf.take(p, n);
    block<kMR, NV, MASKED>(K, A + i * rsa, rsa, csa, B, ldb, C + i * ldc, ldc, accumulate, m, p, n);
  }
  const float* Ai = A + i * rsa;
  float* Ci = C + i * ldc;
  if (M > i) pf.take(p, n);
  switch (M - i) {
    case 7: block<7, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 6: block<6, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 5: block<5, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 4: block<4, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 3: block<3, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 2: block<2, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    case 1: block<1, NV, MASKED>(K, Ai, rsa, csa, B, ldb, Ci, ldc, accumulate, m, p, n); break;
    default: break;
  }
}

__attribute__((target("avx512f,fma,prfchw"))) void sgemm_avx512(int64_t M, int64_t N, int64_t K, const float* A,
                                                         int64_t rsa, int64_t csa, const float* B, int64_t ldb,
                                                         bool accumulate, float* C, int64_t ldc,
                                                         const NextOperands* next) {
  Prefetcher pf(next, ((M + kMR - 1) / kMR) * ((N + kNR - 1) / kNR), K);
  int64_t j = 0;
  for (; j + kNR <= N; j += kNR) panel<kNV, false>(M, K, A, rsa, csa, B + j, ldb, accumulate, C + j, ldc, nullptr, pf);
  const int64_t w = N - j;  // 0 < w < 48 columns left: masked vectors
  if (w == 0) return;
  __mmask16 m[kNV];
  for (int v = 0; v < kNV; ++v) {
    const int64_t n = std::clamp<int64_t>(w - 16 * v, 0, 16);
    m[v] = static_cast<__mmask16>((1u << n) - 1u);
  }
  if (w > 32) {
    panel<3, true>(M, K, A, rsa, csa, B + j, ldb, accumulate, C + j, ldc, m, pf);
  } else if (w > 16) {
    panel<2, true>(M, K, A, rsa, csa, B + j, ldb, accumulate, C + j, ldc, m, pf);
  } else {
    panel<1, true>(M, K, A, rsa, csa, B + j, ldb, accumulate, C + j, ldc, m, pf);
  }
}

}  // namespace
#endif

bool fast_sgemm_enabled() {
#ifdef FASTNIN_HAVE_AVX512_SGEMM
  static const bool cpu = cpu_has_avx512f() && __builtin_cpu_supports("fma");
  if (!cpu) return false;
  const char* env = std::getenv("FASTNIN_CPU_GEMM");
  return env == nullptr || std::strcmp(env, "mkl") != 0;
#else
  return false;
#endif
}

void fast_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                int64_t ldb, bool accumulate, float* C, int64_t ldc, const NextOperands* next) {
#ifdef FASTNIN_HAVE_AVX512_SGEMM
  sgemm_avx512(M, N, K, A, rsa, csa, B, ldb, accumulate, C, ldc, next);
#else
  (void)M, (void)N, (void)K, (void)A, (void)rsa, (void)csa, (void)B, (void)ldb, (void)accumulate, (void)C, (void)ldc,
      (void)next;
  std::abort();  // callers check fast_sgemm_enabled() first
#endif
}

#ifdef FASTNIN_HAVE_AVX512_SGEMM
namespace {
// GCC 12's _mm512_unpack{lo,hi}_{ps,pd} pass an _mm512_undefined_* vector as the merge source,
// which -Wuninitialized reports at every use (GCC bug 105593; seen with Debian's GCC 12.2 here):
// silenced for these functions only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// dst rows 0..15 (leading dimension ldd), 16 floats each = the 16x16 block of src (leading
// dimension lds) transposed: 16 loads, 4 rounds of 16 shuffles (32-bit, 64-bit, 128-bit and
// 256-bit interleaves), 16 stores.
__attribute__((target("avx512f"))) inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
  }
}

__attribute__((target("avx512f"))) void transpose_pack_avx512(int64_t N, int64_t K, const float* src, int64_t lds,
                                                              float* dst) {
  const int64_t N16 = N / 16 * 16, K16 = K / 16 * 16;
  for (int64_t j0 = 0; j0 < N16; j0 += 16) {
    for (int64_t k0 = 0; k0 < K16; k0 += 16) transpose16(src + j0 * lds + k0, lds, dst + k0 * N + j0, N);
  }
  // The edges (N or K past a multiple of 16), element by element.
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = (k < K16 ? N16 : 0); j < N; ++j) dst[k * N + j] = src[j * lds + k];
  }
}
#pragma GCC diagnostic pop
}  // namespace
#endif

void transpose_pack(int64_t N, int64_t K, const float* src, int64_t lds, float* dst) {
#ifdef FASTNIN_HAVE_AVX512_SGEMM
  // 16x16 blocks in registers: the element-by-element loop below took 1.6-2.0 ms for the 2.4 MB
  // of CIFAR block 3's U^T (prepare_transposed, each backward), ~8% of its fwd+bwd.
  if (cpu_has_avx512f()) {
    transpose_pack_avx512(N, K, src, lds, dst);
    return;
  }
#endif
  // 16 x 16 blocks: each reads 16 rows of src and writes 16 rows of dst a cache line at a time.
  constexpr int64_t B = 16;
  for (int64_t j0 = 0; j0 < N; j0 += B) {
    const int64_t j1 = std::min(N, j0 + B);
    for (int64_t k0 = 0; k0 < K; k0 += B) {
      const int64_t k1 = std::min(K, k0 + B);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t j = j0; j < j1; ++j) dst[k * N + j] = src[j * lds + k];
      }
    }
  }
}

}  // namespace fastnin::cpu
