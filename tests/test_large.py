"""GAP and LRN over tensors of more than 2^31 elements (fp16, to keep memory down): every index
past 2^31 must be computed in 64 bits. The reference runs on chunks of rows in float64, so no
huge float64 tensor is ever made.

All marked `slow` and skipped unless the run selects them: `pytest -m slow tests/test_large.py`.
Measured on this 2-core, 24 GB machine (cpu backend, wall time / peak RSS of the pytest process):
  test_gap_past_2_31_elements[cpu-contiguous]          45 s    5.3 GB
  test_lrn_forward_past_2_31_elements[cpu-contiguous]  40 s    9.3 GB
  test_lrn_backward_past_2_31_elements[cpu-contiguous] ~100 s  17.4 GB (x, y kept by autograd,
      the gradient, and the CPU kernel's dense copy of the expanded grad_out)
CI (.ci/run) runs the contiguous GAP and LRN-forward cases (< 3 min, < 10 GB); the rest needs
~20 GB free. benchmarks/gpu_check.sh runs the whole file on the GPU (cuda and triton backends).
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from _utils import assert_close_rule, grads_of

import fastnin
from fastnin import reference

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_when_selected(request):
    """`pytest` alone runs every test, slow ones included (pyproject.toml filters no mark): these
    need ~5-17 GB, so they run only when the mark expression names them (`-m slow`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("large-tensor test: run with -m slow")

ROWS = 1024  # rows (H) per chunk of the fill and of the reference


def _free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
    return info["MemAvailable"]


def _need(backend_device, gib):
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("2^31 elements are far too many for the Triton interpreter")
    if _free_bytes(device) < gib * 2**30:
        pytest.skip(f"needs ~{gib} GiB of free {device} memory")


def _big(shape, device, layout, dtype=torch.float16):
    """x of `shape` (> 2^31 elements): a random block of ROWS rows repeated down H, each copy
    shifted by its chunk index / 8, so that a read from a wrong (wrapped) offset gives a wrong
    value. Filled chunk by chunk (torch.randn over 2^31 elements would take most of the time)."""
    n, c, h, w = shape
    assert math.prod(shape) > 2**31
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, c, ROWS, w, generator=g).to(device)
    for i in range(0, h, ROWS):
        r = min(ROWS, h - i)
        x[:, :, i : i + r] = (base[:, :, :r] + (i // ROWS) / 8).to(dtype)
    return x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gap_past_2_31_elements(backend_device, layout):
    """[1, 2, 2^15, 2^15 + 8] fp16 (4.3 GB): the means against a chunked float64 sum, and the
    gradient's last elements (past index 2^31)."""
    _need(backend_device, 7)
    _, device = backend_device
    shape = (1, 2, 2**15, 2**15 + 8)
    x = _big(shape, device, layout)
    y = fastnin.ops.global_avg_pool2d(x)
    total = torch.zeros(shape[:2], dtype=torch.float64, device=device)
    for i in range(0, shape[2], ROWS):
        total += x[:, :, i : i + ROWS].double().sum((2, 3))
    ref = total / (shape[2] * shape[3])
    # Yardstick: the exact mean rounded to fp16 (torch's own fp16 mean would upcast the whole
    # tensor to fp32 first: 8.6 GB more)
    assert_close_rule(y, ref, ref.to(torch.float16), "gap > 2^31")
    g = torch.tensor([[3.0, -5.0]], dtype=torch.float16, device=device)
    del x
    gc.collect()
    ns = torch.ops.fastnin_triton if fastnin.get_backend() == "triton" else torch.ops.fastnin
    gx = ns.gap_backward(g, list(shape), layout == "channels_last")
    want = (g.double() / (shape[2] * shape[3])).to(torch.float16)
    for c in range(2):
        assert torch.equal(gx[0, c, -1, -16:], want[0, c].expand(16)), f"channel {c}: tail of the gradient"
        assert torch.equal(gx[0, c, 0, :16], want[0, c].expand(16)), f"channel {c}: head of the gradient"
    del gx


LRN_SHAPE = (1, 4, 2**14, 2**15 + 8)
LRN_ARGS = (5, 0.5, 0.75, 2.0)
# rows checked against the reference: the first, a middle and the last chunk (the last one holds
# the elements past 2^31 in both layouts)
LRN_CHUNKS = [slice(0, 64), slice(2**13, 2**13 + 64), slice(2**14 - 64, 2**14)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_forward_past_2_31_elements(backend_device, layout):
    """[1, 4, 2^14, 2^15 + 8] fp16 (4.3 GB), size 5: the window spans all 4 channels."""
    _need(backend_device, 10)
    _, device = backend_device
    x = _big(LRN_SHAPE, device, layout)
    y = fastnin.ops.local_response_norm(x, *LRN_ARGS)
    assert y.shape == x.shape
    for sl in LRN_CHUNKS:
        xc = x[:, :, sl]
        assert_close_rule(y[:, :, sl], reference.local_response_norm(xc.double(), *LRN_ARGS),
                          reference.local_response_norm(xc, *LRN_ARGS), f"lrn > 2^31 rows {sl}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_backward_past_2_31_elements(backend_device, layout):
    """The gradient through autograd (the path a user takes) with a stride-0 expanded grad_out,
    as y.sum() gives."""
    _need(backend_device, 19)
    _, device = backend_device
    x = _big(LRN_SHAPE, device, layout)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(1, 4, 1, LRN_SHAPE[3], generator=g).to(device, torch.float16).expand(LRN_SHAPE)
    xl = x.requires_grad_()
    (gx,) = grads_of(fastnin.ops.local_response_norm(xl, *LRN_ARGS), [xl], gout)
    xl.requires_grad_(False)
    gc.collect()
    for sl in LRN_CHUNKS:
        xc = x[:, :, sl].detach().double().requires_grad_()
        (gr,) = grads_of(reference.local_response_norm(xc, *LRN_ARGS), [xc], gout[:, :, sl].double())
        xt = x[:, :, sl].detach().clone().requires_grad_()
        (gt,) = grads_of(reference.local_response_norm(xt, *LRN_ARGS), [xt], gout[:, :, sl])
        assert_close_rule(gx[:, :, sl], gr, gt, f"lrn grad > 2^31 rows {sl}")
