"""torch.func's reverse-mode transforms over the three ops, on every backend: grad, jacrev (vmap
over vjp, with grad mode on and off), per-example gradients (vmap over grad with functional_call),
grad of grad. torch's register_autograd alone fails all of them ("must override the setup_context
staticmethod"); fastnin.ops routes them through autograd.Functions that have one (ops.py). Each is
checked in float64 against the same transform of the plain torch composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import fastnin
from fastnin import reference


def _randn(*shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


def _params(device):
    return (
        [_randn(4, 3, 3, 3, device=device, seed=1), _randn(2, 4, 1, 1, device=device, seed=2)],
        [_randn(4, device=device, seed=3), None],
    )


# op name -> (fastnin, plain torch), each f(x, weights, biases) -> Tensor
OPS = {
    "mlpconv": (
        lambda x, w, b: fastnin.ops.mlpconv(x, w, b, 1, 1),
        lambda x, w, b: reference.mlpconv(x, w, b, (1, 1), (1, 1)),
    ),
    "mlpconv-gap": (
        lambda x, w, b: fastnin.ops.mlpconv(x, w, b, (2, 1), (0, 1), gap=True),
        lambda x, w, b: reference.mlpconv(x, w, b, (2, 1), (0, 1), True),
    ),
    "lrn": (
        lambda x, w, b: fastnin.ops.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
        lambda x, w, b: F.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
    ),
    "gap": (lambda x, w, b: fastnin.ops.global_avg_pool2d(x), lambda x, w, b: x.mean((2, 3))),
}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", list(OPS))
def test_func_grad(backend_device, op):
    """torch.func.grad with respect to x, every weight and every bias."""
    _, device = backend_device
    f, ref = OPS[op]
    x = _randn(2, 3, 7, 6, device=device)
    w, b = _params(device)
    b[1] = _randn(2, device=device, seed=6)  # torch.func.grad takes no None among its arguments
    cot = _randn(*ref(x, w, b).shape, device=device, seed=4)

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b) * cot).sum()

    got = grad(loss(f), argnums=(0, 1, 2))(x, w, b)
    want = grad(loss(ref), argnums=(0, 1, 2))(x, w, b)
    _close(got, want)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad-on", "no-grad"])
@pytest.mark.parametrize("op", list(OPS))
def test_func_jacrev(backend_device, op, grad_mode):
    """jacrev is vmap over a vjp. With grad mode off the vjp runs the fused backward kernels under
    vmap (their batching rules); with it on, the differentiable composition."""
    _, device = backend_device
    f, ref = OPS[op]
    x = _randn(1, 3, 4, 3, device=device)
    w, b = _params(device)
    fallback = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)  # an op without a batching rule raises
    try:
        with torch.set_grad_enabled(grad_mode):
            got = jacrev(lambda x, w0: f(x, [w0, w[1]], b), argnums=(0, 1))(x, w[0])
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(fallback)
    with torch.set_grad_enabled(grad_mode):
        want = jacrev(lambda x, w0: ref(x, [w0, w[1]], b), argnums=(0, 1))(x, w[0])
    _close(got, want)


def _small_net():
    return torch.nn.Sequential(
        fastnin.nn.MLPConv(3, [4, 5], 3, padding=1),
        fastnin.nn.LocalResponseNorm(3, alpha=1e-2, k=2.0),
        fastnin.nn.GlobalAvgPool2d(),
    ).double()


def test_func_per_example_grads(backend_device):
    """torch.func's per-sample-gradient recipe: vmap over grad of a functional_call, one
    gradient per example, as autograd gives running the examples one by one through torch."""
    _, device = backend_device
    torch.manual_seed(0)
    net = _small_net().to(device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs = _randn(3, 2, 3, 5, 6, device=device)  # 3 examples of 2 images
    ys = _randn(3, 2, 5, device=device, seed=5)

    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(3):
        with fastnin.use_backend("torch"):
            want = torch.autograd.grad(loss(dict(net.named_parameters()), xs[i], ys[i]), list(net.parameters()))
        for (name, _), g in zip(net.named_parameters(), want):
            _close(got[name][i], g)


@pytest.mark.parametrize("op", list(OPS))
def test_func_grad_of_grad(backend_device, op):
    """A second derivative: grad of (the squared norm of grad with respect to x)."""
    _, device = backend_device
    f, ref = OPS[op]
    x = _randn(1, 3, 4, 3, device=device)
    w, b = _params(device)

    def outer(fn):
        inner = grad(lambda x: (fn(x, w, b) ** 2).sum())
        return grad(lambda x: (inner(x) ** 2).sum())

    _close(outer(f)(x), outer(ref)(x))


@pytest.mark.parametrize("op", list(OPS))
def test_func_forward_mode_is_refused(backend_device, op):
    """Forward mode (jvp, jacfwd, hessian) has no kernels: a clear error naming the op."""
    backend, device = backend_device
    f, _ = OPS[op]
    x = _randn(1, 3, 4, 3, device=device)
    w, b = _params(device)
    public = {"lrn": "local_response_norm", "gap": "global_avg_pool2d"}.get(op, "mlpconv")
    with pytest.raises(NotImplementedError, match=f"fastnin.ops.{public}: forward-mode"):
        torch.func.jvp(lambda x: f(x, w, b), (x,), (torch.ones_like(x),))
