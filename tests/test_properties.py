"""Property-based parity (hypothesis): random problems for every op on every backend, forward and
every gradient, against the float64 reference (tests/_hardening.py runs one case).

What is drawn:
  mlpconv  batch 0-3 (0 one time in eight), 1-6 input channels, H and W 1-10, kernels 1-5 (rectangular), stride 1-3,
           padding 0-2 (only problems with an output of at least 1x1), 1-3 stages of 1-7
           channels, each bias present or None, gap on/off, which inputs need gradients.
  lrn      rank 3-5, batch 0-3, 1-12 channels, spatial dims 1-5, size 1 to C+4 (windows wider
           than C included), alpha 1e-4..2, beta 0.05..1.5, k 0.5..3.
  gap      batch 0-3, 0-9 channels, H and W 1-12 (sometimes up to 40).
  all      dtype float32 / float16 / bfloat16 / float64; x layout contiguous, channels_last,
           sliced (a view inside a NaN-filled buffer) or expanded (stride 0); weights contiguous or
           channels_last; the output gradient random in any of those layouts, or ones expanded
           from a scalar (y.sum().backward()).

Budgets (derandomized, so CI draws the same examples every run): cpu 50 per op, triton under
the interpreter 16 per op with tiny shapes (it runs every kernel program in Python), cuda and
triton on a GPU 300 per op with larger shapes. A shrunk failure becomes an explicit test in
test_regressions.py.
"""

from __future__ import annotations

import pytest
from _hardening import LAYOUTS, RUNNERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = ["float32", "float32", "float16", "bfloat16", "float64"]  # float32 drawn twice as often
GRAD_LAYOUTS = (*LAYOUTS, "ones-expanded")


def _mode(backend_device) -> str:
    backend, device = backend_device
    if device == "cuda":
        return "gpu"
    return "interp" if backend == "triton" else "cpu"


BUDGET = {"cpu": 50, "interp": 16, "gpu": 300}
# Upper bounds of the drawn sizes per mode: (batch, channels, spatial, mlpconv stage channels).
LIMITS = {
    "cpu": dict(n=3, c=6, hw=10, ch=7, lrn_c=12, lrn_s=5, gap_c=9, gap_hw=12, gap_big=40),
    "interp": dict(n=2, c=3, hw=5, ch=4, lrn_c=6, lrn_s=3, gap_c=4, gap_hw=5, gap_big=8),
    "gpu": dict(n=4, c=24, hw=20, ch=48, lrn_c=80, lrn_s=9, gap_c=40, gap_hw=24, gap_big=300),
}


def _batch(draw, lim):
    """Batch 0 one time in eight (hypothesis would otherwise favour it), else 1..n."""
    return 0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, lim["n"]))


@st.composite
def mlpconv_cases(draw, lim):
    n = _batch(draw, lim)
    cin = draw(st.integers(1, lim["c"]))
    h, w = draw(st.integers(1, lim["hw"])), draw(st.integers(1, lim["hw"]))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # kernels that fit the padded input: every drawn problem is valid
    kh, kw = draw(st.integers(1, min(5, h + 2 * ph))), draw(st.integers(1, min(5, w + 2 * pw)))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stages = draw(st.integers(1, 3))
    channels = draw(st.lists(st.integers(1, lim["ch"]), min_size=stages, max_size=stages))
    bias = draw(st.lists(st.booleans(), min_size=stages, max_size=stages))
    need = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    return dict(
        x=[n, cin, h, w], kernel=[kh, kw], stride=[sh, sw], padding=[ph, pw], channels=channels, bias=bias,
        gap=draw(st.booleans()), need=list(need), dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(LAYOUTS)), w_layout=draw(st.sampled_from(["contiguous", "channels_last"])),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def lrn_cases(draw, lim):
    rank = draw(st.integers(3, 5))
    c = draw(st.integers(1, lim["lrn_c"]))
    spatial = draw(st.lists(st.integers(1, lim["lrn_s"]), min_size=rank - 2, max_size=rank - 2))
    return dict(
        x=[_batch(draw, lim), c, *spatial],
        size=draw(st.integers(1, c + 4)),
        alpha=draw(st.sampled_from([1e-4, 0.01, 0.3, 1.0, 2.0])),
        beta=draw(st.sampled_from([0.05, 0.5, 0.75, 1.0, 1.5])),
        k=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
        dtype=draw(st.sampled_from(DTYPES)), x_layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def gap_cases(draw, lim):
    big = draw(st.booleans()) and draw(st.booleans())  # a quarter of the cases: long rows
    top = lim["gap_big"] if big else lim["gap_hw"]
    return dict(
        x=[_batch(draw, lim), draw(st.integers(0, lim["gap_c"])), draw(st.integers(1, top)),
           draw(st.integers(1, top))],
        dtype=draw(st.sampled_from(DTYPES)), x_layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


STRATEGIES = {"mlpconv": mlpconv_cases, "lrn": lrn_cases, "gap": gap_cases}


@pytest.mark.parametrize("op", ["mlpconv", "lrn", "gap"])
def test_parity_property(backend_device, op):
    """Forward and every gradient of `op` on random problems, within the tolerance rule."""
    _, device = backend_device
    mode = _mode(backend_device)
    run = RUNNERS[op]

    @settings(
        max_examples=BUDGET[mode], deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=STRATEGIES[op](LIMITS[mode]))
    def check(case):
        run(case, device)

    check()
