"""CUDA-specific tests of the CUDA C++ kernels (csrc/cuda/*.cu): every kernel path, dtype and layout
against fastnin.reference in float64, plus what only a GPU can show: TF32 on/off, channel counts up to
1024 (the shared-memory split of the mlpconv chain), int64 indexing past 2^31 elements, a non-default
stream, a second device, and bitwise determinism.

The generic parity matrix of each op on the "cuda" backend lives in test_mlpconv.py / test_lrn.py /
test_gap.py; here each test forces one kernel path, so that a failure names the kernel, path and
dtype in its test id (e.g. test_mlpconv_path[tc-bfloat16-3stage]):

  mlpconv   path "tc"   tensor cores: wmma bf16/fp16, wmma TF32 for float32 (allow_tf32 on)
            path "simt" FASTNIN_CUDA_SIMT=1 (float32 without TF32 and float64 always take it)
            FASTNIN_CUDA_MLPCONV_SPLIT=1 forces one stage per launch (global intermediates)
  lrn       FASTNIN_CUDA_LRN=column|pixel|generic
  gap       16-byte vector vs scalar loads (by alignment), NCHW rows / channels_last, long rows

Tests marked `sanitize` are the small ones that benchmarks/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck). All tests here need a GPU (skipped without one).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

import fastnin
from fastnin import reference

from _utils import assert_close_rule, grads_of, leaf, make_layout, max_err, same_layout

pytestmark = pytest.mark.needs_cuda

DEV = "cuda"
LOW = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@contextlib.contextmanager
def env(**kv):
    """Set FASTNIN_CUDA_* switches for the enclosed calls (the C++ side reads them at every call)."""
    old = {k: os.environ.get(k) for k in kv}
    try:
        for k, v in kv.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tf32(on: bool):
    """torch.backends.cudnn.allow_tf32 (what fastnin's float32 mlpconv follows); the conftest
    fixture restores both flags after the test."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------
# mlpconv
# ------------------------------------------------------------------------------------------------

# (id, N, Cin, H, W, channels, kernel, stride, padding, gap, bias_none, layout)
MLP_CASES = {
    # three stages, every channel count below one 64-column chunk (padding columns), odd map
    "3stage": (2, 3, 9, 7, [8, 6, 5], (3, 3), (1, 1), (1, 1), False, (), "contiguous"),
    # two 64-column chunks per stage, Cin % 8 == 0 (16-byte gathers), stride 2, a None bias
    "wide-s2": (3, 16, 8, 8, [70, 65], (3, 3), (2, 2), (1, 1), False, (1,), "contiguous"),
    # one stage (conv + bias + ReLU), K0 = 125 = 3 full K steps + a tail, rectangular padding
    "1stage-k5": (2, 5, 13, 11, [96], (5, 5), (1, 1), (2, 1), False, (), "contiguous"),
    # gap=True: M = 180 rows, 64-row tiles straddle images
    "gap": (5, 4, 6, 6, [9, 7, 10], (3, 3), (1, 1), (1, 1), True, (), "contiguous"),
    # the textbook NiN stem: 11x11 stride 4, no padding
    "k11s4": (2, 3, 27, 27, [12, 8, 4], (11, 11), (4, 4), (0, 0), False, (0,), "contiguous"),
    # channels_last input (NHWC output rows), rectangular kernel and stride
    "cl": (2, 8, 10, 9, [16, 12, 7], (3, 2), (2, 1), (1, 0), False, (), "channels_last"),
}

# (path, dtype): float64 and float32-without-TF32 only exist on the SIMT path.
MLP_PATHS = [
    ("simt", torch.float64),
    ("simt", torch.float32),
    ("tc", torch.float32),  # TF32
    ("simt", torch.float16),
    ("tc", torch.float16),
    ("simt", torch.bfloat16),
    ("tc", torch.bfloat16),
]


def _mlp_inputs(case, seed=0):
    N, Cin, H, W, chans, k, stride, padding, gap, bias_none, layout = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    ws, bs = [], []
    prev = Cin
    for i, c in enumerate(chans):
        kh, kw = k if i == 0 else (1, 1)
        fan_in = prev * kh * kw
        ws.append(torch.randn(c, prev, kh, kw, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5)
        bs.append(None if i in bias_none else 0.1 * torch.randn(c, generator=g, dtype=torch.float64))
        prev = c
    return x, ws, bs


def _mlp_call(impl, x, ws, bs, stride, padding, gap, gout):
    """Forward and all gradients (x, weights, biases) of impl."""
    xl = leaf(x)
    wl = [leaf(w) for w in ws]
    bl = [leaf(b) for b in bs]
    out = impl(xl, wl, bl)
    grads = grads_of(out, [xl, *wl, *bl], gout)
    return out.detach(), grads


def _ours(stride, padding, gap):
    def f(x, ws, bs):
        with fastnin.use_backend("cuda"):
            return fastnin.mlpconv(x, ws, bs, stride, padding, gap=gap)

    return f


def _ref(stride, padding, gap):
    return lambda x, ws, bs: reference.mlpconv(x, ws, bs, stride, padding, gap)


def _tf32_floor(x, ws, bs, stride, padding, gap, gout):
    """Per result, 16 * 2^-11 * max of the same chain run on |x|, |w|, |b| with |grad_out| (float64):
    a bound on the sum of |terms| behind every value, times the TF32 rounding of a few GEMM inputs.
    Used as the least tolerance of the TF32 path, whatever algorithm cuDNN picked for torch's own
    TF32 result (a fp32 algorithm would make the 2x-torch rule impossible to meet)."""
    out, grads = _mlp_call(
        _ref(stride, padding, gap), x.abs(), [w.abs() for w in ws], [None if b is None else b.abs() for b in bs],
        stride, padding, gap, gout.abs(),
    )
    u = 2.0**-11
    return [16 * u * t.abs().max().item() if t is not None and t.numel() else 0.0 for t in [out, *grads]]


def _names(n_w):
    return ["out", "grad_x"] + [f"grad_w{i}" for i in range(n_w)] + [f"grad_b{i}" for i in range(n_w)]


def check_mlpconv(case, dtype, path, seed=0, extra_env=None):
    """Run ours (on `path`) and compare forward + every gradient with the float64 reference by the
    tolerance rule (TF32: torch's own TF32 result, floored by _tf32_floor). Returns ours."""
    N, Cin, H, W, chans, k, stride, padding, gap, bias_none, layout = case
    x64, ws64, bs64 = _mlp_inputs(case, seed)
    # round the inputs to dtype first: the reference sees exactly what the kernels see
    x = make_layout(x64.to(dtype), layout).to(DEV)
    ws = [w.to(dtype).to(DEV) for w in ws64]
    bs = [None if b is None else b.to(dtype).to(DEV) for b in bs64]
    out_shape = (N, chans[-1]) if gap else None
    g = torch.Generator().manual_seed(seed + 1)
    if out_shape is None:
        with torch.no_grad():
            out_shape = reference.mlpconv(x64[:, :, :, :], ws64, bs64, stride, padding, False).shape
    gout = torch.randn(*out_shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)

    use_tc = path == "tc"
    env_kv = {"FASTNIN_CUDA_SIMT": None if use_tc else "1"}
    env_kv.update(extra_env or {})
    with env(**env_kv), tf32(use_tc and dtype == torch.float32):
        ours, ours_g = _mlp_call(_ours(stride, padding, gap), x, ws, bs, stride, padding, gap, gout)
        same, same_g = (None, [None] * len(ours_g))
        if dtype != torch.float64:
            same, same_g = _mlp_call(_ref(stride, padding, gap), x, ws, bs, stride, padding, gap, gout)
    with tf32(False):
        x_d, gout_d = x.double(), gout.double()
        ws_d = [w.double() for w in ws]
        bs_d = [b.double() if b is not None else None for b in bs]
        ref, ref_g = _mlp_call(_ref(stride, padding, gap), x_d, ws_d, bs_d, stride, padding, gap, gout_d)
        floors = None
        if use_tc and dtype == torch.float32:
            floors = _tf32_floor(x_d, ws_d, bs_d, stride, padding, gap, gout_d)

    assert ours.dtype == dtype and ours.shape == ref.shape
    if not gap:
        torch_out = reference.mlpconv(x, ws, bs, stride, padding, False)
        assert same_layout(ours, torch_out), "output layout differs from torch's"
    names = ["out", "grad_x"] + [f"grad_w{i}" for i in range(len(ws))] + [f"grad_b{i}" for i in range(len(bs))]
    results = [ours, *ours_g]
    refs = [ref, *ref_g]
    sames = [same, *same_g]
    for i, (name, o, r, s) in enumerate(zip(names, results, refs, sames)):
        if r is None:
            assert o is None, f"{name}: a gradient where none was expected"
            continue
        assert o is not None, f"{name}: missing"
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        if floors is not None:
            err = max_err(o, r)
            base = max_err(s, r)
            bound = max(2 * base + torch.finfo(dtype).eps * r.abs().max().item(), floors[i])
            assert err <= bound, f"{name}: TF32 max error {err:.3g} > {bound:.3g} (torch TF32 {base:.3g})"
        else:
            assert_close_rule(o, r, s, name)
    return [ours, *ours_g]


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["3stage", "gap"])
@pytest.mark.parametrize("path,dtype", [("tc", torch.bfloat16), ("simt", torch.float32), ("simt", torch.float64)],
                         ids=["tc-bfloat16", "simt-float32", "simt-float64"])
def test_mlpconv_sanitize(case, path, dtype):
    check_mlpconv(MLP_CASES[case], dtype, path)


@pytest.mark.parametrize("case", list(MLP_CASES))
@pytest.mark.parametrize("path,dtype", MLP_PATHS, ids=[f"{p}-{NAMES[d]}" for p, d in MLP_PATHS])
def test_mlpconv_path(case, path, dtype):
    check_mlpconv(MLP_CASES[case], dtype, path)


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["3stage", "gap", "cl"])
@pytest.mark.parametrize("path,dtype", [("tc", torch.bfloat16), ("simt", torch.float64)],
                         ids=["tc-bfloat16", "simt-float64"])
