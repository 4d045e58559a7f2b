"""LeNet for MNIST, as trained by Park et al. 2018 (Table 1, "MNIST (LeNet)", Caffe).

Caffe's ``examples/mnist/lenet_train_test.prototxt``: conv 20 5x5 -> max-pool 2 -> conv 50 5x5 -> max-pool 2
-> FC 500 -> ReLU -> FC classes, 431,080 parameters for 10 classes, "xavier" weights (Caffe's filler:
U(+-sqrt(3 / fan_in))) and zero biases.

Deviation from the Caffe prototxt, following Park's text: Park describe every CONV module as "convolution, ReLU
activation, and pooling layers" (Section 4.1), so a ReLU follows each convolution (Caffe's example has none).
ReLUs carry no parameters, so the count is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import scaled

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """Caffe LeNet on 1x28x28 inputs; ``width`` scales the 20/50/500 hidden widths (WRPN widening)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, hidden = scaled(20, width), scaled(50, width), scaled(500, width)
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5),  # 28 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 12
            nn.Conv2d(c1, c2, 5),  # -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(3.0 / (module.weight[0].numel()))  # Caffe xavier, variance_norm FAN_IN
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        return self.classifier(self.features(x))
