"""fastnin's functional API, and the autograd and fake (meta) rules of its ops.

    mlpconv(x, weights, biases, stride, padding, gap=False)   Tensor[N, Cin, H, W] -> Tensor[N, Cout, Ho, Wo]
    local_response_norm(x, size, alpha, beta, k)              Tensor[N, C, *] -> same shape
    global_avg_pool2d(x)                                      Tensor[N, C, H, W] -> Tensor[N, C]

Each function validates its arguments here, once, with the same messages for every backend, then
runs the backend in force (fastnin.set_backend / use_backend / FASTNIN_BACKEND; see _backend.py):
the C++ ops torch.ops.fastnin.* (CPU and CUDA kernels, picked by the dispatcher), the Triton ops
torch.ops.fastnin_triton.*, or the plain torch composition of reference.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the torch.ops.fastnin.* schemas and native kernels)
from . import reference
from ._backend import backend_for, load_triton

__all__ = ["mlpconv", "local_response_norm", "global_avg_pool2d"]

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ----------------------------------------------------------------------------------------------
# Argument checks. The C++ entry points (csrc/checks.h) repeat them with the same messages.
# ----------------------------------------------------------------------------------------------


def _check_tensor(t, op: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    # Sparse and other layouts have no kernels here (the raw ops' dispatcher would say only that
    # no kernel exists for, e.g., SparseCPU).
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def _check_floating(t: Tensor, op: str, name: str) -> None:
    if t.dtype not in _FLOATING:
        raise ValueError(
            f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )


def _check_like_x(t: Tensor, x: Tensor, op: str, name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")


def _pair(v, op: str, name: str) -> tuple[int, int]:
    if isinstance(v, (bool, float)) or (not isinstance(v, int) and not isinstance(v, Sequence)):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def mlpconv_output_size(h: int, w: int, kh: int, kw: int, stride, padding) -> tuple[int, int]:
    return ((h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)


def check_mlpconv_args(x, weights, biases, stride, padding):
    """Validate and normalize mlpconv's arguments.

    Returns (weights: list, biases: list of Tensor|None, stride: (int, int), padding: (int, int), (Ho, Wo)).
    Raises ValueError naming the offending argument.
    """
    op = "mlpconv"
    _check_tensor(x, op, "x")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [N, C, H, W], got {x.dim()}-D")
    _check_floating(x, op, "x")
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence):
        raise ValueError(f"{op}: weights must be a list of 1 to 3 tensors, got {type(weights).__name__}")
    weights = list(weights)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"{op}: expected 1 to 3 weights, got {len(weights)}")
    if biases is None:
        biases = [None] * len(weights)
    elif isinstance(biases, Tensor) or not isinstance(biases, Sequence):
        raise ValueError(f"{op}: biases must be a list of tensors or None, got {type(biases).__name__}")
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"{op}: got {len(weights)} weights but {len(biases)} biases")
    stride = _pair(stride, op, "stride")
    padding = _pair(padding, op, "padding")
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {list(stride)}")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be >= 0, got {list(padding)}")
    prev = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        name = f"weights[{i}]"
        _check_tensor(w, op, name)
        if w.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor [Cout, Cin, kh, kw], got {w.dim()}-D")
        _check_like_x(w, x, op, name)
        if i > 0 and (w.shape[2] != 1 or w.shape[3] != 1):
            raise ValueError(f"{op}: {name} must be 1x1, got {w.shape[2]}x{w.shape[3]}")
        if w.shape[1] != prev:
            src = "x" if i == 0 else f"weights[{i - 1}]"
            what = "channels" if i == 0 else "output channels"
            raise ValueError(f"{op}: {name} has {w.shape[1]} input channels but {src} has {prev} {what}")
        if w.shape[0] < 1:
            raise ValueError(f"{op}: {name} must have at least one output channel")
        if b is not None:
            bname = f"biases[{i}]"
            _check_tensor(b, op, bname)
            _check_like_x(b, x, op, bname)
            if b.dim() != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"{op}: {bname} must have shape [{w.shape[0]}], got {list(b.shape)}")
        prev = w.shape[0]
    kh, kw = weights[0].shape[2], weights[0].shape[3]
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: weights[0] has an empty kernel {kh}x{kw}")
    h, w_ = x.shape[2], x.shape[3]
    if h < 1 or w_ < 1:  # torch's convolutions reject an empty map even where the padding would give an output
        raise ValueError(f"{op}: x must have a non-empty spatial size, got {h}x{w_}")
    ho, wo = mlpconv_output_size(h, w_, kh, kw, stride, padding)
    if h + 2 * padding[0] < kh or w_ + 2 * padding[1] < kw or ho < 1 or wo < 1:
        ho_s = ho if h + 2 * padding[0] >= kh else 0
        wo_s = wo if w_ + 2 * padding[1] >= kw else 0
        raise ValueError(
            f"{op}: output size would be {ho_s}x{wo_s} (input {h}x{w_}, kernel {kh}x{kw}, stride {list(stride)}, "
            f"padding {list(padding)}): the kernel is larger than the padded input"
        )
    return weights, biases, stride, padding, (ho, wo)


def check_lrn_args(x, size, alpha, beta, k) -> None:
    op = "lrn"
    _check_tensor(x, op, "x")
    if x.dim() < 3:
        raise ValueError(f"{op}: x must have at least 3 dimensions [N, C, *], got {x.dim()}-D")
    _check_floating(x, op, "x")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"{op}: size must be an int, got {size!r}")
    if size < 1:
        raise ValueError(f"{op}: size must be >= 1, got {size}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{op}: {name} must be a number, got {v!r}")


def check_gap_args(x) -> None:
    op = "gap"
    _check_tensor(x, op, "x")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [N, C, H, W], got {x.dim()}-D")
    _check_floating(x, op, "x")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: x must have a non-empty spatial size, got {x.shape[2]}x{x.shape[3]}")


def check_mlpconv_backward_args(grad_out, x, weights, biases, out, stride, padding, gap) -> None:
    """The checks of mlpconv_backward's C++ entry point, for the Triton op called directly."""
    op = "mlpconv_backward"
    weights, biases, stride, padding, (ho, wo) = check_mlpconv_args(x, weights, biases, stride, padding)
    _check_tensor(grad_out, op, "grad_out")
    _check_like_x(grad_out, x, op, "grad_out")
    n, cout = x.shape[0], weights[-1].shape[0]
    want = [n, cout] if gap else [n, cout, ho, wo]
    if list(grad_out.shape) != want:
        raise ValueError(f"{op}: grad_out must have shape {want}, got {list(grad_out.shape)}")
    if out is not None:
        _check_tensor(out, op, "out")
        _check_like_x(out, x, op, "out")
        if list(out.shape) != want:
            raise ValueError(f"{op}: out must have shape {want}, got {list(out.shape)}")