def test_mlpconv_forced_split_is_bitwise_equal(case, path, dtype):
    """One stage per launch (intermediates through global memory) gives the same bits as the fused
    chain: same arithmetic, same rounding, only the h tiles' home changes."""
    fused = check_mlpconv(MLP_CASES[case], dtype, path)
    split = check_mlpconv(MLP_CASES[case], dtype, path, extra_env={"FASTNIN_CUDA_MLPCONV_SPLIT": "1"})
    for name, a, b in zip(_names(len(MLP_CASES[case][4])), fused, split):
        if a is not None:
            assert torch.equal(a, b), f"{name}: split and fused results differ"


# channel counts up to 1024: the chain no longer fits shared memory in one launch (bf16 fuses
# stages 0+1, fp32 runs every stage alone); ImageNet NiN's last block shape at a tiny batch.
WIDE = {
    "1024x3": (2, 8, 6, 6, [1024, 1024, 1000], (3, 3), (1, 1), (1, 1), False, (), "contiguous"),
    "1024x3-gap": (3, 8, 6, 6, [1024, 1024, 1000], (3, 3), (1, 1), (1, 1), True, (), "channels_last"),
    "384-1024": (2, 384, 5, 5, [1024, 384], (3, 3), (1, 1), (1, 1), False, (), "channels_last"),
}


