"""Parity tests of local response normalization (forward and gradient) on every backend.

Each case runs fastnin.ops.local_response_norm under the backend of the `backend_device` fixture
and compares the output and the gradient of x with fastnin.reference.local_response_norm in
float64 (same rounded inputs), with the tolerance rule of _utils.assert_close_rule (torch's own
result in the same dtype sets the bound; on the CPU torch has no fp16/bf16 LRN, and the reference
then runs in fp32 and rounds). Shapes are small for the Triton interpreter.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from _utils import DTYPES, assert_close_rule, check_grad_x, grads_of, leaf, make_layout, same_layout

import fastnin
from fastnin import reference
from fastnin.ops import lrn_output_format

# AlexNet's LRN (alpha 1e-4) barely changes x: d ~ k. These parameters make the window matter
# (alpha / size * sum x^2 ~ k for unit-variance x), so a wrong window or gradient term shows.
ALPHA, BETA, K = 0.6, 0.75, 1.5


def _interp(backend_device) -> bool:
    backend, device = backend_device
    return backend == "triton" and device == "cpu"


def _ns(backend):
    if backend == "triton":
        fastnin._backend.load_triton()
        return torch.ops.fastnin_triton
    return torch.ops.fastnin


def make_x(shape, device, dtype=torch.float32, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def run_case(x, size, alpha=ALPHA, beta=BETA, k=K, layout="contiguous", grad_out_kind="random", backward=True):
    """ours, torch in x's dtype and the float64 reference, forward and grad x; compare all."""
    dtype = x.dtype
    xs = make_layout(x, layout)
    xo = leaf(xs, backward)
    y = fastnin.ops.local_response_norm(xo, size, alpha, beta, k)
    xr = leaf(x.detach().double(), backward)
    yr = reference.local_response_norm(xr, size, alpha, beta, k)
    xt = leaf(xs, backward)
    yt = reference.local_response_norm(xt, size, alpha, beta, k)

    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert y.is_contiguous(memory_format=lrn_output_format(xs)), f"layout {y.stride()}"
    # (strides of an empty result say nothing: torch gives arbitrary ones)
    if xs.numel() > 0 and (xs.is_contiguous() or xs.is_contiguous(memory_format=torch.channels_last)):
        assert same_layout(y, F.local_response_norm(xs.detach().float(), size, alpha, beta, k)), "layout vs torch"
    assert_close_rule(y, yr, yt, "out")
    if not backward:
        return y
    gen = torch.Generator().manual_seed(7)
    if grad_out_kind == "random":
        go = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=dtype)
    elif grad_out_kind == "expanded":  # zero strides, as y.sum().backward() gives
        go = torch.ones((), dtype=dtype, device=x.device).expand(x.shape)
    elif grad_out_kind == "channels_last":
        go = make_layout(torch.randn(x.shape, generator=gen).to(device=x.device, dtype=dtype), "channels_last")
    else:
        raise ValueError(grad_out_kind)
    check_grad_x((y, yr, yt), (xo, xr, xt), go, lrn_output_format(xs))
    return y


# ----------------------------------------------------------------------------------------------
# forward + gradient over shapes and window sizes
# ----------------------------------------------------------------------------------------------

