// CPU kernels of fastnin::mlpconv and fastnin::mlpconv_backward.
//
// mlpconv = relu(conv1x1(relu(conv1x1(relu(conv2d(x, w0, b0, stride, padding)), w1, b1)), w2, b2)),
// 1 to 3 stages. The work is cut into tiles of output pixels (NHWC order). A tile goes through
// every stage while it is in cache: its im2col patch block P[T, K] (K = kh*kw*Cin, in (kh, kw, cin)
// order so that runs of Cin come straight from the NHWC input), then z1 = P W0^T (+b0, ReLU),
// z2 = h1 W1^T (+b1, ReLU), z3 = h2 W2^T (+b2, ReLU), all in small per-thread buffers, then the
// tile is written to the output (or summed into the per-image GAP sums). No intermediate
// activation ever exists as a whole tensor.
//
// The matrix products (gemm.h) run single-threaded inside at::parallel_for: fastnin's own float
// GEMM where the CPU has AVX-512 (sgemm.h), MKL's sgemm_/dgemm_ (exported by libtorch_cpu)
// elsewhere, for double, and for the weight-heavy calls' one tile (run outside a parallel region,
// where MKL threads it). at::mm on the same buffers adds ~1.6 us of dispatch and tensor
// bookkeeping per call (64x192x10 product: 4.9 vs 3.3 us); where the BLAS symbols are missing
// (another torch build) it is the fallback. ATen's cpublas::gemm_stub cannot be called from an
// extension (its DispatchStub lookup is not exported), and the oneDNN ukernel (cpublas::brgemm)
// measured no faster than MKL.
//
// History of the GEMM choice. On the Xeon this was first written on (below), MKL's AVX-512 path
// was as fast in place as a hand-written 14x32 AVX-512 micro-kernel: alone that kernel beat MKL on
// the Winograd backward's products by 3-16%, but inside the CIFAR block 2 backward both ran at
// 155-162 GF/s and the whole backward within noise; MKL's packed API (weights packed once) gained
// 1-2%. On the AMD EPYC (Zen 4) these sessions moved to, MKL takes a generic Zen path at 92-101
// GF/s a core and spends ~11% of block 2's fwd+bwd packing operands and zeroing C; sgemm.h's 8x48
// kernel reads both operands in place at 111-115 GF/s alone, and took block 2's forward from
// 30.0-31.5 to 26.2-29.8 ms and its fwd+bwd from 118.4-127.5 to 110.5-120.6 ms (3 runs, 2
// threads, channels_last, the two GEMMs alternated in one process by FASTNIN_CPU_GEMM; see
// sgemm.cpp).
//
// Measured on the 2-core Xeon (Sapphire Rapids, AVX-512, 214 GF/s/core fp32 FMA peak) this was
// written on: MKL sgemm reaches 135-175 GF/s per core on the tile shapes (T = 64..512 rows,
// K = 75..2400, N = 96..192), oneDNN's direct convolution ~190 GF/s on the 5x5 96->192 layer.
// Tiles of whole images through a oneDNN convolution per tile, then the 1x1 stages, were tried:
// within 5% of this design forward and no better backward. Where the stride is 1 and the stage
// wide enough, the KxK stage runs as Winograd F(2x2, 3x3) instead (winograd.h: 2.04x fewer
// multiplies for 5x5, 2.25x for 3x3), chosen per call by use_winograd(); im2col + GEMM elsewhere.
// The backward recomputes the KxK product, ~1.3x the FLOPs of torch's backward for a 5x5 block
// with im2col (Winograd's backward multiplies shrink with its forward's).
//
// The backward keeps nothing from the forward but x and out: per tile it recomputes P and the
// hidden activations (the last stage's ReLU mask comes from `out` when given, so a one-stage
// mlpconv recomputes nothing), then walks the stages back:
//   g_S = grad_out * (h_S > 0)
//   gW_s += g_{s+1}^T a_s,  gb_s += colsum(g_{s+1}),  g_s = (g_{s+1} W_s) * (h_s > 0)   (a_0 = P)
//   gP = g_1 W_0, scattered back into grad_x (col2im).
// Weight and bias gradients accumulate per chunk of tiles (one chunk per thread) and are reduced
// in chunk order at the end; grad_x accumulates in a shared buffer when the chunks own disjoint
// images, else in one private buffer per chunk, also reduced in order. So results are bitwise
// identical from run to run with the same number of threads.
//
// float16 / bfloat16: tiles are converted to float32 and every stage runs in float32 (fp32
// accumulation, fp32 intermediates: more accurate than torch, which rounds each stage's output).
// float64 runs in double (gradcheck).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/attributes.h"
#include "cpu/gemm.h"
#include "cpu/layout.h"
#include "cpu/winograd.h"

namespace {

using fastnin::MlpconvShape;
using fastnin::cpu::add_to;
using fastnin::cpu::buf;
using fastnin::cpu::gemm_rm;
using fastnin::cpu::Winograd;
using fastnin::cpu::WinoWork;

// Weight gradients in the backward: one product g^T a per tile (about 512 pixels; a weight-heavy
// call's single tile at most 2048), summed in double, so the float error of a weight gradient is
// that of a sum over one tile's rows, not over N * Ho * Wo. A call with one tile and one thread (the weight-heavy calls)
// has one product per stage, which MKL writes straight into the result: a double pass over a
// weight of millions of elements, in a fresh vector beyond what a thread keeps, took ImageNet NiN
// block 4's fwd+bwd from 83 to 107 ms (AMD EPYC, 2 threads). A stage whose weight has at most
// kWgradDoubleMax elements multiplies in double (dgemm on the tile's rows converted), so that its
// gradient carries only the rounding of its float inputs: measured on the AMD EPYC, a [3, 4] last
// stage over 32 rows came out 2.9 ulp of its largest value off in float (8.6e-7 at 3.05; torch's
// oneDNN: 2.1e-7), the same float inputs multiplied in double 2.8e-7. The bound keeps NiN's own
// stages (the smallest: 10 x 192) in float.
constexpr int64_t kWgradDoubleMax = 1024;

// ---------------------------------------------------------------------------------------------
// Pointwise pieces of a tile. The generic bodies are always_inline templates; the float versions
// are leaf functions compiled for AVX-512 / AVX2 / baseline and picked at load time
// (target_clones), since the build has no -march. double (gradcheck) uses the plain template.
// ---------------------------------------------------------------------------------------------

// z = relu(z + bias) on rows of C channels. relu keeps NaN, like torch's (v < 0 is false for NaN).
template <typename T>
FASTNIN_INLINE void bias_relu_impl(T* __restrict z, int64_t rows, int64_t C, int64_t ld, const T* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict row = z + r * ld;
    if (bias != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c] + bias[c];
        row[c] = v < T(0) ? T(0) : v;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c];
        row[c] = v < T(0) ? T(0) : v;
      }
    }
  }
}