def check_lrn_backward_args(grad_out, x, size, alpha, beta, k) -> None:
    check_lrn_args(x, size, alpha, beta, k)
    _check_tensor(grad_out, "lrn_backward", "grad_out")
    _check_like_x(grad_out, x, "lrn_backward", "grad_out")
    if grad_out.shape != x.shape:
        raise ValueError(f"lrn_backward: grad_out must have x's shape {list(x.shape)}, got {list(grad_out.shape)}")


def check_gap_backward_args(grad_out, input_size) -> None:
    op = "gap_backward"
    _check_tensor(grad_out, op, "grad_out")
    _check_floating(grad_out, op, "grad_out")
    if len(input_size) != 4 or min(input_size) < 0 or input_size[2] < 1 or input_size[3] < 1:
        raise ValueError(f"{op}: input_size must be [N, C, H, W] with H, W >= 1, got {list(input_size)}")
    if list(grad_out.shape) != list(input_size[:2]):
        raise ValueError(f"{op}: grad_out must have shape {list(input_size[:2])}, got {list(grad_out.shape)}")


# ----------------------------------------------------------------------------------------------
# Output layouts, shared by the fake kernels here and the Triton launchers. They match what torch
# returns for the same layer and what the C++ kernels allocate (csrc/checks.h).
# ----------------------------------------------------------------------------------------------


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(t)


def mlpconv_output_format(x: Tensor, w0: Tensor) -> torch.memory_format:
    """torch's convolutions return channels_last when the input or the weight suggests it."""
    if suggest_memory_format(x) == torch.channels_last or suggest_memory_format(w0) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def empty_mlpconv_output(x: Tensor, weights: Sequence[Tensor], stride, padding, gap: bool) -> Tensor:
    n = x.shape[0]
    cout = weights[-1].shape[0]
    if gap:
        return x.new_empty((n, cout))
    ho, wo = mlpconv_output_size(x.shape[2], x.shape[3], weights[0].shape[2], weights[0].shape[3], stride, padding)
    fmt = mlpconv_output_format(x, weights[0])
    return torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)


