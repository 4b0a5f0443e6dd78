"""pytest-benchmark: fastnin's ops (mlpconv, lrn, gap) against torch eager (NCHW, channels_last)
and torch.compile, forward and forward+backward, on the NiN and AlexNet shapes. See conftest.py."""

import pytest

from conftest import params


@pytest.mark.parametrize("case,dtype,provider", params("ops"))
def test_op(bench_run, case, dtype, provider):
    bench_run(case, dtype, provider)