// g = 0 where h <= 0, else g: torch's threshold_backward(g, h, 0), written so that a NaN h passes
// the gradient through as torch does (`h > 0 ? g : 0` would block it).
template <typename T>
FASTNIN_INLINE void relu_mask_impl(T* __restrict g, int64_t ldg, const T* __restrict h, int64_t ldh, int64_t rows,
                                   int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict gr = g + r * ldg;
    const T* __restrict hr = h + r * ldh;
    for (int64_t c = 0; c < C; ++c) gr[c] = hr[c] <= T(0) ? T(0) : gr[c];
  }
}

// g[r, c] = h[r, c] <= 0 ? 0 : scale * go[r * gstride + c] (NaN h passes, as in torch). gstride = C (a map), or 0 (the same
// row for every pixel: the GAP gradient of one image).
template <typename T>
FASTNIN_INLINE void masked_grad_impl(T* __restrict g, const T* __restrict go, int64_t gstride, const T* __restrict h,
                                     int64_t rows, int64_t C, T scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gr = go + r * gstride;
    for (int64_t c = 0; c < C; ++c) g[r * C + c] = h[r * C + c] <= T(0) ? T(0) : gr[c] * scale;
  }
}

// acc[c] += sum over rows of g[r, c]. The sums (bias gradients, GAP) run over up to N*Ho*Wo rows
// one after the other: they accumulate in double so that the error does not grow with the row
// count (float32 sums of ~1500 rows came out 5x less accurate than torch's pairwise sums).
template <typename T>
FASTNIN_INLINE void colsum_add_impl(const T* __restrict g, int64_t rows, int64_t C, int64_t ld,
                                    double* __restrict acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gr = g + r * ld;
    for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(gr[c]);
  }
}


// acc[i] += p[i], in double: a tile's weight-gradient product added into the running total.
template <typename T>
FASTNIN_INLINE void add_wide_impl(const T* __restrict p, int64_t n, double* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<double>(p[i]);
}

template <typename T>
inline void add_wide(const T* p, int64_t n, double* acc) {
  add_wide_impl(p, n, acc);
}

template <typename T>
inline void bias_relu(T* z, int64_t rows, int64_t C, int64_t ld, const T* bias) {
  bias_relu_impl(z, rows, C, ld, bias);
}
template <typename T>
inline void relu_mask(T* g, int64_t ldg, const T* h, int64_t ldh, int64_t rows, int64_t C) {
  relu_mask_impl(g, ldg, h, ldh, rows, C);
}
template <typename T>
inline void masked_grad(T* g, const T* go, int64_t gstride, const T* h, int64_t rows, int64_t C, T scale) {
  masked_grad_impl(g, go, gstride, h, rows, C, scale);
}
template <typename T>
inline void colsum_add(const T* g, int64_t rows, int64_t C, int64_t ld, double* acc) {
  colsum_add_impl(g, rows, C, ld, acc);
}

template <>
FASTNIN_CLONES void bias_relu<float>(float* z, int64_t rows, int64_t C, int64_t ld, const float* bias) {
  bias_relu_impl(z, rows, C, ld, bias);
}
template <>
FASTNIN_CLONES void relu_mask<float>(float* g, int64_t ldg, const float* h, int64_t ldh, int64_t rows, int64_t C) {
  relu_mask_impl(g, ldg, h, ldh, rows, C);
}
template <>
FASTNIN_CLONES void masked_grad<float>(float* g, const float* go, int64_t gstride, const float* h, int64_t rows,
                                       int64_t C, float scale) {
  masked_grad_impl(g, go, gstride, h, rows, C, scale);
}
template <>
FASTNIN_CLONES void add_wide<float>(const float* p, int64_t n, double* acc) {
  add_wide_impl(p, n, acc);
}
template <>
FASTNIN_CLONES void colsum_add<float>(const float* g, int64_t rows, int64_t C, int64_t ld, double* acc) {
  colsum_add_impl(g, rows, C, ld, acc);
}

// ---------------------------------------------------------------------------------------------
// Tiles. A tile is a run [q0, q1) of output pixels, q = (n * Ho + oh) * Wo + ow. Either an image
// is cut into `tpi` tiles, or a tile holds `ipt` whole images: tiles never straddle two images
// partially, which keeps the GAP sums and the grad_x ownership simple.
// ---------------------------------------------------------------------------------------------
struct Tiling {
  int64_t N, HW;
  int64_t tpi = 1, ipt = 1, tsize = 1, ntiles = 0;

  // align: tiles that cut an image hold a multiple of `align` pixels (Winograd: 2 output rows).
  Tiling(int64_t N_, int64_t HW_, int64_t target, int64_t align = 1) : N(N_), HW(HW_) {
    target = std::max<int64_t>(target, 1);
    if (HW > target) {
      tpi = (HW + target - 1) / target;
      tsize = (HW + tpi - 1) / tpi;  // even split of the image
      tsize = (tsize + align - 1) / align * align;
      tpi = (HW + tsize - 1) / tsize;
      if (tpi == 1) tsize = HW;
      ntiles = N * tpi;
    } else {
      ipt = std::max<int64_t>(1, target / HW);
      tsize = ipt * HW;
      ntiles = (N + ipt - 1) / ipt;
    }
  }
  int64_t max_rows() const { return tsize; }
  // pixel range of tile t
  void range(int64_t t, int64_t& q0, int64_t& q1) const {
    if (tpi > 1 || ipt == 1) {
      const int64_t n = t / tpi, j = t % tpi;
      const int64_t r0 = j * tsize, r1 = std::min(HW, r0 + tsize);
      q0 = n * HW + r0;
      q1 = n * HW + r1;
    } else {
      q0 = t * ipt * HW;
      q1 = std::min(N, (t + 1) * ipt) * HW;
    }
  }
};

// Rows (output pixels) per tile. The tile's patch block P[T, K] should stay in the 2 MB L2 of a
// core next to the weights streaming through: ~1.25 MB of P, 64 to 512 rows. Measured on this
// machine (1 thread, thread CPU time, medians): T = 128 ran 3-4% faster than T = 64 forward and
// backward on 32x96x16x16 5x5 96->192x3 and on 32x192x8x8 3x3 192->192->192->10; MKL's sgemm on
// these shapes is flat (135-150 GF/s) from T = 64 to T = 512.
int64_t tile_target(const MlpconvShape& s, int64_t elem) {
  const int64_t K = s.kh * s.kw * s.Cin;
  int64_t t = (int64_t(5) << 18) / std::max<int64_t>(elem * K, 1);
  t = std::max<int64_t>(64, std::min<int64_t>(512, t));
  return t;
}

