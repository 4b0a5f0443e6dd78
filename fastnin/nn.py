"""Modules over fastnin's ops, with the parameters and state_dict keys of their plain-torch twins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["MLPConv", "nin_block", "LocalResponseNorm", "GlobalAvgPool2d"]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class MLPConv(nn.Sequential):
    """A fused NiN mlpconv block: Conv2d(k) -> ReLU [-> Conv2d(1x1) -> ReLU [-> Conv2d(1x1) -> ReLU]].

    It *is* the nn.Sequential it replaces (same children, same state_dict keys `0.weight`,
    `0.bias`, `2.weight`, ...), so the weights of a plain nin block load into it unchanged; only
    forward differs: one fused kernel per direction (fastnin.ops.mlpconv).

    Args:
        in_channels: Cin.
        channels: output channels of each stage, 1 to 3 ints (an int means one stage).
        kernel_size, stride, padding: of the first convolution (int or pair).
        bias: whether the convolutions have biases.
        gap: average the result over H and W (output Tensor[N, Cout]), fused into the kernel.

    Shape: Tensor[N, Cin, H, W] -> Tensor[N, Cout, Ho, Wo] (or Tensor[N, Cout] with gap=True).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int | Sequence[int],
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        gap: bool = False,
        device=None,
        dtype=None,
    ):
        channels = [channels] if isinstance(channels, int) else list(channels)
        if not 1 <= len(channels) <= 3:
            raise ValueError(f"MLPConv: channels must hold 1 to 3 ints, got {channels}")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            if i == 0:
                conv = nn.Conv2d(prev, c, kernel_size, stride, padding, bias=bias, device=device, dtype=dtype)
            else:
                conv = nn.Conv2d(prev, c, 1, bias=bias, device=device, dtype=dtype)
            layers += [conv, nn.ReLU()]
            prev = c
        super().__init__(*layers)
        self.gap = gap

    @classmethod
    def from_modules(cls, convs: Sequence[nn.Conv2d], gap: bool = False) -> MLPConv:
        """Wrap existing Conv2d modules (their parameters are shared, not copied)."""
        self = cls.__new__(cls)
        layers: list[nn.Module] = []
        for c in convs:
            layers += [c, nn.ReLU()]
        nn.Sequential.__init__(self, *layers)
        self.gap = gap
        return self

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self if isinstance(m, nn.Conv2d)]

    def extra_repr(self) -> str:
        return "gap=True" if self.gap else ""

    def forward(self, x: Tensor) -> Tensor:
        convs = self.convs
        first = convs[0]
        if first.padding_mode != "zeros":
            raise ValueError(f"MLPConv: padding_mode {first.padding_mode!r} is not supported (only 'zeros')")
        return ops.mlpconv(
            x,
            [c.weight for c in convs],
            [c.bias for c in convs],
            first.stride,
            first.padding,
            gap=self.gap,
        )


def nin_block(
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0
) -> MLPConv:
    """The textbook NiN block: Conv2d(k, stride, padding) -> ReLU -> (Conv2d 1x1 -> ReLU) x 2, fused."""
    return MLPConv(in_channels, [out_channels] * 3, kernel_size, stride, padding)


class LocalResponseNorm(nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm with fastnin's one-pass kernel (same arguments, same result)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.local_response_norm(x, self.size, self.alpha, self.beta, self.k)


class GlobalAvgPool2d(nn.Module):
    """Global average pooling: Tensor[N, C, H, W] -> Tensor[N, C] (flatten=True) or Tensor[N, C, 1, 1]."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def extra_repr(self) -> str:
        return f"flatten={self.flatten}"

    def forward(self, x: Tensor) -> Tensor:
        y = ops.global_avg_pool2d(x)
        return y if self.flatten else y[:, :, None, None]
