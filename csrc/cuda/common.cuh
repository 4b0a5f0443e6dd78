// Shared helpers of the CUDA kernels (csrc/cuda/*.cu): accumulation types, 16-byte vector
// access, warp reductions, launch bookkeeping and the debug environment switches.
//
// Headers: only the light ATen/c10 ones. <ATen/ATen.h> or <torch/extension.h> would add most
// of a minute of host-compile time per .cu file on the 2-core CI machine.
// c10::cuda::getCurrentCUDAStream() is the very function at::cuda::getCurrentCUDAStream() names
// (ATen/cuda/CUDAContext.h re-exports it), without CUDAContext.h's cuBLAS/cuSPARSE includes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace fastnin {
namespace cuda {

// fp32 accumulation for float, half and bfloat16; float64 for float64 (gradcheck).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename T>
__host__ __device__ constexpr bool is_16bit() {
  return std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
}

// Elements of T in one 16-byte access.
template <typename T>
__host__ __device__ constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// 16 bytes of T, loaded / stored as one uint4.
template <typename T>
struct alignas(16) Vec16 {
  T v[vec16<T>()];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Vec16<T> out;
  static_assert(sizeof(Vec16<T>) == sizeof(uint4), "Vec16 must be 16 bytes");
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  // Butterfly in a fixed order: every lane ends with the same, reproducible sum.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename I>
__host__ __device__ __forceinline__ I round_up(I a, I b) {
  return ceil_div(a, b) * b;
}

// The value of a debug switch FASTNIN_CUDA_<name> ("" when unset). Read at every call, so that a
// test can flip it with os.environ between calls.
inline const char* env_switch(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}
inline bool env_flag(const char* name) {
  const char* v = env_switch(name);
  return v[0] != '\0' && std::strcmp(v, "0") != 0;
}

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int sm_count() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, current_device()));
  return v;
}

// The most dynamic shared memory one block may ask for after opting in (227 KB on sm_90,
// 163 KB on sm_80).
inline int max_smem_optin() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
  return v;
}

inline int device_major() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, current_device()));
  return v;
}

// Grid sizes: a grid-stride loop covers the rest, so the grid never needs more blocks than
// this (and never 0, which is not a valid launch).
inline unsigned int grid_for(int64_t work_items, int threads, int64_t cap_blocks) {
  int64_t b = ceil_div<int64_t>(work_items, threads);
  if (b > cap_blocks) b = cap_blocks;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b);
}

}  // namespace cuda
}  // namespace fastnin