// Whether no element of t (float or double, contiguous in some memory format) is Inf or NaN: one
// parallel pass testing the exponent bits, a branch-free OR per chunk that vectorizes.
// at::isfinite(t).all() allocated a bool tensor and made 4 passes over memory: 9% of the CIFAR
// block 2 forward and 20% of block 3's (perf, 1 thread).
template <typename U>
FASTNIN_INLINE bool finite_span_impl(const U* __restrict p, int64_t n) {
  // exponent all ones <=> Inf or NaN
  constexpr U exp_mask = sizeof(U) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((p[i] & exp_mask) == exp_mask);
  return bad == 0;
}
FASTNIN_CLONES bool finite_span(const uint32_t* p, int64_t n) { return finite_span_impl(p, n); }
FASTNIN_CLONES bool finite_span(const uint64_t* p, int64_t n) { return finite_span_impl(p, n); }

bool all_finite(const at::Tensor& t_in) {
  if (!t_in.defined() || t_in.numel() == 0) return true;
  // Any dense layout is read as one span (NCHW or channels_last); others are made dense first.
  const at::Tensor t = t_in.is_non_overlapping_and_dense() ? t_in : t_in.contiguous();
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  std::atomic<bool> ok{true};
  const bool is_float = t.scalar_type() == at::kFloat;
  const char* base = static_cast<const char*>(t.const_data_ptr());
  at::parallel_for(0, t.numel(), int64_t(1) << 16, [&](int64_t b, int64_t e) {
    const bool fin = is_float ? finite_span(reinterpret_cast<const uint32_t*>(base) + b, e - b)
                              : finite_span(reinterpret_cast<const uint64_t*>(base) + b, e - b);
    if (!fin) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// The first stage's algorithm: Winograd (winograd.h) where the stride is 1, the kernel 3x3 or
// 5x5, Cin >= 16 (below that the stage is memory-bound: the CIFAR NiN's 5x5 3->192 first block
// ran no faster) and the call has >= 1024 output pixels (below that the transformed weight, 16/9
// the weight's size, costs more than the multiplies saved), im2col + GEMM elsewhere. Measured
// with python -m fastnin.bench --batch B, 2 threads, forced either way: CIFAR block 3 (3x3
// 192->192) at 1024 pixels fwd 1.04x vs im2col's 0.76x of eager, fwd+bwd 0.82x vs 0.66x; at 512
// pixels Winograd lost (0.71x vs 0.75x fwd); block 2 (5x5 96->192) at 1024 pixels 0.81x vs 0.73x
// fwd. FASTNIN_CPU_CONV=im2col or winograd forces one where it applies; the tests run both.
// Other kernel sizes split into 3x3 sub-kernels (any size works, forced) but are not chosen: in
// fp32 their rounding error is not always within 2x torch's (the tests' rule). Forced, over 12
// seeds x 2 layouts of a small 2-stage layer (AMD EPYC, torch's oneDNN as the yardstick): 2x2
// 6 of 24 cases above it, 4x4 and 7x7 2 of 24, 3x3 and 5x5 none (Cin 5 and 32).
// Winograd needs stride 1, a kernel other than 1x1, and finite x,
// weight (and grad_out in the backward): its transforms mix neighbouring pixels, so an Inf would
// meet -Inf (NaN) or reach outputs whose receptive field does not hold it, unlike torch's
// convolution. The check is one pass over those tensors (all_finite, in the compute type).
bool use_winograd(const MlpconvShape& s, const at::Tensor& x, const at::Tensor& w0,
                  const at::Tensor& grad_out = at::Tensor()) {
  const bool k35 = s.kh == s.kw && (s.kh == 3 || s.kh == 5);
  bool wanted = k35 && s.Cin >= 16 && s.N * s.Ho * s.Wo >= 1024;
  const char* env = std::getenv("FASTNIN_CPU_CONV");
  if (env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK_VALUE(v == "auto" || v == "winograd" || v == "im2col",
                      "FASTNIN_CPU_CONV must be auto, im2col or winograd, got '", v, "'");
    if (v != "auto") wanted = v == "winograd";
  }
  if (s.sh != 1 || s.sw != 1 || (s.kh == 1 && s.kw == 1)) return false;
  return wanted && all_finite(x) && all_finite(w0) && all_finite(grad_out);
}

// Winograd work items: ~128 2x2 tiles (512 pixels), whole images or bands of an even number of
// output rows. Measured on the CIFAR NiN's blocks 2 and 3 at batch 32 (1 thread): 512 pixels ran
// ~5% faster than 256 forward and ~8% backward (the weight-gradient GEMM's depth is the tile
// count), 1024 and 2048 no faster (the 16 transformed input blocks outgrow the 2 MB L2); after the
// zero sub-kernel blocks were dropped (49 of 64 for 5x5), 1024-pixel forward items ran 2-6%
// slower than 512 on blocks 2 and 3 (2 threads, separate processes alternated).
//
// Smaller items where a call has fewer pixels than 512 per thread (down to 128; 64 for im2col):
// CIFAR block 3 at batch 32 has 2048 output pixels, four 512-pixel items, which would leave all
// but four cores of a bigger machine idle. (On this 2-core machine no benchmark shape changes.)
//
// Weight-heavy calls (the stages' weights >= 2^20 elements, beyond a core's L2, and <= 2048 output
// pixels: the ImageNet NiN's block 4, the textbook NiN's block 3) run as ONE tile: MKL repacks a
// GEMM's weight operand on every call, so small tiles paid a pass over the weights for every 72
// pixels, and each thread's weight-gradient accumulators (14 MB for 3x3 384 -> 1024) were read
// and written once per tile. One tile runs outside any parallel region, so MKL threads the
// products itself. Measured (python -m fastnin.bench, 2 threads): imagenet.b4+gap fwd 15.0 ->
// 13.7 ms, fwd+bwd 88 -> 65 ms; nin.b3 fwd+bwd 47 -> 43 ms.
bool weight_heavy(const MlpconvShape& s) {
  int64_t welems = 0, kin = s.kh * s.kw * s.Cin;
  for (int64_t i = 0; i < s.stages(); ++i) {
    welems += s.C[i] * kin;
    kin = s.C[i];
  }
  return welems >= (int64_t(1) << 20) && s.N * s.Ho * s.Wo <= 2048;
}

Tiling make_tiling(const MlpconvShape& s, int64_t elem, bool wino) {
  const int64_t HW = s.Ho * s.Wo;
  // Weight-heavy Winograd calls are one work item too (the textbook NiN's block 3, 8x256x12x12
  // 3x3 -> 384: fwd 0.78x -> 0.85x of eager, fwd+bwd 0.59x -> 0.75x against 512-pixel items).
  if (weight_heavy(s)) return Tiling(s.N, HW, s.N * HW, wino ? 2 * s.Wo : 1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (s.N * HW + threads - 1) / threads;
  auto capped = [&](int64_t target, int64_t floor) { return std::min(target, std::max(floor, per_thread)); };
  return wino ? Tiling(s.N, HW, capped(512, 128), 2 * s.Wo)
              : Tiling(s.N, HW, capped(tile_target(s, elem), 64));
}

// The most 2x2 tiles a Winograd work item of `tl` holds.
int64_t wino_tmax(const MlpconvShape& s, const Tiling& tl) {
  const int64_t per_image = std::min(tl.tsize, tl.HW);
  const int64_t tile_rows = ((per_image + s.Wo - 1) / s.Wo + 1) / 2;
  return (tl.tpi > 1 ? 1 : tl.ipt) * tile_rows * ((s.Wo + 1) / 2);
}

// im2col of pixels [q0, q1) into P[T, K], (kh, kw, cin) order, zeros for the padding.
// x is NHWC. Inside the image the kw * Cin values of one kernel row are contiguous in NHWC.
template <typename T>
void im2col_tile(const T* x, const MlpconvShape& s, int64_t q0, int64_t q1, T* P) {
  const int64_t Cin = s.Cin, K = s.kh * s.kw * Cin, HoWo = s.Ho * s.Wo, rowlen = s.kw * Cin;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / HoWo, r = q % HoWo, oh = r / s.Wo, ow = r % s.Wo;
    T* prow = P + (q - q0) * K;
    const int64_t ih0 = oh * s.sh - s.ph, iw0 = ow * s.sw - s.pw;
    const int64_t jlo = std::min(s.kw, std::max<int64_t>(0, -iw0));
    const int64_t jhi = std::max(jlo, std::min(s.kw, s.W - iw0));
    for (int64_t i = 0; i < s.kh; ++i) {
      T* dst = prow + i * rowlen;
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= s.H) {
        std::fill_n(dst, rowlen, T(0));
        continue;
      }
      if (jlo > 0) std::fill_n(dst, jlo * Cin, T(0));
      if (jhi > jlo) {
        const T* src = x + ((n * s.H + ih) * s.W + iw0 + jlo) * Cin;
        std::memcpy(dst + jlo * Cin, src, sizeof(T) * (jhi - jlo) * Cin);
      }
      if (jhi < s.kw) std::fill_n(dst + jhi * Cin, (s.kw - jhi) * Cin, T(0));
    }
  }
}

// col2im: gx (NHWC) += the patch gradients gP[T, K] of pixels [q0, q1); padding dropped.
template <typename T>
void col2im_tile(const T* gP, const MlpconvShape& s, int64_t q0, int64_t q1, T* gx) {
  const int64_t Cin = s.Cin, K = s.kh * s.kw * Cin, HoWo = s.Ho * s.Wo, rowlen = s.kw * Cin;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / HoWo, r = q % HoWo, oh = r / s.Wo, ow = r % s.Wo;
    const T* prow = gP + (q - q0) * K;
    const int64_t ih0 = oh * s.sh - s.ph, iw0 = ow * s.sw - s.pw;
    const int64_t jlo = std::min(s.kw, std::max<int64_t>(0, -iw0));
    const int64_t jhi = std::max(jlo, std::min(s.kw, s.W - iw0));
    if (jhi <= jlo) continue;
    const int64_t len = (jhi - jlo) * Cin;
    for (int64_t i = 0; i < s.kh; ++i) {
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= s.H) continue;
      const T* src = prow + i * rowlen + jlo * Cin;
      add_to(gx + ((n * s.H + ih) * s.W + iw0 + jlo) * Cin, src, len);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Parameters, repacked once per call in the compute type.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Params {
  int64_t S = 0;
  std::vector<int64_t> Kin;          // input width of each stage (K for stage 0)
  // [C_s, Kin_s], (kh, kw, cin) order: z = a W^T (forward, an NT GEMM: a transposed copy per
  // call cost more than the ImageNet NiN block 4's products), g_s = g_{s+1} W (backward)
  std::vector<at::Tensor> W;
  std::vector<at::Tensor> b;  // [C_s] or undefined
  // [Kin_s, C_s] = W_s^T, only where the products are fastnin's own (sgemm.h), which read their B
  // operand in place and would otherwise transpose W_s for every tile.
  std::vector<at::Tensor> WT;
  const acc_t* w(int64_t i) const { return W[i].template data_ptr<acc_t>(); }
  const acc_t* bias(int64_t i) const { return b[i].defined() ? b[i].template data_ptr<acc_t>() : nullptr; }

  // z[rows, C_i] = a[rows, Kin_i] W_i^T multiplied in double (ad, wd: scratch), rounded once: the
  // backward's recomputed activations of a stage with at most kWgradDoubleMax weights, the
  // input of its weight gradient (see kWgradDoubleMax). Measured: a [3, 4] stage after a [4, 4]
  // one over 32 rows, its weight gradient 9.9e-7 off in float (torch 2.0e-7; the tests' bound 7.6e-7).
  void product_wide(int64_t i, int64_t rows, const acc_t* a, acc_t* z, int64_t ldz, std::vector<double>& ad,
                    std::vector<double>& wd) const {
    const int64_t C = W[i].size(0), K = Kin[i];
    double* av = buf(ad, rows * (K + C));  // a's rows, then z's
    double* zv = av + rows * K;
    double* wv = buf(wd, C * K);
    std::copy_n(a, rows * K, av);
    std::copy_n(w(i), C * K, wv);
    gemm_rm<double>(false, true, rows, C, K, av, K, wv, K, 0.0, zv, C);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < C; ++c) z[r * ldz + c] = static_cast<acc_t>(zv[r * C + c]);
    }
  }

  // z[rows, C_i] = a[rows, Kin_i] W_i^T
  void product(int64_t i, int64_t rows, const acc_t* a, acc_t* z, int64_t ldz) const {
    const int64_t C = W[i].size(0);
    if (!WT.empty()) {
      gemm_rm<acc_t>(false, false, rows, C, Kin[i], a, Kin[i], WT[i].template data_ptr<acc_t>(), C, acc_t(0), z, ldz);
    } else {
      gemm_rm<acc_t>(false, true, rows, C, Kin[i], a, Kin[i], w(i), Kin[i], acc_t(0), z, ldz);
    }
  }
};

template <typename acc_t>
Params<acc_t> pack_params(const MlpconvShape& s, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases, bool skip_first = false) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Params<acc_t> p;
  p.S = s.stages();
  for (int64_t i = 0; i < p.S; ++i) {
    const at::Tensor& wi = weights[i];
    const int64_t C = wi.size(0), Kin = wi.size(1) * wi.size(2) * wi.size(3);
    p.Kin.push_back(Kin);
    const bool skip = skip_first && i == 0;  // stage 0 runs through Winograd: no copy of it here
    // [C, Cin, kh, kw] -> [C, kh, kw, Cin]: the im2col order, i.e. the weight's NHWC bytes
    // (nhwc: the blocked transposing pass; torch's generic permuted copy took 0.75 ms on the
    // textbook NiN's 2.4 MB 5x5 96 -> 256 weight, the same order of time as the layer's pools).
    p.W.push_back(skip ? at::Tensor() : fastnin::cpu::nhwc<acc_t>(wi).permute({0, 2, 3, 1}).reshape({C, Kin}));
    const std::optional<at::Tensor> b = biases[i];
    p.b.push_back(b.has_value() && b->defined() ? b->to(acc).contiguous() : at::Tensor());
  }
  // Weight-heavy calls run one tile outside any parallel region, through MKL (gemm_rm): no copy.
  // transpose_pack's register blocks rather than .t().contiguous(): ~0.05 ms a 192x192 weight
  // through TensorIterator, twice per CIFAR block call.
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fastnin::cpu::fast_sgemm_enabled() && !weight_heavy(s)) {
      for (int64_t i = 0; i < p.S; ++i) {
        if (!p.W[i].defined()) {
          p.WT.emplace_back();
          continue;
        }
        const int64_t C = p.W[i].size(0), Kin = p.Kin[i];
        at::Tensor t = at::empty({Kin, C}, p.W[i].options());
        fastnin::cpu::transpose_pack(C, Kin, p.W[i].template data_ptr<acc_t>(), Kin, t.template data_ptr<acc_t>());
        p.WT.push_back(std::move(t));
      }
    }
  }
  return p;
}

