"""Parity tests of mlpconv (forward and every gradient) on every backend, against the float64 reference.

Each case runs fastnin.ops.mlpconv under the backend of the `backend_device` fixture and compares
the output and the gradients of x, every weight and every bias with fastnin.reference.mlpconv in
float64 (same rounded inputs), with the tolerance rule of _utils.assert_close_rule (torch's own
result in the same dtype sets the bound). Shapes are small for the Triton interpreter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _utils import DTYPES, assert_close_rule, grads_of, leaf, make_layout, same_layout
from conftest import BACKEND_PARAMS, HAS_CUDA
from torch import nn

import fastnin
from fastnin import reference
from fastnin.ops import mlpconv_output_format

# The CPU kernel's first stage runs as im2col + GEMM or as Winograd F(2x2, 3x3) (stride 1; see
# csrc/cpu/winograd.h), chosen by shape; FASTNIN_CPU_CONV forces one. Every CPU case in this file
# runs under both: most test shapes are too narrow for the automatic choice to pick Winograd.
# The float products are fastnin's own GEMM where the CPU has AVX-512 (csrc/cpu/sgemm.h), MKL's
# elsewhere and for the weight-heavy calls' one tile; FASTNIN_CPU_GEMM=mkl forces MKL's, and every
# CPU case runs under both too (on a CPU without AVX-512 the two runs are the same).
MLPCONV_BACKEND_PARAMS = [
    pytest.param(("cpu", "cpu", "im2col"), id="cpu-im2col"),
    pytest.param(("cpu", "cpu", "winograd"), id="cpu-winograd"),
    pytest.param(("cpu", "cpu", "im2col+mkl"), id="cpu-im2col-mkl"),
    pytest.param(("cpu", "cpu", "winograd+mkl"), id="cpu-winograd-mkl"),
    *[pytest.param((*p.values[0], None), id=p.id, marks=p.marks) for p in BACKEND_PARAMS[1:]],
]


@pytest.fixture(params=MLPCONV_BACKEND_PARAMS)
def backend_device(request, monkeypatch):
    """(backend, device) with the backend in force, and for the CPU the first-stage algorithm and
    the GEMM."""
    backend, device, conv = request.param
    if conv is not None:
        conv, _, gemm = conv.partition("+")
        monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
        if gemm:
            monkeypatch.setenv("FASTNIN_CPU_GEMM", gemm)
        else:
            monkeypatch.delenv("FASTNIN_CPU_GEMM", raising=False)
    with fastnin.use_backend(backend):
        yield backend, device


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _interp(backend_device) -> bool:
    backend, device = backend_device
    return backend == "triton" and device == "cpu"


def make_params(cin, channels, kernel, device, dtype=torch.float32, bias=True, seed=0):
    """Weights scaled like kaiming (so activations stay O(1) through the stages) and biases.

    bias: True / False / a list of bools, one per stage (None bias where False)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    if isinstance(bias, bool):
        bias = [bias] * len(channels)
    ws, bs = [], []
    prev = cin
    for i, c in enumerate(channels):
        k = (kh, kw) if i == 0 else (1, 1)
        fan_in = prev * k[0] * k[1]
        w = torch.randn(c, prev, *k, generator=g) * math.sqrt(2.0 / max(fan_in, 1))
        ws.append(w.to(device=device, dtype=dtype))
        bs.append((torch.randn(c, generator=g) * 0.1).to(device=device, dtype=dtype) if bias[i] else None)
        prev = c
    return ws, bs