@pytest.mark.parametrize("case", list(WIDE))
@pytest.mark.parametrize("path,dtype", [("tc", torch.bfloat16), ("tc", torch.float16), ("tc", torch.float32),
                                        ("simt", torch.float32)],
                         ids=["tc-bfloat16", "tc-float16", "tc-float32", "simt-float32"])
def test_mlpconv_wide_channels(case, path, dtype):
    check_mlpconv(WIDE[case], dtype, path)


def _k5_float32_case():
    """The 1-stage 5x5 case in float32 on the GPU, and its float64 reference (stride 1, padding (2, 1))."""
    x64, ws64, bs64 = _mlp_inputs(MLP_CASES["1stage-k5"])
    x = x64.float().to(DEV)
    ws = [w.float().to(DEV) for w in ws64]
    bs = [b.float().to(DEV) for b in bs64]
    ref = reference.mlpconv(x.double(), [w.double() for w in ws], [b.double() for b in bs], (1, 1), (2, 1))
    return x, ws, bs, ref


def test_mlpconv_tf32_flag_is_followed():
    """float32 with allow_tf32 off must be exact fp32 (errors at fp32 level, far below TF32's)."""
    x, ws, bs, ref = _k5_float32_case()
    with env(FASTNIN_CUDA_SIMT=None), fastnin.use_backend("cuda"):
        with tf32(False):
            exact = fastnin.mlpconv(x, ws, bs, 1, (2, 1))
        with tf32(True):
            fast = fastnin.mlpconv(x, ws, bs, 1, (2, 1))
    scale = ref.abs().max().item()
    assert max_err(exact, ref) < 1e-5 * scale
    # TF32 keeps 10 mantissa bits: with 125-term sums its error is far above fp32's
    assert max_err(fast, ref) > 1e-5 * scale, "allow_tf32=True did not take the TF32 path"


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no per-op fp32_precision flags")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_mlpconv_follows_the_per_op_conv_precision(backend):
    """torch.backends.cudnn.conv.fp32_precision = "ieee" leaves the legacy cudnn flag raising
    (conv and rnn disagree); torch's convolutions still run, and so must fastnin's, in IEEE fp32."""
    if backend == "triton":
        pytest.importorskip("triton")
    x, ws, bs, ref = _k5_float32_case()
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    try:
        conv.fp32_precision = "ieee"
        with env(FASTNIN_CUDA_SIMT=None), fastnin.use_backend(backend):
            out = fastnin.mlpconv(x, ws, bs, 1, (2, 1))
    finally:
        conv.fp32_precision = old
    assert max_err(out, ref) < 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_mlpconv_backward_output_mask(mask):
    """Only what output_mask asks for is computed; what is computed matches the full backward."""
    case = MLP_CASES["3stage"]
    x64, ws64, bs64 = _mlp_inputs(case)
    x = x64.float().to(DEV)
    ws = [w.float().to(DEV) for w in ws64]
    bs = [b.float().to(DEV) for b in bs64]
    # our own forward output: its ReLU mask is bitwise the one the backward recomputes when out=None
    out = torch.ops.fastnin.mlpconv(x, ws, bs, [1, 1], [1, 1], False)
    gout = torch.randn_like(out)
    full = torch.ops.fastnin.mlpconv_backward(gout, x, ws, bs, out, [1, 1], [1, 1], False, [True, True, True])
    part = torch.ops.fastnin.mlpconv_backward(gout, x, ws, bs, out, [1, 1], [1, 1], False, list(mask))
    if mask[0]:
        assert torch.equal(part[0], full[0])
    else:
        assert part[0].numel() == 0
    assert (len(part[1]) == 3) == mask[1] and (len(part[2]) == 3) == mask[2]
    for a, b in zip(part[1], full[1]):
        assert torch.equal(a, b)
    for a, b in zip(part[2], full[2]):
        assert torch.equal(a, b)
    # out=None (not kept) recomputes the last stage: same bits
    again = torch.ops.fastnin.mlpconv_backward(gout, x, ws, bs, None, [1, 1], [1, 1], False, [True, True, True])
    for a, b in zip([again[0], *again[1], *again[2]], [full[0], *full[1], *full[2]]):
        assert torch.equal(a, b)


