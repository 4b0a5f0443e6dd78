"""Network in Network (Lin, Chen, Yan, ICLR 2014): the textbook NiN and the paper's CIFAR-10 NiN.

Both are FusedSequentials of the plain-torch layout (REFERENCE.md), so their state_dict keys are
those of the plain nn.Sequential; forward runs each mlpconv block as one fastnin mlpconv and the
last block, the global average pool and the Flatten as one mlpconv(gap=True): the last block's
[N, classes, H, W] map is never written.
"""

from __future__ import annotations

from torch import nn

from ..nn import FusedSequential, GlobalAvgPool2d, MLPConv, nin_block

__all__ = ["NiN", "NiNCIFAR10", "nin", "nin_cifar10"]


def _check(num_classes: int, in_channels: int, dropout: float) -> None:
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"NiN: {name} must be a positive int, got {v!r}")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"NiN: dropout must be in [0, 1], got {dropout!r}")


class NiN(FusedSequential):
    """The textbook NiN (input Tensor[N, in_channels, 224, 224] -> logits Tensor[N, num_classes]).

    Children (and state_dict keys 0.0.weight ... 7.4.bias) as the plain nn.Sequential:
      0 nin_block(in->96, k11, s4)  1 MaxPool2d(3, 2)  2 nin_block(96->256, k5, p2)  3 MaxPool2d(3, 2)
      4 nin_block(256->384, k3, p1) 5 MaxPool2d(3, 2)  6 Dropout  7 nin_block(384->num_classes, k3, p1)
      8 global average pool  9 Flatten
    Any input side from 67 up works (the global pool adapts).
    """

    channels_last_inside = True  # see FusedSequential

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5):
        _check(num_classes, in_channels, dropout)
        super().__init__(
            nin_block(in_channels, 96, kernel_size=11, stride=4, padding=0),
            nn.MaxPool2d(3, stride=2),
            nin_block(96, 256, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(3, stride=2),
            nin_block(256, 384, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(dropout),
            nin_block(384, num_classes, kernel_size=3, stride=1, padding=1),
            GlobalAvgPool2d(flatten=False),
            nn.Flatten(),
        )


class NiNCIFAR10(FusedSequential):
    """The paper's NiN for CIFAR-10 (cuda-convnet NIN/cifar-10_def; input Tensor[N, 3, 32, 32]).

      0 mlpconv(in->192->160->96, k5, p2)   1 MaxPool2d(3, 2, p1)  2 Dropout
      3 mlpconv(96->192->192->192, k5, p2)  4 MaxPool2d(3, 2, p1)  5 Dropout
      6 mlpconv(192->192->192->num_classes, k3, p1)  7 global average pool (8x8)  8 Flatten
    """

    channels_last_inside = True  # see FusedSequential

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5):
        _check(num_classes, in_channels, dropout)
        super().__init__(
            MLPConv(in_channels, [192, 160, 96], kernel_size=5, padding=2),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Dropout(dropout),
            MLPConv(96, [192, 192, 192], kernel_size=5, padding=2),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Dropout(dropout),
            MLPConv(192, [192, 192, num_classes], kernel_size=3, padding=1),
            GlobalAvgPool2d(flatten=False),
            nn.Flatten(),
        )


def nin(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5) -> NiN:
    return NiN(num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def nin_cifar10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> NiNCIFAR10:
    return NiNCIFAR10(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
