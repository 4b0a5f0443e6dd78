"""torch.func.vmap over the three ops, on every backend: a batched input is folded into N (one
call, no per-example fallback or its warning); batched weights (model ensembling) run one call per
example. Checked against the float64 torch composition, forward and through autograd."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastnin
from fastnin import reference


def _randn(*shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


OPS = {
    "mlpconv": (
        lambda x, p: fastnin.ops.mlpconv(x, p["w"], p["b"], 1, 1),
        lambda x, p: reference.mlpconv(x, p["w"], p["b"], (1, 1), (1, 1)),
    ),
    "mlpconv-gap": (
        lambda x, p: fastnin.ops.mlpconv(x, p["w"], p["b"], (2, 1), (0, 1), gap=True),
        lambda x, p: reference.mlpconv(x, p["w"], p["b"], (2, 1), (0, 1), True),
    ),
    "lrn": (
        lambda x, p: fastnin.ops.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
        lambda x, p: F.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
    ),
    "gap": (lambda x, p: fastnin.ops.global_avg_pool2d(x), lambda x, p: x.mean((2, 3))),
}


@contextlib.contextmanager
def _no_per_example_fallback():
    """Without a batching rule torch would run the op once per example (a C++ warning, once per
    process): switched off here, an op without a rule raises instead."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


def _params(device):
    return {
        "w": [_randn(4, 3, 3, 3, device=device, seed=1), _randn(2, 4, 1, 1, device=device, seed=2)],
        "b": [_randn(4, device=device, seed=3), None],
    }


@pytest.mark.parametrize("in_dim", [0, 2])
@pytest.mark.parametrize("op", list(OPS))
def test_vmap_batched_input(backend_device, op, in_dim):
    _, device = backend_device
    f, ref = OPS[op]
    p = _params(device)
    # 4 examples of [2, 3, 7, 6] images, the vmapped dimension at in_dim
    xs = _randn(4, 2, 3, 7, 6, device=device).movedim(0, in_dim).requires_grad_()
    with _no_per_example_fallback():
        got = torch.func.vmap(lambda x: f(x, p), in_dims=in_dim)(xs)
    xr = xs.detach().requires_grad_()
    want = torch.stack([ref(xr.select(in_dim, i), p) for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, xs, g)[0], torch.autograd.grad(want, xr, g)[0], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_vmap_batched_weights(backend_device, gap):
    """Model ensembling: per-example weights and biases, a shared input."""
    _, device = backend_device
    x = _randn(2, 3, 7, 6, device=device)
    w0 = _randn(3, 4, 3, 3, 3, device=device, seed=1).requires_grad_()
    w1 = _randn(2, 4, 1, 1, device=device, seed=2)  # shared
    b0 = _randn(3, 4, device=device, seed=3)

    def f(w0, b0):
        return fastnin.ops.mlpconv(x, [w0, w1], [b0, None], 1, 1, gap=gap)

    with _no_per_example_fallback():
        got = torch.func.vmap(f)(w0, b0)
    w0r = w0.detach().requires_grad_()
    want = torch.stack([reference.mlpconv(x, [w0r[i], w1], [b0[i], None], (1, 1), (1, 1), gap) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, w0, g)[0], torch.autograd.grad(want, w0r, g)[0], rtol=1e-12, atol=1e-12
    )


def test_nin_model_ensembling():
    """torch.func's model-ensembling recipe (stack_module_state + functional_call + vmap) on the
    NiN: the same logits as the models run one by one."""
    from torch.func import functional_call, stack_module_state

    torch.manual_seed(0)
    models = [fastnin.models.get("nin_cifar10").eval() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = fastnin.models.get("nin_cifar10").eval().to("meta")
    x = torch.randn(2, 3, 32, 32)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    got = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        want = torch.stack([m(x) for m in models])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
