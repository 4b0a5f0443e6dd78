"""fwd+bwd of the CIFAR NiN's blocks 2 and 3 (batch 32) with the weights changed in place before
every call, as an optimizer step changes them, fastnin (CPU) against eager, both layouts,
interleaved in one process.

The main job's fwd+bwd rows keep the weights fixed (as benchmarks do), so the CPU kernel's cache of
transformed Winograd weights hits in their forward too; here it cannot. Usage:

    python benchmarks/fwdbwd_changing_weights.py
"""

import time

import torch

import fastnin
import fastnin.ops as fo

BLOCKS = {"cifar.b2": (96, [192, 192, 192], 5, 2, 16), "cifar.b3": (192, [192, 192, 10], 3, 1, 8)}


def median_ms(fn, reps=15, warmup=30):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    torch.manual_seed(0)
    for name, (cin, chans, k, p, hw) in BLOCKS.items():
        x = torch.randn(32, cin, hw, hw).relu()
        seq = torch.nn.Sequential()
        c = cin
        for i, co in enumerate(chans):
            seq.append(torch.nn.Conv2d(c, co, k if i == 0 else 1, padding=p if i == 0 else 0))
            seq.append(torch.nn.ReLU())
            c = co
        res = {}
        for lay, mf in [("nchw", torch.contiguous_format), ("cl", torch.channels_last)]:
            sq = seq.to(memory_format=mf)
            xr = x.contiguous(memory_format=mf).requires_grad_()
            convs = [m for m in sq if isinstance(m, torch.nn.Conv2d)]
            ws, bs = [m.weight for m in convs], [m.bias for m in convs]

            def step(f, ws=ws, xr=xr):
                with torch.no_grad():
                    for w in ws:
                        w.mul_(1.0000001)
                f(xr).sum().backward()

            res["eager " + lay] = median_ms(lambda sq=sq, step=step: step(sq))
            with fastnin.use_backend("cpu"):
                res["fastnin " + lay] = median_ms(
                    lambda ws=ws, bs=bs, step=step: step(lambda xx: fo.mlpconv(xx, ws, bs, 1, p))
                )
        best = min(res["eager nchw"], res["eager cl"])
        print(
            f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()),
            f"| fastnin vs eager's best: {best / res['fastnin nchw']:.2f}x (NCHW) / {best / res['fastnin cl']:.2f}x (cl)",
        )


if __name__ == "__main__":
    main()
