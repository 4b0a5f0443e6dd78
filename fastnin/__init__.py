"""fastnin: fused CPU, CUDA and Triton kernels for the Network-in-Network family of CNNs.

    import fastnin
    y = fastnin.ops.mlpconv(x, [w0, w1, w2], [b0, b1, b2], stride=1, padding=2)
    block = fastnin.nn.MLPConv(96, [192, 192, 192], kernel_size=5, padding=2)
    with fastnin.use_backend("triton"):
        ...
"""

import torch as _torch

try:
    from . import _C  # noqa: F401  (the ops' schemas and native kernels)
except ImportError as _e:  # most often: built against another torch than the one installed
    raise ImportError(
        f"fastnin: cannot load its compiled kernels (fastnin._C) with torch {_torch.__version__}: {_e}. "
        "fastnin must be built against the torch it runs with: reinstall it with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a checkout)."
    ) from _e
from . import nn, ops, reference
from . import models
from .fuse import fuse
from .models import NiN
from ._backend import BACKENDS, available_backends, get_backend, set_backend, use_backend
from .ops import global_avg_pool2d, local_response_norm, mlpconv

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "mlpconv",
    "local_response_norm",
    "global_avg_pool2d",
    "nn",
    "ops",
    "reference",
    "models",
    "NiN",
    "fuse",
]
