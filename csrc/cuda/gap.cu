// Global average pooling on CUDA: gap(x[N, C, H, W]) -> [N, C] and its backward.
//
// Forward, one pass over x, fp32 accumulation (float64 for float64), deterministic (every sum
// has one fixed order; no atomics):
//   * NCHW: N*C rows of H*W contiguous elements. A warp per row (a 256-thread block per row when
//     the row is long, >= 2048 elements), each lane summing a strided part of the row with
//     16-byte loads when the rows start 16-byte aligned (H*W*sizeof(T) % 16 == 0 and an aligned
//     base; checked at run time, else scalar loads), then a butterfly warp reduction.
//   * channels_last: for each image, H*W rows of C contiguous channels. A block of 32 x 8
//     threads covers 32 16-byte channel vectors of one image; its 8 thread rows split the pixels,
//     and the 8 partial sums are added in a fixed order through shared memory.
//   * Few, long reductions (e.g. one 224x224 image with 3 channels): the pixel range is split
//     over gridDim.z slices (each >= 8192 pixels) that write fp32 partial sums; a second kernel
//     adds the slices in order. Each thread also sums in blocks of 256 loads before adding to
//     its running total, so that long sums keep fp32 accuracy (a flat running fp32 sum of
//     2^27 values stalls once the total is 2^24 times the addend).
// Backward: grad_x[n, c, h, w] = grad_out[n, c] / (H*W), a broadcast fill written with 16-byte
// stores, in the layout asked for.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "common.cuh"

#include <algorithm>

namespace {

using fastnin::cuda::acc_t;
using fastnin::cuda::load_vec16;
using fastnin::cuda::store_vec16;
using fastnin::cuda::Vec16;
using fastnin::cuda::vec16;
using fastnin::cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kBlockSum = 256;  // loads per inner (blocked) sum

// Where a forward kernel puts its sums: the mean into out (one slice), or the slice's partial
// sum into part[z][row] (several slices; _gap_fwd_finalize_kernel divides).
template <typename T>
struct GapOut {
  T* out;
  acc_t<T>* part;
  int64_t rows;     // N * C
  int64_t L;        // H * W
  int64_t chunk;    // pixels per slice (a multiple of 16 / sizeof(T))
};

template <typename T>
__device__ __forceinline__ void gap_emit(const GapOut<T>& o, int64_t row, acc_t<T> sum) {
  using A = acc_t<T>;
  if (o.part != nullptr) {
    o.part[static_cast<int64_t>(blockIdx.z) * o.rows + row] = sum;
  } else {
    o.out[row] = static_cast<T>(sum / static_cast<A>(o.L));
  }
}

// NCHW: `rows` rows of L elements; tpr (32 or 256) threads per row, kThreads / tpr rows per block;
// blockIdx.z takes pixels [z * chunk, min(L, (z + 1) * chunk)) of each row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) _gap_fwd_rows_kernel(const T* __restrict__ x, GapOut<T> o, int tpr) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / 32];
  const int rows_per_block = kThreads / tpr;
  const int lane = threadIdx.x % tpr;
  const int rib = threadIdx.x / tpr;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * o.chunk;
  const int64_t p_end = p_begin + o.chunk < o.L ? p_begin + o.chunk : o.L;
  // The loop condition depends on the block only, so every thread of a block runs the same
  // iterations: the warp shuffles and __syncthreads below are never divergent.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; row0 < o.rows;
       row0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = row0 + rib;
    A s = A(0), blk = A(0);
    int cnt = 0;
    if (row < o.rows) {
      const T* p = x + row * o.L;
      if (VEC > 1) {
        // L % VEC == 0, chunk % VEC == 0 and x 16-byte aligned (checked by the launcher).
#pragma unroll 2
        for (int64_t i = p_begin + static_cast<int64_t>(lane) * VEC; i < p_end; i += static_cast<int64_t>(tpr) * VEC) {
          const Vec16<T> v = load_vec16(p + i);
#pragma unroll
          for (int e = 0; e < VEC; ++e) blk += static_cast<A>(v.v[e]);
          if (++cnt == kBlockSum) {
            s += blk;
            blk = A(0);
            cnt = 0;
          }
        }
      } else {
#pragma unroll 4
        for (int64_t i = p_begin + lane; i < p_end; i += tpr) {
          blk += static_cast<A>(p[i]);
          if (++cnt == kBlockSum) {
            s += blk;
            blk = A(0);
            cnt = 0;
          }
        }
      }
    }
    s = warp_sum(s + blk);
    if (tpr == 32) {
      if (lane == 0 && row < o.rows) gap_emit(o, row, s);
    } else {
      // One row per block (row == row0 < rows): add the warps' sums in warp order.
      if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = s;
      __syncthreads();
      if (threadIdx.x == 0) {
        A t = A(0);
        for (int w = 0; w < tpr / 32; ++w) t += red[w];
        gap_emit(o, row, t);
      }
      __syncthreads();
    }
  }
}