def test_mlpconv_nan_propagates_like_torch():
    case = MLP_CASES["3stage"]
    x64, ws64, bs64 = _mlp_inputs(case)
    x64[0, 1, 3, 2] = float("nan")
    x = x64.to(DEV)
    ws = [w.to(DEV) for w in ws64]
    bs = [b.to(DEV) for b in bs64]
    # the CPU's im2col + GEMM spreads the NaN exactly over its receptive field (a cuDNN Winograd or
    # FFT algorithm would smear it further)
    ref = reference.mlpconv(x64, ws64, bs64, (1, 1), (1, 1)).to(DEV)
    with fastnin.use_backend("cuda"):
        ours = fastnin.mlpconv(x, ws, bs, 1, 1)
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(ours.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.allclose(ours[ok], ref[ok], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# LRN
# ------------------------------------------------------------------------------------------------

# (id, shape, size, alpha, beta, k, layout)
LRN_CASES = {
    "s5-b075": ((2, 13, 5, 7), 5, 0.5, 0.75, 2.0, "contiguous"),
    "s5-cl": ((2, 13, 5, 7), 5, 0.5, 0.75, 2.0, "channels_last"),
    "s2-beta06": ((3, 3, 4, 6), 2, 0.8, 0.6, 1.0, "contiguous"),
    "size-gt-C": ((2, 4, 3, 5), 6, 1.0, 0.75, 1.0, "channels_last"),
    "size1": ((2, 5, 3, 3), 1, 0.3, 0.75, 1.0, "contiguous"),
    "s40-C37": ((2, 37, 3, 4), 40, 2.0, 0.9, 1.5, "contiguous"),
    "3d": ((3, 7, 10), 3, 0.5, 0.75, 1.0, "contiguous"),
    "5d": ((2, 6, 3, 4, 2), 4, 0.5, 0.7, 1.2, "contiguous"),
    "noncontig": ((2, 9, 5, 8), 5, 0.5, 0.75, 2.0, "noncontig"),
}
LRN_PATHS = ["column", "pixel", "generic"]


def check_lrn(case, dtype, path, seed=0):
    shape, size, alpha, beta, k, layout = case
    g = torch.Generator().manual_seed(seed)
    x = make_layout(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype), layout).to(DEV)
    gout = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)

    def ours_f(t):
        with fastnin.use_backend("cuda"):
            return fastnin.local_response_norm(t, size, alpha, beta, k)

    def ref_f(t):
        return reference.local_response_norm(t, size, alpha, beta, k)

    with env(FASTNIN_CUDA_LRN=path):
        xl = leaf(x)
        ours = ours_f(xl)
        (ours_gx,) = grads_of(ours, [xl], gout)
    xd = leaf(x.double())
    ref = ref_f(xd)
    (ref_gx,) = grads_of(ref, [xd], gout.double())
    same = same_gx = None
    if dtype != torch.float64:
        xs = leaf(x)
        same = ref_f(xs)
        (same_gx,) = grads_of(same, [xs], gout)
    if layout != "noncontig":
        assert same_layout(ours, ref_f(x)), "output layout differs from torch's"
    assert_close_rule(ours.detach(), ref, same, "out")
    assert_close_rule(ours_gx, ref_gx, same_gx, "grad_x")
    return ours.detach(), ours_gx