def empty_mlpconv_grads(x, weights, biases, output_mask):
    """The (grad_x, grad_weights, grad_biases) that mlpconv_backward returns, unfilled."""
    need_x, need_w, need_b = output_mask
    if need_x:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=mlpconv_output_format(x, weights[0]))
    else:
        gx = x.new_empty((0,))
    gws = [torch.empty_like(w) for w in weights] if need_w else []
    gbs = [torch.empty_like(b) if b is not None else x.new_empty((0,)) for b in biases] if need_b else []
    return gx, gws, gbs


def lrn_output_format(x: Tensor) -> torch.memory_format:
    """LRN (and its gradient) come out channels_last for a 4-D channels_last input, else contiguous."""
    if x.dim() == 4 and suggest_memory_format(x) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def empty_lrn_output(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=lrn_output_format(x))


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------


def _fill_missing_biases(biases: list, weights: list) -> list:
    """Replace None biases by zeros when the others need gradients.

    torch's autograd for a Tensor?[] argument treats a list that holds a None as one opaque value:
    the tensors in it then get no gradient at all (biases=[b0, None] would leave b0.grad None). A
    zero bias adds nothing to the result and its gradient is dropped.
    """
    if all(b is not None for b in biases) or all(b is None for b in biases):
        return biases
    if not (torch.is_grad_enabled() and any(b is not None and b.requires_grad for b in biases)):
        return biases
    return [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta: shape inference) has none
        return False


def _autocast_mlpconv_args(x, weights, biases):
    """Under torch.autocast, cast mlpconv's floating inputs to the autocast dtype, as autocast casts
    those of the convolutions mlpconv replaces. A custom op is not cast by autocast itself: without
    this, a float32 model under autocast would run mlpconv in float32, and a bfloat16 activation
    would meet float32 weights. float64 stays float64 (autocast leaves it alone too). The casts are
    differentiable: float32 parameters get float32 gradients."""
    if not isinstance(x, Tensor) or not _autocast_enabled(x.device.type):
        return x, weights, biases
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence):
        return x, weights, biases  # check_mlpconv_args reports it
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return t.to(dtype)
        return t

    if biases is not None and not isinstance(biases, Tensor) and isinstance(biases, Sequence):
        biases = [cast(b) for b in biases]
    return cast(x), [cast(w) for w in weights], biases


def _warn_traced_as_composition() -> None:
    """torch.jit.trace (deprecated by torch) cannot record an op with a Tensor?[] argument (its
    tracer fails with "unsupported input list type: Tensor?"), and mlpconv's biases are one. So
    under the tracer mlpconv records the plain torch composition it computes: the trace runs and is
    correct, with torch's convolutions in place of the fused kernel. LRN and GAP trace as
    themselves. torch.export keeps fastnin.mlpconv in its graph. (Python's warning filter shows
    it once per calling line.)"""
    import warnings

    warnings.warn(
        "fastnin.mlpconv under torch.jit.trace records the plain torch composition (conv2d + relu "
        "per stage), not the fused kernel: the tracer cannot record its Tensor?[] argument. "
        "torch.export keeps the fused op.",
        stacklevel=3,
    )


def _op_namespace(backend: str):
    """The ops of a native backend: torch.ops.fastnin (CPU and CUDA kernels) or fastnin_triton."""
    if backend == "triton":
        load_triton()
        return torch.ops.fastnin_triton
    return torch.ops.fastnin


