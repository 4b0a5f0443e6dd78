// NCHW <-> NHWC copies for the CPU mlpconv, which computes in NHWC (rows of channels). torch's own
// permuting copy (x.contiguous(channels_last), TensorIterator) moved 32x192x16x16 floats in 1.08
// ms here (~12 GB/s of traffic, 2 threads), 4.7x a plain clone of the same tensor; an NCHW call of
// the CIFAR NiN's block 2 made four such copies (x twice, out, grad_out) and transposed grad_x and
// its forward output back.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/attributes.h"

namespace fastnin::cpu {

// dst[j * ldd + i] = D(src[i * lds + j]) for i < rows, j < cols. In 16 x 16 blocks: each block
// reads 16 rows and writes 16 rows of 16 elements, all in L1 (a whole-row loop over one of the
// two sides touched a fresh cache line per element once the rows outgrew L1).
template <typename S, typename D>
FASTNIN_INLINE void transpose_impl(const S* __restrict src, int64_t lds, D* __restrict dst, int64_t ldd,
                                   int64_t rows, int64_t cols) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += B) {
    const int64_t ni = std::min(B, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += B) {
      const int64_t nj = std::min(B, cols - j0);
      const S* s = src + i0 * lds + j0;
      D* d = dst + j0 * ldd + i0;
      if (ni == B && nj == B) {  // fixed trip counts: the compiler unrolls and vectorizes
        for (int64_t j = 0; j < B; ++j) {
          for (int64_t i = 0; i < B; ++i) d[j * ldd + i] = static_cast<D>(s[i * lds + j]);
        }
      } else {
        for (int64_t j = 0; j < nj; ++j) {
          for (int64_t i = 0; i < ni; ++i) d[j * ldd + i] = static_cast<D>(s[i * lds + j]);
        }
      }
    }
  }
}
template <typename S, typename D>
inline void transpose(const S* src, int64_t lds, D* dst, int64_t ldd, int64_t rows, int64_t cols) {
  transpose_impl(src, lds, dst, ldd, rows, cols);
}
template <>
FASTNIN_CLONES inline void transpose<float, float>(const float* src, int64_t lds, float* dst, int64_t ldd,
                                                   int64_t rows, int64_t cols) {
  transpose_impl(src, lds, dst, ldd, rows, cols);
}

// x ([N, C, H, W]) as an NHWC tensor of type T: x itself when it already is one; one parallel
// transposing pass from an NCHW-contiguous x; torch's copy for any other layout.
template <typename T>
at::Tensor nhwc(const at::Tensor& x) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  if (x.scalar_type() == st && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  if (x.dim() != 4 || !x.is_contiguous() || x.numel() == 0) {
    return x.to(st).contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(st).memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  // Work items: 64 channels of one image ([64][HW] -> [HW][64]).
  constexpr int64_t CB = 64;
  const int64_t ncb = (C + CB - 1) / CB;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnin_nhwc", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    T* dst = y.data_ptr<T>();
    at::parallel_for(0, N * ncb, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / ncb, c0 = (t % ncb) * CB, nc = std::min(CB, C - c0);
        transpose<scalar_t, T>(src + (n * C + c0) * HW, HW, dst + n * HW * C + c0, C, nc, HW);
      }
    });
  });
  return y;
}

// dst (NCHW-contiguous [N, C, H, W], any floating type) = src, the same values as NHWC rows of T.
template <typename T>
void store_nchw(const T* src, at::Tensor& dst) {
  const int64_t N = dst.size(0), C = dst.size(1), HW = dst.size(2) * dst.size(3);
  // Work items: 256 pixels of one image ([256][C] -> [C][256]).
  constexpr int64_t PB = 256;
  const int64_t npb = (HW + PB - 1) / PB;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "fastnin_store_nchw", [&] {
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, N * npb, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / npb, p0 = (t % npb) * PB, np = std::min(PB, HW - p0);
        transpose<T, scalar_t>(src + (n * HW + p0) * C, C, d + n * C * HW + p0, HW, np, C);
      }
    });
  });
}

// The tile of output pixels [q0, q1) (q = n * HW + pixel; a tile may hold several images or part
// of one) moved between rows[q - q0][C] (the tile's NHWC rows, leading dimension C) and an
// NCHW-contiguous [N, C, HW] tensor t, one transpose per image run.
template <typename S, typename D>
void load_tile_rows(const S* t, int64_t HW, int64_t C, int64_t q0, int64_t q1, D* rows) {
  for (int64_t q = q0; q < q1;) {
    const int64_t n = q / HW, r0 = q % HW, r1 = std::min(HW, r0 + (q1 - q));
    transpose<S, D>(t + n * C * HW + r0, HW, rows + (q - q0) * C, C, C, r1 - r0);
    q += r1 - r0;
  }
}
template <typename S, typename D>
void store_tile_rows(const S* rows, int64_t HW, int64_t C, int64_t q0, int64_t q1, D* t) {
  for (int64_t q = q0; q < q1;) {
    const int64_t n = q / HW, r0 = q % HW, r1 = std::min(HW, r0 + (q1 - q));
    transpose<S, D>(rows + (q - q0) * C, C, t + n * C * HW + r0, HW, r1 - r0, C);
    q += r1 - r0;
  }
}

}  // namespace fastnin::cpu