@pytest.mark.sanitize
@pytest.mark.parametrize("path", LRN_PATHS)
@pytest.mark.parametrize("case", ["s5-b075", "s5-cl"])
def test_lrn_sanitize(path, case):
    check_lrn(LRN_CASES[case], torch.float32, path)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("path", LRN_PATHS)
@pytest.mark.parametrize("case", list(LRN_CASES))
def test_lrn_path(case, path, dtype):
    check_lrn(LRN_CASES[case], dtype, path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: NAMES[d])
def test_lrn_big_window_falls_back_to_generic(dtype):
    """size 200 over 300 channels: the column kernel's rings (256 slots) exceed 48 KB for the
    backward (and for the float64 forward): the generic kernels serve, by default."""
    check_lrn(((2, 300, 3, 3), 200, 1.0, 0.75, 1.0, "contiguous"), dtype, "")
    check_lrn(((2, 300, 3, 3), 200, 1.0, 0.75, 1.0, "channels_last"), dtype, "")


def test_lrn_window_sum_has_no_cancellation():
    """A huge value followed by tiny ones: a running add/subtract window sum in fp32 would leave
    garbage of the order of 1e30 * 2^-24 behind the huge value; exact window sums do not."""
    x = torch.full((1, 40, 1, 1), 1e-3, dtype=torch.float32, device=DEV)
    x[0, 3] = 1e15
    for path in LRN_PATHS:
        with env(FASTNIN_CUDA_LRN=path), fastnin.use_backend("cuda"):
            y = fastnin.local_response_norm(x, 5, 1.0, 0.75, 1.0)
        ref = reference.local_response_norm(x.double(), 5, 1.0, 0.75, 1.0)
        rel = ((y.double() - ref).abs() / ref.abs()).max().item()
        assert rel < 1e-5, f"{path}: relative error {rel:.3g}"


# ------------------------------------------------------------------------------------------------
# GAP
# ------------------------------------------------------------------------------------------------


