"""Numerics beyond parity, on every backend: NaN/Inf propagation, fp16 near the top of its range,
bitwise determinism (also under torch.use_deterministic_algorithms), and concurrent calls from
several Python threads.

NaN/Inf: the oracle is torch's composition (fastnin.reference) run in float64 on the same values:
the NaN, +Inf and -Inf positions of our output and of every gradient must be exactly its. (float64
so that the composition's own fp32 algorithm choices, e.g. a Winograd convolution, do not decide.)
"""

from __future__ import annotations

import threading

import pytest
import torch
from _hardening import check_close
from _utils import assert_close_rule, grads_of

import fastnin
from fastnin import _backend, reference


def _interp(backend_device):
    return backend_device == ("triton", "cpu")


def _rand(*shape, device, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _assert_same_nonfinite(ours, ref, name):
    ours, ref = ours.detach().cpu(), ref.detach().cpu()
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        a, b = f(ours), f(ref)
        if not torch.equal(a, b):
            only_ours = (a & ~b).nonzero().tolist()[:5]
            only_ref = (b & ~a).nonzero().tolist()[:5]
            raise AssertionError(f"{name}: {what} positions differ: ours only at {only_ours}, torch only at {only_ref}")


def _poison(t, where, idx):
    """t with NaN / +Inf / -Inf at the given flat indices (a copy)."""
    t = t.detach().clone()
    flat = t.view(-1)
    for val, i in zip((float("nan"), float("inf"), float("-inf")), idx):
        if i is not None:
            flat[i % flat.numel()] = val
    return t


# ----------------------------------------------------------------------------------------------
# NaN / Inf
# ----------------------------------------------------------------------------------------------

# (flat indices of NaN, +Inf, -Inf), chosen to land in different images / channels / borders
SPOTS = [(7, 50, 93), (0, None, 199), (None, 31, None), (130, 131, 132)]


def _mlpconv_setup(device, dtype):
    x = _rand(2, 3, 7, 6, device=device, dtype=dtype, seed=1)
    ws = [_rand(4, 3, 3, 3, device=device, dtype=dtype, seed=2, scale=0.4),
          _rand(5, 4, 1, 1, device=device, dtype=dtype, seed=3, scale=0.5),
          _rand(3, 5, 1, 1, device=device, dtype=dtype, seed=4, scale=0.5)]
    bs = [_rand(c, device=device, dtype=dtype, seed=5 + c, scale=0.1) for c in (4, 5, 3)]
    return x, ws, bs


# This test found two bugs, fixed on main (d0a8518, 7eadd2b): the mlpconv backward's ReLU masks
# on the CPU and in Triton blocked the gradient at NaN pre-activations (`h > 0`; torch's
# threshold_backward passes it), and Triton's data gradient multiplied taps outside the image
# (0 * NaN with a NaN in weights[0]).
@pytest.mark.parametrize("target", ["x", "weights[0]", "biases[1]", "grad_out"])
@pytest.mark.parametrize("spots", SPOTS, ids=["mixed", "nan-ninf", "pinf", "adjacent"])
@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_mlpconv_nan_inf(backend_device, target, spots, gap):
    _, device = backend_device
    x, ws, bs = _mlpconv_setup(device, torch.float32)
    if target == "x":
        x = _poison(x, target, spots)
    elif target == "weights[0]":
        ws[0] = _poison(ws[0], target, spots)
    elif target == "biases[1]":
        bs[1] = _poison(bs[1], target, spots)
    leaves = [t.detach().requires_grad_() for t in (x, *ws, *bs)]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *ws, *bs)]
    y = fastnin.ops.mlpconv(leaves[0], leaves[1:4], leaves[4:], 1, 1, gap=gap)
    r = reference.mlpconv(leaves64[0], leaves64[1:4], leaves64[4:], (1, 1), (1, 1), gap)
    _assert_same_nonfinite(y, r, "out")
    go = _rand(*r.shape, device=device, seed=9)
    if target == "grad_out":
        go = _poison(go, target, spots)
    g, gr = grads_of(y, leaves, go), grads_of(r, leaves64, go.double())
    names = ["x", "weights[0]", "weights[1]", "weights[2]", "biases[0]", "biases[1]", "biases[2]"]
    for name, a, b in zip(names, g, gr):
        _assert_same_nonfinite(a, b, f"grad {name}")
    if target == "grad_out" or torch.isnan(r).any() or torch.isinf(r).any():
        return
    pytest.fail("the poisoned input changed nothing: the case tests nothing")  # pragma: no cover


