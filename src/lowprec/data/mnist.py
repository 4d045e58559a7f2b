"""MNIST-layout image sets (MNIST, Fashion-MNIST) as normalised tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from .idx import read_idx

__all__ = ["load_mnist", "SHIPPED_MNIST"]

#: 10,000 training and 2,000 test images of MNIST, shipped inside the package (see scripts/make_shipped_data.py).
SHIPPED_MNIST = Path(__file__).parent / "shipped" / "mnist"

MEAN, STD = 0.1307, 0.3081


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root}: no {stem}[.gz]; expected the four original MNIST-layout IDX files there")


def load_mnist(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, 28, 28), normalised with MNIST's mean/std, and int64 labels.

    ``root`` is a folder with the IDX files (``train-images-idx3-ubyte[.gz]`` ...); default: the shipped subset.
    ``limit`` keeps the first N examples.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else SHIPPED_MNIST
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype("int64"))