def _misaligned(t):
    """The same values at an odd element offset (not 16-byte aligned): the scalar load path."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


# (id, shape, layout): which load path each one takes is in the comment
GAP_CASES = {
    "nchw-vec": ((4, 6, 8, 8), "contiguous"),  # HW = 64: 16-byte rows
    "nchw-odd": ((3, 5, 7, 5), "contiguous"),  # HW = 35: scalar
    "nchw-misaligned": ((3, 5, 8, 8), "misaligned"),
    "nchw-long": ((2, 3, 50, 47), "contiguous"),  # HW >= 2048: a block per row
    "cl-vec": ((4, 16, 5, 7), "channels_last"),  # C % 8 == 0: 16-byte channel vectors
    "cl-odd": ((3, 10, 6, 6), "channels_last"),  # C = 10: scalar
    "cl-wide": ((2, 1000, 3, 3), "channels_last"),
    "noncontig": ((2, 6, 5, 6), "noncontig"),
}


def check_gap(case, dtype, seed=0):
    shape, layout = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    x = _misaligned(x) if layout == "misaligned" else make_layout(x, layout)
    gout = torch.randn(shape[0], shape[1], generator=g, dtype=torch.float64).to(dtype).to(DEV)
    xl = leaf(x)
    with fastnin.use_backend("cuda"):
        ours = fastnin.global_avg_pool2d(xl)
    (ours_gx,) = grads_of(ours, [xl], gout)
    xd = leaf(x.double())
    ref = reference.global_avg_pool2d(xd)
    (ref_gx,) = grads_of(ref, [xd], gout.double())
    same = same_gx = None
    if dtype != torch.float64:
        xs = leaf(x)
        same = reference.global_avg_pool2d(xs)
        (same_gx,) = grads_of(same, [xs], gout)
    assert ours.is_contiguous() and ours.shape == shape[:2]
    assert_close_rule(ours.detach(), ref, same, "out")
    assert_close_rule(ours_gx, ref_gx, same_gx, "grad_x")
    return ours.detach(), ours_gx


@pytest.mark.sanitize
@pytest.mark.parametrize("case", list(GAP_CASES))
def test_gap_sanitize(case):
    check_gap(GAP_CASES[case], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("case", list(GAP_CASES))
def test_gap_path(case, dtype):
    check_gap(GAP_CASES[case], dtype)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=lambda d: NAMES[d])
def test_gap_backward_layouts_and_expanded_grad(channels_last, dtype):
    N, C, H, W = 3, 12, 5, 7
    g = torch.randn(N, 1, dtype=dtype, device=DEV).expand(N, C)  # zero stride
    ours = torch.ops.fastnin.gap_backward(g, [N, C, H, W], channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = (g.to(acc) / (H * W)).to(dtype)[:, :, None, None].expand(N, C, H, W)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(ours, want), "gap_backward is grad / (H*W) in fp32 (fp64), rounded once"


# ------------------------------------------------------------------------------------------------
# Cross-cutting: empty tensors, streams, devices, determinism, int64 indexing
# ------------------------------------------------------------------------------------------------


def test_empty_tensors():
    with fastnin.use_backend("cuda"):
        x = torch.randn(0, 3, 5, 5, device=DEV, requires_grad=True)
        w = [torch.randn(4, 3, 3, 3, device=DEV, requires_grad=True), torch.randn(2, 4, 1, 1, device=DEV)]
        b = [torch.randn(4, device=DEV, requires_grad=True), None]
        y = fastnin.mlpconv(x, w, b, 1, 1)
        assert y.shape == (0, 2, 5, 5)
        gx, gw0, gb0 = torch.autograd.grad(y.sum(), [x, w[0], b[0]])
        assert gx.shape == x.shape
        assert torch.equal(gw0, torch.zeros_like(gw0)) and torch.equal(gb0, torch.zeros_like(gb0))
        assert fastnin.mlpconv(x, w, b, 1, 1, gap=True).shape == (0, 2)
        for shape in [(0, 4, 3, 3), (2, 0, 3, 3)]:
            t = torch.randn(*shape, device=DEV)
            assert fastnin.local_response_norm(t, 3).shape == shape
            assert fastnin.global_avg_pool2d(t).shape == shape[:2]


def _all_ops_bf16(x):
    """Forward + backward of the three ops on the tensor-core paths; returns every result."""
    torch.manual_seed(0)
    ws = [torch.randn(32, 8, 3, 3, device=x.device, dtype=x.dtype) * 0.2,
          torch.randn(24, 32, 1, 1, device=x.device, dtype=x.dtype) * 0.2,
          torch.randn(16, 24, 1, 1, device=x.device, dtype=x.dtype) * 0.2]
    bs = [torch.randn(c, device=x.device, dtype=x.dtype) * 0.1 for c in (32, 24, 16)]
    xl, wl, bl = leaf(x), [leaf(w) for w in ws], [leaf(b) for b in bs]
    with fastnin.use_backend("cuda"):
        y = fastnin.mlpconv(xl, wl, bl, 1, 1)
        z = fastnin.local_response_norm(y, 5, 0.5, 0.75, 2.0)
        p = fastnin.global_avg_pool2d(z)
        q = fastnin.mlpconv(z, [leaf(ws[1][:, :16]), leaf(ws[2])], None, 1, 0, gap=True)
    loss = p.float().sum() + (q.float() ** 2).sum()
    grads = torch.autograd.grad(loss, [xl, *wl, *bl])
    return [y.detach(), z.detach(), p.detach(), q.detach(), *grads]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_determinism_bitwise(layout):
    x = make_layout(torch.randn(4, 8, 17, 13, device=DEV, dtype=torch.bfloat16), layout)
    a = _all_ops_bf16(x)
    b = _all_ops_bf16(x)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"result {i} differs between two identical runs"


def test_non_default_stream():
    """The kernels run on the current stream: inputs made on a busy side stream are ready when
    they run, and the results are those of the default stream."""
    x0 = torch.randn(4, 8, 17, 13, device=DEV, dtype=torch.bfloat16)
    want = _all_ops_bf16(x0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # keep s busy: a kernel launched elsewhere would run first
        x = x0 * 1  # written on s after the sleep
        got = _all_ops_bf16(x)
    torch.cuda.current_stream().wait_stream(s)
    for i, (u, v) in enumerate(zip(got, want)):
        assert torch.equal(u, v), f"result {i} differs on a side stream"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    x0 = torch.randn(4, 8, 17, 13, device="cuda:0", dtype=torch.bfloat16)
    want = _all_ops_bf16(x0)
    with torch.cuda.device(0):  # the current device is not the tensors' one: CUDAGuard must switch
        got = _all_ops_bf16(x0.to("cuda:1"))
    for i, (u, v) in enumerate(zip(got, want)):
        assert u.device == torch.device("cuda:1")
        assert torch.equal(u.cpu(), v.cpu()), f"result {i} differs on cuda:1"


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_int64_indexing(layout):
    """> 2^31 elements (bf16, 5.4 GB): the last channels sit past index 2^31. LRN is per pixel, so
    the tail pixels are checked against the reference run on those pixels alone."""
    if _free_gib() < 32:
        pytest.skip("needs ~32 GiB of free GPU memory")
    shape = (1, 5, 2**15, 2**14 + 8)
    assert math.prod(shape) > 2**31
    x = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    x = make_layout(x, layout)
    gout = torch.randn_like(x)
    with fastnin.use_backend("cuda"):
        xl = leaf(x)
        y = fastnin.local_response_norm(xl, 5, 0.5, 0.75, 2.0)
        (gx,) = torch.autograd.grad(y, xl, gout)
    tail = (slice(None), slice(None), slice(-3, None), slice(-5, None))
    xt = leaf(x[tail].double())
    rt = reference.local_response_norm(xt, 5, 0.5, 0.75, 2.0)
    (gt,) = torch.autograd.grad(rt, xt, gout[tail].double())
    assert max_err(y.detach()[tail], rt) < 2e-2 * rt.abs().max().item()
    assert max_err(gx[tail], gt) < 2e-2 * gt.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gap_int64_indexing(layout):
    """> 2^31 elements (bf16, 4.3 GB): channel c holds the constant c + 1, so a wrong (wrapped) index
    shows as a wrong mean; the backward's last elements likewise."""
    if _free_gib() < 16:
        pytest.skip("needs ~16 GiB of free GPU memory")
    N, C, H, W = 1, 2, 2**15, 2**15 + 8
    assert N * C * H * W > 2**31
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(N, C, H, W, device=DEV, dtype=torch.bfloat16, memory_format=fmt)
    for c in range(C):
        x[:, c].fill_(c + 1)
    with fastnin.use_backend("cuda"):
        y = fastnin.global_avg_pool2d(x)
    assert torch.equal(y.float().cpu(), torch.tensor([[1.0, 2.0]])), y
    g = torch.tensor([[3.0, 5.0]], device=DEV, dtype=torch.bfloat16)
    gx = torch.ops.fastnin.gap_backward(g, [N, C, H, W], layout == "channels_last")
    for c in range(C):
        want = (g[0, c].float() / (H * W)).to(torch.bfloat16)
        assert torch.equal(gx[0, c, -1, -4:], want.expand(4)), f"channel {c} tail"
    del x, gx
