// Local response normalization across channels on CUDA (torch.nn.functional.local_response_norm):
//
//   d_c  = k + alpha/size * sum_{j = c - lo}^{c + hi} x_j^2,   lo = size/2, hi = (size-1)/2,
//          channels outside [0, C) counting as zero;
//   y_c  = x_c * d_c^-beta;
//   gx_c = g_c d_c^-beta - (2 alpha beta / size) x_c * sum_{j = c - hi}^{c + lo} g_j x_j d_j^(-beta-1)
//          (the j whose window holds c), d recomputed from x.
//
// x is viewed as "pixel columns" of C channels: column q = (n, s) starts at base(q) and channel c
// sits at base(q) + c * cs. Contiguous [N, C, *]: cs = S (the spatial size), neighbouring columns
// are neighbouring addresses. channels_last (4-D): cs = 1, a column is C contiguous values.
//
// Three kernels, each for forward and backward:
//   * column  (contiguous layouts): one thread per column walks the channels in order, so a warp
//     reads 32 neighbouring addresses per channel (coalesced). Each element of x (and of
//     grad_out) is read once and each output written once: the last `size` values of the walk
//     live in per-thread ring buffers in shared memory ([slot][thread], conflict-free).
//   * pixel   (channels_last, cs == 1): a warp per column loads its C channels into shared
//     memory (coalesced), then every lane computes its channels' windows from there.
//   * generic (any layout, any size): one thread per element reading its window from global
//     memory (the backward in two passes through fp32 temporaries). Used when the rings or the
//     column's channels would not fit in 48 KB of shared memory (a window or C in the hundreds
//     to thousands), or when forced for testing.
// Window sums are always exact sums of the window's squares (no running add/subtract, which
// would cancel catastrophically in fp32 when a large value leaves the window). Accumulation in
// fp32 (float64 for float64 inputs). For beta = 0.75 and 16-bit inputs, d^-0.75 is
// rsqrt(d) * sqrt(rsqrt(d)) (~3 fp32 ulp, far below a 16-bit ulp); fp32/fp64 inputs use pow(),
// whose error matches what torch's own fp32 composition has.
//
// FASTNIN_CUDA_LRN=column|pixel|generic forces a kernel (tests; a path that does not fit falls
// back to generic).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "common.cuh"

