// Small array helpers shared by the CPU kernels, compiled per ISA like the kernels' own loops
// (FASTNIN_CLONES: the build has no -march).
#pragma once

#include <cstdint>

#include "cpu/attributes.h"

#include <vector>

namespace fastnin::cpu {

// v's storage, grown to at least n elements (kept, not shrunk: the per-thread buffers reused from
// call to call).
template <typename T>
inline T* buf(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// dst[i] += src[i], i < n.
template <typename T>
FASTNIN_INLINE void add_to_impl(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}
template <typename T>
inline void add_to(T* dst, const T* src, int64_t n) {
  add_to_impl(dst, src, n);
}
template <>
FASTNIN_CLONES inline void add_to<float>(float* dst, const float* src, int64_t n) {
  add_to_impl(dst, src, n);
}

}  // namespace fastnin::cpu