def make_x(n, c, h, w, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(device=device, dtype=dtype)


def run_case(
    x,
    ws,
    bs,
    stride,
    padding,
    gap=False,
    need_x=True,
    need_w=True,
    need_b=True,
    x_layout="contiguous",
    w_layout="contiguous",
    grad_out_kind="random",
    check_layout=True,
    grad_norm=None,
):
    """Run ours, torch-in-dtype and the float64 reference with gradients; compare all of them."""
    dtype = x.dtype
    xs = make_layout(x, x_layout)
    ws_l = [make_layout(w, w_layout) for w in ws]

    def leaves(xx, wws, bbs, to=None):
        cv = (lambda t: t if t is None else t.detach().to(to)) if to is not None else (lambda t: t)
        xl = leaf(cv(xx), need_x)
        wl = [leaf(cv(w), need_w) for w in wws]
        bl = [leaf(cv(b), need_b) for b in bbs]
        return xl, wl, bl

    # ours
    xo, wo, bo = leaves(xs, ws_l, bs)
    y = fastnin.ops.mlpconv(xo, wo, bo, stride, padding, gap=gap)
    # float64 reference from the same rounded values (contiguous copies: the layout is irrelevant)
    xr, wr, br = leaves(x, ws, bs, to=torch.float64)
    yr = reference.mlpconv(xr, wr, br, stride, padding, gap)
    # torch in the same dtype (and the same layouts, for the output-layout check); torch's CPU
    # convolution has float16 and bfloat16 kernels, so no fp32-and-round stand-in is needed
    xt, wt, bt = leaves(xs, ws_l, bs)
    yt = reference.mlpconv(xt, wt, bt, stride, padding, gap)

    assert y.dtype == dtype and y.device == x.device
    assert y.shape == yr.shape
    if check_layout and not gap:
        assert same_layout(y, yt), f"layout {y.stride()} vs torch {yt.stride()}"
        assert y.is_contiguous(memory_format=mlpconv_output_format(xs, ws_l[0]))
    assert_close_rule(y, yr, yt, "out")

    inputs = [xo, *wo, *bo]
    inputs_r = [xr, *wr, *br]
    inputs_t = [xt, *wt, *bt]
    if not any(t is not None and t.requires_grad for t in inputs):
        return y
    gen = torch.Generator().manual_seed(7)
    if grad_out_kind == "random":
        go64 = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(x.device)
        go = go64.to(dtype)
        go64 = go.double()
    elif grad_out_kind == "expanded":  # zero strides, as y.sum().backward() gives
        go = torch.ones((), dtype=dtype, device=x.device).expand(yr.shape)
        go64 = go.double()
    elif grad_out_kind == "channels_last":
        go = make_layout(torch.randn(yr.shape, generator=gen).to(device=x.device, dtype=dtype), "channels_last")
        go64 = go.double()
    else:
        raise ValueError(grad_out_kind)
    g = grads_of(y, inputs, go)
    gr = grads_of(yr, inputs_r, go64)
    gt = grads_of(yt, inputs_t, go)
    names = ["x"] + [f"weights[{i}]" for i in range(len(wo))] + [f"biases[{i}]" for i in range(len(bo))]
    for name, a, r, t, inp in zip(names, g, gr, gt, inputs):
        if inp is None or not inp.requires_grad:
            continue
        assert a is not None, name
        assert a.dtype == dtype and a.shape == inp.shape, name
        # Low-precision gradients: rms rule (see assert_close_rule); forward and fp32 stay on max.
        norm = grad_norm or ("max" if dtype == torch.float32 else "rms")
        assert_close_rule(a, r, t, f"grad {name}", norm=norm)
        if name == "x":
            fmt = mlpconv_output_format(xo, wo[0])
            assert a.is_contiguous(memory_format=fmt), f"grad x layout {a.stride()}"
    return y


# ----------------------------------------------------------------------------------------------
# forward + gradients over shapes
# ----------------------------------------------------------------------------------------------

# (N, Cin, H, W, channels, kernel, stride, padding)
CASES = [
    pytest.param((2, 3, 8, 8, [6, 5, 4], (3, 3), (1, 1), (1, 1)), id="3stage-3x3"),
    pytest.param((2, 3, 31, 29, [8, 6, 5], (5, 5), (1, 1), (2, 2)), id="3x31x29-5x5"),
    pytest.param((1, 1, 9, 7, [4, 3], (3, 2), (2, 1), (0, 2)), id="1ch-rect-s21-p02-2stage"),
    pytest.param((3, 4, 7, 10, [5], (2, 3), (1, 2), (1, 0)), id="1stage-rect"),
    pytest.param((2, 5, 6, 6, [7, 3, 2], (1, 1), (1, 1), (0, 0)), id="pointwise-1x1"),
    pytest.param((2, 3, 10, 9, [4, 4, 3], (4, 4), (3, 2), (2, 1)), id="stride32-pad21"),
    pytest.param((1, 3, 5, 4, [3, 2, 2], (5, 4), (1, 1), (0, 0)), id="kernel-equals-input"),
]
CASES_INTERP = [CASES[0], CASES[2], CASES[3]]


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_fp32(backend_device, case):
    backend, device = backend_device
    if _interp(backend_device) and case not in [c.values[0] for c in CASES_INTERP]:
        pytest.skip("shape list trimmed for the Triton interpreter")
    n, cin, h, w, chs, k, s, p = case
    x = make_x(n, cin, h, w, device)
    ws, bs = make_params(cin, chs, k, device)
    run_case(x, ws, bs, s, p)


def test_large_tiles_fp32(backend_device):
    """Images split into several tiles and many images per tile (the CPU kernel's two tilings,
    up to 512 pixels a tile here), more images than threads and fewer."""
    if _interp(backend_device):
        pytest.skip("too large for the Triton interpreter")
    _, device = backend_device
    for n, h, w in [(1, 40, 37), (5, 33, 30), (41, 5, 4)]:
        x = make_x(n, 6, h, w, device)
        ws, bs = make_params(6, [16, 12, 8], (3, 3), device)
        run_case(x, ws, bs, (1, 1), (1, 1))


@pytest.mark.parametrize("gemm", ["auto", "mkl"])
@pytest.mark.parametrize("conv", ["auto", "winograd", "im2col"])
@pytest.mark.parametrize(
    "block",
    [
        pytest.param((96, [192, 192, 192], (5, 5), (2, 2), 16, 4), id="cifar-block2-5x5"),
        pytest.param((192, [192, 192, 10], (3, 3), (1, 1), 8, 16), id="cifar-block3-3x3"),
    ],
)
def test_cpu_cifar_blocks_fp32(monkeypatch, block, conv, gemm):
    """The paper's CIFAR-10 NiN blocks 2 and 3 at full width (1024 output pixels a call: the
    smallest that auto runs through Winograd), fp32, on the CPU under each first-stage algorithm.
    The output is held to the max rule (Winograd's max error measured at these shapes: 1.7x / 1.3x
    torch's NCHW error on blocks 2 / 3, 0.8x / 0.7x its channels_last error; the rule allows 2x).

    The gradients are held to the rms rule: at this width the max rule measures which
    implementation's rounding happened to peak, not accuracy. Measured on block 3 over 4 seeds,
    torch's own channels_last gradients against its NCHW ones as the bound: grad x 1.4-2.0x,
    weights[1] 0.6-1.2x, weights[2] 0.7-1.25x of the bound; ours (im2col or Winograd) 0.4-1.2x."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
    monkeypatch.setenv("FASTNIN_CPU_GEMM", gemm)
    cin, chs, k, p, hw, n = block
    x = make_x(n, cin, hw, hw, "cpu").relu()  # a block's input is a ReLU's (pooled) output
    ws, bs = make_params(cin, chs, k, "cpu")
    with fastnin.use_backend("cpu"):
        run_case(x, ws, bs, (1, 1), p, x_layout="channels_last", grad_norm="rms")
        run_case(x, ws, bs, (1, 1), p, gap=True, grad_norm="rms")


@pytest.mark.parametrize("gemm", ["auto", "mkl"])
@pytest.mark.parametrize("conv", ["winograd", "im2col"])
def test_cpu_gemm_edges_fp32(monkeypatch, conv, gemm):
    """fastnin's own GEMM (csrc/cpu/sgemm.h) works in 8-row x 48-column blocks: stage widths of
    100 (two blocks and 4 columns), 40 (three masked vectors) and 17 (two), rows not a multiple of
    8 (126 output pixels), on one thread and on two. Every gradient, both layouts."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
    monkeypatch.setenv("FASTNIN_CPU_GEMM", gemm)
    x = make_x(2, 37, 9, 7, "cpu").relu()
    ws, bs = make_params(37, [100, 40, 17], (3, 3), "cpu")
    threads = torch.get_num_threads()
    try:
        for t in [1, 2]:
            torch.set_num_threads(t)
            with fastnin.use_backend("cpu"):
                run_case(x, ws, bs, (1, 1), (1, 1))
                run_case(x, ws, bs, (1, 1), (1, 1), x_layout="channels_last")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("conv", ["auto", "winograd"])
@pytest.mark.parametrize("n", [1, 3])
def test_cpu_weight_heavy_fp32(monkeypatch, conv, n):
    """Stage weights of >= 2^20 elements over few pixels (the ImageNet NiN's block 4 regime): the
    CPU kernel runs the call as one tile with MKL threading its products (im2col; forced Winograd
    keeps its own work items). Map and GAP outputs, both layouts, every gradient."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
    x = make_x(n, 256, 5, 5, "cpu").relu()
    ws, bs = make_params(256, [512, 512, 10], (3, 3), "cpu")
    assert sum(w.numel() for w in ws) >= 2**20
    with fastnin.use_backend("cpu"):
        run_case(x, ws, bs, (1, 1), (1, 1), grad_norm="rms")
        run_case(x, ws, bs, (1, 1), (1, 1), x_layout="channels_last", grad_norm="rms")
        run_case(x, ws, bs, (1, 1), (1, 1), gap=True, grad_norm="rms")


def test_cpu_winograd_large_weight(monkeypatch):
    """Forced Winograd with a 3x3 768 -> 768 weight: its transformed weight and weight-gradient
    buffers (16 x 768 x 768 floats, 38 MB) exceed what a thread keeps between calls (32 MB), so
    they take the call-owned path. Twice, so that a kept buffer from the first call is not
    mistaken for a fresh one."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", "winograd")
    x = make_x(2, 768, 4, 5, "cpu").relu()
    ws, bs = make_params(768, [768], (3, 3), "cpu")
    with fastnin.use_backend("cpu"):
        for _ in range(2):
            run_case(x, ws, bs, (1, 1), (1, 1), x_layout="channels_last", grad_norm="rms")