namespace {

using fastnin::cuda::acc_t;

template <typename A>
struct LrnArgs {
  int64_t cols;  // N * S
  int64_t S;     // spatial size (product of the dims after C)
  int64_t ps;    // distance between neighbouring pixels of one image: 1 (contiguous) or C (channels_last)
  int64_t cs;    // channel stride: S (contiguous) or 1 (channels_last)
  int C;
  int size, lo, hi;
  A k, aos, neg_beta, coef;  // aos = alpha / size, coef = 2 alpha beta / size
  bool fast075;              // d^-0.75 via rsqrt (16-bit inputs only)
};

template <typename A>
__device__ __forceinline__ int64_t column_base(const LrnArgs<A>& a, int64_t q) {
  const int64_t n = q / a.S;
  return n * a.C * a.S + (q - n * a.S) * a.ps;
}

template <typename A>
__device__ __forceinline__ A pow_neg_beta(A d, const LrnArgs<A>& a) {
  if constexpr (std::is_same<A, float>::value) {
    if (a.fast075) {
      const float r = rsqrtf(d);
      return r * sqrtf(r);
    }
    return powf(d, a.neg_beta);
  } else {
    return ::pow(d, a.neg_beta);
  }
}

// ------------------------------------------------------------------------------------------------
// column kernels: one thread per (column, channel segment [c_begin, c_end)). Channel `pos` of the
// walk sits in ring slot pos & (R - 1), ring[slot * nt] (this thread's slots are nt apart), R a
// power of two >= min(size, C). Why that suffices: every window (of x for d; of t for the
// backward sum) spans at most min(size, C) consecutive channels inside [0, C), and a value is
// read at most size - 1 positions after it was written; when C <= R every channel has its own
// slot. Segments re-read a halo of size - 1 channels (the backward 2 (size - 1)) so that short
// walks give the GPU enough threads when there are few columns.
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(128) _lrn_fwd_col_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                          LrnArgs<acc_t<T>> a, int rmask, int seg) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nt = blockDim.x, tid = threadIdx.x;
  A* ring = reinterpret_cast<A*>(smem_raw) + tid;
  const int C = a.C;
  const int c_begin = static_cast<int>(blockIdx.y) * seg;
  const int c_end = c_begin + seg < C ? c_begin + seg : C;
  // Load channel p, then emit channel c = p - hi, whose window [c - lo, c + hi] ends at p.
  const int p_begin = c_begin - a.lo > 0 ? c_begin - a.lo : 0;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * nt + tid; q < a.cols; q += static_cast<int64_t>(gridDim.x) * nt) {
    const int64_t base = column_base(a, q);
    for (int p = p_begin; p < c_end + a.hi; ++p) {
      if (p < C) ring[(p & rmask) * nt] = static_cast<A>(x[base + static_cast<int64_t>(p) * a.cs]);
      const int c = p - a.hi;
      if (c < c_begin) continue;
      const int j0 = c - a.lo > 0 ? c - a.lo : 0;
      const int j1 = c + a.hi < C ? c + a.hi : C - 1;
      A sum = A(0);
      for (int j = j0; j <= j1; ++j) {
        const A v = ring[(j & rmask) * nt];
        sum += v * v;
      }
      const A d = a.k + a.aos * sum;
      y[base + static_cast<int64_t>(c) * a.cs] = static_cast<T>(ring[(c & rmask) * nt] * pow_neg_beta(d, a));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(128) _lrn_bwd_col_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                          T* __restrict__ gx, LrnArgs<acc_t<T>> a, int rmask, int seg) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nt = blockDim.x, tid = threadIdx.x;
  const int R = rmask + 1;
  A* xr = reinterpret_cast<A*>(smem_raw) + tid;  // x_pos
  A* tr = xr + R * nt;                           // t_j = g_j x_j d_j^(-beta-1)
  A* ar = tr + R * nt;                           // a_j = g_j d_j^-beta
  const int C = a.C;
  const int span = a.lo + a.hi;  // size - 1 (both clamped to C for huge windows)
  const int c_begin = static_cast<int>(blockIdx.y) * seg;
  const int c_end = c_begin + seg < C ? c_begin + seg : C;
  // Step p: load x_p; finish j = p - hi (its x window [j - lo, p] is loaded): t_j and a_j; then
  // finish c = p - span, whose t window [c - hi, c + lo = j] is complete. Only the j that some
  // c in [c_begin, c_end) needs (j >= c_begin - hi) are computed: their x windows start at or
  // after p_begin. Reuse distances: x_c is read span steps after its write, t_{c - hi} span steps
  // after, a_c lo steps after: all < R.
  const int p_begin = c_begin - span > 0 ? c_begin - span : 0;
  const int j_begin = c_begin - a.hi > 0 ? c_begin - a.hi : 0;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * nt + tid; q < a.cols; q += static_cast<int64_t>(gridDim.x) * nt) {
    const int64_t base = column_base(a, q);
    for (int p = p_begin; p < c_end + span; ++p) {
      if (p < C) xr[(p & rmask) * nt] = static_cast<A>(x[base + static_cast<int64_t>(p) * a.cs]);
      const int j = p - a.hi;
      if (j >= j_begin && j < C) {
        const int j0 = j - a.lo > 0 ? j - a.lo : 0;
        const int j1 = j + a.hi < C ? j + a.hi : C - 1;
        A sum = A(0);
        for (int i = j0; i <= j1; ++i) {
          const A v = xr[(i & rmask) * nt];
          sum += v * v;
        }
        const A d = a.k + a.aos * sum;
        const A dp = pow_neg_beta(d, a);
        const A gj = static_cast<A>(g[base + static_cast<int64_t>(j) * a.cs]);
        const A xj = xr[(j & rmask) * nt];
        tr[(j & rmask) * nt] = gj * xj * dp / d;
        ar[(j & rmask) * nt] = gj * dp;
      }
      const int c = p - span;
      if (c < c_begin) continue;
      const int i0 = c - a.hi > 0 ? c - a.hi : 0;
      const int i1 = c + a.lo < C ? c + a.lo : C - 1;
      A sum = A(0);
      for (int i = i0; i <= i1; ++i) sum += tr[(i & rmask) * nt];
      const int cs = (c & rmask) * nt;
      gx[base + static_cast<int64_t>(c) * a.cs] = static_cast<T>(ar[cs] - a.coef * xr[cs] * sum);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// pixel kernels: a warp per column, the column's channels in shared memory (C values per warp for
// the forward, 3 C for the backward).
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(128) _lrn_fwd_pix_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                          LrnArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int C = a.C;
  A* xs = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(warp) * C;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * warps + warp; q < a.cols;
       q += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t base = column_base(a, q);
    for (int c = lane; c < C; c += 32) xs[c] = static_cast<A>(x[base + static_cast<int64_t>(c) * a.cs]);
    __syncwarp();
    for (int c = lane; c < C; c += 32) {
      const int j0 = c - a.lo > 0 ? c - a.lo : 0;
      const int j1 = c + a.hi < C ? c + a.hi : C - 1;
      A sum = A(0);
      for (int j = j0; j <= j1; ++j) sum += xs[j] * xs[j];
      const A d = a.k + a.aos * sum;
      y[base + static_cast<int64_t>(c) * a.cs] = static_cast<T>(xs[c] * pow_neg_beta(d, a));
    }
    __syncwarp();  // xs is refilled for the next column
  }
}