# (id, shape, size)
CASES = [
    ("7ch-size3", (2, 7, 5, 3), 3),
    ("3x31x29-size5", (2, 3, 31, 29), 5),
    ("1ch", (2, 1, 6, 5), 5),
    ("C<size", (2, 3, 4, 4), 7),
    ("size>2C", (2, 5, 4, 3), 13),
    ("size1", (2, 6, 3, 3), 1),
    ("even-size4", (2, 9, 5, 4), 4),
    ("even-size6", (2, 10, 3, 5), 6),
    ("rank3", (3, 10, 17), 5),
    ("rank5", (2, 6, 3, 4, 5), 3),
    ("1x1-spatial", (4, 9, 1, 1), 4),
    ("wide-window", (1, 300, 5, 7), 201),  # w = 201 rows: the CPU walk's narrowest blocks
]
CASES_INTERP = ["7ch-size3", "1ch", "C<size", "even-size4", "rank3", "rank5"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_fp32(backend_device, case):
    _, device = backend_device
    name, shape, size = case
    if _interp(backend_device) and name not in CASES_INTERP:
        pytest.skip("shape list trimmed for the Triton interpreter")
    run_case(make_x(shape, device), size)


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("size", [3, 4, 7])
def test_layouts(backend_device, layout, size):
    """channels_last (channels innermost; output channels_last as torch's) and strided input."""
    _, device = backend_device
    run_case(make_x((2, 5, 4, 6), device), size, layout=layout)


def test_noncontig_rank5(backend_device):
    _, device = backend_device
    run_case(make_x((2, 4, 3, 2, 5), device), 3, layout="noncontig")


@pytest.mark.parametrize("kind", ["expanded", "channels_last"])
def test_grad_out_strides(backend_device, kind):
    _, device = backend_device
    run_case(make_x((2, 6, 5, 4), device), 5, grad_out_kind=kind)


def test_large_fp32(backend_device):
    """Many spatial blocks per image, many channels, more tasks than threads (CPU planar walk);
    the same in channels_last."""
    if _interp(backend_device):
        pytest.skip("too large for the Triton interpreter")
    _, device = backend_device
    x = make_x((3, 40, 37, 41), device)
    run_case(x, 5)
    run_case(x, 5, layout="channels_last")
    run_case(make_x((2, 96, 11, 13), device), 5, alpha=1e-4, beta=0.75, k=1.0)  # AlexNet's parameters


@pytest.mark.parametrize("n", [0, 1])
def test_batch_0_and_1(backend_device, n):
    _, device = backend_device
    run_case(make_x((n, 6, 5, 4), device), 3)
    run_case(make_x((n, 6, 5, 4), device), 3, layout="channels_last")


def test_empty_spatial(backend_device):
    _, device = backend_device
    for shape in [(2, 4, 0, 3), (2, 4, 0), (2, 0, 3, 3)]:
        x = make_x(shape, device).requires_grad_()
        y = fastnin.ops.local_response_norm(x, 3, ALPHA, BETA, K)
        assert y.shape == x.shape
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert g.shape == x.shape


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, -0.25, 0.0])
def test_beta_values(backend_device, beta):
    """Exponents other than 0.75 (integer, negative and zero included)."""
    _, device = backend_device
    run_case(make_x((2, 6, 4, 3), device), 5, beta=beta)


