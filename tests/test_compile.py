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
