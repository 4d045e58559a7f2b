"""ResNet-20 for CIFAR-10 (He et al. 2016, Section 4.2), with WRPN's width factor.

Used by Park et al. 2018 (Table 1, "CIFAR10-ResNet20") and, widened, as the CPU-sized WRPN analog (spec 2(c)).
conv 3x3 16 -> BN -> ReLU -> 3 stages x 3 basic blocks (16, 32, 64 channels; stride 2 at the first block of
stages 2 and 3) -> global average pool -> FC classes. Shortcuts are He et al.'s option A for CIFAR: identity,
and where the shape changes, stride-2 subsampling plus zero channels (parameter-free). 269,722 parameters at
width 1 for 10 classes (0.27M, He et al. Table 6).

WRPN widening (Mishra et al. 2017, spec W4): every layer's filters are multiplied by ``width`` (beta); the
image channels and the number of classes stay fixed. Option A pads however many zero channels the widened
stages need, so any width works. Weights: He initialisation (fan-out, as torchvision), BN weight 1, bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import kaiming_conv_init, pooled_head, scaled

__all__ = ["BasicBlock", "PadShortcut", "ResNet", "resnet20"]


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the channels (half in front, half
    behind) up to ``channels``, the residual branch's width, which is read at run time so that a model widened
    after construction (``lowprec.widen``) stays consistent."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class BasicBlock(nn.Module):
    """conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN, plus the shortcut, -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: PadShortcut | None = None if stride == 1 and in_channels == out_channels else PadShortcut(stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one layer a statement: each intermediate is released as soon as the next layer has made its result
        # (``bn2(conv2(out))`` would hold conv2's input while bn2 runs; under lowprec's packed storage the saved
        # tensors are narrower than such float32 activations in flight, which then set the peak)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu1(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = out + (x if self.shortcut is None else self.shortcut(x, out.shape[1]))
        return self.relu2(out)


class ResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` basic blocks per stage (depth 6 * blocks + 2)."""

    def __init__(self, blocks: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        channels = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        c_in = channels[0]
        for i, c_out in enumerate(channels):
            stage = [BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (b == 0 and i > 0) else 1)
                     for b in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool, self.fc = pooled_head(c_in, num_classes)
        kaiming_conv_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, num_classes) logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)  # a stage a statement: its input is released when the stage returns (BasicBlock)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.fc(self.pool(x))


def resnet20(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-20 (3 blocks per stage); ``width`` is WRPN's beta."""
    return ResNet(3, num_classes=num_classes, width=width, in_channels=in_channels)