def mlpconv(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    *,
    gap: bool = False,
) -> Tensor:
    """The NiN mlpconv block, fused: a KxK convolution then up to two 1x1 convolutions, each
    followed by bias and ReLU, without writing the intermediate activations to memory.

    Args:
        x: Tensor[N, Cin, H, W] (contiguous or channels_last; float32, float16, bfloat16, float64).
        weights: 1 to 3 tensors. weights[0] is Tensor[C1, Cin, kh, kw]; weights[i > 0] is
            Tensor[C(i+1), Ci, 1, 1].
        biases: as many Tensor[Ci] or None as weights (or None for no biases at all).
        stride, padding: of the KxK convolution, an int or a pair (zero padding).
        gap: average the last stage over H and W (the last NiN block with global average pooling);
            the [N, Cout, Ho, Wo] map is then never written.

    Under torch.autocast, x, weights and biases are cast to the autocast dtype first (as for the
    convolutions mlpconv replaces).

    Returns:
        relu(conv1x1(relu(conv1x1(relu(conv2d(x, w0, b0, stride, padding)), w1, b1)), w2, b2)):
        Tensor[N, Cout, Ho, Wo] with Ho = (H + 2*ph - kh) // sh + 1 (channels_last when x or
        weights[0] is), or Tensor[N, Cout] with gap=True.
    """
    x, weights, biases = _autocast_mlpconv_args(x, weights, biases)
    weights, biases, stride, padding, _ = check_mlpconv_args(x, weights, biases, stride, padding)
    gap = bool(gap)
    backend = backend_for(x, "mlpconv")
    if backend != "torch" and torch.jit.is_tracing():
        _warn_traced_as_composition()
        backend = "torch"
    if backend == "torch":
        return reference.mlpconv(x, weights, biases, stride, padding, gap)
    biases = _fill_missing_biases(biases, weights)
    ns = _op_namespace(backend)
    if _under_grad_transform("mlpconv"):
        return _FuncMlpconv.apply(ns, list(stride), list(padding), gap, len(weights), x, *weights, *biases)
    return ns.mlpconv(x, weights, biases, list(stride), list(padding), gap)


def local_response_norm(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """Local response normalization across channels, as torch.nn.functional.local_response_norm:

        y[n, c] = x[n, c] / (k + alpha / size * sum_{c' = c - size//2}^{c + (size-1)//2} x[n, c']^2) ** beta

    with channels outside [0, C) counting as zero (alpha is divided by size, the Caffe convention).

    Args:
        x: Tensor[N, C, *] of rank >= 3 (float32, float16, bfloat16, float64).
    Returns:
        Tensor of x's shape (and layout, when x is dense).
    """
    check_lrn_args(x, size, alpha, beta, k)
    backend = backend_for(x, "local_response_norm")
    if backend == "torch":
        return reference.local_response_norm(x, size, alpha, beta, k)
    ns = _op_namespace(backend)
    if _under_grad_transform("local_response_norm"):
        return _FuncLrn.apply(ns, x, size, float(alpha), float(beta), float(k))
    return ns.lrn(x, size, float(alpha), float(beta), float(k))


def global_avg_pool2d(x: Tensor) -> Tensor:
    """Global average pooling: Tensor[N, C, H, W] -> Tensor[N, C], the mean over H and W
    (accumulated in float32 for float16/bfloat16 inputs)."""
    check_gap_args(x)
    backend = backend_for(x, "global_avg_pool2d")
    if backend == "torch":
        return reference.global_avg_pool2d(x)
    ns = _op_namespace(backend)
    if _under_grad_transform("global_avg_pool2d"):
        return _FuncGap.apply(ns, x)
    return ns.gap(x)


# ----------------------------------------------------------------------------------------------
# Autograd. The rules are written once against an op namespace, so that the Triton backend
# (fastnin/triton/__init__.py) registers the same ones for torch.ops.fastnin_triton.*.
# ----------------------------------------------------------------------------------------------


def _list_grads(needs, grads):
    """Shape a list argument's gradients the way register_autograd expects: None when no element
    needs a gradient (needs is False), else one entry per element."""
    if needs is False or needs is None:
        return None
    return [g if n else None for g, n in zip(grads, needs)]


def _as_flags(needs, n: int) -> list[bool]:
    """ctx.needs_input_grad's entry for a list argument (a bool, or one per element) as n bools."""
    if isinstance(needs, (list, tuple)):
        return [bool(v) for v in needs]
    return [bool(needs)] * n


def _not_differentiable(t: Tensor) -> bool:
    # functorch's level -2 marks a dead wrapper (torch/csrc/functorch: maybe_get_level); its
    # requires_grad is True, but operations on it record no graph.
    return not t.requires_grad or torch._C._functorch.maybe_get_level(t) == -2


def _reference_grads(compute, tensors: list, needs: list[bool], grad_out: Tensor) -> list:
    """The gradients of compute(*tensors) (the plain torch composition of the saved inputs) for the
    tensors whose flag is set, themselves differentiable (create_graph=True).

    Why: a backward run with create_graph=True (a gradient penalty, higher-order derivatives,
    torch.func's transforms) must return gradients that autograd can differentiate again, and the
    fused backward kernels have no derivative of their own. There the gradients are computed by
    differentiating the plain torch composition instead, at eager speed, from the saved inputs,
    which carry their graph. Ordinary backwards (create_graph=False, and torch.compile's traced
    backward) run with grad mode off and never come here.

    A wanted tensor that autograd cannot differentiate through (one that does not require grad;
    a torch.func.grad wrapper whose transform has exited, as the saved inputs are when jacrev
    calls the function torch.func.vjp returned, under its vmap) sends the whole computation
    through torch.func.vjp instead, which needs no requires_grad (and a leaf made with
    requires_grad_() is refused under a torch.func transform). Its result is differentiable again
    by torch.func and autograd alike."""
    if any(n and _not_differentiable(t) for t, n in zip(tensors, needs)):
        idx = [i for i, n in enumerate(needs) if n]

        def of_wanted(*wanted):
            full = list(tensors)
            for i, t in zip(idx, wanted):
                full[i] = t
            return compute(*full)

        _, vjp_fn = torch.func.vjp(of_wanted, *[tensors[i] for i in idx])
        got = iter(vjp_fn(grad_out))
    else:
        wanted = [t for t, n in zip(tensors, needs) if n]
        with torch.enable_grad():
            out = compute(*tensors)
        got = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    grads = []
    for t, n in zip(tensors, needs):
        g = next(got) if n else None
        grads.append(torch.zeros_like(t) if n and g is None else g)
    return grads


def _refuse_double_backward(backward_op, op: str, public: str) -> None:
    """Make differentiating through the raw backward op raise instead of what torch does for an op
    without autograd, which is to warn and treat it as a constant, i.e. return wrong second
    derivatives silently. (Through fastnin.ops.*, a create_graph=True backward never calls the raw
    backward op: see _reference_grads.)"""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastnin: {op}_backward has no derivative of its own; differentiate fastnin.ops.{public} "
            "with create_graph=True instead, whose gradients are differentiable"
        )

    torch.library.register_autograd(backward_op, backward, setup_context=lambda ctx, inputs, output: None)


