"""Helpers shared by the image loaders: argument checks and uint8 -> normalised float32 conversion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_limit", "check_split", "normalise"]


def check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> None:
    """ValueError unless ``split`` is one of ``allowed``."""
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(map(repr, allowed))}; got {split!r}")


def check_limit(limit: int | None) -> None:
    """ValueError unless ``limit`` is None or a non-negative int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int; got {limit!r}")


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 tensor (x / 255 - mean[c]) / std[c], one mean/std per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