// acc[0:n] = sum over c of acc[c*n : (c+1)*n], in chunk order (deterministic).
// stride: the distance between two chunks' blocks (default n).
template <typename T>
void sum_chunks(T* acc, int64_t nchunks, int64_t n, int64_t stride = -1) {
  if (nchunks <= 1) return;
  if (stride < 0) stride = n;
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t c = 1; c < nchunks; ++c) {
      add_to(acc + b, acc + c * stride + b, e - b);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void mlpconv_forward_impl(const MlpconvShape& s, const at::Tensor& x, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases, bool gap, at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t S = s.stages(), N = s.N, HW = s.Ho * s.Wo, Cout = s.Cout();
  const int64_t K = s.kh * s.kw * s.Cin;
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;

  const at::Tensor xc = fastnin::cpu::nhwc<acc_t>(x);
  const acc_t* xp = xc.data_ptr<acc_t>();
  const at::Tensor w0 = weights[0].to(acc);  // once, for the finite check and the Winograd transform
  const bool wino = use_winograd(s, xc, w0);
  const Params<acc_t> prm = pack_params<acc_t>(s, weights, biases, wino);

  const Tiling tl = make_tiling(s, sizeof(acc_t), wino);
  std::optional<Winograd<acc_t>> winop;
  if (wino) winop.emplace(s, w0, wino_tmax(s, tl));
  const bool out_nhwc = !gap && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  // Writing the last stage straight into the output saves a copy when it has the compute type.
  const bool direct = out_nhwc && std::is_same_v<scalar_t, acc_t>;
  scalar_t* op = out.data_ptr<scalar_t>();
  // GAP: per-tile partial sums when images are cut into several tiles, reduced in tile order.
  std::vector<double> gap_part(gap ? tl.ntiles * Cout * (tl.tpi > 1 ? 1 : tl.ipt) : 0);

  at::parallel_for(0, tl.ntiles, 1, [&](int64_t tb, int64_t te) {
    // Per-thread buffers kept from call to call: allocating them afresh cost page faults on
    // every call (~1% of a 32x96x16x16 5x5 block forward).
    static thread_local std::vector<acc_t> Pv, Av, Bv;
    static thread_local WinoWork<acc_t> wk;
    const int64_t T = tl.max_rows();
    acc_t* P = pointwise || wino ? nullptr : buf(Pv, T * K);
    acc_t* hA = buf(Av, T * s.max_channels());
    acc_t* hB = buf(Bv, T * s.max_channels());
    for (int64_t t = tb; t < te; ++t) {
      int64_t q0, q1;
      tl.range(t, q0, q1);
      const int64_t rows = q1 - q0;
      const acc_t* a = nullptr;
      if (pointwise) {
        a = xp + q0 * s.Cin;
      } else if (wino) {
        winop->transform_input(xp, q0, q1, wk);
      } else {
        im2col_tile(xp, s, q0, q1, P);
        a = P;
      }
      for (int64_t i = 0; i < S; ++i) {
        const int64_t C = s.C[i];
        acc_t* z = (i % 2 == 0) ? hA : hB;
        int64_t ldz = C;
        if (i == S - 1 && direct) {
          z = reinterpret_cast<acc_t*>(op) + q0 * Cout;
        }
        if (i == 0 && wino) {
          winop->multiply_output(q0, q1, wk, z);
        } else {
          prm.product(i, rows, a, z, ldz);
        }
        bias_relu(z, rows, C, ldz, prm.bias(i));
        a = z;
      }
      // a: the tile's [rows, Cout] result
      if (gap) {
        double* part = gap_part.data() + t * Cout * (tl.tpi > 1 ? 1 : tl.ipt);
        if (tl.tpi > 1) {
          std::fill_n(part, Cout, 0.0);
          colsum_add(a, rows, Cout, Cout, part);
        } else {
          const int64_t nimg = rows / HW;
          for (int64_t j = 0; j < nimg; ++j) {
            std::fill_n(part + j * Cout, Cout, 0.0);
            colsum_add(a + j * HW * Cout, HW, Cout, Cout, part + j * Cout);
          }
        }
      } else if (direct) {
        // already in place
      } else if (out_nhwc) {
        scalar_t* dst = op + q0 * Cout;
        for (int64_t e = 0; e < rows * Cout; ++e) dst[e] = static_cast<scalar_t>(a[e]);
      } else {
        fastnin::cpu::store_tile_rows(a, HW, Cout, q0, q1, op);  // NCHW: transposed on the way out
      }
    }
  });

  if (gap) {
    const double hw = static_cast<double>(HW);
    for (int64_t n = 0; n < N; ++n) {
      scalar_t* dst = op + n * Cout;
      if (tl.tpi > 1) {
        for (int64_t c = 0; c < Cout; ++c) {
          double sum = 0;
          for (int64_t j = 0; j < tl.tpi; ++j) sum += gap_part[(n * tl.tpi + j) * Cout + c];
          dst[c] = static_cast<scalar_t>(sum / hw);
        }
      } else {
        const double* src = gap_part.data() + n * Cout;  // tiles of ipt images are laid out in image order
        for (int64_t c = 0; c < Cout; ++c) dst[c] = static_cast<scalar_t>(src[c] / hw);
      }
    }
  }
}

at::Tensor mlpconv_cpu(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool gap) {
  const MlpconvShape s = fastnin::check_mlpconv_args(x, weights, biases, stride, padding);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "mlpconv: x must be a CPU tensor for the CPU kernel, got ", x.device());
  const int64_t K = s.kh * s.kw * s.Cin;
  TORCH_CHECK(K <= INT_MAX && s.max_channels() <= INT_MAX, "mlpconv: kh*kw*Cin = ", K, " is too large");
  at::Tensor out;
  if (gap) {
    out = at::empty({s.N, s.Cout()}, x.options());
  } else {
    const auto fmt = fastnin::mlpconv_output_format(x, weights[0]);
    out = at::empty({s.N, s.Cout(), s.Ho, s.Wo}, x.options().memory_format(fmt));
  }
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlpconv_cpu", [&] {
    mlpconv_forward_impl<scalar_t>(s, x, weights, biases, gap, out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void mlpconv_backward_impl(const MlpconvShape& s, const at::Tensor& grad_out, const at::Tensor& x,
                           at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                           const at::Tensor& out /* undefined if not given */, bool gap, bool need_x, bool need_w,
                           bool need_b, at::Tensor& grad_x, std::vector<at::Tensor>& grad_w,
                           std::vector<at::Tensor>& grad_b) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t S = s.stages(), N = s.N, HW = s.Ho * s.Wo, Cout = s.Cout(), Cin = s.Cin;
  const int64_t K = s.kh * s.kw * Cin, Cmax = s.max_channels();
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
  const bool use_out = out.defined() && !gap;
  // Recompute h_1..h_S from x, except the last stage when `out` gives its ReLU mask.
  const int64_t n_recompute = use_out ? S - 1 : S;
  // P is needed to recompute stage 0, and for gW_0.
  const bool need_P = n_recompute > 0 || need_w;

  const at::Tensor xc = fastnin::cpu::nhwc<acc_t>(x);
  const acc_t* xp = xc.data_ptr<acc_t>();
  // grad_out and out are read as [N*HW, Cout] rows of the compute type (grad_out: [N, Cout] for
  // gap). Where one is NCHW-contiguous in the compute type it is read where it lies, each tile
  // transposing its own block into a buffer (load_tile_rows, layout.h), instead of a whole-tensor NHWC
  // copy first (a 6.3 MB temporary each for CIFAR block 2 at batch 32, written and read again).
  // Measured on that block's NCHW backward, old and new builds alternated in separate processes:
  // within noise (medians 106.2 vs 106.2 ms at 1 thread, minima 100.8 vs 99.7 ms); kept for the
  // two temporaries it spares. Other dtypes and layouts get the copy.
  const auto read_in_place = [&](const at::Tensor& t) {
    return t.scalar_type() == acc && t.dim() == 4 && t.is_contiguous() &&
           !t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  const bool go_nchw = !gap && read_in_place(grad_out);
  const at::Tensor go = gap ? grad_out.to(acc).contiguous() : go_nchw ? grad_out : fastnin::cpu::nhwc<acc_t>(grad_out);
  const acc_t* gop = go.data_ptr<acc_t>();
  const at::Tensor w0 = weights[0].to(acc);  // once, for the finite check and the Winograd transform
  const bool wino = use_winograd(s, xc, w0, go);
  const Params<acc_t> prm = pack_params<acc_t>(s, weights, biases, wino);
  at::Tensor oc;
  const acc_t* outp = nullptr;
  const bool out_nchw = use_out && read_in_place(out);
  if (use_out) {
    oc = out_nchw ? out : fastnin::cpu::nhwc<acc_t>(out);
    outp = oc.data_ptr<acc_t>();
  }

  const Tiling tl = make_tiling(s, sizeof(acc_t), wino);
  std::optional<Winograd<acc_t>> winop;
  if (wino) winop.emplace(s, w0, wino_tmax(s, tl));
  if (wino && need_x) winop->prepare_transposed();
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tl.ntiles));
  // One chunk of consecutive tiles per thread. grad_x can be shared by all chunks when no image
  // is split between two chunks (tiles of whole images, or chunk boundaries on image
  // boundaries): patches of different images never overlap. Otherwise (fewer images than
  // threads, each cut into tiles) every chunk accumulates into its own copy.
  std::vector<int64_t> bounds(nchunks + 1);
  const bool by_image = tl.tpi > 1 && N >= nchunks;
  for (int64_t c = 0; c <= nchunks; ++c) {
    if (by_image) {
      const int64_t n = (c * N) / nchunks;
      bounds[c] = n * tl.tpi;
    } else {
      bounds[c] = (c * tl.ntiles) / nchunks;
    }
  }
  const bool shared_gx = tl.tpi == 1 || by_image || nchunks == 1;

  // grad_x accumulators (NHWC, compute type)
  const int64_t xnumel = N * s.H * s.W * Cin;
  const bool gx_direct = need_x && shared_gx && std::is_same_v<scalar_t, acc_t> &&
                         grad_x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor gx_acc;
  if (need_x) {
    if (gx_direct) {
      grad_x.zero_();
      gx_acc = grad_x;
    } else {
      gx_acc = at::zeros({shared_gx ? 1 : nchunks, xnumel}, x.options().dtype(acc));
    }
  }
  // weight / bias gradient accumulators per chunk
  int64_t wsize = 0, bsize = 0;
  std::vector<int64_t> woff(S), boff(S);
  for (int64_t i = 0; i < S; ++i) {
    woff[i] = wsize;
    boff[i] = bsize;
    wsize += s.C[i] * prm.Kin[i];
    bsize += s.C[i];
  }
  // Kept from call to call by the calling thread, like dU_store below: a fresh zeroed vector cost
  // page faults and a memset on every call (4.3 MB on CIFAR block 2 with 2 chunks). Zeroed here
  // except stage 0's blocks under Winograd: no chunk accumulates there (that gradient sums in
  // dU_acc), and weight_grad writes its result whole.
  static thread_local std::vector<acc_t> gw_store;
  std::vector<acc_t> gw_own;
  acc_t* const gw_acc = need_w ? fastnin::cpu::kept_or_own(gw_store, gw_own, nchunks * wsize) : nullptr;
  const int64_t wlo = wino ? woff[0] + s.C[0] * prm.Kin[0] : 0;  // the accumulated part: [wlo, wsize)
  // The accumulated part sums in double, per chunk ([nchunks][wsize - wlo]): each tile's product
  // g^T a (see kWgradDoubleMax) is rounded once to acc_t and added there, the chunk's first one
  // stored (no zeroing pass). A float running sum (MKL's beta = 1 over all the tiles, or one GEMM
  // over all the rows) grows its error with the row count: on an AMD EPYC (Zen 4), whose MKL
  // kernels accumulate differently from the Xeon's, a 1x1 weight gradient over 1125 rows came out
  // 2.9e-6 off against torch's 8.6e-7 (one fp32 GEMM over them all: 2.1e-6; products of <= 250
  // rows summed in double: 7-8e-7).
  const int64_t wlen = wsize - wlo;
  static thread_local std::vector<double> gw64_store;
  std::vector<double> gw64_own;
  // One tile, one chunk, one product a stage: each goes straight to gw_acc, and gw64 is not used
  // (for the weight-heavy calls it would be tens of MB: beyond what a thread keeps, a fresh
  // zeroed vector every call).
  const bool one_product = nchunks == 1 && tl.ntiles == 1;
  double* const gw64 =
      need_w && !one_product ? fastnin::cpu::kept_or_own(gw64_store, gw64_own, nchunks * wlen) : nullptr;
  // Whether stage i's gradient is in gw64 (double) at the end, or in gw_acc (compute type).
  auto in_double = [&](int64_t i) { return !(wino && i == 0) && !one_product; };
  int64_t wprod = 0;  // the largest C_i * Kin_i among the accumulated stages: a tile product's size
  for (int64_t i = wino ? 1 : 0; i < S; ++i) wprod = std::max(wprod, s.C[i] * prm.Kin[i]);
  std::vector<double> gb_acc(need_b ? nchunks * bsize : 0, 0.0);
  // Winograd: stage 0's weight gradient accumulates in the transformed domain, per chunk.
  const int64_t usize = wino && need_w ? winop->u_size() : 0;
  // Kept from call to call by the calling thread, not zeroed: each chunk's first work item
  // overwrites its block (beta 0). A fresh zeroed 2.4-9.4 MB vector per call cost page faults and
  // a memset, ~10% of CIFAR block 3's weight-gradient work (2 threads).
  static thread_local std::vector<acc_t> dU_store;
  std::vector<acc_t> dU_own;
  acc_t* dU_acc = fastnin::cpu::kept_or_own(dU_store, dU_own, nchunks * usize);

  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    const int64_t T = tl.max_rows();
    static thread_local std::vector<acc_t> Pv, Hv, Gv0, Gv1, GPv, Ov, Wv;  // kept from call to call (see the forward)
    static thread_local std::vector<double> Gdv, Adv, Wdv;  // g, a_i and their product in double (small stages)
    static thread_local WinoWork<acc_t> wk;
    acc_t* P = need_P && !pointwise && !wino ? buf(Pv, T * K) : nullptr;
    // h_1 .. h_{S-1} (and h_S when recomputed), each [T, C_s]
    acc_t* H = buf(Hv, T * Cmax * S);
    acc_t* G0 = buf(Gv0, T * Cmax);
    acc_t* G1 = buf(Gv1, T * Cmax);
    acc_t* Ot = out_nchw ? buf(Ov, T * Cout) : nullptr;  // the tile's rows of an NCHW `out`
    acc_t* Wt = need_w && !one_product ? buf(Wv, wprod) : nullptr;  // one tile product of a weight gradient
    // gP: reuses P's buffer once gW_0 is done, or its own when P is not needed
    for (int64_t c = cb; c < ce; ++c) {
      double* gw = gw64 != nullptr ? gw64 + c * wlen : nullptr;  // stage i at gw + (woff[i] - wlo)
      double* gb = need_b ? gb_acc.data() + c * bsize : nullptr;
      acc_t* gx = need_x ? gx_acc.data_ptr<acc_t>() + (shared_gx || gx_direct ? 0 : c * xnumel) : nullptr;
      if (usize > 0 && bounds[c] == bounds[c + 1]) std::fill_n(dU_acc + c * usize, usize, acc_t(0));  // no items
      if (gw64 != nullptr && bounds[c] == bounds[c + 1]) std::fill_n(gw64 + c * wlen, wlen, 0.0);
      for (int64_t t = bounds[c]; t < bounds[c + 1]; ++t) {
        int64_t q0, q1;
        tl.range(t, q0, q1);
        const int64_t rows = q1 - q0;
        // stage inputs a_s: a_0 = P, a_s = h_s
        const acc_t* a[4] = {nullptr, nullptr, nullptr, nullptr};
        if (need_P) {
          if (pointwise) {
            a[0] = xp + q0 * Cin;
          } else if (wino) {
            winop->transform_input(xp, q0, q1, wk);
          } else {
            im2col_tile(xp, s, q0, q1, P);
            a[0] = P;
          }
        }
        for (int64_t i = 0; i < n_recompute; ++i) {
          acc_t* z = H + i * T * Cmax;
          if (i == 0 && wino) {
            winop->multiply_output(q0, q1, wk, z);
          } else {
            if (!std::is_same_v<acc_t, double> && s.C[i] * prm.Kin[i] <= kWgradDoubleMax) {
              prm.product_wide(i, rows, a[i], z, s.C[i], Adv, Wdv);
            } else {
              prm.product(i, rows, a[i], z, s.C[i]);
            }
          }
          bias_relu(z, rows, s.C[i], s.C[i], prm.bias(i));
          a[i + 1] = z;
        }
        // g_S = grad_out * (h_S > 0)
        acc_t* g = G0;
        acc_t* gnext = G1;
        const acc_t* hS = a[S];
        if (out_nchw) {
          fastnin::cpu::load_tile_rows(outp, HW, Cout, q0, q1, Ot);
          hS = Ot;
        } else if (use_out) {
          hS = outp + q0 * Cout;
        }
        if (gap) {
          // d mean / d pixel = 1 / (Ho * Wo), one grad_out row per image
          const acc_t inv = acc_t(1) / static_cast<acc_t>(HW);
          for (int64_t r = 0; r < rows;) {
            const int64_t n = (q0 + r) / HW, r1 = std::min(rows, (n + 1) * HW - q0);
            masked_grad(g + r * Cout, gop + n * Cout, int64_t(0), hS + r * Cout, r1 - r, Cout, inv);
            r = r1;
          }
        } else if (go_nchw) {
          fastnin::cpu::load_tile_rows(gop, HW, Cout, q0, q1, g);
          relu_mask(g, Cout, hS, Cout, rows, Cout);  // = masked_grad with scale 1, bit for bit
        } else {
          masked_grad(g, gop + q0 * Cout, Cout, hS, rows, Cout, acc_t(1));
        }
        for (int64_t i = S - 1; i >= 0; --i) {
          const int64_t C = s.C[i], Kin = prm.Kin[i];
          if (need_b) colsum_add(g, rows, C, C, gb + boff[i]);
          if (i == 0 && wino) {
            if (need_w || need_x) {
              winop->backward(g, q0, q1, wk, need_w ? dU_acc + c * usize : nullptr, need_x ? gx : nullptr,
                              /*dU_init=*/t == bounds[c]);
            }
            break;
          }
          if (need_w) {
            // gW_i[C, Kin] += g^T a_i: the tile's product added in double (above); the chunk's
            // first one stored instead.
            const bool first = t == bounds[c];
            const bool small = !std::is_same_v<acc_t, double> && C * Kin <= kWgradDoubleMax;
            double* const gwi = gw != nullptr ? gw + (woff[i] - wlo) : nullptr;
            if (small) {
              double* gd = buf(Gdv, rows * C);
              double* ad = buf(Adv, rows * Kin);
              std::copy_n(g, rows * C, gd);
              std::copy_n(a[i], rows * Kin, ad);
              if (one_product) {  // the single product, rounded once into the result
                double* wd = buf(Wdv, C * Kin);
                gemm_rm<double>(true, false, C, Kin, rows, gd, C, ad, Kin, 0.0, wd, Kin);
                std::copy_n(wd, C * Kin, gw_acc + woff[i]);
              } else {
                gemm_rm<double>(true, false, C, Kin, rows, gd, C, ad, Kin, first ? 0.0 : 1.0, gwi, Kin);
              }
            } else if (one_product) {  // straight into the result
              gemm_rm<acc_t>(true, false, C, Kin, rows, g, C, a[i], Kin, acc_t(0), gw_acc + woff[i], Kin);
            } else if constexpr (std::is_same_v<acc_t, double>) {
              gemm_rm<double>(true, false, C, Kin, rows, g, C, a[i], Kin, first ? 0.0 : 1.0, gwi, Kin);
            } else {
              gemm_rm<acc_t>(true, false, C, Kin, rows, g, C, a[i], Kin, acc_t(0), Wt, Kin);
              if (first) {
                std::copy_n(Wt, C * Kin, gwi);
              } else {
                add_wide(Wt, C * Kin, gwi);
              }
            }
          }
          if (i > 0) {
            // g_i = (g W_i) * (h_i > 0)
            gemm_rm<acc_t>(false, false, rows, Kin, C, g, C, prm.w(i), Kin, acc_t(0), gnext, Kin);
            relu_mask(gnext, Kin, a[i], Kin, rows, Kin);
            std::swap(g, gnext);
          } else if (need_x) {
            acc_t* gP = (P != nullptr) ? P : buf(GPv, T * K);
            gemm_rm<acc_t>(false, false, rows, K, C, g, C, prm.w(0), K, acc_t(0), gP, K);
            col2im_tile(gP, s, q0, q1, gx);
          }
        }
      }
    }
  });

  // Reduce the per-chunk accumulators in chunk order and write the results.
  if (need_w) {
    if (gw64 != nullptr) sum_chunks(gw64, nchunks, wlen);
    // Winograd writes stage 0's kernel gradient straight into grad_w[0] where that has the
    // compute type (its permuting copy below took 0.3 ms on CIFAR block 2), else into gw_acc's
    // [K1][kh][kw][Cin] block for the converting copy.
    const bool wino_direct = wino && grad_w[0].scalar_type() == acc;
    if (wino) {
      sum_chunks(dU_acc, nchunks, usize);
      if (wino_direct) {
        const at::Tensor& g = grad_w[0];
        winop->weight_grad(dU_acc, g.data_ptr<acc_t>(), g.stride(0), g.stride(1), g.stride(2), g.stride(3));
      } else {
        winop->weight_grad(dU_acc, gw_acc + woff[0], s.kh * s.kw * Cin, 1, s.kw * Cin, Cin);
      }
    }
    for (int64_t i = 0; i < S; ++i) {
      if (i == 0 && wino_direct) continue;
      const auto& w = weights[i];
      // from gw64 (rounded once, by the converting copy) or gw_acc
      const bool dbl = in_double(i);
      void* base = dbl ? static_cast<void*>(gw64 + (woff[i] - wlo)) : static_cast<void*>(gw_acc + woff[i]);
      at::Tensor src = at::from_blob(base, {w.size(0), w.size(2), w.size(3), w.size(1)},
                                     at::TensorOptions().dtype(dbl ? at::kDouble : acc))
                           .permute({0, 3, 1, 2});
      grad_w[i].copy_(src);
    }
  }
  if (need_b) {
    sum_chunks(gb_acc.data(), nchunks, bsize);
    for (int64_t i = 0; i < S; ++i) {
      if (grad_b[i].numel() == 0) continue;  // None bias
      grad_b[i].copy_(at::from_blob(gb_acc.data() + boff[i], {s.C[i]}, at::TensorOptions().dtype(at::kDouble)));
    }
  }
  if (need_x && !gx_direct) {
    if (!shared_gx) sum_chunks(gx_acc.data_ptr<acc_t>(), nchunks, xnumel);
    if (grad_x.is_contiguous()) {
      fastnin::cpu::store_nchw<acc_t>(gx_acc.data_ptr<acc_t>(), grad_x);
    } else {
      grad_x.copy_(gx_acc[0].view({N, s.H, s.W, Cin}).permute({0, 3, 1, 2}));
    }
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlpconv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, const std::optional<at::Tensor>& out, at::IntArrayRef stride,
    at::IntArrayRef padding, bool gap, std::array<bool, 3> output_mask) {
  const MlpconvShape s = fastnin::check_mlpconv_args(x, weights, biases, stride, padding);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "mlpconv_backward: x must be a CPU tensor for the CPU kernel, got ",
                    x.device());
  fastnin::check_same(grad_out, x, "mlpconv_backward", "grad_out");
  if (gap) {
    TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == s.N && grad_out.size(1) == s.Cout(),
                      "mlpconv_backward: grad_out must have shape [", s.N, ", ", s.Cout(), "], got ",
                      grad_out.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.Cout() &&
                          grad_out.size(2) == s.Ho && grad_out.size(3) == s.Wo,
                      "mlpconv_backward: grad_out must have shape [", s.N, ", ", s.Cout(), ", ", s.Ho, ", ", s.Wo,
                      "], got ", grad_out.sizes());
  }
  at::Tensor out_t;
  if (out.has_value() && out->defined() && !gap) {
    out_t = *out;
    fastnin::check_same(out_t, x, "mlpconv_backward", "out");
    TORCH_CHECK_VALUE(out_t.sizes() == grad_out.sizes(), "mlpconv_backward: out must have shape ", grad_out.sizes(),
                      ", got ", out_t.sizes());
  }
  const int64_t K = s.kh * s.kw * s.Cin;
  TORCH_CHECK(K <= INT_MAX && s.max_channels() <= INT_MAX, "mlpconv: kh*kw*Cin = ", K, " is too large");
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const int64_t S = s.stages();

  const auto gx_fmt = fastnin::mlpconv_output_format(x, weights[0]);
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options().memory_format(gx_fmt)) : at::empty({0}, x.options());
  std::vector<at::Tensor> grad_w, grad_b;
  if (need_w) {
    for (int64_t i = 0; i < S; ++i) grad_w.push_back(at::empty_like(weights[i]));
  }
  if (need_b) {
    for (int64_t i = 0; i < S; ++i) {
      const std::optional<at::Tensor> b = biases[i];
      grad_b.push_back(b.has_value() && b->defined() ? at::empty_like(*b) : at::empty({0}, x.options()));
    }
  }
  if (!need_x && !need_w && !need_b) return {grad_x, grad_w, grad_b};
  // Empty problems: every gradient is zero (or empty).
  if (s.N == 0 || grad_out.numel() == 0) {
    if (need_x) grad_x.zero_();
    for (auto& g : grad_w) g.zero_();
    for (auto& g : grad_b) g.zero_();
    return {grad_x, grad_w, grad_b};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlpconv_backward_cpu", [&] {
    mlpconv_backward_impl<scalar_t>(s, grad_out, x, weights, biases, out_t, gap, need_x, need_w, need_b, grad_x,
                                    grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CPU, m) {
  m.impl("mlpconv", &mlpconv_cpu);
  m.impl("mlpconv_backward", &mlpconv_backward_cpu);
}