def _mlpconv_setup_context(ctx, inputs, output):
    x, weights, biases, stride, padding, gap = inputs
    ctx.stride, ctx.padding, ctx.gap = list(stride), list(padding), gap
    ctx.nstages = len(weights)
    ctx.has_bias = [b is not None for b in biases]
    # Only x and the output are kept: the backward recomputes the intermediate activations.
    ctx.save_for_backward(x, None if gap else output, *weights, *[b for b in biases if b is not None])


def _mlpconv_grads(ns, ctx, grad_out, need_x: bool, need_w: list[bool], need_b: list[bool]):
    """(grad_x, [grad_w], [grad_b]) of the mlpconv saved by _mlpconv_setup_context, None where not
    needed, with the backward kernel of op namespace ns (differentiable ones under grad mode)."""
    x, out, *params = ctx.saved_tensors
    S = ctx.nstages
    weights = params[:S]
    it = iter(params[S:])
    biases = [next(it) if h else None for h in ctx.has_bias]
    need_b = [n and b is not None for n, b in zip(need_b, biases)]
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
        g = _reference_grads(
            lambda x, *p: reference.mlpconv(x, p[:S], p[S:], ctx.stride, ctx.padding, ctx.gap),
            [x, *weights, *biases], [need_x, *need_w, *need_b], grad_out,
        )
        gx, gws, gbs = g[0], g[1 : S + 1], g[S + 1 :]
    else:
        # The kernel's mask is per kind (x, all weights, all biases): a frozen layer's weights
        # (requires_grad=False) cost no weight-gradient products.
        mask = [need_x, any(need_w), any(need_b)]
        gx, gws, gbs = ns.mlpconv_backward(
            grad_out, x, weights, biases, out, ctx.stride, ctx.padding, ctx.gap, mask
        )
        # (a kind the mask leaves out comes back as an empty list)
        gws, gbs = list(gws) or [None] * S, list(gbs) or [None] * S
    return (
        gx if need_x else None,
        [g if n else None for g, n in zip(gws, need_w)],
        [g if n else None for g, n in zip(gbs, need_b)],
    )