template <typename T>
__global__ void __launch_bounds__(128) _lrn_bwd_pix_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                          T* __restrict__ gx, LrnArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int C = a.C;
  A* xs = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(warp) * 3 * C;
  A* gs = xs + C;  // g_c, then a_c = g_c d_c^-beta
  A* ts = gs + C;  // t_c = g_c x_c d_c^(-beta-1)
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * warps + warp; q < a.cols;
       q += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t base = column_base(a, q);
    for (int c = lane; c < C; c += 32) {
      xs[c] = static_cast<A>(x[base + static_cast<int64_t>(c) * a.cs]);
      gs[c] = static_cast<A>(g[base + static_cast<int64_t>(c) * a.cs]);
    }
    __syncwarp();
    for (int c = lane; c < C; c += 32) {
      const int j0 = c - a.lo > 0 ? c - a.lo : 0;
      const int j1 = c + a.hi < C ? c + a.hi : C - 1;
      A sum = A(0);
      for (int j = j0; j <= j1; ++j) sum += xs[j] * xs[j];
      const A d = a.k + a.aos * sum;
      const A dp = pow_neg_beta(d, a);
      ts[c] = gs[c] * xs[c] * dp / d;
      gs[c] = gs[c] * dp;  // only this lane reads gs[c] from here on
    }
    __syncwarp();
    for (int c = lane; c < C; c += 32) {
      const int i0 = c - a.hi > 0 ? c - a.hi : 0;
      const int i1 = c + a.lo < C ? c + a.lo : C - 1;
      A sum = A(0);
      for (int i = i0; i <= i1; ++i) sum += ts[i];
      gx[base + static_cast<int64_t>(c) * a.cs] = static_cast<T>(gs[c] - a.coef * xs[c] * sum);
    }
    __syncwarp();
  }
}

// ------------------------------------------------------------------------------------------------
// generic kernels: one thread per element e (a memory index); c = (e / cs) % C and the column
// starts at e - c * cs, for either layout.
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ acc_t<T> window_d(const T* __restrict__ x, int64_t col, int c, const LrnArgs<acc_t<T>>& a) {
  using A = acc_t<T>;
  const int j0 = c - a.lo > 0 ? c - a.lo : 0;
  const int j1 = c + a.hi < a.C ? c + a.hi : a.C - 1;
  A sum = A(0);
  for (int j = j0; j <= j1; ++j) {
    const A v = static_cast<A>(x[col + static_cast<int64_t>(j) * a.cs]);
    sum += v * v;
  }
  return a.k + a.aos * sum;
}

template <typename T>
__global__ void __launch_bounds__(256) _lrn_fwd_generic_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              LrnArgs<acc_t<T>> a, int64_t total) {
  using A = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>((e / a.cs) % a.C);
    const int64_t col = e - static_cast<int64_t>(c) * a.cs;
    const A d = window_d(x, col, c, a);
    y[e] = static_cast<T>(static_cast<A>(x[e]) * pow_neg_beta(d, a));
  }
}

// Pass 1: t[e] = g x d^(-beta-1), ga[e] = g d^-beta (accumulation type).
template <typename T>
__global__ void __launch_bounds__(256) _lrn_bwd_generic_t_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                                acc_t<T>* __restrict__ t, acc_t<T>* __restrict__ ga,
                                                                LrnArgs<acc_t<T>> a, int64_t total) {
  using A = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>((e / a.cs) % a.C);
    const int64_t col = e - static_cast<int64_t>(c) * a.cs;
    const A d = window_d(x, col, c, a);
    const A dp = pow_neg_beta(d, a);
    const A gv = static_cast<A>(g[e]);
    t[e] = gv * static_cast<A>(x[e]) * dp / d;
    ga[e] = gv * dp;
  }
}

