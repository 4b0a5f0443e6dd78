"""Shared machinery of the hardening tests (test_properties.py, test_regressions.py, test_numerics.py):
layouts beyond _utils.make_layout, and one parity runner per op that checks the forward and every
gradient of fastnin.ops.* (under the backend in force) against fastnin.reference in float64.

A case is a plain dict (what hypothesis draws, or what a regression test writes out), so that a
shrunk failure printed by hypothesis can be pasted into test_regressions.py unchanged.
"""

from __future__ import annotations

import math

import torch
from _utils import assert_close_rule, grads_of, max_err

import fastnin
from fastnin import reference
from fastnin.ops import lrn_output_format, mlpconv_output_format

LAYOUTS = ("contiguous", "channels_last", "sliced", "expanded")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor of t's shape in `layout`, detached (a leaf). The values may differ from t's (for
    "expanded" they must): callers take the reference from the returned tensor, never from t.

    contiguous     t itself, contiguous.
    channels_last  channels innermost: torch.channels_last for 4-D, the same permutation
                   (dim 1 last) for other ranks.
    sliced         a view into a larger buffer filled with NaN: storage offset > 0, channel dim
                   offset by 1, dim 2 with stride 2 (rank >= 3), the last dim padded; a kernel
                   that reads outside the view picks up NaN.
    expanded       zero strides: dim 0 and the last dim are broadcast from size 1 (stride 0), as
                   x.expand() or y.sum().backward()'s gradients give.
    """
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        perm = [0, *range(2, t.dim()), 1]
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv)
    if layout == "sliced":
        big_shape, index = [], []
        for d, s in enumerate(t.shape):
            if d == 1:  # offset 1, one spare channel after
                big_shape.append(s + 2)
                index.append(slice(1, 1 + s))
            elif d == 2 and t.dim() >= 3 and d != t.dim() - 1:  # every other row
                big_shape.append(2 * s + 1)
                index.append(slice(1, 1 + 2 * s, 2))
            elif d == t.dim() - 1:  # padded rows
                big_shape.append(s + 3)
                index.append(slice(0, s))
            else:
                big_shape.append(s)
                index.append(slice(None))
        big = torch.full(big_shape, float("nan"), dtype=t.dtype, device=t.device)
        big[tuple(index)] = t
        return big[tuple(index)]
    if layout == "expanded":
        idx = [slice(None)] * t.dim()
        idx[0] = slice(0, 1)
        idx[-1] = slice(0, 1)
        return t[tuple(idx)].contiguous().expand(t.shape)
    raise ValueError(layout)


def _leaf(t, requires_grad=True):
    """A leaf of t, keeping t's strides (a view of a non-grad tensor is itself a leaf)."""
    if t is None:
        return None
    t = t.detach()
    return t.requires_grad_(requires_grad) if requires_grad else t


def _dense64(t):
    return None if t is None else t.detach().to(torch.float64).contiguous()


# fp32 reductions (GEMMs, GAP's mean): the rule's yardstick, torch's own fp32 error, is often below
# 1 ulp of the output scale for short reductions, and another (equally valid) summation order
# lands a few ulp away. Seen here: the CPU mlpconv forward, 10-term dot products (1x5 kernel,
# 2 channels), max error 3.1 and 4.5 ulp against torch's 0.8 and 1.4 in 2 of 111 random fp32
# checks, ours bitwise equal to torch.mm over the same im2col matrix in its (kh, kw, cin) order,
# i.e. pure summation order; 4.5 ulp against 1.4 for a 3-stage gap=True output of 3 values; the
# Triton GAP, 3.8 ulp against 0.8 for the mean of 20 values that partly cancel. So fp32
# reductions get FP32_REDUCTION_ULPS ulp beside 2x torch's error, measured at the larger of the
# output scale and `term_scale`, the size of the reduced terms (for a mean, max mean|x|: the
# classic bound of a float sum's error is relative to sum |x_i|, not to |sum x_i|).
FP32_REDUCTION_ULPS = 4


def check_close(ours, ref64, same, name, low_norm="max", reduction=False, term_scale=0.0):
    """assert_close_rule, with the fp32 reduction allowance above when reduction=True."""
    if reduction and ours.dtype == torch.float32 and ours.numel() > 0:
        scale = max(ref64.detach().abs().max().item(), term_scale, 1e-30)
        err, base = max_err(ours, ref64), max_err(same, ref64)
        bound = 2 * base + FP32_REDUCTION_ULPS * torch.finfo(torch.float32).eps * scale
        assert err <= bound, (f"{name}: float32 max error {err:.3g} > 2 * torch's {base:.3g} + "
                              f"{FP32_REDUCTION_ULPS} ulp of {scale:.3g}")
        return
    norm = "max" if ours.dtype in (torch.float32, torch.float64) else low_norm
    assert_close_rule(ours, ref64, same, name, norm=norm)


def _check_grads(names, ours, ref, same, inputs, low_norm, reduction=False):
    for name, a, r, s, inp in zip(names, ours, ref, same, inputs):
        if inp is None or not inp.requires_grad:
            continue
        assert a is not None, f"grad {name} missing"
        assert a.dtype == inp.dtype and a.shape == inp.shape, f"grad {name}: {a.dtype} {tuple(a.shape)}"
        check_close(a, r, s, f"grad {name}", low_norm, reduction)


def _grad_out(shape, dtype, device, kind, seed):
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if kind == "ones-expanded":  # y.sum().backward()
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    return lay_out(vals, kind)


# ----------------------------------------------------------------------------------------------
# mlpconv
# ----------------------------------------------------------------------------------------------