// channels_last: x is [N, HW, C]. Block (32, 8); blockIdx.x picks 32*VEC channels, blockIdx.y
// (grid-stride) the image, blockIdx.z the pixel slice.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1) _gap_fwd_cl_kernel(const T* __restrict__ x, GapOut<T> o, int64_t N,
                                                               int64_t C) {
  using A = acc_t<T>;
  __shared__ A red[8][32 * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * 32 + tx) * VEC;
  const int64_t HW = o.L;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * o.chunk;
  const int64_t p_end = p_begin + o.chunk < HW ? p_begin + o.chunk : HW;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    A s[VEC], blk[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) s[e] = blk[e] = A(0);
    if (c < C) {
      // With VEC > 1, C % VEC == 0 (launcher), so c < C means the whole vector is in range.
      const T* p = x + n * HW * C + c;
      int cnt = 0;
#pragma unroll 2
      for (int64_t pix = p_begin + ty; pix < p_end; pix += 8) {
        if (VEC > 1) {
          const Vec16<T> v = load_vec16(p + pix * C);
#pragma unroll
          for (int e = 0; e < VEC; ++e) blk[e] += static_cast<A>(v.v[e]);
        } else {
          blk[0] += static_cast<A>(p[pix * C]);
        }
        if (++cnt == kBlockSum) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            s[e] += blk[e];
            blk[e] = A(0);
          }
          cnt = 0;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[ty][tx * VEC + e] = s[e] + blk[e];
    __syncthreads();
    if (ty == 0 && c < C) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        A t = A(0);
        for (int yy = 0; yy < 8; ++yy) t += red[yy][tx * VEC + e];
        gap_emit(o, n * C + c + e, t);
      }
    }
    __syncthreads();
  }
}

// out[row] = (sum of the slices' partial sums, in slice order) / L.
template <typename T>
__global__ void __launch_bounds__(kThreads) _gap_fwd_finalize_kernel(const acc_t<T>* __restrict__ part, int Z,
                                                                     T* __restrict__ out, int64_t rows, int64_t L) {
  using A = acc_t<T>;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    A s = A(0);
    for (int z = 0; z < Z; ++z) s += part[z * rows + r];
    out[r] = static_cast<T>(s / static_cast<A>(L));
  }
}

// grad_x[n, c, p] = g[n, c] / HW. Each thread writes VEC consecutive elements of grad_x's memory
// (one 16-byte store when VEC > 1 and the run is whole); `cl` says whether that memory is
// [N, HW, C] (channels_last) or [N, C, HW].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) _gap_bwd_kernel(const T* __restrict__ g, int64_t gs0, int64_t gs1,
                                                            T* __restrict__ gx, int64_t C, int64_t HW, bool cl,
                                                            int64_t total) {
  using A = acc_t<T>;
  const A inv_div = static_cast<A>(HW);
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; e0 < total;
       e0 += static_cast<int64_t>(gridDim.x) * kThreads * VEC) {
    // Decompose e0 once, then step through the run, carrying the channel / row over.
    int64_t n, c, rem;
    if (cl) {
      const int64_t pix = e0 / C;
      c = e0 - pix * C;
      n = pix / HW;
      rem = pix - n * HW;  // pixel within the image
    } else {
      const int64_t nc = e0 / HW;
      rem = e0 - nc * HW;
      n = nc / C;
      c = nc - n * C;
    }
    T vals[VEC];
    A cur = static_cast<A>(g[n * gs0 + c * gs1]) / inv_div;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      vals[e] = static_cast<T>(cur);
      if (e + 1 < VEC && e0 + e + 1 < total) {
        bool moved = false;
        if (cl) {
          if (++c == C) {
            c = 0;
            if (++rem == HW) {
              rem = 0;
              ++n;
            }
          }
          moved = true;
        } else if (++rem == HW) {
          rem = 0;
          if (++c == C) {
            c = 0;
            ++n;
          }
          moved = true;
        }
        if (moved) cur = static_cast<A>(g[n * gs0 + c * gs1]) / inv_div;
      }
    }
    if (VEC > 1 && e0 + VEC <= total) {
      Vec16<T> v;
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = vals[e];
      store_vec16(gx + e0, v);
    } else {
      for (int e = 0; e < VEC && e0 + e < total; ++e) gx[e0 + e] = vals[e];
    }
  }
}