def register_mlpconv_autograd(ns) -> None:
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        S = ctx.nstages
        # For a list argument needs_input_grad holds a bool or one bool per element.
        gx, gws, gbs = _mlpconv_grads(ns, ctx, grad_out, bool(need_x), _as_flags(need_w, S), _as_flags(need_b, S))
        grads = (gx, _list_grads(need_w, gws), _list_grads(need_b, gbs), None, None, None)
        # One entry per input the op actually received: torch 2.11's dispatcher drops `gap` when
        # it equals its default, and its tensor-list autograd then rejects a 6th gradient.
        return grads[: len(ctx.needs_input_grad)]

    torch.library.register_autograd(ns.mlpconv.default, backward, setup_context=_mlpconv_setup_context)
    _refuse_double_backward(ns.mlpconv_backward.default, "mlpconv", "mlpconv")


def _lrn_setup_context(ctx, inputs, output):
    x, size, alpha, beta, k = inputs
    ctx.args = (size, alpha, beta, k)
    ctx.save_for_backward(x)


def _lrn_grad(ns, ctx, grad_out):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
        (gx,) = _reference_grads(lambda x: reference.local_response_norm(x, *ctx.args), [x], [True], grad_out)
        return gx
    return ns.lrn_backward(grad_out, x, *ctx.args)


def register_lrn_autograd(ns) -> None:
    def backward(ctx, grad_out):
        gx = _lrn_grad(ns, ctx, grad_out) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None

    torch.library.register_autograd(ns.lrn.default, backward, setup_context=_lrn_setup_context)
    _refuse_double_backward(ns.lrn_backward.default, "lrn", "local_response_norm")


def _gap_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.input_size = list(x.shape)
    ctx.channels_last = suggest_memory_format(x) == torch.channels_last


def register_gap_autograd(ns) -> None:
    def backward(ctx, grad_out):
        return ns.gap_backward(grad_out, ctx.input_size, ctx.channels_last)

    torch.library.register_autograd(ns.gap.default, backward, setup_context=_gap_setup_context)

    # gap_backward is linear in grad_out (grad_out[n, c] / (H * W) at every pixel): its own
    # gradient is the mean over H and W of the incoming one, i.e. gap again. So GAP is
    # differentiable to any order (gradient penalties through a network's head).
    def backward_of_backward(ctx, grad_grad_x):
        return ns.gap(grad_grad_x), None, None

    torch.library.register_autograd(
        ns.gap_backward.default, backward_of_backward, setup_context=lambda ctx, inputs, output: None
    )


# ----------------------------------------------------------------------------------------------
# torch.func's reverse-mode transforms: grad, vjp, jacrev, and vmap over them (per-example
# gradients). torch's register_autograd ties an op to an autograd.Function that has no
# setup_context staticmethod, which functorch refuses ("must override the setup_context
# staticmethod"; pytorch/pytorch#168393, #179652, open). So under such a transform the public
# functions apply these Functions instead: the same forward op, setup_context and gradients.
# Everywhere else (plain autograd, torch.compile, torch.func.vmap alone) the ops' own
# registration runs. functorch differentiates with create_graph=True, so the gradients there come
# from the plain torch composition (_reference_grads): eager speed, differentiable again
# (grad of grad, hessian-vector products by double vjp).
# ----------------------------------------------------------------------------------------------


