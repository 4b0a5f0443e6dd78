"""Compile every Triton kernel launch of fastnin for a GPU, on a machine without one.

    python tests/_triton_aot.py [--arch 90] [--quick]     (tests/test_triton_aot.py runs it)

Without a GPU the Triton kernels only ever run under the interpreter, which executes them as
numpy code: it never lowers them, so a kernel that fails to compile (a type error in a branch the
interpreter accepts, a tl.dot shape the hardware lacks, a tile that overflows shared memory)
would hide until a GPU appears. Here the launchers (fastnin/triton/{mlpconv,lrn,gap}.py) run on
CPU tensors with their launches recorded instead of executed (fastnin._backend.wrap_triton, which
every launch goes through, is swapped for a recorder), then each recorded launch is compiled by
Triton's own JIT path (JITFunction.warmup: the same specialization as a real launch) for the
target GPU down to a cubin (ptxas), against a stand-in driver that names the target. An autotuned
launch is compiled once per config of its autotuner. Checked: every compile succeeds, and each
kernel's shared memory fits the target (227 KB per block on sm_90, 163 KB on sm_80).

The launches are those of the NiN blocks and their variants: every dtype (fp32 with TF32 dots and
with IEEE ones), 1-3 stages, gap, the width classes and the segment split of mlpconv; LRN and GAP
in both layouts. Must run before fastnin.triton is imported and without TRITON_INTERPRET (the
recorded kernels are JIT functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("_triton_aot.py: unset TRITON_INTERPRET (it compiles the kernels, not interprets them)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# Shared memory per block, opt-in maximum (CUDA C Programming Guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class StandInDriver:
    """What JITFunction.warmup asks of the driver: a device, a stream and the target. Nothing is
    loaded or launched."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    """Stands in for wrap_triton(kernel): kernel[grid](*args, **kwargs) is recorded."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            Recorder.launches.append((self.kernel, grid, args, kwargs))

        return launch


def record_launches(quick: bool) -> list:
    from fastnin.triton import gap as tgap
    from fastnin.triton import lrn as tlrn
    from fastnin.triton import mlpconv as tmlp

    for mod in (tgap, tlrn, tmlp):
        mod.wrap_triton = Recorder

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype, cl=False):
        t = torch.randn(*shape, generator=g).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    # fp32 twice: TF32 dots (torch's default, cudnn.allow_tf32) and IEEE ones (the tests' setting).
    dtypes = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
              (torch.float64, False)]  # fmt: skip
    # (Cin, widths, kernel, stride, padding, gap, H): the CIFAR NiN blocks, the textbook NiN's
    # first (11x11 stride 4), one and two stages, and a 2-stage chain wider than one fused launch.
    blocks = [
        (3, [192, 160, 96], 5, 1, 2, False, 12),
        (96, [192, 192, 192], 5, 1, 2, False, 8),
        (192, [192, 192, 10], 3, 1, 1, True, 8),
        (1, [96, 96, 96], 11, 4, 0, False, 27),
        (64, [64], 3, 1, 1, False, 8),
        (32, [48, 24], 1, 1, 0, False, 8),
        (64, [128, 512], 3, 1, 1, False, 6),
    ]
    if quick:
        dtypes, blocks = dtypes[:3], blocks[1:3]
    for dtype, tf32 in dtypes:
        torch.backends.cudnn.allow_tf32 = tf32
        for cin, widths, k, s, p, gap, h in blocks:
            x = rand(2, cin, h, h, dtype=dtype, cl=cin > 1)
            ws = [rand(widths[0], cin, k, k, dtype=dtype)]
            ws += [rand(co, ci, 1, 1, dtype=dtype) for ci, co in zip(widths, widths[1:])]
            bs = [rand(c, dtype=dtype) for c in widths]
            out = tmlp.mlpconv_forward(x, ws, bs, (s, s), (p, p), gap)
            tmlp.mlpconv_backward(torch.ones_like(out), x, ws, bs, out, (s, s), (p, p), gap, (True, True, True))
        for cl in (False, True):
            x = rand(2, 96, 13, 13, dtype=dtype, cl=cl)
            y = tlrn.lrn_forward(x, 5, 1e-4, 0.75, 2.0)
            tlrn.lrn_backward(torch.ones_like(y), x, 5, 1e-4, 0.75, 2.0)
            tgap.gap_forward(x)
            tgap.gap_backward(torch.ones(2, 96, dtype=dtype), x.shape, cl)
    return Recorder.launches


def compile_jobs(launches) -> list:
    """The distinct compiles of the recorded launches, (what, kernel, grid, args, kwargs): one per
    autotune config of an autotuned launch. (Triton's own cache catches what this key misses.)"""
    from triton.runtime.autotuner import Autotuner

    seen, jobs = set(), []
    for kernel, grid, args, kwargs in launches:
        if isinstance(kernel, Autotuner):
            variants = [(kernel.fn, {**kwargs, **c.all_kwargs()}) for c in kernel.configs]
        else:
            variants = [(kernel, kwargs)]
        for fn, kw in variants:
            dtypes = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
            ints = tuple(a for a in args if isinstance(a, int))
            key = (fn.__name__, dtypes, tuple(sorted(kw.items())), tuple(v == 1 or v % 16 == 0 for v in ints))
            if key not in seen:
                seen.add(key)
                jobs.append((f"{fn.__name__} {'/'.join(sorted(set(dtypes)))} {kw}", fn, grid, args, kw))
    return jobs


_JOBS: list = []  # set before the worker processes fork: they inherit it (tensors and kernels
_LIMIT: int | None = None  # are not sent through pickles)


def _compile(i: int) -> str | None:
    """Compile job i; the failure's report, or None."""
    what, fn, grid, args, kw = _JOBS[i]
    try:
        compiled = fn.warmup(*args, grid=grid, **kw)
    except Exception as e:  # a compile error: report every one, fail at the end
        return f"FAIL {what}\n     {type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"
    if _LIMIT is not None and compiled.metadata.shared > _LIMIT:
        return f"FAIL {what}\n     shared memory {compiled.metadata.shared} B > {_LIMIT} B"
    return None


def compile_all(launches, arch: int, workers: int) -> int:
    """Compile every job, in `workers` forked processes (each compile is one-threaded: ~0.8 s cold
    here, 459 of them)."""
    global _JOBS, _LIMIT
    _JOBS, _LIMIT = compile_jobs(launches), SMEM_LIMIT.get(arch)
    t0 = time.perf_counter()
    if workers > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            reports = list(pool.map(_compile, range(len(_JOBS))))
    else:
        reports = [_compile(i) for i in range(len(_JOBS))]
    failures = [r for r in reports if r is not None]
    for r in failures:
        print(r)
    print(f"sm_{arch}: {len(_JOBS)} kernel specializations compiled to cubin, {len(failures)} failed "
          f"({time.perf_counter() - t0:.0f} s, {workers} processes; triton {triton.__version__}, torch {torch.__version__})")
    return len(failures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    p.add_argument("--quick", action="store_true", help="three dtypes, two blocks")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    driver.set_active(StandInDriver(args.arch))
    launches = record_launches(args.quick)
    print(f"{len(launches)} launches recorded")
    return 1 if compile_all(launches, args.arch, args.workers) else 0


if __name__ == "__main__":
    sys.exit(main())
