"""The plain-torch twins of fastnin.models, written from REFERENCE.md (the textbook definitions).

Each factory takes the same arguments as its fastnin counterpart; the state_dict keys are the
textbook ones, so that `fastnin_model.load_state_dict(twin.state_dict())` checks the drop-in claim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


def nin(num_classes=10, in_channels=1, dropout=0.5):
    return nn.Sequential(
        nin_block(in_channels, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(dropout),
        nin_block(384, num_classes, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
    )


def _mlpconv(cin, channels, k, p):
    layers, prev = [], cin
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(prev, c, k if i == 0 else 1, padding=p if i == 0 else 0), nn.ReLU()]
        prev = c
    return nn.Sequential(*layers)


def nin_cifar10(num_classes=10, in_channels=3, dropout=0.5):
    return nn.Sequential(
        _mlpconv(in_channels, [192, 160, 96], 5, 2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Dropout(dropout),
        _mlpconv(96, [192, 192, 192], 5, 2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Dropout(dropout),
        _mlpconv(192, [192, 192, num_classes], 3, 1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
    )
