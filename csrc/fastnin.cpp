// Every op schema of fastnin, in one place, and the (empty) Python module fastnin._C.
//
// Importing fastnin._C runs the static registrations below and those of csrc/cpu/*.cpp and
// csrc/cuda/*.cu; the dispatcher then picks the CPU or CUDA kernel by the tensors' device.
// Autograd, fake (meta) kernels and the Triton backend are registered from Python
// (fastnin/ops.py, fastnin/triton/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no functions: the ops are reached as torch.ops.fastnin.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastnin, m) {
  // relu(conv1x1(relu(conv1x1(relu(conv2d(x, w0, b0, stride, padding)), w1, b1)), w2, b2)),
  // with 1 to 3 stages. gap=True averages the last stage over H and W: the result is [N, C].
  m.def(
      "mlpconv(Tensor x, Tensor[] weights, Tensor?[] biases, int[2] stride, int[2] padding, bool gap=False) "
      "-> Tensor");
  // Gradients of mlpconv. `out` is the forward's result (None when gap=True or not kept); the
  // kernels recompute the intermediate activations from x instead of storing them.
  // output_mask = (x, weights, biases): what to compute. Not computed: grad_x is an empty [0]
  // tensor, grad_weights / grad_biases are empty lists. A None bias gets an empty [0] grad.
  m.def(
      "mlpconv_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? out, "
      "int[2] stride, int[2] padding, bool gap, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor[] grad_weights, Tensor[] grad_biases)");
  // torch.nn.functional.local_response_norm: x / (k + alpha/size * sum_window x^2)^beta over
  // channels, window [c - size//2, c + (size-1)//2] clipped to [0, C). x is [N, C, *].
  m.def("lrn(Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  m.def("lrn_backward(Tensor grad_out, Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  // Global average pooling: [N, C, H, W] -> [N, C], mean over H and W, fp32 accumulation.
  m.def("gap(Tensor x) -> Tensor");
  // grad_x[n, c, h, w] = grad_out[n, c] / (H * W), laid out channels_last when channels_last=True.
  m.def("gap_backward(Tensor grad_out, int[4] input_size, bool channels_last) -> Tensor");
}
