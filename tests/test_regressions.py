"""Failures found by the hardening tests (hypothesis shrinks, NaN/Inf probes), kept as explicit
cases on every backend so that they keep running whatever hypothesis draws next.

Each case is the dict test_properties.py drew (tests/_hardening.py runs it) or a minimal probe.
"""

from __future__ import annotations

import pytest
import torch
from _hardening import RUNNERS
from _utils import grads_of

import fastnin
from fastnin import reference

# (op, case, what it showed)
CASES = [
    pytest.param("mlpconv", {
        "x": [3, 2, 9, 10], "kernel": [1, 5], "stride": [1, 1], "padding": [1, 0], "channels": [4], "bias": [True],
        "gap": False, "need": [False, False, False], "dtype": "float32", "x_layout": "contiguous",
        "w_layout": "contiguous", "grad_layout": "contiguous", "seed": 321,
    }, id="mlpconv-fp32-10-term-dot"),  # CPU: 3.1 ulp vs torch's 0.8 (summation order): the fp32 allowance
    pytest.param("mlpconv", {
        "x": [3, 4, 4, 6], "kernel": [3, 1], "stride": [2, 2], "padding": [0, 2], "channels": [3, 6, 1],
        "bias": [False, True, True], "gap": True, "need": [False, False, True], "dtype": "float32",
        "x_layout": "channels_last", "w_layout": "contiguous", "grad_layout": "sliced", "seed": 1511,
    }, id="mlpconv-fp32-3stage-gap-3-values"),  # CPU: 4.5 ulp vs torch's 1.4 on a 3-value output
    pytest.param("gap", {
        "x": [1, 1, 4, 5], "dtype": "float32", "x_layout": "channels_last", "grad_layout": "sliced", "seed": 29112,
    }, id="gap-fp32-cancelling-mean"),  # Triton: 3.8 ulp of a mean of 20 values that partly cancel
]


@pytest.mark.parametrize("op,case", CASES)
def test_shrunk_case(backend_device, op, case):
    RUNNERS[op](case, backend_device[1])


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("gap", [False, True], ids=["map", "gap"])
def test_mlpconv_inf_input_gradients_like_torch(backend_device, stages, gap):
    """One +Inf in x, 2-3 stages: the hidden pre-activations hold NaN (Inf - Inf) and the weight
    gradients +-Inf where torch's hold them. The CPU and Triton backwards used to mask the ReLU
    gradient with `h > 0`, which blocks NaN pre-activations (torch's threshold_backward passes
    them): their weight gradients came out NaN where torch's are +-Inf (fixed in d0a8518)."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, generator=g)
    x[0, 1, 1, 2] = float("inf")
    ws = [torch.randn(3, 2, 3, 3, generator=g) * 0.3] + [torch.randn(3, 3, 1, 1, generator=g) * 0.5
                                                         for _ in range(stages - 1)]
    bs = [torch.randn(3, generator=g) * 0.1 for _ in range(stages)]
    leaves = [t.to(device).requires_grad_() for t in (x, *ws, *bs)]
    leaves64 = [t.double().requires_grad_() for t in (x, *ws, *bs)]
    y = fastnin.ops.mlpconv(leaves[0], leaves[1:1 + stages], leaves[1 + stages:], 1, 1, gap=gap)
    r = reference.mlpconv(leaves64[0], leaves64[1:1 + stages], leaves64[1 + stages:], (1, 1), (1, 1), gap)
    go = torch.randn(r.shape, generator=g)
    for i, (a, b) in enumerate(zip(grads_of(y, leaves, go.to(device)), grads_of(r, leaves64, go.double()))):
        a = a.cpu()
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isposinf(), b.isposinf()) and torch.equal(
            a.isneginf(), b.isneginf()), f"gradient {i}: NaN/Inf positions differ from torch's"
