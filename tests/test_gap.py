"""Parity tests of global average pooling (forward and gradient) on every backend.

Each case runs fastnin.ops.global_avg_pool2d under the backend of the `backend_device` fixture and
compares the output and the gradient of x with fastnin.reference.global_avg_pool2d in float64
(same rounded inputs), with the tolerance rule of _utils.assert_close_rule (torch's own x.mean in
the same dtype sets the bound). Shapes are small for the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import DTYPES, assert_close_rule, check_grad_x, leaf, make_layout

import fastnin
from fastnin import reference


def _interp(backend_device) -> bool:
    backend, device = backend_device
    return backend == "triton" and device == "cpu"


def _ns(backend):
    if backend == "triton":
        fastnin._backend.load_triton()
        return torch.ops.fastnin_triton
    return torch.ops.fastnin


def make_x(shape, device, dtype=torch.float32, seed=1, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dtype)


def grad_layout(xs):
    """The layout fastnin gives grad x: channels_last iff x suggests it (see ops.register_gap_autograd)."""
    if fastnin.ops.suggest_memory_format(xs) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def run_case(x, layout="contiguous", grad_out_kind="random"):
    dtype = x.dtype
    xs = make_layout(x, layout)
    xo = leaf(xs)
    y = fastnin.ops.global_avg_pool2d(xo)
    xr = leaf(x.detach().double())
    yr = reference.global_avg_pool2d(xr)
    xt = leaf(xs)
    yt = reference.global_avg_pool2d(xt)
    assert y.dtype == dtype and y.device == x.device and y.shape == (x.shape[0], x.shape[1])
    assert_close_rule(y, yr, yt, "out")
    gen = torch.Generator().manual_seed(7)
    if grad_out_kind == "random":
        go = torch.randn(yr.shape, generator=gen).to(device=x.device, dtype=dtype)
    elif grad_out_kind == "expanded":  # zero strides, as y.sum().backward() gives
        go = torch.ones((), dtype=dtype, device=x.device).expand(yr.shape)
    elif grad_out_kind == "transposed":  # column-major [N, C]
        go = torch.randn(yr.shape[::-1], generator=gen).to(device=x.device, dtype=dtype).t()
    else:
        raise ValueError(grad_out_kind)
    check_grad_x((y, yr, yt), (xo, xr, xt), go, grad_layout(xs))
    return y


SHAPES = [
    pytest.param((2, 3, 31, 29), id="3x31x29"),
    pytest.param((2, 1, 5, 4), id="1ch"),
    pytest.param((1, 1, 1, 1), id="1x1x1x1"),
    pytest.param((3, 5, 1, 7), id="H1"),
    pytest.param((2, 10, 6, 6), id="nin-cifar-head"),
    pytest.param((1, 300, 3, 2), id="C300"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_forward_backward_fp32(backend_device, shape, layout):
    _, device = backend_device
    run_case(make_x(shape, device), layout)


def test_large_fp32(backend_device):
    """Rows longer than one accumulation block (CPU: 4096 elements, 16 channels_last pixels),
    many rows over the threads, C split into channel blocks, and the issue's benchmark shape
    64x384x13x13 (channels_last sums over blocks of 256 pixels failed the rule there)."""
    if _interp(backend_device):
        pytest.skip("too large for the Triton interpreter")
    _, device = backend_device
    for shape in [(2, 5, 70, 65), (9, 384, 13, 13), (1, 520, 17, 16), (64, 384, 13, 13)]:
        for layout in ["contiguous", "channels_last"]:
            run_case(make_x(shape, device), layout)


@pytest.mark.parametrize("kind", ["expanded", "transposed"])
def test_grad_out_strides(backend_device, kind):
    _, device = backend_device
    run_case(make_x((2, 6, 5, 4), device), grad_out_kind=kind)
    run_case(make_x((2, 6, 5, 4), device), "channels_last", grad_out_kind=kind)


@pytest.mark.parametrize("n", [0, 1])
def test_batch_0_and_1(backend_device, n):
    _, device = backend_device
    for layout in ["contiguous", "channels_last"]:
        run_case(make_x((n, 6, 5, 4), device), layout)


def test_zero_channels(backend_device):
    _, device = backend_device
    x = make_x((2, 0, 3, 3), device).requires_grad_()
    y = fastnin.ops.global_avg_pool2d(x)
    assert y.shape == (2, 0)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert g.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision(backend_device, dtype, layout):
    _, device = backend_device
    run_case(make_x((2, 7, 9, 10), device, dtype, scale=2.0, shift=1.0), layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_long_rows(backend_device, dtype):
    """A long sum (1 + noise over 8000 pixels): fp32 accumulation, one rounding at the end."""
    if _interp(backend_device):
        pytest.skip("too large for the Triton interpreter")
    _, device = backend_device
    for layout in ["contiguous", "channels_last"]:
        run_case(make_x((2, 3, 80, 100), device, dtype, shift=1.0), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp16_near_max_does_not_overflow(backend_device, layout):
    """Values near fp16's largest (65504): their sum is far out of fp16 range, their mean is not."""
    _, device = backend_device
    x = make_x((2, 3, 8, 9), device, shift=60000.0, scale=3000.0).clamp(max=65504).half()
    y = fastnin.ops.global_avg_pool2d(make_layout(x, layout))
    r = x.double().mean((2, 3))
    assert torch.isfinite(y).all(), y
    # one fp16 rounding of the exact mean (plus fp32 accumulation error, far below it)
    assert ((y.double() - r).abs() <= r.abs() * 2.0**-11 * 1.01).all()