// Pixel slices for few, long reductions: enough blocks for ~2 per SM, slices of >= 8192 pixels.
int64_t gap_slices(int64_t base_blocks, int64_t L, int sms) {
  if (L < 16384 || base_blocks >= 2 * sms) return 1;
  const int64_t want = fastnin::cuda::ceil_div<int64_t>(2 * sms, base_blocks);
  return std::max<int64_t>(1, std::min<int64_t>({want, L / 8192, 1024}));
}

at::Tensor gap_cuda(const at::Tensor& x) {
  fastnin::check_gap_args(x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty({N, C}, x.options());
  if (out.numel() == 0) return out;
  const bool cl = x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = fastnin::cuda::sm_count();
  const int64_t max_blocks = static_cast<int64_t>(sms) * 32;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gap_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec16<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const int64_t rows = N * C;
    dim3 grid;
    bool vec;
    int tpr = 32;
    if (!cl) {
      // A warp per row keeps all lanes busy for NiN's 6x6 .. 55x55 maps; long rows get a whole
      // block each.
      tpr = HW >= 2048 ? kThreads : 32;
      grid.x = fastnin::cuda::grid_for(rows, kThreads / tpr, max_blocks);
      vec = (HW % V == 0) && fastnin::cuda::aligned16(xp);
    } else {
      vec = (C % V == 0) && fastnin::cuda::aligned16(xp);
      grid.x = static_cast<unsigned>(fastnin::cuda::ceil_div<int64_t>(C, 32 * (vec ? V : 1)));
      grid.y = static_cast<unsigned>(std::min<int64_t>(N, 65535));
    }
    const int64_t Z = gap_slices(static_cast<int64_t>(grid.x) * grid.y, HW, sms);
    grid.z = static_cast<unsigned>(Z);
    GapOut<scalar_t> o{out.mutable_data_ptr<scalar_t>(), nullptr, rows, HW,
                       fastnin::cuda::round_up<int64_t>(fastnin::cuda::ceil_div<int64_t>(HW, Z), V)};
    at::Tensor part;
    if (Z > 1) {
      part = at::empty({Z, rows}, x.options().dtype(std::is_same<A, double>::value ? at::kDouble : at::kFloat));
      o.part = part.mutable_data_ptr<A>();
    }
    if (!cl) {
      if (vec) {
        _gap_fwd_rows_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(xp, o, tpr);
      } else {
        _gap_fwd_rows_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(xp, o, tpr);
      }
    } else {
      const dim3 block(32, 8);
      if (vec) {
        _gap_fwd_cl_kernel<scalar_t, V><<<grid, block, 0, stream>>>(xp, o, N, C);
      } else {
        _gap_fwd_cl_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(xp, o, N, C);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (Z > 1) {
      _gap_fwd_finalize_kernel<scalar_t><<<fastnin::cuda::grid_for(rows, kThreads, max_blocks), kThreads, 0, stream>>>(
          o.part, static_cast<int>(Z), o.out, rows, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor gap_backward_cuda(const at::Tensor& grad_out, at::IntArrayRef input_size, bool channels_last) {
  fastnin::check_gap_backward_args(grad_out, input_size);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t C = input_size[1], HW = input_size[2] * input_size[3];
  at::Tensor gx = at::empty(input_size, grad_out.options().memory_format(
                                            channels_last ? c10::MemoryFormat::ChannelsLast
                                                          : c10::MemoryFormat::Contiguous));
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  // A 4-D tensor asked for as channels_last is laid out [N, H, W, C] in memory (at::empty gives
  // the dense strides), which is what the kernel writes.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(fastnin::cuda::sm_count()) * 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "gap_backward_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const int64_t s0 = grad_out.stride(0), s1 = grad_out.stride(1);
    if (fastnin::cuda::aligned16(gxp)) {
      const unsigned grid = fastnin::cuda::grid_for(fastnin::cuda::ceil_div<int64_t>(total, V), kThreads, max_blocks);
      _gap_bwd_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(gp, s0, s1, gxp, C, HW, channels_last, total);
    } else {
      const unsigned grid = fastnin::cuda::grid_for(total, kThreads, max_blocks);
      _gap_bwd_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(gp, s0, s1, gxp, C, HW, channels_last, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnin, CUDA, m) {
  m.impl("gap", &gap_cuda);
  m.impl("gap_backward", &gap_backward_cuda);
}