def torch_func_transforms() -> set:
    """The kinds (torch._C._functorch.TransformType) of the torch.func transforms in force around
    this call; empty without any, and under torch.compile, where Dynamo traces torch.func itself."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return {i.key() for i in retrieve_all_functorch_interpreters()}


def _under_grad_transform(op: str) -> bool:
    """Whether a torch.func reverse-mode transform is in force around this call. Forward mode
    (jvp, jacfwd, hessian) raises: the kernels have no forward derivative."""
    kinds = torch_func_transforms()
    if not kinds:
        return False
    from torch._C._functorch import TransformType

    if TransformType.Jvp in kinds:
        raise NotImplementedError(
            f"fastnin.ops.{op}: forward-mode differentiation (torch.func.jvp, jacfwd, hessian) is not "
            "supported by its kernels; use reverse mode (torch.func.grad, vjp, jacrev), or "
            "fastnin.use_backend('torch') for the plain torch composition"
        )
    return TransformType.Grad in kinds


class _FuncMlpconv(torch.autograd.Function):
    """mlpconv for torch.func: the tensor lists flattened into the arguments (an autograd.Function
    tracks only tensors passed directly): apply(ns, stride, padding, gap, nstages, x, *weights,
    *biases)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(ns, stride, padding, gap, nstages, x, *params):
        return ns.mlpconv(x, list(params[:nstages]), list(params[nstages:]), stride, padding, gap)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ns, stride, padding, gap, nstages, x, *params = inputs
        ctx.ns = ns
        _mlpconv_setup_context(ctx, (x, params[:nstages], params[nstages:], stride, padding, gap), output)

    @staticmethod
    def backward(ctx, grad_out):
        S = ctx.nstages
        need = [bool(n) for n in ctx.needs_input_grad[5:]]
        gx, gws, gbs = _mlpconv_grads(ctx.ns, ctx, grad_out, need[0], need[1 : S + 1], need[S + 1 :])
        return (None, None, None, None, None, gx, *gws, *gbs)


