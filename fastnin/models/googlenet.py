"""GoogLeNet (textbook PyTorch version, Inception v1 without auxiliary heads; input 96x96).

Keys as the plain model (0.0.weight, 1.0.weight, 1.2.weight, 2.0.p1_1.weight, ..., 5.weight).
Fusions:
  - every Conv2d -> ReLU of the stem runs as a one-stage fastnin mlpconv (FusedSequential);
  - in each Inception block the three 1x1 convolutions that read the block input (p1_1, p2_1,
    p3_1) run as ONE one-stage mlpconv with their weights concatenated along the output channels
    (horizontal fusion: the input is read once), whose output is then split; the other convs of
    the block run as one-stage mlpconvs;
  - the last block's four branches end with mlpconv(gap=True) (the global average pool of a
    channel concatenation is the concatenation of the branches' pools), so its map is not written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import FusedSequential, GlobalAvgPool2d, channels_last_inside

__all__ = ["Inception", "googlenet"]


class Inception(nn.Module):
    """Inception block: four branches concatenated along channels.

    p1: 1x1 -> c1;  p2: 1x1 -> c2[0], 3x3 p1 -> c2[1];  p3: 1x1 -> c3[0], 5x5 p2 -> c3[1];
    p4: MaxPool 3/1 p1, 1x1 -> c4; each conv followed by ReLU. Parameters p1_1, p2_1, p2_2, p3_1,
    p3_2, p4_2 are kept separately (the plain block's keys); forward concatenates p1_1, p2_1 and
    p3_1's weights on every call, so gradients flow back to each of them.
    """

    def __init__(self, in_channels: int, c1: int, c2: tuple[int, int], c3: tuple[int, int], c4: int):
        super().__init__()
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def _branches(self, x: Tensor, gap: bool) -> list[Tensor]:
        heads = (self.p1_1, self.p2_1, self.p3_1)
        w = torch.cat([c.weight for c in heads])
        b = torch.cat([c.bias for c in heads])
        split = [c.out_channels for c in heads]
        y1, y2, y3 = ops.mlpconv(x, [w], [b]).split(split, dim=1)
        p2, p3 = self.p2_2, self.p3_2
        return [
            ops.global_avg_pool2d(y1) if gap else y1,
            ops.mlpconv(y2, [p2.weight], [p2.bias], 1, 1, gap=gap),
            ops.mlpconv(y3, [p3.weight], [p3.bias], 1, 2, gap=gap),
            ops.mlpconv(self.p4_1(x), [self.p4_2.weight], [self.p4_2.bias], gap=gap),
        ]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # mlpconv takes batched input only; the plain computation takes both
            return self._plain(x)
        return torch.cat(self._branches(x, gap=False), dim=1)

    def fastnin_forward_gap(self, x: Tensor) -> Tensor:
        """forward followed by a global average pool: Tensor[N, C] (FusedSequential calls it)."""
        return torch.cat(self._branches(x, gap=True), dim=1)

    def _plain(self, x: Tensor) -> Tensor:
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=-3)


def googlenet(num_classes: int = 10, in_channels: int = 1) -> FusedSequential:
    """GoogLeNet for Tensor[N, in_channels, 96, 96] -> logits Tensor[N, num_classes] (any side from
    about 32 up works: it ends with a global average pool)."""
    b1 = FusedSequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b2 = FusedSequential(
        nn.Conv2d(64, 64, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(64, 192, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b3 = FusedSequential(
        Inception(192, 64, (96, 128), (16, 32), 32),
        Inception(256, 128, (128, 192), (32, 96), 64),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b4 = FusedSequential(
        Inception(480, 192, (96, 208), (16, 48), 64),
        Inception(512, 160, (112, 224), (24, 64), 64),
        Inception(512, 128, (128, 256), (24, 64), 64),
        Inception(512, 112, (144, 288), (32, 64), 64),
        Inception(528, 256, (160, 320), (32, 128), 128),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b5 = FusedSequential(
        Inception(832, 256, (160, 320), (32, 128), 128),
        Inception(832, 384, (192, 384), (48, 128), 128),
        GlobalAvgPool2d(flatten=False),
        nn.Flatten(),
    )
    return channels_last_inside(FusedSequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes)))