@pytest.mark.parametrize("target", ["x", "grad_out"])
@pytest.mark.parametrize("spots", SPOTS, ids=["mixed", "nan-ninf", "pinf", "adjacent"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_nan_inf(backend_device, target, spots, layout):
    """A NaN or Inf entering and leaving the channel window: a running add/subtract window sum
    would leave NaN (inf - inf) behind in the channels after it; torch's composition does not."""
    _, device = backend_device
    x = _rand(2, 9, 4, 3, device=device, seed=1)
    if target == "x":
        x = _poison(x, target, spots)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xo, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    args = (5, 0.3, 0.75, 1.5)
    y = fastnin.ops.local_response_norm(xo, *args)
    r = reference.local_response_norm(xr, *args)
    _assert_same_nonfinite(y, r, "out")
    go = _rand(*x.shape, device=device, seed=9)
    if target == "grad_out":
        go = _poison(go, target, spots)
    (g,), (gr,) = grads_of(y, [xo], go), grads_of(r, [xr], go.double())
    _assert_same_nonfinite(g, gr, "grad x")
    fin = torch.isfinite(r) & torch.isfinite(gr)
    assert_close_rule(y.detach()[fin], r.detach()[fin], reference.local_response_norm(x, *args)[fin], "finite out")


@pytest.mark.parametrize("target", ["x", "grad_out"])
@pytest.mark.parametrize("spots", SPOTS + [(None, 5, 6)], ids=["mixed", "nan-ninf", "pinf", "adjacent", "inf-minus-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gap_nan_inf(backend_device, target, spots, layout):
    _, device = backend_device
    x = _rand(2, 3, 5, 7, device=device, seed=1)
    if target == "x":
        x = _poison(x, target, spots)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xo, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    y = fastnin.ops.global_avg_pool2d(xo)
    r = reference.global_avg_pool2d(xr)
    _assert_same_nonfinite(y, r, "out")
    go = _rand(2, 3, device=device, seed=9)
    if target == "grad_out":
        go = _poison(go, target, spots)
    (g,), (gr,) = grads_of(y, [xo], go), grads_of(r, [xr], go.double())
    _assert_same_nonfinite(g, gr, "grad x")


# ----------------------------------------------------------------------------------------------
# fp16 near the top of its range (65504)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gap_does_not_overflow(backend_device, dtype, layout):
    """The mean of 60000s is 60000 (exact in fp16 and bf16's neighbourhood), though their sum
    overflows fp16 after two terms: the sum must be accumulated in fp32."""
    _, device = backend_device
    hw = 9 if _interp(backend_device) else 33
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.full((2, 3, hw, hw + 2), 60000.0, dtype=dtype, device=device).contiguous(memory_format=fmt)
    y = fastnin.ops.global_avg_pool2d(x)
    want = torch.tensor(60000.0, dtype=dtype)
    assert torch.equal(y.cpu(), want.expand(2, 3)), y
    # values spread over [30000, 65000]: the rule against float64
    g = torch.Generator().manual_seed(0)
    v = (30000 + 35000 * torch.rand(2, 3, hw, hw + 2, generator=g, dtype=torch.float64)).to(device, dtype)
    v = v.contiguous(memory_format=fmt)
    yv = fastnin.ops.global_avg_pool2d(v)
    assert torch.isfinite(yv).all()
    assert_close_rule(yv, reference.global_avg_pool2d(v.double()), reference.global_avg_pool2d(v), "gap 3e4..6.5e4")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_fp16_big_values(backend_device, layout):
    """x up to 60000 in fp16: x^2 (3.6e9) overflows fp16, not fp32, and the result (O(1..1e3))
    is representable: the fp32 composition does not overflow, so ours must not either."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, 5, generator=g, dtype=torch.float64) * 20000
    x[0, 3, 1, 1] = 60000.0
    x[1, :, 2, 2] = -60000.0
    x = x.clamp(-65000, 65000).to(device, torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    args = (5, 1e-4, 0.75, 1.0)
    fp32 = torch.nn.functional.local_response_norm(x.float(), *args)
    assert torch.isfinite(fp32).all()  # the premise
    xo, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    y = fastnin.ops.local_response_norm(xo, *args)
    r = reference.local_response_norm(xr, *args)
    assert torch.isfinite(y).all(), "fp16 LRN overflowed"
    xt = x.detach().requires_grad_()
    t = reference.local_response_norm(xt, *args)
    assert_close_rule(y, r, t, "lrn big out")
    go = torch.randn(x.shape, generator=g).to(device, torch.float16)
    (gx,), (gr,), (gt,) = grads_of(y, [xo], go), grads_of(r, [xr], go.double()), grads_of(t, [xt], go)
    assert torch.isfinite(gx).all(), "fp16 LRN gradient overflowed"
    assert_close_rule(gx, gr, gt, "lrn big grad")


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


def _problems(backend_device):
    """One problem per op, big enough on the CPU to split across threads and tiles."""
    _, device = backend_device
    small = _interp(backend_device)
    n, hw = (2, 5) if small else (6, 21)
    x = _rand(n, 5, hw, hw, device=device, seed=1)
    ws = [_rand(8, 5, 3, 3, device=device, seed=2, scale=0.3), _rand(6, 8, 1, 1, device=device, seed=3, scale=0.4),
          _rand(4, 6, 1, 1, device=device, seed=4, scale=0.4)]
    bs = [_rand(c, device=device, seed=5 + c, scale=0.1) for c in (8, 6, 4)]
    lx = _rand(*((2, 9, 3, 4) if small else (4, 40, 17, 19)), device=device, seed=6)
    gx = _rand(*((2, 3, 4, 5) if small else (8, 64, 13, 13)), device=device, seed=7)
    return {
        "mlpconv": ([x, *ws, *bs], lambda t: fastnin.ops.mlpconv(t[0], t[1:4], t[4:], 1, 1)),
        "mlpconv-gap": ([x, *ws, *bs], lambda t: fastnin.ops.mlpconv(t[0], t[1:4], t[4:], 1, 1, gap=True)),
        "lrn": ([lx], lambda t: fastnin.ops.local_response_norm(t[0], 5, 0.3, 0.75, 1.5)),
        "lrn-channels_last": ([lx.contiguous(memory_format=torch.channels_last)],
                              lambda t: fastnin.ops.local_response_norm(t[0], 5, 0.3, 0.75, 1.5)),
        "gap": ([gx], lambda t: fastnin.ops.global_avg_pool2d(t[0])),
    }


def _run(inputs, fn, seed=11):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(leaves)
    go = _rand(*y.shape, device=y.device, seed=seed)
    return [y.detach(), *grads_of(y, leaves, go)]


@pytest.mark.parametrize("op", ["mlpconv", "mlpconv-gap", "lrn", "lrn-channels_last", "gap"])
def test_bitwise_deterministic(backend_device, op):
    """Three runs, bitwise-identical outputs and gradients; then the same under
    torch.use_deterministic_algorithms(True), which the kernels (no atomics) must simply accept."""
    inputs, fn = _problems(backend_device)[op]
    first = _run(inputs, fn)
    for _ in range(2):
        for i, (a, b) in enumerate(zip(first, _run(inputs, fn))):
            assert torch.equal(a, b), f"result {i} differs between runs"
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = _run(inputs, fn)
    finally:
        torch.use_deterministic_algorithms(old)
    for i, (a, b) in enumerate(zip(first, det)):
        assert torch.equal(a, b), f"result {i} differs under use_deterministic_algorithms(True)"


# ----------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------


def _expected(inputs, fn):
    with fastnin.use_backend("torch"):
        return _run([t.double() for t in inputs], fn)


def _check_against(res, ref, same, what):
    for i, (a, r, s) in enumerate(zip(res, ref, same)):
        check_close(a, r, s, f"{what} result {i}", reduction=True, term_scale=r.abs().max().item())


def _threaded(jobs, n_iter):
    """Run jobs (callables) each in its own thread, all released at once by a barrier, n_iter
    times each; re-raise the first failure."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def work(job):
        try:
            barrier.wait(timeout=60)
            for _ in range(n_iter):
                job()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_threads_cpu_backend():
    """4 Python threads calling all three ops on the cpu backend at once, each on its own inputs;
    every result within the tolerance rule of the float64 reference."""
    backend_device = ("cpu", "cpu")
    cases = []
    for k, (inputs, fn) in enumerate(_problems(backend_device).values()):
        inputs = [t * (1 + 0.1 * k) for t in inputs]
        with fastnin.use_backend("torch"):
            same = _run(inputs, fn)
        cases.append((inputs, fn, _expected(inputs, fn), same))

    def job_for(offset):
        def job():
            for j in range(len(cases)):
                inputs, fn, ref, same = cases[(j + offset) % len(cases)]
                with fastnin.use_backend("cpu"):
                    _check_against(_run(inputs, fn), ref, same, f"thread {offset}")

        return job

    _threaded([job_for(i) for i in range(4)], n_iter=3)


def test_threads_use_backend_is_thread_local():
    """4 threads, each inside use_backend() of a different backend (cpu, torch, triton where
    available, cpu again), running at the same time: each sees its own backend (ops resolve to it)
    and gets correct results."""
    names = [b for b in ("cpu", "torch", "triton", "cpu") if b in fastnin.available_backends()]
    if len(names) < 4:
        names.append("torch")
    device = "cpu"
    x = _rand(2, 6, 4, 5, device=device, seed=1)
    ws = [_rand(4, 6, 3, 3, device=device, seed=2, scale=0.3)]
    bs = [_rand(4, device=device, seed=3, scale=0.1)]
    ops = {
        "mlpconv": ([x, *ws, *bs], lambda t: fastnin.ops.mlpconv(t[0], t[1:2], t[2:], 1, 1)),
        "lrn": ([x], lambda t: fastnin.ops.local_response_norm(t[0], 3, 0.3, 0.75, 1.5)),
        "gap": ([x], lambda t: fastnin.ops.global_avg_pool2d(t[0])),
    }
    expect = {}
    for k, (inputs, fn) in ops.items():
        with fastnin.use_backend("torch"):
            expect[k] = (_expected(inputs, fn), _run(inputs, fn))

    def job_for(name):
        def job():
            with fastnin.use_backend(name):
                for k, (inputs, fn) in ops.items():
                    assert fastnin.get_backend() == name
                    assert _backend.backend_for(x, k) == name, f"thread of {name} resolved {k} elsewhere"
                    _check_against(_run(inputs, fn), *expect[k], f"{name} {k}")
                    assert fastnin.get_backend() == name

        return job

    before = fastnin.get_backend()
    _threaded([job_for(n) for n in names], n_iter=2)
    assert fastnin.get_backend() == before
