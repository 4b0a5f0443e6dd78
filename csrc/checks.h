// Argument checks and shape arithmetic shared by the CPU and CUDA entry points.
//
// fastnin/ops.py validates the same things first with the same messages, so that every backend
// (including Triton and the torch reference) raises the same ValueError; these checks guard
// direct calls of torch.ops.fastnin.*. TORCH_CHECK_VALUE raises ValueError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace fastnin {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(
      st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
      " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ", st);
}

inline void check_same(const at::Tensor& t, const at::Tensor& x, const char* op, const std::string& name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(
      t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
      x.scalar_type());
}

// Everything a mlpconv kernel needs to know about its problem.
struct MlpconvShape {
  int64_t N, Cin, H, W;           // input
  int64_t kh, kw, sh, sw, ph, pw;  // first (KxK) stage
  int64_t Ho, Wo;                 // output spatial size
  std::vector<int64_t> C;         // output channels of each stage, C.size() == stages
  int64_t stages() const { return static_cast<int64_t>(C.size()); }
  int64_t Cout() const { return C.back(); }
  int64_t max_channels() const {
    int64_t m = 0;
    for (auto c : C) m = c > m ? c : m;
    return m;
  }
};

inline MlpconvShape check_mlpconv_args(
    const at::Tensor& x,
    at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const char* op = "mlpconv";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D");
  check_floating(x, op, "x");
  const int64_t S = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(S >= 1 && S <= 3, op, ": expected 1 to 3 weights, got ", S);
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(biases.size()) == S, op, ": got ", S, " weights but ", biases.size(), " biases");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2, op, ": stride and padding must have 2 values");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);

  MlpconvShape s;
  s.N = x.size(0);
  s.Cin = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  // torch's convolutions reject an empty map even where the padding alone would give an output.
  TORCH_CHECK_VALUE(s.H >= 1 && s.W >= 1, op, ": x must have a non-empty spatial size, got ", s.H, "x", s.W);
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  int64_t prev = s.Cin;
  for (int64_t i = 0; i < S; ++i) {
    const at::Tensor& w = weights[i];
    const std::string wname = "weights[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(w.dim() == 4, op, ": ", wname, " must be a 4-D tensor [Cout, Cin, kh, kw], got ", w.dim(), "-D");
    check_same(w, x, op, wname);
    if (i > 0) {
      TORCH_CHECK_VALUE(
          w.size(2) == 1 && w.size(3) == 1, op, ": ", wname, " must be 1x1, got ", w.size(2), "x", w.size(3));
    }
    TORCH_CHECK_VALUE(
        w.size(1) == prev, op, ": ", wname, " has ", w.size(1), " input channels but ",
        i == 0 ? std::string("x") : "weights[" + std::to_string(i - 1) + "]", " has ", prev,
        i == 0 ? " channels" : " output channels");
    TORCH_CHECK_VALUE(w.size(0) >= 1, op, ": ", wname, " must have at least one output channel");
    const std::optional<at::Tensor> b = biases[i];
    if (b.has_value() && b->defined()) {
      const std::string bname = "biases[" + std::to_string(i) + "]";
      check_same(*b, x, op, bname);
      TORCH_CHECK_VALUE(
          b->dim() == 1 && b->size(0) == w.size(0), op, ": ", bname, " must have shape [", w.size(0), "], got ",
          b->sizes());
    }
    s.C.push_back(w.size(0));
    prev = w.size(0);
  }
  s.kh = weights[0].size(2);
  s.kw = weights[0].size(3);
  TORCH_CHECK_VALUE(s.kh >= 1 && s.kw >= 1, op, ": weights[0] has an empty kernel ", s.kh, "x", s.kw);
  s.Ho = (s.H + 2 * s.ph - s.kh) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - s.kw) / s.sw + 1;
  TORCH_CHECK_VALUE(
      s.H + 2 * s.ph >= s.kh && s.W + 2 * s.pw >= s.kw && s.Ho >= 1 && s.Wo >= 1, op, ": output size would be ",
      s.H + 2 * s.ph >= s.kh ? s.Ho : 0, "x", s.W + 2 * s.pw >= s.kw ? s.Wo : 0, " (input ", s.H, "x", s.W,
      ", kernel ", s.kh, "x", s.kw, ", stride ", stride, ", padding ", padding,
      "): the kernel is larger than the padded input");
  return s;
}

// torch's convolutions return channels_last when the input or the weight suggests it.
inline c10::MemoryFormat mlpconv_output_format(const at::Tensor& x, const at::Tensor& w0) {
  return (x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast ||
          w0.suggest_memory_format() == c10::MemoryFormat::ChannelsLast)
      ? c10::MemoryFormat::ChannelsLast
      : c10::MemoryFormat::Contiguous;
}

inline void check_lrn_args(const at::Tensor& x, int64_t size) {
  TORCH_CHECK_VALUE(x.dim() >= 3, "lrn: x must have at least 3 dimensions [N, C, *], got ", x.dim(), "-D");
  check_floating(x, "lrn", "x");
  TORCH_CHECK_VALUE(size >= 1, "lrn: size must be >= 1, got ", size);
}

inline void check_gap_args(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "gap: x must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D");
  check_floating(x, "gap", "x");
  TORCH_CHECK_VALUE(
      x.size(2) >= 1 && x.size(3) >= 1, "gap: x must have a non-empty spatial size, got ", x.size(2), "x",
      x.size(3));
}

// gap_backward(grad_out [N, C], input_size [N, C, H, W]): as the forward, H and W >= 1 (a mean
// over an empty map has no gradient to give; torch's would be 0/0).
inline void check_gap_backward_args(const at::Tensor& grad_out, at::IntArrayRef input_size) {
  TORCH_CHECK_VALUE(input_size.size() == 4, "gap_backward: input_size must have 4 values [N, C, H, W], got ",
                    input_size);
  check_floating(grad_out, "gap_backward", "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == input_size[0] && grad_out.size(1) == input_size[1],
                    "gap_backward: grad_out must have shape [", input_size[0], ", ", input_size[1], "], got ",
                    grad_out.sizes());
  for (auto s : input_size) TORCH_CHECK_VALUE(s >= 0, "gap_backward: negative input_size ", input_size);
  TORCH_CHECK_VALUE(input_size[2] >= 1 && input_size[3] >= 1,
                    "gap_backward: input_size must have a non-empty spatial size, got ", input_size);
}

}  // namespace fastnin

namespace fastnin {

// LRN (and its gradient) come out channels_last for a 4-D channels_last input, else contiguous.
inline c10::MemoryFormat lrn_format(const at::Tensor& x) {
  return (x.dim() == 4 && x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast)
      ? c10::MemoryFormat::ChannelsLast
      : c10::MemoryFormat::Contiguous;
}

}  // namespace fastnin
