"""pytest-benchmark: the models of fastnin.models (NiN, the paper's CIFAR-10 NiN, AlexNet with LRN,
VGG-11, GoogLeNet, ResNet-18, LeNet), inference and one training step (forward, backward, SGD
step), against torch eager (NCHW, channels_last) and torch.compile. Skipped while fastnin.models
is not installed. Parametrized over (case, dtype, provider) by conftest.py."""

import pytest

from fastnin.bench import cases

if cases.models_module() is None:
    pytest.skip("fastnin.models is not part of this install", allow_module_level=True)

GROUP = "models"


def test_model(bench_run, case, dtype, provider):
    bench_run(case, dtype, provider)
