"""The plain torch compositions that fastnin's kernels compute.

These are the tests' oracle (run in float64) and the backend "torch". They take already
validated, normalized arguments: weights/biases as equal-length sequences, stride/padding as pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def mlpconv(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    gap: bool = False,
) -> Tensor:
    """relu(conv1x1(relu(conv1x1(relu(conv2d(x, w0, b0, stride, padding)), w1, b1)), w2, b2)).

    With gap=True the result is averaged over H and W: Tensor[N, C].
    """
    y = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = F.relu(F.conv2d(y, w, b, stride, padding) if i == 0 else F.conv2d(y, w, b))
    return y.mean(dim=(2, 3)) if gap else y


def local_response_norm(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """torch.nn.functional.local_response_norm. torch has no float16/bfloat16 LRN on the CPU: there
    the composition runs in float32 and the result is rounded back."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return F.local_response_norm(x.float(), size, alpha, beta, k).to(x.dtype)
    return F.local_response_norm(x, size, alpha, beta, k)


def global_avg_pool2d(x: Tensor) -> Tensor:
    """Mean over H and W: Tensor[N, C, H, W] -> Tensor[N, C]."""
    return x.mean(dim=(2, 3))
