"""A small CNN for the CPU-sized WRPN and mixed-precision experiments (Fashion-MNIST / MNIST / CIFAR-10).

None of the papers trains this network: WRPN report ImageNet only and MPT's experiments do not fit on 2 cores
(spec 1(c), 2(c)). It is the "small CNN at beta in {1, 2}" analog of spec 2(c): three CONV modules (conv 3x3
-> batch norm -> ReLU -> max-pool 2) with 32/64/128 filters times ``width``, global average pooling and one FC
layer, so its cost and memory are dominated by conv activations, which WRPN and MPT reduce. The first conv
and the FC layer are the "first and last layer" WRPN keep at full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import kaiming_conv_init, pooled_head, scaled

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """``in_channels`` x H x W images (any H, W >= 8; 28x28 or 32x32 in practice) -> (N, num_classes) logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for filters in (32, 64, 128):
            c_out = scaled(filters, width)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool, self.fc = pooled_head(c_in, num_classes)
        kaiming_conv_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))
