"""The bad-input matrix's cases, and the worker that runs them (test_bad_input_matrix.py).

Every invalid input of the foundation issue (issue 2, "Bad input") for every op, through every
entry point: the functional API (fastnin.ops.*, under a backend) and the raw ops of the backend's
namespace (torch.ops.fastnin.* for cpu / cuda, torch.ops.fastnin_triton.* for triton), backward
ops included. Each case names the exception it must raise (ValueError everywhere) and a regular
expression its message must match, which names the offending argument. A few `valid-*` control
cases must raise nothing, so that a broken harness cannot pass by raising everywhere.

Run as a script, the worker imports fastnin once, then runs the cases named on its command line
in order, printing one JSON line when a case starts and one with its outcome, flushed: the parent
learns which case was running when the process crashed (segfault, abort) or hung.

    python -c "import sys, _bad_input_cases as b; b.main(sys.argv[1:])" BACKEND DEVICE ID [ID ...]
    (with tests/ and the repository root on PYTHONPATH)
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

VIAS = {
    "ops": "the functional API fastnin.ops.*",
    "fwd": "the raw forward op torch.ops.<ns>.<op>",
    "bwd": "the raw backward op torch.ops.<ns>.<op>_backward",
}


@dataclass(frozen=True)
class Case:
    id: str
    op: str  # mlpconv | lrn | gap
    via: str  # ops | fwd | bwd
    match: str | None  # regex the message must match; None: must not raise
    build: Callable  # build(ctx) -> zero-argument callable


CASES: list[Case] = []


# ----------------------------------------------------------------------------------------------
# tensors (built in the worker only; tiny, so the Triton interpreter runs the control cases fast)
# ----------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, backend: str, device: str):
        import torch

        self.torch = torch
        self.backend, self.device = backend, device
        if backend == "triton":
            import fastnin._backend

            fastnin._backend.load_triton()
            self.ns = torch.ops.fastnin_triton
        else:
            self.ns = torch.ops.fastnin
        # the "other device": meta on a CPU-only machine, the CPU next to a GPU
        self.other = "cpu" if device == "cuda" else "meta"

    def randn(self, *shape, dtype=None):
        t = self.torch

        g = t.Generator().manual_seed(sum(shape) + len(shape))
        return t.randn(*shape, generator=g).to(device=self.device, dtype=dtype or t.float32)

    # mlpconv base problem: x [1, 3, 6, 6], 3x3 -> 4, 1x1 -> 5, 1x1 -> 2, stride 1, padding 1
    def mlpconv_base(self):
        ws = [self.randn(4, 3, 3, 3), self.randn(5, 4, 1, 1), self.randn(2, 5, 1, 1)]
        bs = [self.randn(4), self.randn(5), self.randn(2)]
        return dict(x=self.randn(1, 3, 6, 6), weights=ws, biases=bs, stride=[1, 1], padding=[1, 1])

    def lrn_base(self):
        return dict(x=self.randn(2, 5, 3, 3), size=3, alpha=1e-4, beta=0.75, k=1.0)

    def gap_base(self):
        return dict(x=self.randn(2, 3, 4, 4))


# ----------------------------------------------------------------------------------------------
# calls
# ----------------------------------------------------------------------------------------------


def _call_mlpconv(ctx, via, a, grad_out=None, out="auto", mask=(True, True, True)):
    import fastnin

    if via == "ops":
        return lambda: fastnin.ops.mlpconv(a["x"], a["weights"], a["biases"], a["stride"], a["padding"])
    if via == "fwd":
        return lambda: ctx.ns.mlpconv(a["x"], a["weights"], a["biases"], a["stride"], a["padding"], False)
    # bwd: grad_out of the base problem's output shape [1, 2, 6, 6] unless given
    go = grad_out if grad_out is not None else ctx.randn(1, 2, 6, 6)
    o = ctx.randn(1, 2, 6, 6) if isinstance(out, str) else out
    return lambda: ctx.ns.mlpconv_backward(
        go, a["x"], a["weights"], a["biases"], o, a["stride"], a["padding"], False, list(mask)
    )


def _call_lrn(ctx, via, a, grad_out=None):
    import fastnin

    args = (a["size"], a["alpha"], a["beta"], a["k"])
    if via == "ops":
        return lambda: fastnin.ops.local_response_norm(a["x"], *args)
    if via == "fwd":
        return lambda: ctx.ns.lrn(a["x"], *args)
    x = a["x"]
    go = grad_out if grad_out is not None else ctx.torch.ones(x.shape, device=x.device, dtype=ctx.torch.float32)
    return lambda: ctx.ns.lrn_backward(go, x, *args)


def _call_gap(ctx, via, a):
    import fastnin

    if via == "ops":
        return lambda: fastnin.ops.global_avg_pool2d(a["x"])
    if via == "fwd":
        return lambda: ctx.ns.gap(a["x"])
    raise AssertionError("gap_backward has its own cases")


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------


def _mlpconv_change(name, match, change, vias=("ops", "fwd", "bwd")):
    """change(ctx, base_args) -> the invalid args (a modified copy of the base)."""
    for via in vias:
        def build(ctx, via=via, change=change):
            a = ctx.mlpconv_base()
            return _call_mlpconv(ctx, via, change(ctx, a))

        CASES.append(Case(f"mlpconv-{via}-{name}", "mlpconv", via, match, build))


def _set(a, **kw):
    return {**a, **kw}


def _ws(a, i, w):
    ws = list(a["weights"])
    ws[i] = w
    return ws


def _bs(a, i, b):
    bs = list(a["biases"])
    bs[i] = b
    return bs


def _t():
    import torch

    return torch


_mlpconv_change("valid", None, lambda c, a: a)
# wrong rank
_mlpconv_change("x-3d", r"mlpconv: x must be a 4-D tensor", lambda c, a: _set(a, x=a["x"][0]))
_mlpconv_change("x-5d", r"mlpconv: x must be a 4-D tensor", lambda c, a: _set(a, x=a["x"][None]))
_mlpconv_change("w0-3d", r"weights\[0\] must be a 4-D", lambda c, a: _set(a, weights=_ws(a, 0, a["weights"][0][0])))
_mlpconv_change("w2-2d", r"weights\[2\] must be a 4-D",
                lambda c, a: _set(a, weights=_ws(a, 2, a["weights"][2][:, :, 0, 0])))
# channel mismatches
_mlpconv_change("x-w0-channels", r"weights\[0\] has 3 input channels but x has 2",
                lambda c, a: _set(a, x=a["x"][:, :2]))
_mlpconv_change("w0-w1-channels", r"weights\[1\] has 3 input channels but weights\[0\] has 4",
                lambda c, a: _set(a, weights=_ws(a, 1, a["weights"][1][:, :3])))
_mlpconv_change("w1-w2-channels", r"weights\[2\] has 6 input channels but weights\[1\] has 5",
                lambda c, a: _set(a, weights=_ws(a, 2, c.randn(2, 6, 1, 1))))
# a later weight that is not 1x1
_mlpconv_change("w1-3x3", r"weights\[1\] must be 1x1, got 3x3",
                lambda c, a: _set(a, weights=_ws(a, 1, c.randn(5, 4, 3, 3))))
_mlpconv_change("w2-1x2", r"weights\[2\] must be 1x1, got 1x2",
                lambda c, a: _set(a, weights=_ws(a, 2, c.randn(2, 5, 1, 2))))
# bias shapes
_mlpconv_change("b0-short", r"biases\[0\] must have shape \[4\]", lambda c, a: _set(a, biases=_bs(a, 0, c.randn(3))))
_mlpconv_change("b1-2d", r"biases\[1\] must have shape \[5\]", lambda c, a: _set(a, biases=_bs(a, 1, c.randn(1, 5))))
_mlpconv_change("b2-scalar", r"biases\[2\] must have shape \[2\]",
                lambda c, a: _set(a, biases=_bs(a, 2, a["biases"][2][0])))
# counts
_mlpconv_change("3w-2b", r"got 3 weights but 2 biases", lambda c, a: _set(a, biases=a["biases"][:2]))
_mlpconv_change("1w-2b", r"got 1 weights but 2 biases",
                lambda c, a: _set(a, weights=a["weights"][:1], biases=[a["biases"][0], None]))
_mlpconv_change("0-stages", r"expected 1 to 3 weights, got 0", lambda c, a: _set(a, weights=[], biases=[]))
_mlpconv_change("4-stages", r"expected 1 to 3 weights, got 4",
                lambda c, a: _set(a, weights=[*a["weights"], c.randn(2, 2, 1, 1)], biases=[*a["biases"], None]))
# dtypes
for _dt in ("int32", "int64", "uint8", "bool"):
    _mlpconv_change(f"x-{_dt}", r"mlpconv: x must be a floating-point tensor",
                    lambda c, a, dt=_dt: _set(a, x=a["x"].to(getattr(_t(), dt))))
_mlpconv_change("w1-int64", r"weights\[1\] has dtype",
                lambda c, a: _set(a, weights=_ws(a, 1, a["weights"][1].to(_t().int64))))
_mlpconv_change("all-int", r"mlpconv: x must be a floating-point tensor", lambda c, a: _set(
    a, x=a["x"].to(_t().int32), weights=[w.to(_t().int32) for w in a["weights"]],
    biases=[b.to(_t().int32) for b in a["biases"]]))
_mlpconv_change("w2-float64", r"weights\[2\] has dtype (torch.float64|Double) but x has (torch.float32|Float)",
                lambda c, a: _set(a, weights=_ws(a, 2, a["weights"][2].double())))
_mlpconv_change("b0-float16", r"biases\[0\] has dtype (torch.float16|Half)",
                lambda c, a: _set(a, biases=_bs(a, 0, a["biases"][0].half())))
# layouts other than strided (the functional API: the raw ops have no sparse kernels to reach)
_mlpconv_change("x-sparse", r"mlpconv: x must be a dense \(strided\) tensor",
                lambda c, a: _set(a, x=a["x"].to_sparse()), vias=("ops",))
_mlpconv_change("w0-sparse", r"mlpconv: weights\[0\] must be a dense \(strided\) tensor",
                lambda c, a: _set(a, weights=_ws(a, 0, a["weights"][0].to_sparse())), vias=("ops",))
# devices
_mlpconv_change("w0-other-device", r"weights\[0\] is on (meta|cpu) but x is on",
                lambda c, a: _set(a, weights=_ws(a, 0, a["weights"][0].to(c.other))))
_mlpconv_change("b1-other-device", r"biases\[1\] is on (meta|cpu) but x is on",
                lambda c, a: _set(a, biases=_bs(a, 1, a["biases"][1].to(c.other))))
# stride / padding / output size
_mlpconv_change("padding-negative", r"padding must be >= 0", lambda c, a: _set(a, padding=[-1, 0]))
_mlpconv_change("padding-negative-w", r"padding must be >= 0", lambda c, a: _set(a, padding=[0, -2]))
_mlpconv_change("stride-0", r"stride must be >= 1", lambda c, a: _set(a, stride=[0, 1]))
_mlpconv_change("stride-negative", r"stride must be >= 1", lambda c, a: _set(a, stride=[1, -1]))
_mlpconv_change("output-0-rows", r"output size would be 0x.*kernel is larger than the padded input",
                lambda c, a: _set(a, x=a["x"][:, :, :1], padding=[0, 1]))
_mlpconv_change("output-0-cols", r"output size would be .*x0 .*kernel is larger than the padded input",
                lambda c, a: _set(a, x=a["x"][:, :, :, :2], padding=[1, 0]))
_mlpconv_change("x-empty-spatial", r"x must have a non-empty spatial size, got 0x",
                lambda c, a: _set(a, x=a["x"][:, :, :0], padding=[0, 0]))
# The padding alone would give an output here, but torch's convolutions reject the empty map.
_mlpconv_change("x-empty-spatial-padded", r"x must have a non-empty spatial size, got .*x0",
                lambda c, a: _set(a, x=a["x"][:, :, :, :0], padding=[2, 2]))
_mlpconv_change("w0-empty-kernel", r"weights\[0\] has an empty kernel",
                lambda c, a: _set(a, weights=_ws(a, 0, a["weights"][0][:, :, :0])))
_mlpconv_change("w0-no-outputs", r"weights\[0\] must have at least one output channel", lambda c, a: _set(
    a, weights=[a["weights"][0][:0]], biases=[None]))


# mlpconv_backward's own arguments
def _mlpconv_bwd(name, match, **kw):
    def build(ctx, kw=kw):
        a = ctx.mlpconv_base()
        extra = {k: v(ctx) for k, v in kw.items()}
        return _call_mlpconv(ctx, "bwd", a, **extra)

    CASES.append(Case(f"mlpconv-bwd-{name}", "mlpconv", "bwd", match, build))


_mlpconv_bwd("grad_out-channels", r"mlpconv_backward: grad_out must have shape",
             grad_out=lambda c: c.randn(1, 3, 6, 6))
_mlpconv_bwd("grad_out-3d", r"mlpconv_backward: grad_out must have shape", grad_out=lambda c: c.randn(2, 6, 6))
_mlpconv_bwd("grad_out-float64", r"mlpconv_backward: grad_out has dtype (torch.float64|Double)",
             grad_out=lambda c: c.randn(1, 2, 6, 6, dtype=_t().float64))
_mlpconv_bwd("grad_out-int", r"mlpconv_backward: grad_out (has dtype|must be a floating)",
             grad_out=lambda c: c.randn(1, 2, 6, 6).to(_t().int32))
_mlpconv_bwd("grad_out-other-device", r"mlpconv_backward: grad_out is on (meta|cpu)",
             grad_out=lambda c: c.randn(1, 2, 6, 6).to(c.other))
_mlpconv_bwd("out-shape", r"mlpconv_backward: out must have shape", out=lambda c: c.randn(1, 2, 5, 6))
_mlpconv_bwd("out-float16", r"mlpconv_backward: out has dtype (torch.float16|Half)",
             out=lambda c: c.randn(1, 2, 6, 6, dtype=_t().float16))


# lrn
def _lrn_change(name, match, change, vias=("ops", "fwd", "bwd")):
    for via in vias:
        def build(ctx, via=via, change=change):
            return _call_lrn(ctx, via, change(ctx, ctx.lrn_base()))

        CASES.append(Case(f"lrn-{via}-{name}", "lrn", via, match, build))


_lrn_change("valid", None, lambda c, a: a)
_lrn_change("valid-rank3-size-wider-than-C", None, lambda c, a: _set(a, x=a["x"][:, :, 0], size=9))
_lrn_change("x-2d", r"lrn: x must have at least 3 dimensions", lambda c, a: _set(a, x=a["x"][:, :, 0, 0]))
_lrn_change("x-1d", r"lrn: x must have at least 3 dimensions", lambda c, a: _set(a, x=a["x"][0, :, 0, 0]))
for _dt in ("int32", "int64", "uint8", "bool"):
    _lrn_change(f"x-{_dt}", r"lrn: x must be a floating-point tensor",
                lambda c, a, dt=_dt: _set(a, x=a["x"].to(getattr(_t(), dt))))
_lrn_change("x-sparse", r"lrn: x must be a dense \(strided\) tensor", lambda c, a: _set(a, x=a["x"].to_sparse()),
            vias=("ops",))
_lrn_change("size-0", r"lrn: size must be >= 1, got 0", lambda c, a: _set(a, size=0))
_lrn_change("size-negative", r"lrn: size must be >= 1, got -3", lambda c, a: _set(a, size=-3))


def _lrn_bwd(name, match, grad_out):
    def build(ctx):
        return _call_lrn(ctx, "bwd", ctx.lrn_base(), grad_out=grad_out(ctx))

    CASES.append(Case(f"lrn-bwd-{name}", "lrn", "bwd", match, build))


_lrn_bwd("grad_out-shape", r"lrn_backward: grad_out (must have x's shape|has shape)", lambda c: c.randn(2, 5, 3, 2))
_lrn_bwd("grad_out-float64", r"lrn_backward: grad_out has dtype (torch.float64|Double)",
         lambda c: c.randn(2, 5, 3, 3, dtype=_t().float64))
_lrn_bwd("grad_out-int", r"lrn_backward: grad_out (has dtype|must be a floating)",
         lambda c: c.randn(2, 5, 3, 3).to(_t().int64))
_lrn_bwd("grad_out-other-device", r"lrn_backward: grad_out is on (meta|cpu)", lambda c: c.randn(2, 5, 3, 3).to(c.other))


# gap
def _gap_change(name, match, change, vias=("ops", "fwd")):
    for via in vias:
        def build(ctx, via=via, change=change):
            return _call_gap(ctx, via, change(ctx, ctx.gap_base()))

        CASES.append(Case(f"gap-{via}-{name}", "gap", via, match, build))


_gap_change("valid", None, lambda c, a: a)
_gap_change("x-3d", r"gap: x must be a 4-D tensor", lambda c, a: _set(a, x=a["x"][0]))
_gap_change("x-5d", r"gap: x must be a 4-D tensor", lambda c, a: _set(a, x=a["x"][..., None]))
for _dt in ("int32", "int64", "uint8", "bool"):
    _gap_change(f"x-{_dt}", r"gap: x must be a floating-point tensor",
                lambda c, a, dt=_dt: _set(a, x=a["x"].to(getattr(_t(), dt))))
_gap_change("x-sparse", r"gap: x must be a dense \(strided\) tensor", lambda c, a: _set(a, x=a["x"].to_sparse()),
            vias=("ops",))
_gap_change("x-0-rows", r"gap: x must have a non-empty spatial size, got 0x4", lambda c, a: _set(a, x=a["x"][:, :, :0]))
_gap_change("x-0-cols", r"gap: x must have a non-empty spatial size, got 4x0",
            lambda c, a: _set(a, x=a["x"][:, :, :, :0]))


def _gap_bwd(name, match, grad_out, input_size, channels_last=False):
    def build(ctx):
        go = grad_out(ctx)
        return lambda: ctx.ns.gap_backward(go, input_size, channels_last)

    CASES.append(Case(f"gap-bwd-{name}", "gap", "bwd", match, build))


_gap_bwd("valid", None, lambda c: c.randn(2, 3), [2, 3, 4, 4])
_gap_bwd("valid-channels_last", None, lambda c: c.randn(2, 3), [2, 3, 4, 4], True)
_gap_bwd("grad_out-int", r"gap_backward: grad_out must be a floating-point", lambda c: c.randn(2, 3).to(_t().int32),
         [2, 3, 4, 4])
_gap_bwd("grad_out-bool", r"gap_backward: grad_out must be a floating-point", lambda c: c.randn(2, 3).bool(),
         [2, 3, 4, 4])
_gap_bwd("grad_out-1d", r"gap_backward: grad_out must have shape", lambda c: c.randn(6), [2, 3, 4, 4])
_gap_bwd("grad_out-shape", r"gap_backward: grad_out must have shape", lambda c: c.randn(2, 4), [2, 3, 4, 4])
_gap_bwd("input_size-3", r"gap_backward: input_size", lambda c: c.randn(2, 3), [2, 3, 4])
_gap_bwd("input_size-0-rows", r"gap_backward: input_size", lambda c: c.randn(2, 3), [2, 3, 0, 4])
_gap_bwd("input_size-negative", r"gap_backward: (input_size|negative input_size)", lambda c: c.randn(2, 3),
         [2, 3, -4, 4])


CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "duplicate case ids"


# ----------------------------------------------------------------------------------------------
# the worker
# ----------------------------------------------------------------------------------------------


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv):
    backend, device, *ids = argv
    if device == "cpu" and backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fastnin

    ctx = Ctx(backend, device)
    _emit({"ready": True})
    with fastnin.use_backend(backend):
        for cid in ids:
            case = CASE_BY_ID[cid]
            _emit({"id": cid, "status": "start"})
            try:
                fn = case.build(ctx)
                out = fn()
                if device == "cuda":
                    ctx.torch.cuda.synchronize()
                del out
                _emit({"id": cid, "status": "done", "exc": None, "msg": ""})
            except BaseException as e:  # noqa: BLE001 - report anything, the parent judges
                _emit({"id": cid, "status": "done", "exc": type(e).__name__, "msg": str(e)[:2000],
                       "where": traceback.format_exc(limit=3)[-1500:]})


if __name__ == "__main__":
    main(sys.argv[1:])