def test_wide_dynamic_range(backend_device):
    """Values from 1e-3 to 1e3 side by side: exact window sums (no running add/subtract) keep the
    small channels right when a large one leaves the window."""
    _, device = backend_device
    x = make_x((2, 12, 3, 4), device)
    x[:, ::3] *= 1e3
    x[:, 1::3] *= 1e-3
    run_case(x, 3, alpha=1e-4, beta=0.75, k=1.0)
    run_case(x, 4, alpha=1e-4, beta=0.75, k=1.0, layout="channels_last")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision(backend_device, dtype, layout):
    _, device = backend_device
    run_case(make_x((2, 7, 5, 6), device, dtype), 5, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_rank3_even(backend_device, dtype):
    _, device = backend_device
    run_case(make_x((3, 9, 11), device, dtype, scale=3.0), 4)


def test_deterministic_and_layout_independent(backend_device):
    """Bitwise-identical results from run to run, and between contiguous and channels_last input."""
    _, device = backend_device
    x = make_x((3, 9, 7, 6), device)
    go = make_x((3, 9, 7, 6), device, seed=3)
    res = []
    for layout in ["contiguous", "contiguous", "channels_last"]:
        xo = leaf(make_layout(x, layout))
        y = fastnin.ops.local_response_norm(xo, 5, ALPHA, BETA, K)
        (g,) = grads_of(y, [xo], go)
        res.append((y, g))
    for a, b in zip(res[0], res[1]):
        assert torch.equal(a, b)
    backend, _ = backend_device
    if backend == "cpu":  # the CPU kernels add the same squares in the same order in both layouts
        for a, b in zip(res[0], res[2]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("size", [3, 5])
def test_nan_inf_propagation(backend_device, size):
    """NaN and Inf in x propagate as in the torch composition: a NaN poisons every output whose
    window holds it; an Inf makes its window's d infinite (outputs 0 there, NaN at the Inf).
    Size 5 also runs the CPU forward's fused full-window loop (lrn.cpp) and its std::pow lanes."""
    _, device = backend_device
    x = make_x((2, 8, 4, 5), device)
    x[0, 2, 1, 1] = float("nan")
    x[1, 5, 2, 3] = float("inf")
    x[1, 0, 0, 4] = float("-inf")
    for layout in ["contiguous", "channels_last"]:
        xs = make_layout(x, layout)
        y = fastnin.ops.local_response_norm(xs, size, ALPHA, BETA, K)
        r = reference.local_response_norm(x.double(), size, ALPHA, BETA, K)
        assert torch.equal(y.isnan(), r.isnan()), layout
        assert torch.equal(y.isinf(), r.isinf()), layout
        assert y.isnan().sum() > 3
        fin = r.isfinite()
        assert_close_rule(y[fin], r[fin], reference.local_response_norm(x, size, ALPHA, BETA, K)[fin], "finite part")
        # gradient: NaN wherever the composition's gradient is NaN (the windows holding the NaN)
        xo = leaf(xs)
        xr = leaf(x.double())
        (g,) = grads_of(fastnin.ops.local_response_norm(xo, size, ALPHA, BETA, K), [xo], torch.ones_like(xs))
        (gr,) = grads_of(reference.local_response_norm(xr, size, ALPHA, BETA, K), [xr], torch.ones_like(xr))
        nan0 = gr[0].isnan()
        assert nan0.any() and torch.equal(g[0].isnan(), nan0), layout


@pytest.mark.parametrize("size,c", [(3, 4), (5, 8)])
def test_zero_k_and_zero_input(backend_device, size, c):
    """k = 0 with a zero pixel column: d = 0, 0 * 0^-beta is NaN in the composition too."""
    _, device = backend_device
    x = make_x((1, c, 3, 3), device)
    x[0, :, 1, 2] = 0
    y = fastnin.ops.local_response_norm(x, size, ALPHA, BETA, 0.0)
    r = reference.local_response_norm(x.double(), size, ALPHA, BETA, 0.0)
    assert torch.equal(y.isnan(), r.isnan()) and y.isnan().any()
    fin = r.isfinite()
    assert_close_rule(y[fin], r[fin], reference.local_response_norm(x, size, ALPHA, BETA, 0.0)[fin], "finite part")


# ----------------------------------------------------------------------------------------------
# module, gradcheck / opcheck
# ----------------------------------------------------------------------------------------------


def test_module_matches_torch(backend_device):
    _, device = backend_device
    x = make_x((2, 6, 5, 4), device)
    m = fastnin.nn.LocalResponseNorm(5, alpha=ALPHA, beta=BETA, k=K)
    tm = torch.nn.LocalResponseNorm(5, alpha=ALPHA, beta=BETA, k=K)
    torch.testing.assert_close(m(x), tm(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [2, 3])
def test_gradcheck(backend_device, layout, size):
    _, device = backend_device
    x = make_layout(make_x((2, 4, 3, 2), device, torch.float64), layout).requires_grad_()

    def f(x):
        return fastnin.ops.local_response_norm(x, size, ALPHA, BETA, K)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_double_backward(backend_device):
    """As for mlpconv: create_graph=True gradients are differentiable (second derivatives equal
    torch's in float64), and the raw backward op raises when differentiated."""
    _, device = backend_device
    x = make_x((2, 4, 3, 2), device, torch.float64)

    def penalty_grads(f):
        xl = leaf(x)
        (g,) = torch.autograd.grad(f(xl).square().sum(), xl, create_graph=True)
        return g.detach(), torch.autograd.grad(g.square().sum(), xl)[0]

    got = penalty_grads(lambda t: fastnin.ops.local_response_norm(t, 3, ALPHA, BETA, K))
    want = penalty_grads(lambda t: F.local_response_norm(t, 3, ALPHA, BETA, K))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    ns = _ns(backend_device[0])
    xl = leaf(x)
    gx = ns.lrn_backward(torch.ones_like(x), xl, 3, ALPHA, BETA, K)
    with pytest.raises(RuntimeError, match="lrn_backward has no derivative of its own"):
        gx.square().sum().backward()


def test_opcheck(backend_device):
    backend, device = backend_device
    if backend != "cpu" and backend != "cuda":
        pytest.skip("opcheck runs on the C++ ops (Triton's fake-tensor test cannot run in the interpreter)")
    ns = torch.ops.fastnin
    for shape, layout, size in [((2, 5, 4, 3), "contiguous", 3), ((2, 5, 4, 3), "channels_last", 4),
                                ((2, 6, 7), "contiguous", 5)]:
        x = make_layout(make_x(shape, device), layout).requires_grad_()
        torch.library.opcheck(ns.lrn.default, (x, size, ALPHA, BETA, K))
        go = torch.randn_like(x.detach())
        torch.library.opcheck(ns.lrn_backward.default, (go, x.detach(), size, ALPHA, BETA, K))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

BAD = [
    ("x must have at least 3 dimensions", lambda d: (make_x((4, 5), d), 3, {})),
    ("x must have at least 3 dimensions", lambda d: (make_x((5,), d), 3, {})),
    ("size must be >= 1", lambda d: (make_x((1, 4, 3), d), 0, {})),
    ("size must be >= 1", lambda d: (make_x((1, 4, 3), d), -2, {})),
    ("x must be a floating-point", lambda d: (make_x((1, 4, 3), d).to(torch.int32), 3, {})),
    ("x must be a floating-point", lambda d: (make_x((1, 4, 3), d).to(torch.int64), 3, {})),
    ("x must be a floating-point", lambda d: (make_x((1, 4, 3), d).bool(), 3, {})),
]


@pytest.mark.parametrize("via", ["ops", "torch.ops"])
def test_bad_input(backend_device, via):
    backend, device = backend_device
    for match, make in BAD:
        x, size, _ = make(device)
        with pytest.raises(ValueError, match=match):
            if via == "ops":
                fastnin.ops.local_response_norm(x, size, ALPHA, BETA, K)
            else:
                _ns(backend).lrn(x, size, ALPHA, BETA, K)


def test_bad_input_python_types(backend_device):
    _, device = backend_device
    x = make_x((1, 4, 3), device)
    with pytest.raises(ValueError, match="size must be an int"):
        fastnin.ops.local_response_norm(x, 2.5)
    with pytest.raises(ValueError, match="size must be an int"):
        fastnin.ops.local_response_norm(x, True)
    with pytest.raises(ValueError, match="alpha must be a number"):
        fastnin.ops.local_response_norm(x, 3, alpha="0.1")
    with pytest.raises(ValueError, match="x must be a Tensor"):
        fastnin.ops.local_response_norm([[[1.0]]], 3)


def test_bad_input_backward_op(backend_device):
    backend, device = backend_device
    ns = _ns(backend)
    x = make_x((2, 4, 3, 3), device)
    with pytest.raises(ValueError, match="grad_out"):
        ns.lrn_backward(x[:, :3], x, 3, ALPHA, BETA, K)
    if backend == "cpu":
        with pytest.raises(ValueError, match="grad_out"):
            ns.lrn_backward(x.double(), x, 3, ALPHA, BETA, K)
    with pytest.raises(ValueError, match="size"):
        ns.lrn_backward(x, x, 0, ALPHA, BETA, K)


# ----------------------------------------------------------------------------------------------
# CPU kernel variants
# ----------------------------------------------------------------------------------------------

def _isa_outputs(x, go):
    """Every dtype, layout and two windows of the CPU LRN forward and backward on (x, go)."""
    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            xx = xx.to(dt)
            for size, beta in ((5, 0.75), (4, 1.3)):
                out.append(torch.ops.fastnin.lrn(xx, size, 0.6, beta, 1.5))
                out.append(torch.ops.fastnin.lrn_backward(go.to(dt), xx, size, 0.6, beta, 1.5))
    return out


# The child process runs the same _isa_outputs (its source), under another ATEN_CPU_CAPABILITY.
_ISA_SCRIPT = (
    "import sys, torch, fastnin\n"
    + inspect.getsource(_isa_outputs)
    + "x, go = torch.load(sys.argv[1])\ntorch.save(_isa_outputs(x, go), sys.argv[2])\n"
)


@pytest.mark.parametrize("capability", ["avx512", "avx2", "default"])
def test_cpu_isa_variants_agree(tmp_path, capability):
    """The CPU kernels' AVX-512, AVX2 and baseline variants (picked from ATen's CPU capability,
    ATEN_CPU_CAPABILITY here) give bitwise-identical results, the default path included, and the
    one the test run uses matches the float64 reference."""
    import os
    import subprocess
    import sys

    if "cpu" not in fastnin.available_backends():
        pytest.skip("no CPU kernels")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 7, 37, generator=g) * 2  # rows of 259 positions: vector bodies and remainders
    x[0, 1, 1, 1] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    go = torch.randn(x.shape, generator=g)
    torch.save((x, go), tmp_path / "in.pt")
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(fastnin.__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    # -c: the child imports the same fastnin as this run (installed, or the in-place build in cwd)
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    theirs = torch.load(tmp_path / "out.pt")
    ours = _isa_outputs(x, go)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a.isnan(), b.isnan()), i
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), i
    fin = x.isfinite().all(1, keepdim=True).expand_as(x)  # pixels whose windows hold no NaN / Inf
    ref = reference.local_response_norm(x.double(), 5, 0.6, 0.75, 1.5)
    assert_close_rule(ours[0][fin], ref[fin], reference.local_response_norm(x, 5, 0.6, 0.75, 1.5)[fin], "fp32")