// Pass 2: gx = ga - coef x sum_{j = c - hi}^{c + lo} t_j.
template <typename T>
__global__ void __launch_bounds__(256) _lrn_bwd_generic_gx_kernel(const T* __restrict__ x,
                                                                 const acc_t<T>* __restrict__ t,
                                                                 const acc_t<T>* __restrict__ ga, T* __restrict__ gx,
                                                                 LrnArgs<acc_t<T>> a, int64_t total) {
  using A = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>((e / a.cs) % a.C);
    const int64_t col = e - static_cast<int64_t>(c) * a.cs;
    const int i0 = c - a.hi > 0 ? c - a.hi : 0;
    const int i1 = c + a.lo < a.C ? c + a.lo : a.C - 1;
    A sum = A(0);
    for (int i = i0; i <= i1; ++i) sum += t[col + static_cast<int64_t>(i) * a.cs];
    gx[e] = static_cast<T>(ga[e] - a.coef * static_cast<A>(x[e]) * sum);
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

enum class LrnPath { kColumn, kPixel, kGeneric };

constexpr int kSmemLimit = 48 * 1024;  // no opt-in: these kernels need little

struct LrnPlan {
  LrnPath path;
  int threads;
  size_t smem;
  int R;  // column: ring slots, a power of two
};

int next_pow2(int v) {
  int r = 1;
  while (r < v) r *= 2;
  return r;
}

// rings: shared-memory values per thread (column: 1 forward / 3 backward, times R) or per warp
// (pixel: 1 / 3, times C).
LrnPlan plan_lrn(bool channels_inner, int C, int size, int rings, size_t acc_bytes) {
  const char* force = fastnin::cuda::env_switch("FASTNIN_CUDA_LRN");
  LrnPath want = channels_inner ? LrnPath::kPixel : LrnPath::kColumn;
  if (std::strcmp(force, "column") == 0) want = LrnPath::kColumn;
  if (std::strcmp(force, "pixel") == 0) want = LrnPath::kPixel;
  if (std::strcmp(force, "generic") == 0) want = LrnPath::kGeneric;
  if (want == LrnPath::kColumn) {
    const int R = next_pow2(size < C ? size : C);
    for (int nt = 128; nt >= 32; nt /= 2) {
      const size_t bytes = static_cast<size_t>(rings) * R * nt * acc_bytes;
      if (bytes <= kSmemLimit) return LrnPlan{LrnPath::kColumn, nt, bytes, R};
    }
  } else if (want == LrnPath::kPixel) {
    for (int warps = 4; warps >= 1; warps /= 2) {
      const size_t bytes = static_cast<size_t>(rings) * C * warps * acc_bytes;
      if (bytes <= kSmemLimit) return LrnPlan{LrnPath::kPixel, warps * 32, bytes, 0};
    }
  }
  return LrnPlan{LrnPath::kGeneric, 256, 0, 0};
}

// Channel segments per column for the column kernels: enough threads in flight (~2^19, a few
// waves of an H100's 132 x 2048 thread slots) when there are few columns, at least 16 channels
// per segment so that the halo re-reads stay small.
int column_segments(int64_t cols, int C) {
  const int64_t want = fastnin::cuda::ceil_div<int64_t>(int64_t(1) << 19, cols);
  const int64_t most = std::min<int64_t>(fastnin::cuda::ceil_div<int64_t>(C, 16), 4096);  // grid.y <= 65535
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, most)));
}

struct LrnView {
  at::Tensor x;  // contiguous in `format`
  c10::MemoryFormat format;
  int64_t N, C, S;
  bool channels_last;
};

LrnView lrn_view(const at::Tensor& x) {
  LrnView v;
  v.format = fastnin::lrn_format(x);
  v.channels_last = v.format == c10::MemoryFormat::ChannelsLast;
  v.x = x.contiguous(v.format);
  v.N = x.size(0);
  v.C = x.size(1);
  v.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) v.S *= x.size(d);
  return v;
}

template <typename A>
LrnArgs<A> lrn_args(const LrnView& v, int64_t size, double alpha, double beta, double k, bool is16) {
  TORCH_CHECK(v.C <= INT32_MAX / 2, "lrn: CUDA kernels support up to 2^30 channels, got ", v.C);
  LrnArgs<A> a;
  a.cols = v.N * v.S;
  a.S = v.S;
  a.C = static_cast<int>(v.C);
  // A window longer than 2C + 1 covers every channel from every position: clamp it (the sums
  // and the ring sizes only see [0, C)), keeping the divisor alpha / size of the real size.
  const int64_t eff = std::min<int64_t>(size, 2 * v.C + 1);
  a.size = static_cast<int>(eff);
  a.lo = static_cast<int>(std::min<int64_t>(size / 2, v.C));
  a.hi = static_cast<int>(std::min<int64_t>((size - 1) / 2, v.C));
  a.cs = v.channels_last ? 1 : v.S;
  a.ps = v.channels_last ? v.C : 1;
  a.k = static_cast<A>(k);
  a.aos = static_cast<A>(alpha / static_cast<double>(size));
  a.neg_beta = static_cast<A>(-beta);
  a.coef = static_cast<A>(2.0 * alpha * beta / static_cast<double>(size));
  a.fast075 = is16 && beta == 0.75;
  return a;
}