@pytest.mark.parametrize(
    "kernel", [(2, 2), (1, 3), (3, 1), (4, 6), (7, 7), (2, 5), (6, 3)], ids=lambda k: f"{k[0]}x{k[1]}"
)
def test_cpu_winograd_kernel_split(monkeypatch, kernel):
    """Forced Winograd on kernels other than 3x3 and 5x5: each dimension splits into 3x3
    sub-kernels, and point e's GEMM takes only the sub-kernels whose transform is not zero there
    (one without a third tap is zero on row / column 3). Even sizes leave some points with no
    sub-kernel at all; 7x7 mixes both kinds (3 sub-kernels, the last with a third tap). Forward and
    every gradient, odd map sizes, both layouts.

    In float64 (bound 1e-10 relative: a wrong or wrongly skipped sub-kernel errs by O(1)). These
    kernels run through Winograd only when forced, since in fp32 their rounding is not always
    within 2x torch's (2x2: 6 of 24 seeded cases over it on an AMD EPYC; see use_winograd); the
    fp32 rule is tested on the 3x3 and 5x5 kernels that the CPU backend picks Winograd for
    (test_forward_backward_fp32, test_cpu_winograd_fp32_seeds)."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", "winograd")
    kh, kw = kernel
    x = make_x(2, 5, 9 + kh % 2, 8 + kw % 2, "cpu", dtype=torch.float64)
    ws, bs = make_params(5, [7, 4], kernel, "cpu", dtype=torch.float64)
    with fastnin.use_backend("cpu"):
        run_case(x, ws, bs, (1, 1), (kh // 2, kw // 2))
        run_case(x, ws, bs, (1, 1), (kh // 2, kw // 2), x_layout="channels_last", w_layout="channels_last")


@pytest.mark.parametrize("kernel", [3, 5])
def test_cpu_winograd_fp32_seeds(monkeypatch, kernel):
    """The kernels the CPU backend runs through Winograd, in fp32 against the rule (2x torch's
    error + 1 ulp), over several seeds and both layouts: Winograd rounds more than a direct
    convolution, and one seed can pass by luck (forced 2x2 kernels failed 6 of 24 such cases)."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", "winograd")
    for seed in range(6):
        x = make_x(2, 5, 9, 8, "cpu", seed=seed + 1)
        ws, bs = make_params(5, [7, 4], (kernel, kernel), "cpu", seed=seed)
        with fastnin.use_backend("cpu"):
            for layout in ["contiguous", "channels_last"]:
                run_case(x, ws, bs, (1, 1), (kernel // 2, kernel // 2), x_layout=layout, w_layout=layout)


@pytest.mark.parametrize("conv", ["winograd", "im2col"])
def test_cpu_more_threads_than_items(monkeypatch, conv):
    """With more threads than 512-pixel work items the CPU kernel cuts smaller items (at least one
    per thread, down to 128 pixels; 64 for im2col): here 7 threads on 2 x 20 x 17 output pixels,
    images cut into bands, in both layouts and with GAP."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
    threads = torch.get_num_threads()
    torch.set_num_threads(7)
    try:
        x = make_x(2, 6, 20, 17, "cpu")
        ws, bs = make_params(6, [9, 7, 5], (3, 3), "cpu")
        with fastnin.use_backend("cpu"):
            run_case(x, ws, bs, (1, 1), (1, 1))
            run_case(x, ws, bs, (1, 1), (1, 1), x_layout="channels_last")
            run_case(x, ws, bs, (1, 1), (1, 1), gap=True)
    finally:
        torch.set_num_threads(threads)


def test_cpu_winograd_weight_cache(monkeypatch):
    """The CPU kernel keeps the transformed weights of recent calls per thread and reuses one when
    the weight matches byte for byte. It must notice a weight changed in place behind autograd's
    back (.data: same pointer, same version counter), the same bytes read with other strides, and
    more layers than it keeps (32 MB: each 3x3 256 -> 256 layer here holds 6.6 MB)."""
    monkeypatch.setenv("FASTNIN_CPU_CONV", "winograd")

    def check(x, ws, bs):
        y = fastnin.ops.mlpconv(x, ws, bs, 1, 1)
        r = reference.mlpconv(x.double(), [w.double() for w in ws], [b.double() for b in bs], (1, 1), (1, 1))
        assert_close_rule(y, r, reference.mlpconv(x, ws, bs, (1, 1), (1, 1)), "mlpconv")

    with fastnin.use_backend("cpu"), torch.no_grad():
        x = make_x(1, 8, 6, 5, "cpu")
        ws, bs = make_params(8, [6], (3, 3), "cpu")
        check(x, ws, bs)
        version = ws[0]._version
        ws[0].data.mul_(-0.5)  # in place, behind autograd: pointer and version unchanged
        assert ws[0]._version == version
        check(x, ws, bs)
        # the same bytes as channels_last strides: another weight
        cl_strides = ws[0].contiguous(memory_format=torch.channels_last).stride()
        w_cl = ws[0].reshape(-1).clone().as_strided(ws[0].shape, cl_strides)  # same memory, other meaning
        assert not torch.equal(w_cl, ws[0])
        check(x, [w_cl], bs)
        check(x, ws, bs)
        # six layers, more than the cache holds, twice round
        x = make_x(1, 256, 4, 4, "cpu")
        layers = [make_params(256, [256], (3, 3), "cpu", seed=i) for i in range(6)]
        for _ in range(2):
            for ws, bs in layers:
                check(x, ws, bs)


def test_cpu_conv_env_bad_value(monkeypatch):
    monkeypatch.setenv("FASTNIN_CPU_CONV", "fft")
    x = make_x(1, 3, 6, 6, "cpu")
    ws, bs = make_params(3, [4], (3, 3), "cpu")
    with fastnin.use_backend("cpu"), pytest.raises(ValueError, match="FASTNIN_CPU_CONV"):
        fastnin.ops.mlpconv(x, ws, bs, 1, 1)


def test_textbook_first_layer(backend_device):
    """The textbook NiN first layer: 11x11 stride 4, no padding (small batch, few channels)."""
    _, device = backend_device
    hw = 31 if _interp(backend_device) else 63
    chs = [8, 8, 8] if _interp(backend_device) else [24, 24, 24]
    x = make_x(2, 1, hw, hw, device)
    ws, bs = make_params(1, chs, (11, 11), device)
    run_case(x, ws, bs, (4, 4), (0, 0))


@pytest.mark.parametrize(
    "bias",
    [
        pytest.param([False, False, False], id="none"),
        pytest.param([True, False, True], id="middle-none"),
        pytest.param([False, True, True], id="first-none"),
    ],
)
def test_biases_none(backend_device, bias):
    _, device = backend_device
    x = make_x(2, 3, 7, 6, device)
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device, bias=bias)
    run_case(x, ws, bs, (1, 1), (1, 1))


@pytest.mark.parametrize(
    "x_layout,w_layout",
    [
        ("channels_last", "contiguous"),
        ("contiguous", "channels_last"),
        ("channels_last", "channels_last"),
        ("noncontig", "contiguous"),
        ("noncontig", "channels_last"),
    ],
)
def test_layouts(backend_device, x_layout, w_layout):
    """Non-contiguous and channels_last inputs/weights; the output (and grad_x) layout is torch's."""
    _, device = backend_device
    x = make_x(2, 4, 7, 9, device)
    ws, bs = make_params(4, [6, 5, 3], (3, 3), device)
    run_case(x, ws, bs, (1, 1), (1, 1), x_layout=x_layout, w_layout=w_layout)


@pytest.mark.parametrize("kind", ["expanded", "channels_last"])
def test_grad_out_strides(backend_device, kind):
    _, device = backend_device
    x = make_x(2, 3, 6, 7, device)
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device)
    run_case(x, ws, bs, (1, 1), (1, 1), grad_out_kind=kind)


@pytest.mark.parametrize("n", [0, 1])
def test_batch_0_and_1(backend_device, n):
    _, device = backend_device
    x = make_x(n, 3, 6, 5, device)
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device)
    y = run_case(x, ws, bs, (1, 1), (1, 1))
    assert y.shape == (n, 3, 6, 5)
    yg = run_case(x, ws, bs, (1, 1), (1, 1), gap=True)
    assert yg.shape == (n, 3)
    if n == 0:
        # gradients of an empty batch are zeros of the parameters' shapes
        xo = leaf(x)
        wo = [leaf(w) for w in ws]
        bo = [leaf(b) for b in bs]
        y = fastnin.ops.mlpconv(xo, wo, bo, 1, 1)
        y.sum().backward()
        assert xo.grad.shape == x.shape
        for t in wo + bo:
            assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_low_precision(backend_device, dtype, gap):
    """fp16/bf16: fp32 accumulation, within 2x torch's own error in that dtype (+1 ulp)."""
    _, device = backend_device
    x = make_x(2, 5, 9, 8, device, dtype)
    ws, bs = make_params(5, [12, 10, 6], (3, 3), device, dtype)
    run_case(x, ws, bs, (1, 1), (1, 1), gap=gap)
    run_case(x, ws, bs, (2, 1), (0, 1), gap=gap, x_layout="channels_last")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_block(backend_device, dtype):
    """A wider block (more channels), the shape class the kernels are tuned for, in every dtype."""
    _, device = backend_device
    if _interp(backend_device):
        n, cin, hw, chs = 1, 8, 6, [16, 16, 8]
    else:
        n, cin, hw, chs = 2, 24, 10, [48, 40, 24]
    x = make_x(n, cin, hw, hw, device, dtype)
    ws, bs = make_params(cin, chs, (5, 5), device, dtype)
    run_case(x, ws, bs, (1, 1), (2, 2), x_layout="channels_last")


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_gap(backend_device, stages):
    """gap=True: the mean over H and W of the last stage, fused; and its gradients."""
    _, device = backend_device
    chs = [6, 5, 4][:stages]
    x = make_x(3, 3, 7, 6, device)
    ws, bs = make_params(3, chs, (3, 3), device)
    y = run_case(x, ws, bs, (1, 1), (1, 1), gap=True)
    assert y.shape == (3, chs[-1]) and y.is_contiguous()
    if not _interp(backend_device):
        # images cut into several tiles, and many images per tile
        for n, hw in [(2, 41), (45, 5)]:
            x = make_x(n, 4, hw, hw, device)
            ws, bs = make_params(4, [8, 6, 5][:stages], (3, 3), device)
            run_case(x, ws, bs, (1, 1), (1, 1), gap=True, x_layout="channels_last")


