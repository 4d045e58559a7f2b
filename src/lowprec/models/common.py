"""Helpers shared by the model families."""

from __future__ import annotations

from torch import nn


def scaled(channels: int, width: float) -> int:
    """``channels`` widened by ``width`` (WRPN's beta): ``int(round(channels * width))``, at least 1.

    Only hidden layers are widened; the input channels and the number of classes never go through this.
    """
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    return max(1, round(channels * width))


def pooled_head(channels: int, num_classes: int) -> tuple[nn.Module, nn.Linear]:
    """Global average pooling + flatten, and the classifier over ``channels`` features."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(channels, num_classes)


def kaiming_conv_init(model: nn.Module) -> None:
    """He et al.'s initialisation (fan-out, ReLU gain) for every Conv2d weight of ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