def test_nan_inf_propagation(backend_device):
    """NaN and Inf propagate as in x.mean: NaN stays NaN, +Inf gives +Inf, +Inf and -Inf give NaN."""
    _, device = backend_device
    x = make_x((2, 4, 5, 6), device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 4, 1] = float("inf")
    x[1, 2, 0, 0] = float("-inf")
    x[0, 3, 1, 1] = float("inf")
    x[0, 3, 3, 2] = float("-inf")
    for layout in ["contiguous", "channels_last"]:
        y = fastnin.ops.global_avg_pool2d(make_layout(x, layout))
        r = x.double().mean((2, 3))
        assert torch.equal(y.isnan(), r.isnan()) and y.isnan().sum() == 2, layout
        assert torch.equal(y.isinf(), r.isinf()) and torch.equal(y[y.isinf()].double(), r[r.isinf()]), layout
        fin = r.isfinite()
        assert_close_rule(y[fin], r[fin], x.mean((2, 3))[fin], "finite part")


def test_deterministic(backend_device):
    _, device = backend_device
    x = make_x((3, 20, 11, 9), device)
    for layout in ["contiguous", "channels_last"]:
        xs = make_layout(x, layout)
        assert torch.equal(fastnin.ops.global_avg_pool2d(xs), fastnin.ops.global_avg_pool2d(xs))


# ----------------------------------------------------------------------------------------------
# module, gradcheck / opcheck
# ----------------------------------------------------------------------------------------------