@pytest.mark.parametrize(
    "need_x,need_w,need_b",
    [(False, True, True), (True, False, False), (True, False, True), (False, False, True), (True, True, False)],
)
@pytest.mark.parametrize("stages", [1, 3])
def test_output_mask(backend_device, need_x, need_w, need_b, stages):
    """Only the requested gradients (x without requires_grad: the first layer; frozen weights)."""
    _, device = backend_device
    x = make_x(2, 3, 6, 7, device)
    ws, bs = make_params(3, [6, 5, 4][:stages], (3, 3), device)
    run_case(x, ws, bs, (1, 1), (1, 1), need_x=need_x, need_w=need_w, need_b=need_b)


@pytest.mark.parametrize("frozen", ["weights", "biases", "all-params", "one-weight"])
def test_backward_kernel_asked_only_for_needed_grads(backend_device, monkeypatch, frozen):
    """The mask handed to the backward kernel follows requires_grad: a frozen layer (fine-tuning,
    an input gradient for a saliency map) costs no weight-gradient products. needs_input_grad holds
    one flag per element of a list argument; the mask must be their any(), not the list's truth."""
    backend, device = backend_device
    ns = _ns(backend)
    masks = []
    real = ns.mlpconv_backward

    def spy(*args):
        masks.append(list(args[-1]))
        return real(*args)

    monkeypatch.setattr(ns, "mlpconv_backward", spy)
    x = make_x(2, 3, 6, 7, device).requires_grad_()
    ws, bs = make_params(3, [6, 5], (3, 3), device)
    for t in [*ws, *bs]:
        t.requires_grad_()
    for t in {"weights": ws, "biases": bs, "all-params": ws + bs, "one-weight": ws[:1]}[frozen]:
        t.requires_grad_(False)
    y = fastnin.ops.mlpconv(x, ws, bs, 1, 1)
    grads = grads_of(y, [x, *ws, *bs], torch.ones_like(y))
    want = [True, frozen in ("biases", "one-weight"), frozen in ("weights", "one-weight")]
    assert masks == [want]
    assert [g is not None for g in grads] == [t.requires_grad for t in [x, *ws, *bs]]


