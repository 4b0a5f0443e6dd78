"""Two parts of the CPU Winograd mlpconv on CIFAR block 2's first layer (5x5 96 -> 192), timed
alone: the numbers behind the README's notes on 941333c and 1e25fb0, whose gains are within the
shared VM's noise on the whole block.

  layer     one 16x16 image, one stage: forward with a fixed weight, forward with the weight
            changed before each call (the filter transform runs every call, as in training), and
            fwd+bwd with a changing weight. Run it with FASTNIN_CPU_CONV=winograd: one image has
            fewer than the 1024 output pixels from which Winograd is chosen by itself.
  backward  the whole block 2 (batch 32, 3 stages, channels_last), torch.ops.fastnin.mlpconv_backward
            alone.

Medians of 60 calls. Compare builds by running this with each, alternated. Usage:

    FASTNIN_CPU_CONV=winograd python benchmarks/winograd_cpu_parts.py [layer|backward]
"""

import statistics as st
import sys
import time

import torch

import fastnin


def layer():
    torch.manual_seed(0)
    x = torch.randn(1, 96, 16, 16).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(192, 96, 5, 5) * 0.03]
    bs = [torch.randn(192)]
    ws[0].requires_grad_()
    xg = x.clone().requires_grad_()

    def run(change, bwd):
        t = []
        for _ in range(60):
            if change:
                with torch.no_grad():
                    ws[0].mul_(1.0001)
            t0 = time.perf_counter()
            if bwd:
                y = fastnin.ops.mlpconv(xg, ws, bs, 1, 2)
                y.sum().backward()
            else:
                with torch.no_grad():
                    fastnin.ops.mlpconv(x, ws, bs, 1, 2)
            t.append(time.perf_counter() - t0)
        t.sort()
        return t[len(t) // 2] * 1e3

    print("fwd fixed %.3f changing %.3f | fwd+bwd changing %.3f ms" % (run(False, False), run(True, False), run(True, True)))


def backward():
    torch.manual_seed(0)
    mf = torch.channels_last
    x = torch.randn(32, 96, 16, 16).relu().contiguous(memory_format=mf)
    ws = [
        (torch.randn(192, 96, 5, 5) * 0.03).contiguous(memory_format=mf),
        torch.randn(192, 192, 1, 1) * 0.1,
        torch.randn(192, 192, 1, 1) * 0.1,
    ]
    bs = [(torch.randn(192) * 0.01) for _ in range(3)]
    g = torch.randn(32, 192, 16, 16).contiguous(memory_format=mf)
    out = torch.ops.fastnin.mlpconv(x, ws, bs, [1, 1], [2, 2])

    def f():
        torch.ops.fastnin.mlpconv_backward(g, x, ws, bs, out, [1, 1], [2, 2], False, [True, True, True])

    for _ in range(3):
        f()
    t = []
    for _ in range(60):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    print("backward median %.2f min %.2f ms" % (st.median(t) * 1e3, min(t) * 1e3))


if __name__ == "__main__":
    which = sys.argv[1:] or ["layer", "backward"]
    for name in which:
        {"layer": layer, "backward": backward}[name]()
