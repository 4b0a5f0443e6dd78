"""ResNet-18 (textbook PyTorch version: 3x3 convs with biases, BatchNorm, a 1x1 strided projection
without BatchNorm on the first block of stages 2-4; input 96x96 or 224x224).

Keys as the plain model (0.0.weight, 0.1.running_mean, 1.0.conv1.weight, ..., 7.weight).
In eval mode every BatchNorm is folded into the convolution before it (fastnin.nn.fold_batch_norm):
conv1 -> BN -> ReLU of the stem and of each block run as one-stage fastnin mlpconvs, conv2 -> BN
as one convolution. In training mode the BatchNorms run as themselves (batch statistics and
running-statistics updates exactly as torch's). The global average pool is fastnin's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import FusedSequential, GlobalAvgPool2d, fold_batch_norm

__all__ = ["Residual", "resnet18"]


class Residual(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + (conv3(x) if conv3 else x))."""

    def __init__(self, in_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        # Fold only when both BatchNorms use their running statistics (eval mode) and the input is
        # batched (mlpconv's requirement); otherwise the plain computation.
        if self.bn1.training or self.bn2.training or x.dim() != 4 or self.bn1.running_mean is None:
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
        else:
            w1, b1 = fold_batch_norm(self.conv1.weight, self.conv1.bias, self.bn1)
            y = ops.mlpconv(x, [w1], [b1], self.conv1.stride, self.conv1.padding)
            w2, b2 = fold_batch_norm(self.conv2.weight, self.conv2.bias, self.bn2)
            y = F.conv2d(y, w2, b2, self.conv2.stride, self.conv2.padding)
        if self.conv3 is not None:
            x = self.conv3(x)
        return F.relu(y + x)


def resnet_block(in_channels: int, num_channels: int, num_residuals: int, first_block: bool = False):
    blocks = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blocks.append(Residual(in_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blocks.append(Residual(num_channels, num_channels))
    return FusedSequential(*blocks)


def resnet18(num_classes: int = 10, in_channels: int = 1) -> FusedSequential:
    """ResNet-18 for Tensor[N, in_channels, 96, 96] -> logits Tensor[N, num_classes] (any side works:
    it ends with a global average pool)."""
    b1 = FusedSequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    # Not channels_last_inside (as fastnin's other models are): its training-mode blocks are plain
    # torch (BatchNorm with batch statistics), whose convolutions with channels_last maps and NCHW
    # weights ran the training step at 143 vs 101 ms (batch 8, 96x96, 2 CPU threads, alternated).
    return FusedSequential(
        b1,
        resnet_block(64, 64, 2, first_block=True),
        resnet_block(64, 128, 2),
        resnet_block(128, 256, 2),
        resnet_block(256, 512, 2),
        GlobalAvgPool2d(flatten=False),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )
