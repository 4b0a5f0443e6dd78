"""pytest-benchmark: the models of fastnin.models (NiN, the paper's CIFAR-10 NiN, AlexNet with LRN,
VGG-11, GoogLeNet, ResNet-18, LeNet), inference and one training step (forward, backward, SGD
step), against the same model run by torch eager (NCHW, channels_last) and torch.compile.
Skipped while fastnin.models is not installed. See conftest.py."""

import pytest

from conftest import params
from fastnin.bench import cases

if cases.models_module() is None:
    pytest.skip("fastnin.models is not part of this install", allow_module_level=True)


@pytest.mark.parametrize("case,dtype,provider", params("models"))
def test_model(bench_run, case, dtype, provider):
    bench_run(case, dtype, provider)