def test_module_matches_torch(backend_device):
    _, device = backend_device
    x = make_x((2, 6, 5, 4), device)
    torch.testing.assert_close(fastnin.nn.GlobalAvgPool2d()(x), F.adaptive_avg_pool2d(x, 1).flatten(1))
    torch.testing.assert_close(fastnin.nn.GlobalAvgPool2d(flatten=False)(x), F.adaptive_avg_pool2d(x, 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(backend_device, layout):
    _, device = backend_device
    x = make_layout(make_x((2, 3, 4, 5), device, torch.float64), layout).requires_grad_()
    assert torch.autograd.gradcheck(fastnin.ops.global_avg_pool2d, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradgradcheck(backend_device, layout):
    # GAP's backward is linear (its own gradient is GAP again): second derivatives, through a
    # network's head in a gradient penalty, are exact.
    _, device = backend_device
    x = make_layout(make_x((2, 3, 4, 5), device, torch.float64), layout).requires_grad_()
    assert torch.autograd.gradgradcheck(fastnin.ops.global_avg_pool2d, (x,), eps=1e-6, atol=1e-7)

    def penalty(x):  # the square makes the gradient depend on x
        (g,) = torch.autograd.grad(fastnin.ops.global_avg_pool2d(x).square().sum(), x, create_graph=True)
        return g.square().sum()

    def penalty_ref(x):
        (g,) = torch.autograd.grad(x.mean((2, 3)).square().sum(), x, create_graph=True)
        return g.square().sum()

    (got,) = torch.autograd.grad(penalty(x), x)
    (want,) = torch.autograd.grad(penalty_ref(x), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_opcheck(backend_device):
    backend, device = backend_device
    if backend != "cpu" and backend != "cuda":
        pytest.skip("opcheck runs on the C++ ops (Triton's fake-tensor test cannot run in the interpreter)")
    ns = torch.ops.fastnin
    for layout in ["contiguous", "channels_last"]:
        x = make_layout(make_x((2, 5, 4, 3), device), layout).requires_grad_()
        torch.library.opcheck(ns.gap.default, (x,))
    for cl in [False, True]:
        torch.library.opcheck(ns.gap_backward.default, (make_x((2, 5), device), [2, 5, 4, 3], cl))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

BAD = [
    ("x must be a 4-D tensor", lambda d: make_x((2, 3, 4), d)),
    ("x must be a 4-D tensor", lambda d: make_x((1, 2, 3, 4, 5), d)),
    ("non-empty spatial size", lambda d: make_x((2, 3, 0, 4), d)),
    ("non-empty spatial size", lambda d: make_x((2, 3, 4, 0), d)),
    ("x must be a floating-point", lambda d: make_x((1, 2, 3, 3), d).to(torch.int32)),
    ("x must be a floating-point", lambda d: make_x((1, 2, 3, 3), d).bool()),
]


@pytest.mark.parametrize("via", ["ops", "torch.ops"])
def test_bad_input(backend_device, via):
    backend, device = backend_device
    for match, make in BAD:
        x = make(device)
        with pytest.raises(ValueError, match=match):
            if via == "ops":
                fastnin.ops.global_avg_pool2d(x)
            else:
                _ns(backend).gap(x)


def test_bad_input_backward_op(backend_device):
    backend, device = backend_device
    ns = _ns(backend)
    g = make_x((2, 3), device)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ns.gap_backward(g, [2, 4, 3, 3], False)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ns.gap_backward(g[None], [2, 3, 3, 3], True)
    if backend == "cpu":
        with pytest.raises(ValueError, match="input_size"):
            ns.gap_backward(g, [2, 3, -1, 3], False)
        with pytest.raises(ValueError, match="grad_out must be a floating-point"):
            ns.gap_backward(g.int(), [2, 3, 3, 3], False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_neighbour_rows_do_not_leak(backend_device, layout):
    """NaN / Inf at the start of the next (n, c) row or pixel stay out of this one's mean (the CPU
    kernel reads a row's remainder as one full-width step that runs into the next row)."""
    _, device = backend_device
    x = make_x((2, 3, 5, 7), device)  # rows of 35: one 32-wide step and a remainder of 3
    x[0, 1, 0, 0] = float("nan")
    x[0, 1, 0, 5] = float("inf")
    x[1, 2, 0, 1] = float("-inf")
    y = fastnin.ops.global_avg_pool2d(make_layout(x, layout))
    r = x.double().mean((2, 3))
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
    fin = r.isfinite()
    assert fin.sum() == 4
    assert_close_rule(y[fin], r[fin], x.mean((2, 3))[fin], "finite part")


@pytest.mark.parametrize("hw", [(13, 13), (16, 10), (17, 17)], ids=["13x13", "16x10", "17x17"])
@pytest.mark.parametrize("offset", [0, 1, 7, 15])
def test_rows_off_the_line_start(backend_device, hw, offset):
    """fp32 rows of >= 160 elements that start off a 64-byte line (the CPU kernel reads them as the
    aligned blocks covering them, the first and last with the lanes outside the row dropped): x at
    a storage offset of `offset` floats, so the first row's first block would begin before x and
    the last row's last block end after it; NaN / Inf at the ends of the neighbouring rows stay out."""
    _, device = backend_device
    n, c = 2, 5
    L = hw[0] * hw[1]
    base = make_x((n * c * L + offset + 16,), device)
    x = base[offset : offset + n * c * L].view(n, c, *hw)
    assert x.is_contiguous() and x.storage_offset() == offset
    x[0, 1, 0, 0] = float("nan")  # row 1's first element
    x[0, 2, -1, -1] = float("inf")  # row 2's last
    x[1, 0, 0, 0] = float("-inf")  # row 5's first
    y = fastnin.ops.global_avg_pool2d(x)
    r = x.double().mean((2, 3))
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
    assert torch.equal(y[y.isinf()].double(), r[r.isinf()])
    fin = r.isfinite()
    assert fin.sum() == n * c - 3
    assert_close_rule(y[fin], r[fin], x.mean((2, 3))[fin], "finite rows")
