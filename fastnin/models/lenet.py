"""LeNet-5 (textbook PyTorch version): plain torch, on purpose.

fastnin fuses convolutions with ReLU; LeNet's convolutions are followed by sigmoids and its pools
are 2x2 averages, not global ones, so no fastnin kernel computes any of its layers and any
"fusion" would change the result. lenet() is kept for a complete sibling set, and to show that
fastnin.fuse() leaves such a model alone.
"""

from __future__ import annotations

from torch import nn

__all__ = ["lenet"]


def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """LeNet for Tensor[N, in_channels, 28, 28] -> logits Tensor[N, num_classes] (the sizes are fixed
    by the 16*5*5 = 400 inputs of the first Linear)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
