"""VGG (textbook PyTorch version): vgg11, and VGG with any block layout (for small test variants).

A FusedSequential of FusedSequential blocks, keys as the plain nn.Sequential of blocks
(0.0.weight, 1.0.weight, 2.0.weight, 2.2.weight, ..., 6.weight): every Conv2d(3x3) -> ReLU runs
as a one-stage fastnin mlpconv.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..nn import FusedSequential, channels_last_inside

__all__ = ["VGG11_ARCH", "vgg", "vgg11"]

VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs: int, in_channels: int, out_channels: int) -> FusedSequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return FusedSequential(*layers)


def vgg(
    conv_arch: Sequence[tuple[int, int]] = VGG11_ARCH,
    num_classes: int = 10,
    in_channels: int = 1,
    dropout: float = 0.5,
    input_size: int = 224,
    hidden: int = 4096,
) -> FusedSequential:
    """VGG with blocks conv_arch = ((convs, channels), ...), each halving the map; the classifier
    expects the map of an input_size x input_size image."""
    blocks, side = [], input_size
    for num_convs, out_channels in conv_arch:
        blocks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels, side = out_channels, side // 2
    if side < 1:
        raise ValueError(f"vgg: input_size {input_size} is too small for {len(conv_arch)} blocks")
    return channels_last_inside(FusedSequential(
        *blocks,
        nn.Flatten(),
        nn.Linear(in_channels * side * side, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    ))


def vgg11(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5) -> FusedSequential:
    """VGG-11 for Tensor[N, in_channels, 224, 224] -> logits Tensor[N, num_classes]."""
    return vgg(VGG11_ARCH, num_classes, in_channels, dropout)