class _FuncLrn(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(ns, x, size, alpha, beta, k):
        return ns.lrn(x, size, alpha, beta, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ns, *args = inputs
        ctx.ns = ns
        _lrn_setup_context(ctx, args, output)

    @staticmethod
    def backward(ctx, grad_out):
        gx = _lrn_grad(ctx.ns, ctx, grad_out) if ctx.needs_input_grad[1] else None
        return None, gx, None, None, None, None


class _FuncGap(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(ns, x):
        return ns.gap(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.ns = inputs[0]
        _gap_setup_context(ctx, inputs[1:], output)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # Differentiable again: grad_out[n, c] / (H * W) at every pixel, in torch ops, since
            # gap_backward's own derivative is a register_autograd one, which functorch refuses.
            n, c, h, w = ctx.input_size
            return None, (grad_out / (h * w))[:, :, None, None].expand(n, c, h, w)
        return None, ctx.ns.gap_backward(grad_out, ctx.input_size, ctx.channels_last)


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++ ops: shapes, dtypes and layouts, for torch.compile and opcheck.
# ----------------------------------------------------------------------------------------------


def register_fakes(ns_name: str) -> None:
    @torch.library.register_fake(f"{ns_name}::mlpconv")
    def _mlpconv_fake(x, weights, biases, stride, padding, gap=False):
        weights, biases, stride, padding, _ = check_mlpconv_args(x, weights, biases, stride, padding)
        return empty_mlpconv_output(x, weights, stride, padding, gap)

    @torch.library.register_fake(f"{ns_name}::mlpconv_backward")
    def _mlpconv_backward_fake(grad_out, x, weights, biases, out, stride, padding, gap, output_mask):
        check_mlpconv_backward_args(grad_out, x, weights, biases, out, stride, padding, gap)
        weights, biases, *_ = check_mlpconv_args(x, weights, biases, stride, padding)
        return empty_mlpconv_grads(x, weights, biases, output_mask)

    @torch.library.register_fake(f"{ns_name}::lrn")
    def _lrn_fake(x, size, alpha, beta, k):
        check_lrn_args(x, size, alpha, beta, k)
        return empty_lrn_output(x)

    @torch.library.register_fake(f"{ns_name}::lrn_backward")
    def _lrn_backward_fake(grad_out, x, size, alpha, beta, k):
        check_lrn_backward_args(grad_out, x, size, alpha, beta, k)
        return empty_lrn_output(x)

    @torch.library.register_fake(f"{ns_name}::gap")
    def _gap_fake(x):
        check_gap_args(x)
        return x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake(f"{ns_name}::gap_backward")
    def _gap_backward_fake(grad_out, input_size, channels_last):
        check_gap_backward_args(grad_out, input_size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)


# ----------------------------------------------------------------------------------------------
# torch.func.vmap rules. Without them torch runs LRN and GAP once per example (with a warning)
# and refuses mlpconv outright. An input batched along the vmapped dimension is folded into N:
# one call over B*N images (B examples of N each). Batched weights (model ensembling:
# vmap over stacked parameters) are a different problem per example: one call each, stacked.
# ----------------------------------------------------------------------------------------------


def _fold(t: Tensor, bdim: int) -> Tensor:
    """[..., B (at bdim), ...] with the example dimension N first after B -> [B * N, ...]."""
    t = t.movedim(bdim, 0)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unfold(y: Tensor, batch: int) -> Tensor:
    return y.reshape(batch, y.shape[0] // batch, *y.shape[1:])


def register_vmap_rules(ns) -> None:
    def mlpconv_vmap(info, in_dims, x, weights, biases, stride, padding, gap=False):
        x_dim, w_dims, b_dims = in_dims[0], in_dims[1] or [None] * len(weights), in_dims[2] or [None] * len(biases)
        if x_dim is not None and all(d is None for d in [*w_dims, *b_dims]):
            return _unfold(ns.mlpconv(_fold(x, x_dim), weights, biases, stride, padding, gap), info.batch_size), 0

        def pick(t, d, i):
            return t if t is None or d is None else t.select(d, i)

        outs = [
            ns.mlpconv(
                pick(x, x_dim, i),
                [pick(w, d, i) for w, d in zip(weights, w_dims)],
                [pick(b, d, i) for b, d in zip(biases, b_dims)],
                stride, padding, gap,
            )
            for i in range(info.batch_size)
        ]
        return torch.stack(outs), 0

    def lrn_vmap(info, in_dims, x, size, alpha, beta, k):
        return _unfold(ns.lrn(_fold(x, in_dims[0]), size, alpha, beta, k), info.batch_size), 0

    def gap_vmap(info, in_dims, x):
        return _unfold(ns.gap(_fold(x, in_dims[0])), info.batch_size), 0

    # The backward ops meet vmap where a torch.func transform differentiates a fastnin op (jacrev,
    # per-example gradients: vmap over a vjp; see _FuncMlpconv above) with grad mode off.
    def mlpconv_backward_vmap(info, in_dims, grad_out, x, weights, biases, out, stride, padding, gap, output_mask):
        # One call per example: the weight gradients are per example, not summed over a folded N.
        w_dims, b_dims = in_dims[2] or [None] * len(weights), in_dims[3] or [None] * len(biases)
        dims = [in_dims[0], in_dims[1], w_dims, b_dims, in_dims[4]]

        def pick(t, d, i):
            return t if t is None or d is None else t.select(d, i)

        results = [
            ns.mlpconv_backward(
                pick(grad_out, dims[0], i), pick(x, dims[1], i),
                [pick(w, d, i) for w, d in zip(weights, dims[2])], [pick(b, d, i) for b, d in zip(biases, dims[3])],
                pick(out, dims[4], i), stride, padding, gap, output_mask,
            )
            for i in range(info.batch_size)
        ]
        gx = torch.stack([r[0] for r in results])
        gws = [torch.stack(list(g)) for g in zip(*[r[1] for r in results])]
        gbs = [torch.stack(list(g)) for g in zip(*[r[2] for r in results])]
        return (gx, gws, gbs), (0, [0] * len(gws), [0] * len(gbs))

    def lrn_backward_vmap(info, in_dims, grad_out, x, size, alpha, beta, k):
        def folded(t, d):
            return _fold(t if d is not None else t.expand(info.batch_size, *t.shape), 0 if d is None else d)

        gx = ns.lrn_backward(folded(grad_out, in_dims[0]), folded(x, in_dims[1]), size, alpha, beta, k)
        return _unfold(gx, info.batch_size), 0

    def gap_backward_vmap(info, in_dims, grad_out, input_size, channels_last):
        batch = info.batch_size
        gx = ns.gap_backward(_fold(grad_out, in_dims[0]), [batch * input_size[0], *input_size[1:]], channels_last)
        return _unfold(gx, batch), 0

    torch.library.register_vmap(ns.mlpconv.default, mlpconv_vmap)
    torch.library.register_vmap(ns.lrn.default, lrn_vmap)
    torch.library.register_vmap(ns.gap.default, gap_vmap)
    torch.library.register_vmap(ns.mlpconv_backward.default, mlpconv_backward_vmap)
    torch.library.register_vmap(ns.lrn_backward.default, lrn_backward_vmap)
    torch.library.register_vmap(ns.gap_backward.default, gap_backward_vmap)


register_fakes("fastnin")
register_mlpconv_autograd(torch.ops.fastnin)
register_lrn_autograd(torch.ops.fastnin)
register_gap_autograd(torch.ops.fastnin)
register_vmap_rules(torch.ops.fastnin)
