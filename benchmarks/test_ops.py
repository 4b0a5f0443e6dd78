"""pytest-benchmark: fastnin's ops (mlpconv, lrn, gap) against torch eager (NCHW, channels_last)
and torch.compile, forward and forward+backward, on the NiN and AlexNet shapes. Parametrized over
(case, dtype, provider) by conftest.py."""

GROUP = "ops"


def test_op(bench_run, case, dtype, provider):
    bench_run(case, dtype, provider)
