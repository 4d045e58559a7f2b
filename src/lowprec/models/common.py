"""Helpers shared by the model families."""

from __future__ import annotations


def scaled(channels: int, width: float) -> int:
    """``channels`` widened by ``width`` (WRPN's beta): ``int(round(channels * width))``, at least 1.

    Only hidden layers are widened; the input channels and the number of classes never go through this.
    """
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    return max(1, round(channels * width))
