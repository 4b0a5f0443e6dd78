"""The Triton backend: torch.ops.fastnin_triton.{mlpconv, lrn, gap} and their *_backward ops.

The ops have exactly the schemas of csrc/fastnin.cpp (SCHEMAS below), the fake kernels and the
autograd rules of fastnin/ops.py, and the kernels of mlpconv.py, lrn.py and gap.py.

Registration. On a GPU each op is a torch.library.triton_op whose body calls its kernels through
torch.library.wrap_triton, so torch.compile(fullgraph=True) traces into the kernels (Inductor sees
the Triton launches, not an opaque call), and the op's fake kernel is its own body run on fake
tensors (wrap_triton launches nothing there).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) that fake path cannot work: the
interpreter runs the kernel for real and reads the fake tensors' data pointers. There the same
bodies are registered with torch.library.custom_op plus the explicit fake kernels of
fastnin/ops.py, so that opcheck and torch.compile (which then treats the op as opaque) can be
tested on the CPU as well. The kernels and launchers are the same in both modes; only the wrapper
differs (and fastnin._backend.wrap_triton hands the interpreter the bare kernel, which torch < 2.14's
wrap_triton refuses), and the GPU always gets triton_op.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops as _ops
from .._backend import check_triton_interpreter, triton_interpreting
from .gap import gap_backward, gap_forward
from .lrn import lrn_backward, lrn_forward
from .mlpconv import mlpconv_backward, mlpconv_forward

check_triton_interpreter()  # before any kernel runs: a clear error for a broken interpreter

# The launchers below check their arguments with the functions of fastnin/ops.py (the messages of
# the C++ entry points), so the ops called directly get the same clear errors.

NAMESPACE = "fastnin_triton"

# Exactly the schemas of csrc/fastnin.cpp (TORCH_LIBRARY(fastnin)), without the op names.
SCHEMAS = {
    "mlpconv": "(Tensor x, Tensor[] weights, Tensor?[] biases, int[2] stride, int[2] padding, bool gap=False) -> Tensor",
    "mlpconv_backward": (
        "(Tensor grad_out, Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? out, int[2] stride, "
        "int[2] padding, bool gap, bool[3] output_mask) -> (Tensor grad_x, Tensor[] grad_weights, "
        "Tensor[] grad_biases)"
    ),
    "lrn": "(Tensor x, int size, float alpha, float beta, float k) -> Tensor",
    "lrn_backward": "(Tensor grad_out, Tensor x, int size, float alpha, float beta, float k) -> Tensor",
    "gap": "(Tensor x) -> Tensor",
    "gap_backward": "(Tensor grad_out, int[4] input_size, bool channels_last) -> Tensor",
}


# Annotated in full: torch < 2.12's triton_op ignores `schema` and infers one from these (then
# "SymInt[]" where csrc/fastnin.cpp says "int[2]", and unnamed outputs: the same calls work).
def _mlpconv(
    x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], stride: List[int], padding: List[int],
    gap: bool = False,
) -> Tensor:
    return mlpconv_forward(x, list(weights), list(biases), list(stride), list(padding), bool(gap))


def _mlpconv_backward(
    grad_out: Tensor, x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], out: Optional[Tensor],
    stride: List[int], padding: List[int], gap: bool, output_mask: List[bool],
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    return mlpconv_backward(
        grad_out, x, list(weights), list(biases), out, list(stride), list(padding), bool(gap), list(output_mask)
    )


def _lrn(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return lrn_forward(x, size, alpha, beta, k)


def _lrn_backward(grad_out: Tensor, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return lrn_backward(grad_out, x, size, alpha, beta, k)


def _gap(x: Tensor) -> Tensor:
    return gap_forward(x)


def _gap_backward(grad_out: Tensor, input_size: List[int], channels_last: bool) -> Tensor:
    return gap_backward(grad_out, input_size, channels_last)


IMPLS = {
    "mlpconv": _mlpconv,
    "mlpconv_backward": _mlpconv_backward,
    "lrn": _lrn,
    "lrn_backward": _lrn_backward,
    "gap": _gap,
    "gap_backward": _gap_backward,
}


def register(namespace: str = NAMESPACE, *, use_triton_op: bool | None = None):
    """Define the six ops in `namespace` and tie their autograd; returns torch.ops.<namespace>.

    use_triton_op: True -> torch.library.triton_op (the GPU path), False -> torch.library.custom_op
    with the explicit fake kernels of ops.py (the interpreter path); None picks by TRITON_INTERPRET.
    Tests call this with another namespace to exercise the triton_op wrappers on the CPU.
    """
    if use_triton_op is None:
        use_triton_op = not triton_interpreting()
    for name, fn in IMPLS.items():
        qualname = f"{namespace}::{name}"
        if use_triton_op:
            torch.library.triton_op(qualname, fn, mutates_args=(), schema=SCHEMAS[name])
        else:
            torch.library.custom_op(qualname, fn, mutates_args=(), schema=SCHEMAS[name])
    if not use_triton_op:
        _ops.register_fakes(namespace)
    ns = getattr(torch.ops, namespace)
    _ops.register_mlpconv_autograd(ns)
    _ops.register_lrn_autograd(ns)
    _ops.register_gap_autograd(ns)
    _ops.register_vmap_rules(ns)
    return ns


USES_TRITON_OP = not triton_interpreting()
register(NAMESPACE, use_triton_op=USES_TRITON_OP)

__all__ = [
    "NAMESPACE",
    "SCHEMAS",
    "USES_TRITON_OP",
    "register",
    "mlpconv_forward",
    "mlpconv_backward",
    "lrn_forward",
    "lrn_backward",
    "gap_forward",
    "gap_backward",
]
