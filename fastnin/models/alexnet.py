"""AlexNet (textbook PyTorch version, one input channel by default), optionally with the paper's LRN.

A FusedSequential of the plain layout, so the state_dict keys are the plain nn.Sequential's:
each Conv2d -> ReLU pair runs as a one-stage fastnin mlpconv (bias and ReLU in the convolution's
epilogue), and the LocalResponseNorm layers (lrn=True) are fastnin's one-pass kernel.
"""

from __future__ import annotations

from torch import nn

from ..nn import FusedSequential, LocalResponseNorm, channels_last_inside

__all__ = ["alexnet"]


def alexnet(lrn: bool = False, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5) -> FusedSequential:
    """AlexNet for Tensor[N, in_channels, 224, 224] -> logits Tensor[N, num_classes].

    lrn=True adds LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2) after the ReLU of conv1 and
    of conv2, as in the AlexNet paper (the indices of the later layers then shift by one and two).
    """

    def norm():
        return [LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []

    model = FusedSequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        *norm(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        *norm(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, 4096),
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, num_classes),
    )
    return channels_last_inside(model)
