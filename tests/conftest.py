"""Shared fixtures: the backends to test, and the needs_cuda / slow marks.

Without a GPU, the Triton kernels run on CPU tensors under the Triton interpreter. It must be on
before triton.jit decorates them, i.e. before fastnin.triton is imported: hence here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnin  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


# (backend, device) pairs. "triton-interp" is the Triton backend on CPU tensors under the
# interpreter (CI); on a GPU machine Triton runs natively on CUDA tensors instead.
BACKEND_PARAMS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(
        ("triton", "cpu"),
        id="triton-interp",
        marks=pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="Triton interpreter not enabled"),
    ),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.needs_cuda),
    pytest.param(
        ("triton", "cuda"),
        id="triton-cuda",
        marks=[pytest.mark.needs_cuda, pytest.mark.skipif(not HAS_TRITON, reason="triton missing")],
    ),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request):
    """Yields (backend, device) with the backend in force for the test."""
    backend, device = request.param
    with fastnin.use_backend(backend):
        yield backend, device


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references are true fp32: TF32 off (CONVENTIONS.md), restored after the test."""
    if not HAS_CUDA:
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