def mlpconv_tensors(case, device):
    """x, weights, biases of a case, in its dtype and layouts (weights kaiming-scaled, so values
    stay O(1) through the stages in every dtype)."""
    dtype = DTYPE_NAMES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"])
    n, cin, h, w = case["x"]
    kh, kw = case["kernel"]
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    ws, bs, prev = [], [], cin
    for i, (c, has_b) in enumerate(zip(case["channels"], case["bias"])):
        k = (kh, kw) if i == 0 else (1, 1)
        std = math.sqrt(2.0 / max(prev * k[0] * k[1], 1))
        ws.append(lay_out((torch.randn(c, prev, *k, generator=g, dtype=torch.float64) * std).to(device, dtype),
                          case["w_layout"]))
        bs.append((torch.randn(c, generator=g, dtype=torch.float64) * 0.1).to(device, dtype) if has_b else None)
        prev = c
    return lay_out(x.to(device, dtype), case["x_layout"]), ws, bs


def run_mlpconv(case, device):
    """fastnin.ops.mlpconv (backend in force) vs reference.mlpconv in float64 and in the case's dtype."""
    x, ws, bs = mlpconv_tensors(case, device)
    need_x, need_w, need_b = case["need"]
    stride, padding, gap = tuple(case["stride"]), tuple(case["padding"]), case["gap"]

    xo, wo, bo = _leaf(x, need_x), [_leaf(w, need_w) for w in ws], [_leaf(b, need_b) for b in bs]
    y = fastnin.ops.mlpconv(xo, wo, bo, stride, padding, gap=gap)
    xr, wr, br = (_leaf(_dense64(x), need_x), [_leaf(_dense64(w), need_w) for w in ws],
                  [_leaf(_dense64(b), need_b) for b in bs])
    yr = reference.mlpconv(xr, wr, br, stride, padding, gap)
    xt, wt, bt = _leaf(x.clone(), need_x), [_leaf(w.clone(), need_w) for w in ws], [_leaf(b, need_b) for b in bs]
    yt = reference.mlpconv(xt, wt, bt, stride, padding, gap)

    assert y.dtype == x.dtype and y.shape == yr.shape, f"{y.dtype} {tuple(y.shape)} vs {tuple(yr.shape)}"
    if gap:
        assert y.is_contiguous()
    else:
        assert y.is_contiguous(memory_format=mlpconv_output_format(x, ws[0])), f"output strides {y.stride()}"
    check_close(y, yr, yt, "out", reduction=True)

    inputs = [xo, *wo, *bo]
    if not any(t is not None and t.requires_grad for t in inputs):
        return
    go = _grad_out(yr.shape, x.dtype, device, case["grad_layout"], case["seed"] + 1)
    names = ["x"] + [f"weights[{i}]" for i in range(len(wo))] + [f"biases[{i}]" for i in range(len(bo))]
    g = grads_of(y, inputs, go)
    gr = grads_of(yr, [xr, *wr, *br], _dense64(go))
    gt = grads_of(yt, [xt, *wt, *bt], go)
    # Low precision through ReLU chains: rms (see assert_close_rule), as test_mlpconv.py does.
    _check_grads(names, g, gr, gt, inputs, low_norm="rms", reduction=True)


# ----------------------------------------------------------------------------------------------
# lrn
# ----------------------------------------------------------------------------------------------


def lrn_tensor(case, device):
    dtype = DTYPE_NAMES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["x"], generator=g, dtype=torch.float64) * case.get("scale", 1.0)
    return lay_out(x.to(device, dtype), case["x_layout"])


def run_lrn(case, device):
    x = lrn_tensor(case, device)
    args = (case["size"], case["alpha"], case["beta"], case["k"])
    xo = _leaf(x)
    y = fastnin.ops.local_response_norm(xo, *args)
    xr = _leaf(_dense64(x))
    yr = reference.local_response_norm(xr, *args)
    xt = _leaf(x.clone())
    yt = reference.local_response_norm(xt, *args)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=lrn_output_format(x)), f"output strides {y.stride()}"
    assert_close_rule(y, yr, yt, "out")
    go = _grad_out(x.shape, x.dtype, device, case["grad_layout"], case["seed"] + 1)
    g = grads_of(y, [xo], go)
    gr = grads_of(yr, [xr], _dense64(go))
    gt = grads_of(yt, [xt], go)
    _check_grads(["x"], g, gr, gt, [xo], low_norm="max")


# ----------------------------------------------------------------------------------------------
# gap
# ----------------------------------------------------------------------------------------------


def gap_tensor(case, device):
    dtype = DTYPE_NAMES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["x"], generator=g, dtype=torch.float64) * case.get("scale", 1.0) + case.get("shift", 0.0)
    return lay_out(x.to(device, dtype), case["x_layout"])


def run_gap(case, device):
    x = gap_tensor(case, device)
    xo = _leaf(x)
    y = fastnin.ops.global_avg_pool2d(xo)
    xr = _leaf(_dense64(x))
    yr = reference.global_avg_pool2d(xr)
    xt = _leaf(x.clone())
    yt = reference.global_avg_pool2d(xt)
    assert y.dtype == x.dtype and y.shape == yr.shape and y.is_contiguous()
    terms = xr.detach().abs().mean(dim=(2, 3)).max().item() if xr.numel() else 0.0
    check_close(y, yr, yt, "out", reduction=True, term_scale=terms)
    go = _grad_out(yr.shape, x.dtype, device, case["grad_layout"], case["seed"] + 1)
    g = grads_of(y, [xo], go)
    gr = grads_of(yr, [xr], _dense64(go))
    gt = grads_of(yt, [xt], go)
    _check_grads(["x"], g, gr, gt, [xo], low_norm="max")


RUNNERS = {"mlpconv": run_mlpconv, "lrn": run_lrn, "gap": run_gap}