at::Tensor lrn_cuda(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  fastnin::check_lrn_args(x, size);
  c10::cuda::CUDAGuard guard(x.device());
  const LrnView v = lrn_view(x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(v.format));
  const int64_t total = y.numel();
  if (total == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(fastnin::cuda::sm_count()) * 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto a = lrn_args<A>(v, size, alpha, beta, k, fastnin::cuda::is_16bit<scalar_t>());
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const LrnPlan plan = plan_lrn(a.cs == 1, a.C, a.size, 1, sizeof(A));
    if (plan.path == LrnPath::kColumn) {
      const int nseg = column_segments(a.cols, a.C);
      const int seg = fastnin::cuda::ceil_div(a.C, nseg);
      const dim3 grid(fastnin::cuda::grid_for(a.cols, plan.threads, max_blocks),
                      static_cast<unsigned>(fastnin::cuda::ceil_div(a.C, seg)));
      _lrn_fwd_col_kernel<scalar_t><<<grid, plan.threads, plan.smem, stream>>>(xp, yp, a, plan.R - 1, seg);
    } else if (plan.path == LrnPath::kPixel) {
      const unsigned grid = fastnin::cuda::grid_for(a.cols, plan.threads / 32, max_blocks);
      _lrn_fwd_pix_kernel<scalar_t><<<grid, plan.threads, plan.smem, stream>>>(xp, yp, a);
    } else {
      const unsigned grid = fastnin::cuda::grid_for(total, 256, max_blocks);
      _lrn_fwd_generic_kernel<scalar_t><<<grid, 256, 0, stream>>>(xp, yp, a, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor lrn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, int64_t size, double alpha, double beta,
                             double k) {
  fastnin::check_lrn_args(x, size);
  fastnin::check_floating(grad_out, "lrn_backward", "grad_out");
  fastnin::check_same(grad_out, x, "lrn_backward", "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "lrn_backward: grad_out has shape ", grad_out.sizes(),
                    " but x has ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const LrnView v = lrn_view(x);
  const at::Tensor g = grad_out.contiguous(v.format);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(v.format));
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(fastnin::cuda::sm_count()) * 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto a = lrn_args<A>(v, size, alpha, beta, k, fastnin::cuda::is_16bit<scalar_t>());
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const LrnPlan plan = plan_lrn(a.cs == 1, a.C, a.size, 3, sizeof(A));
    if (plan.path == LrnPath::kColumn) {
      const int nseg = column_segments(a.cols, a.C);
      const int seg = fastnin::cuda::ceil_div(a.C, nseg);
      const dim3 grid(fastnin::cuda::grid_for(a.cols, plan.threads, max_blocks),
                      static_cast<unsigned>(fastnin::cuda::ceil_div(a.C, seg)));
      _lrn_bwd_col_kernel<scalar_t><<<grid, plan.threads, plan.smem, stream>>>(gp, xp, gxp, a, plan.R - 1, seg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (plan.path == LrnPath::kPixel) {
      const unsigned grid = fastnin::cuda::grid_for(a.cols, plan.threads / 32, max_blocks);
      _lrn_bwd_pix_kernel<scalar_t><<<grid, plan.threads, plan.smem, stream>>>(gp, xp, gxp, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const auto acc_dtype = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
      at::Tensor t = at::empty({total}, x.options().dtype(acc_dtype));
      at::Tensor ga = at::empty({total}, x.options().dtype(acc_dtype));
      const unsigned grid = fastnin::cuda::grid_for(total, 256, max_blocks);
      _lrn_bwd_generic_t_kernel<scalar_t><<<grid, 256, 0, stream>>>(gp, xp, t.mutable_data_ptr<A>(),
                                                                     ga.mutable_data_ptr<A>(), a, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      _lrn_bwd_generic_gx_kernel<scalar_t><<<grid, 256, 0, stream>>>(xp, t.const_data_ptr<A>(),
                                                                      ga.const_data_ptr<A>(), gxp, a, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CUDA, m) {
  m.impl("lrn", &lrn_cuda);
  m.impl("lrn_backward", &lrn_backward_cuda);
}
