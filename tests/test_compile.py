"""torch.compile(fullgraph=True) on a module that uses all three ops, on every backend."""

import torch
from torch import nn

import fastnin


class _AllThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = fastnin.nn.MLPConv(3, [8, 6, 5], kernel_size=3, padding=1)
        self.lrn = fastnin.nn.LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=2.0)
        self.gap = fastnin.nn.GlobalAvgPool2d()
        self.head = fastnin.nn.MLPConv(5, [4, 4], kernel_size=3, padding=1, gap=True)

    def forward(self, x):
        y = self.lrn(self.block(x))
        return self.gap(y) + self.head(y).sum(1, keepdim=True)


def test_compile_fullgraph_matches_eager(backend_device):
    # Under the Triton interpreter the Triton ops are custom ops with explicit fake kernels (see
    # fastnin/triton/__init__.py), which torch.compile treats as opaque; on a GPU they are triton_ops.
    backend, device = backend_device
    torch.manual_seed(0)
    model = _AllThree().to(device)
    x = torch.randn(2, 3, 9, 7, device=device, requires_grad=True)
    eager = model(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-5)


def _graph_ops(graphs):
    def capture(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    return capture


def _traced_fastnin_op(ops):
    return any(name.startswith("fastnin.") for name in ops)


def test_compiled_function_follows_the_backend_in_force():
    # Each graph torch.compile captures shows what it traced: fastnin's op ("cpu") or the plain
    # torch composition ("torch"). A backend changed after compiling must take effect: a guard
    # fails and the function is traced again. set_backend() is a plain global, guarded on every
    # torch; use_backend() is a ContextVar, which Dynamo guards on from torch 2.14 and before
    # that reads once while tracing (see fastnin/_backend.py).
    x = torch.randn(2, 3, 4, 4)
    before = fastnin.get_backend()
    try:
        graphs = []
        torch._dynamo.reset()
        fastnin.set_backend("cpu")
        f = torch.compile(fastnin.global_avg_pool2d, backend=_graph_ops(graphs), fullgraph=True)
        torch.testing.assert_close(f(x), x.mean((2, 3)))
        fastnin.set_backend("torch")
        torch.testing.assert_close(f(x), x.mean((2, 3)))
        assert [_traced_fastnin_op(g) for g in graphs] == [True, False]

        graphs.clear()
        torch._dynamo.reset()
        fastnin.set_backend("cpu")
        f = torch.compile(fastnin.global_avg_pool2d, backend=_graph_ops(graphs), fullgraph=True)
        f(x)
        with fastnin.use_backend("torch"):
            torch.testing.assert_close(f(x), x.mean((2, 3)))
        if fastnin._backend._torch_at_least(2, 14):
            assert [_traced_fastnin_op(g) for g in graphs] == [True, False]
        else:  # the documented limitation: compiled under "cpu", it stays so
            assert [_traced_fastnin_op(g) for g in graphs] == [True]
    finally:
        fastnin.set_backend(before)
        torch._dynamo.reset()


def test_compiled_backward_runs_the_fused_kernels():
    # A backward under create_graph=True differentiates the plain torch composition (the fused
    # backward kernels have no derivative); torch.compile's traced backward must not take that
    # path: its graph holds fastnin's backward ops and no convolution.
    from torch._dynamo.backends.common import aot_autograd

    fw, bw_graphs = [], []
    before = fastnin.get_backend()
    try:
        fastnin.set_backend("cpu")
        torch._dynamo.reset()
        model = torch.nn.Sequential(
            fastnin.nn.MLPConv(3, [8, 6], kernel_size=3, padding=1),
            fastnin.nn.LocalResponseNorm(3),
            fastnin.nn.GlobalAvgPool2d(),
        )
        backend = aot_autograd(fw_compiler=_graph_ops(fw), bw_compiler=_graph_ops(bw_graphs))
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        compiled(x).sum().backward()
        (bw,) = bw_graphs
        for op in ("mlpconv", "lrn", "gap"):
            assert f"fastnin.{op}_backward.default" in bw, bw
        assert not any("convolution" in t for t in bw), bw
    finally:
        fastnin.set_backend(before)
        torch._dynamo.reset()
