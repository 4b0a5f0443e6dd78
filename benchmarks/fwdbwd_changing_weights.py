"""fwd+bwd of the CIFAR NiN's blocks 2 and 3 (batch 32), fastnin (CPU) against eager, both
layouts, with the weights changed in place before every call, as an optimizer step changes them
(or kept fixed with --fixed).

The main job's fwd+bwd rows keep the weights fixed (as benchmarks do), so the CPU kernel's cache of
transformed Winograd weights hits in their forward too; here it cannot. fastnin and eager are
alternated call by call (the order flipped every pair), so that the load of this shared machine
falls on both alike: the result is the ratio of the two medians and the median of the per-pair
ratios. Usage:

    python benchmarks/fwdbwd_changing_weights.py [--fixed] [--pairs 40] [--blocks cifar.b2,cifar.b3]
"""

import argparse
import statistics
import time

import torch

import fastnin
import fastnin.ops as fo

# name -> (Cin, channels, kernel, padding, side, batch)
BLOCKS = {
    "cifar.b2": (96, [192, 192, 192], 5, 2, 16, 32),
    "cifar.b3": (192, [192, 192, 10], 3, 1, 8, 32),
    "nin.b3": (256, [384, 384, 384], 3, 1, 12, 4),  # the textbook NiN's block 3 at the models' batch
}


def alternate(fa, fb, pairs: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Times of fa() and fb(), alternated call by call (a b, b a, a b, ...)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for i in range(pairs):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for f, t in order:
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return ta, tb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixed", action="store_true", help="keep the weights fixed (as the main job does)")
    ap.add_argument("--pairs", type=int, default=40, help="timed (fastnin, eager) pairs per block and layout")
    ap.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated, of {', '.join(BLOCKS)}")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"weights {'fixed' if args.fixed else 'changed before every call'}, {args.pairs} pairs, "
          f"{torch.get_num_threads()} threads")
    for name in args.blocks.split(","):
        cin, chans, k, p, hw, batch = BLOCKS[name]
        x = torch.randn(batch, cin, hw, hw).relu()
        seq = torch.nn.Sequential()
        c = cin
        for i, co in enumerate(chans):
            seq.append(torch.nn.Conv2d(c, co, k if i == 0 else 1, padding=p if i == 0 else 0))
            seq.append(torch.nn.ReLU())
            c = co
        med = {}
        for lay, mf in [("nchw", torch.contiguous_format), ("cl", torch.channels_last)]:
            sq = seq.to(memory_format=mf)
            xr = x.contiguous(memory_format=mf).requires_grad_()
            convs = [m for m in sq if isinstance(m, torch.nn.Conv2d)]
            ws, bs = [m.weight for m in convs], [m.bias for m in convs]

            # A dense gradient, as the next layer gives (and the main job uses): .sum().backward()
            # would hand both an expanded tensor of ones, which fastnin's kernel copies first.
            g = torch.randn(sq(xr).shape).contiguous(memory_format=mf)

            def step(f, ws=ws, xr=xr, g=g):
                if not args.fixed:
                    with torch.no_grad():
                        for w in ws:
                            w.mul_(1.0000001)
                f(xr).backward(g)

            def fast(ws=ws, bs=bs, step=step):
                with fastnin.use_backend("cpu"):
                    step(lambda xx: fo.mlpconv(xx, ws, bs, 1, p))

            tf, te = alternate(fast, lambda sq=sq, step=step: step(sq), args.pairs)
            mf_, me = statistics.median(tf) * 1e3, statistics.median(te) * 1e3
            pair = statistics.median(b / a for a, b in zip(tf, te))
            med[lay] = (mf_, me)
            print(f"{name} {lay:4s}: fastnin {mf_:.2f} ms, eager {me:.2f} ms | "
                  f"eager / fastnin, same layout: {me / mf_:.3f}x (medians), {pair:.3f}x (median pair)")
        best = min(me for _, me in med.values())
        print(f"{name}: eager's best layout / fastnin: {best / med['nchw'][0]:.3f}x (NCHW), "
              f"{best / med['cl'][0]:.3f}x (cl)")


if __name__ == "__main__":
    main()