def _ns(backend):
    if backend == "triton":
        fastnin._backend.load_triton()
        return torch.ops.fastnin_triton
    return torch.ops.fastnin


@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_backward_op_contract(backend_device, gap):
    """mlpconv_backward's outputs for every output_mask: empty [0] grad_x / [] lists when not
    requested, an empty [0] entry for a None bias, layouts of empty_like(weights)."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("no backward op")
    ns = _ns(backend)
    x = make_x(2, 3, 6, 5, device)
    ws, bs = make_params(3, [5, 4], (3, 3), device, bias=[True, False])
    ws[1] = ws[1].contiguous(memory_format=torch.channels_last)
    out = ns.mlpconv(x, ws, bs, [1, 1], [1, 1], gap)
    go = torch.randn_like(out)
    full = ns.mlpconv_backward(go, x, ws, bs, None if gap else out, [1, 1], [1, 1], gap, [True, True, True])
    for mask in [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]:
        gx, gws, gbs = ns.mlpconv_backward(go, x, ws, bs, None if gap else out, [1, 1], [1, 1], gap, list(mask))
        if mask[0]:
            torch.testing.assert_close(gx, full[0], rtol=0, atol=0)
        else:
            assert gx.shape == (0,)
        if mask[1]:
            assert len(gws) == 2
            for a, b, w in zip(gws, full[1], ws):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
                assert a.stride() == w.stride()
        else:
            assert gws == []
        if mask[2]:
            assert len(gbs) == 2 and gbs[1].shape == (0,)
            torch.testing.assert_close(gbs[0], full[2][0], rtol=0, atol=0)
        else:
            assert gbs == []
    if not gap:
        # without `out` the last stage is recomputed: same gradients
        again = ns.mlpconv_backward(go, x, ws, bs, None, [1, 1], [1, 1], False, [True, True, True])
        torch.testing.assert_close(again[0], full[0])
        for a, b in zip(again[1], full[1]):
            torch.testing.assert_close(a, b)


def test_deterministic(backend_device):
    """Bitwise-identical results from run to run."""
    _, device = backend_device
    n, hw = (2, 6) if _interp(backend_device) else (5, 23)
    x = make_x(n, 4, hw, hw, device)
    ws, bs = make_params(4, [8, 6, 5], (3, 3), device)
    res = []
    for _ in range(2):
        xo, wo, bo = leaf(x), [leaf(w) for w in ws], [leaf(b) for b in bs]
        y = fastnin.ops.mlpconv(xo, wo, bo, 1, 1)
        g = grads_of(y, [xo, *wo, *bo], torch.ones_like(y))
        res.append([y, *g])
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("conv", ["winograd", "im2col"])
def test_cpu_concurrent_python_threads(monkeypatch, conv):
    """Python threads calling mlpconv at once (an inference server, a DataLoader-side model): each
    gets exactly what it gets alone. The CPU kernels keep per-thread state (the transformed
    Winograd weights, scratch buffers), which must never be shared between threads."""
    import threading

    monkeypatch.setenv("FASTNIN_CPU_CONV", conv)
    jobs = []
    for i in range(4):  # 4x16x16 outputs of a 16-channel 3x3 stage: the Winograd path's domain
        x = make_layout(make_x(4, 16, 16, 16, "cpu", seed=i), "channels_last")
        ws, bs = make_params(16, [32, 24], (3, 3), "cpu", seed=10 + i)
        jobs.append((x, ws, bs))

    def run(job):
        x, ws, bs = (leaf(job[0]), [leaf(w) for w in job[1]], [leaf(b) for b in job[2]])
        out = fastnin.ops.mlpconv(x, ws, bs, 1, 1)
        return [out.detach(), *grads_of(out, [x, *ws, *bs], torch.ones_like(out))]

    alone = [run(job) for job in jobs]
    mismatches, errors = [], []

    def worker(k):
        try:
            for rep in range(6):
                i = (k + rep) % len(jobs)
                if not all(torch.equal(a, b) for a, b in zip(run(jobs[i]), alone[i])):
                    mismatches.append((k, rep, i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, mismatches


def test_nan_inf_propagation(backend_device):
    """NaN and Inf in x propagate as in the torch composition (relu keeps NaN)."""
    _, device = backend_device
    x = make_x(2, 3, 8, 7, device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 1] = float("inf")
    x[1, 2, 0, 6] = float("-inf")
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device)
    y = fastnin.ops.mlpconv(x, ws, bs, 1, 1)
    r = reference.mlpconv(x.double(), [w.double() for w in ws], [b.double() for b in bs], (1, 1), (1, 1))
    assert torch.equal(y.isnan(), r.isnan())
    assert torch.equal(y.isinf(), r.isinf())
    assert y.isnan().any() and y.isinf().any()
    fin = r.isfinite()
    assert_close_rule(y[fin], r[fin], reference.mlpconv(x, ws, bs, (1, 1), (1, 1))[fin], "finite part")
    yg = fastnin.ops.mlpconv(x, ws, bs, 1, 1, gap=True)
    rg = reference.mlpconv(x.double(), [w.double() for w in ws], [b.double() for b in bs], (1, 1), (1, 1), True)
    assert torch.equal(yg.isnan(), rg.isnan())


def test_nan_inf_grad_out_propagation(backend_device):
    """NaN and Inf in grad_out reach the same gradient elements as in the torch composition."""
    _, device = backend_device
    x = make_x(2, 3, 8, 7, device)
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device)
    go = torch.randn(2, 3, 8, 7, generator=torch.Generator().manual_seed(3)).to(device)
    go[0, 1, 2, 3] = float("nan")
    go[1, 0, 5, 1] = float("inf")
    ins = [leaf(t) for t in [x, *ws, *bs]]
    g = torch.autograd.grad(fastnin.ops.mlpconv(ins[0], ins[1:4], ins[4:], 1, 1), ins, go)
    r_ins = [leaf(t.double()) for t in [x, *ws, *bs]]
    r = torch.autograd.grad(reference.mlpconv(r_ins[0], r_ins[1:4], r_ins[4:], (1, 1), (1, 1)), r_ins, go.double())
    for a, b in zip(g, r):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


# ----------------------------------------------------------------------------------------------
# gradcheck / opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(backend_device, gap, bias):
    _, device = backend_device
    interp = _interp(backend_device)
    # every element of every input costs two forward runs: tiny shapes (tinier for the interpreter)
    n, h, w, chs = (1, 4, 3, [2, 2, 2]) if interp else (2, 5, 4, [3, 3, 2])
    x = make_x(n, 2, h, w, device, torch.float64).requires_grad_()
    ws, bs = make_params(2, chs, (3, 2), device, torch.float64, bias=bias)
    ws = [w.requires_grad_() for w in ws]
    bs = [b.requires_grad_() if b is not None else None for b in bs]
    nb = [b for b in bs if b is not None]

    def f(x, *params):
        w = list(params[:3])
        it = iter(params[3:])
        b = [next(it) if o is not None else None for o in bs]
        return fastnin.ops.mlpconv(x, w, b, (2, 1), (1, 1), gap=gap)

    assert torch.autograd.gradcheck(f, (x, *ws, *nb), eps=1e-6, atol=1e-6, fast_mode=interp)


@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_double_backward(backend_device, gap):
    """Gradients taken with create_graph=True are differentiable (a gradient penalty): the second
    derivatives equal the torch composition's in float64. The raw backward op itself has no
    derivative: differentiating through it raises instead of torch's warn-and-treat-as-constant."""
    _, device = backend_device
    x = make_x(1, 2, 5, 4, device, torch.float64)
    ws, bs = make_params(2, [3, 2], (3, 3), device, torch.float64)

    def penalty_grads(f):
        xl, wl, bl = leaf(x), [leaf(w) for w in ws], [leaf(b) for b in bs]
        first = torch.autograd.grad(f(xl, wl, bl).square().sum(), [xl, *wl, *bl], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return [g.detach() for g in first], torch.autograd.grad(penalty, [xl, *wl, *bl])

    first, second = penalty_grads(lambda x, w, b: fastnin.ops.mlpconv(x, w, b, 1, 1, gap=gap))
    first_ref, second_ref = penalty_grads(lambda x, w, b: reference.mlpconv(x, w, b, (1, 1), (1, 1), gap))
    for a, b in zip([*first, *second], [*first_ref, *second_ref]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    ns = _ns(backend_device[0])
    xl, wl = leaf(x), [leaf(w) for w in ws]
    out = fastnin.ops.mlpconv(x, ws, bs, 1, 1, gap=gap)
    gx, gws, _ = ns.mlpconv_backward(torch.ones_like(out), xl, wl, bs, None, [1, 1], [1, 1], gap, [True, True, False])
    with pytest.raises(RuntimeError, match="mlpconv_backward has no derivative of its own"):
        (gx.square().sum() + gws[0].sum()).backward()


@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_opcheck(backend_device, gap):
    backend, device = backend_device
    if backend != "cpu" and backend != "cuda":
        pytest.skip("opcheck runs on the C++ ops (Triton's fake-tensor test cannot run in the interpreter)")
    x = make_x(2, 3, 6, 5, device).requires_grad_()
    ws, bs = make_params(3, [5, 4, 3], (3, 3), device, bias=[True, False, True])
    ws = [w.requires_grad_() for w in ws]
    bs = [b.requires_grad_() if b is not None else None for b in bs]
    torch.library.opcheck(torch.ops.fastnin.mlpconv.default, (x, ws, bs, [1, 1], [1, 1], gap))
    xc = make_layout(x.detach(), "channels_last").requires_grad_()
    torch.library.opcheck(torch.ops.fastnin.mlpconv.default, (xc, ws, bs, [2, 1], [0, 1], gap))
    out = torch.ops.fastnin.mlpconv(x.detach(), [w.detach() for w in ws], [b if b is None else b.detach() for b in bs],
                                    [1, 1], [1, 1], gap)
    go = torch.randn_like(out)
    for mask in [[True, True, True], [False, True, False], [True, False, True]]:
        torch.library.opcheck(
            torch.ops.fastnin.mlpconv_backward.default,
            (go, x.detach(), [w.detach() for w in ws], [b if b is None else b.detach() for b in bs],
             None if gap else out, [1, 1], [1, 1], gap, mask),
        )


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def _bad_cases(device):
    x = make_x(1, 3, 6, 6, device)
    ws, bs = make_params(3, [4, 5, 2], (3, 3), device)
    w0, w1, w2 = ws
    b0, b1, b2 = bs
    w1_wide = torch.cat([w1, w1[:, :1]], 1)  # 5 input channels after a 4-channel stage
    cases = [
        ("x", dict(x=x[0])),  # wrong rank
        ("weights\\[0\\]", dict(weights=[w0[0], w1, w2])),  # weight rank
        ("weights\\[0\\] has 3 input channels but x has 2", dict(x=x[:, :2])),  # channel mismatch x / w0
        ("weights\\[1\\] has 5 input channels but weights\\[0\\]", dict(weights=[w0, w1_wide, w2])),
        ("weights\\[1\\] must be 1x1", dict(weights=[w0, w1.expand(5, 4, 2, 2).contiguous(), w2])),
        ("biases\\[1\\] must have shape", dict(biases=[b0, b1[:3], b2])),
        ("biases\\[2\\] must have shape", dict(biases=[b0, b1, b2[None]])),
        ("3 weights but 2 biases", dict(biases=[b0, b1])),
        ("expected 1 to 3 weights, got 0", dict(weights=[], biases=[])),
        ("expected 1 to 3 weights, got 4", dict(weights=[w0, w1, w2, w2], biases=[b0, b1, b2, b2])),
        ("x must be a floating-point", dict(x=x.to(torch.int32))),
        ("x must be a floating-point", dict(x=x.bool())),
        ("weights\\[1\\] has dtype", dict(weights=[w0, w1.to(torch.int64), w2])),
        ("weights\\[2\\] has dtype", dict(weights=[w0, w1, w2.double()])),
        ("biases\\[0\\] has dtype", dict(biases=[b0.double(), b1, b2])),
        ("weights\\[0\\] is on meta", dict(weights=[w0.to("meta"), w1, w2])),
        ("padding must be >= 0", dict(padding=[-1, 0])),
        ("stride must be >= 1", dict(stride=[1, 0])),
        ("kernel is larger than the padded input", dict(x=x[:, :, :2, :], padding=[0, 0])),
        ("output size would be", dict(x=make_x(1, 3, 2, 6, device), padding=[0, 1])),
        # torch rejects an empty map even where the padding alone would give an output
        ("x must have a non-empty spatial size, got 0x6", dict(x=x[:, :, :0, :])),
        ("x must have a non-empty spatial size, got 6x0", dict(x=x[:, :, :, :0])),
    ]
    if device == "cuda":
        cases.append(("weights\\[1\\] is on cpu", dict(weights=[w0, w1.cpu(), w2])))
    base = dict(x=x, weights=ws, biases=bs, stride=[1, 1], padding=[1, 1])
    return base, cases


@pytest.mark.parametrize("via", ["ops", "torch.ops"])
def test_bad_input(backend_device, via):
    backend, device = backend_device
    base, cases = _bad_cases(device)
    for match, change in cases:
        args = {**base, **change}
        with pytest.raises(ValueError, match=match):
            if via == "ops":
                fastnin.ops.mlpconv(args["x"], args["weights"], args["biases"], args["stride"], args["padding"])
            else:
                if backend == "torch":
                    pytest.skip("no op for the torch backend")
                _ns(backend).mlpconv(args["x"], args["weights"], args["biases"], args["stride"], args["padding"], False)


def test_bad_input_python_types(backend_device):
    _, device = backend_device
    x = make_x(1, 3, 6, 6, device)
    ws, bs = make_params(3, [4], (3, 3), device)
    with pytest.raises(ValueError, match="stride"):
        fastnin.ops.mlpconv(x, ws, bs, 1.5, 1)
    with pytest.raises(ValueError, match="padding"):
        fastnin.ops.mlpconv(x, ws, bs, 1, (1, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        fastnin.ops.mlpconv(x, ws[0], bs, 1, 1)


def test_bad_input_backward_op(backend_device):
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("no backward op")
    ns = _ns(backend)
    x = make_x(1, 3, 6, 6, device)
    ws, bs = make_params(3, [4, 2], (3, 3), device)
    out = ns.mlpconv(x, ws, bs, [1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="grad_out"):
        ns.mlpconv_backward(out[:, :1], x, ws, bs, out, [1, 1], [1, 1], False, [True, True, True])
    with pytest.raises(ValueError, match="grad_out"):
        ns.mlpconv_backward(out.double(), x, ws, bs, out, [1, 1], [1, 1], False, [True, True, True])
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        ns.mlpconv_backward(out, x, [ws[0], ws[1][:, :3]], bs, out, [1, 1], [1, 1], False, [True, True, True])


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


def test_module_loads_plain_sequential(backend_device):
    """fastnin.nn.MLPConv takes the state_dict of the plain nin block and computes the same thing."""
    _, device = backend_device
    torch.manual_seed(0)
    cin, chs = (3, [8, 6, 5]) if _interp(backend_device) else (6, [24, 16, 12])
    plain = nn.Sequential(
        nn.Conv2d(cin, chs[0], 5, 1, 2), nn.ReLU(), nn.Conv2d(chs[0], chs[1], 1), nn.ReLU(),
        nn.Conv2d(chs[1], chs[2], 1), nn.ReLU(),
    ).to(device)
    fused = fastnin.nn.MLPConv(cin, chs, 5, 1, 2).to(device)
    assert set(fused.state_dict()) == set(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    x = make_x(2, cin, 9, 10, device).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    plain64 = copy.deepcopy(plain).double()
    y, yt, yr = fused(x), plain(x), plain64(x64)
    assert_close_rule(y, yr, yt, "module out")
    go = torch.randn_like(y)
    g = grads_of(y, [x, *fused.parameters()], go)
    gt = grads_of(yt, [x, *plain.parameters()], go)
    gr = grads_of(yr, [x64, *plain64.parameters()], go.double())
    for name, a, t, r in zip(["x"] + [n for n, _ in fused.named_parameters()], g, gt, gr):
        assert_close_rule(a, r, t, f"module grad {name}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_tensor_on_cpu_backend():
    x = torch.randn(1, 3, 6, 6, device="cuda")
    ws, bs = make_params(3, [4], (3, 3), "cuda")
    with fastnin.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu'"):
        fastnin.ops.mlpconv(x, ws, bs, 1, 1)

