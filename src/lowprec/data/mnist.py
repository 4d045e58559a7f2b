"""MNIST-layout image sets (MNIST, Fashion-MNIST) as normalised tensors.

A folder holds the four IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzip-compressed
(``.gz``) or raw; the ``*.idx3-ubyte`` spelling is accepted too. torchvision's layout, ``root/MNIST/raw/`` and
``root/FashionMNIST/raw/``, is found from ``root``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import check_limit, check_split, normalise
from .idx import IDXError, read_idx
from .paths import dataset_dir
from .sources import how_to_obtain

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHIPPED_MNIST",
    "find_mnist_files",
    "load_fashion_mnist",
    "load_mnist",
]

#: 10,000 training and 2,000 test images of MNIST, shipped inside the package (see scripts/make_shipped_data.py).
SHIPPED_MNIST = Path(__file__).parent / "shipped" / "mnist"

#: Pixel mean/std of the training images, after scaling to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

_PREFIX = {"train": "train", "test": "t10k"}
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_mnist_files(root: Path, dataset: str, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX paths of ``split`` under ``root`` or its torchvision layout (raw before .gz).

    ``dataset`` is "mnist" or "fashion-mnist" (picks the torchvision folder name). FileNotFoundError naming
    where it looked and how to obtain the data if either file is missing.
    """
    folders = [root, root / _TORCHVISION[dataset] / "raw"]
    stems = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    for folder in folders:
        found = [_find(folder, stem) for stem in stems]
        if None not in found:
            return found[0], found[1]
    raise FileNotFoundError(
        f"no {stems[0]}[.gz] and {stems[1]}[.gz] in {' or '.join(map(str, folders))}. {how_to_obtain(dataset)}"
    )


def _load(
    dataset: str, split: str, root: Path, limit: int | None, mean: float, std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_split(split)
    check_limit(limit)
    image_path, label_path = find_mnist_files(root, dataset, split)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != "uint8":
        raise IDXError(f"{image_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != "uint8":
        raise IDXError(f"{label_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{image_path}: {len(images)} images but {label_path} holds {len(labels)} labels")
    images, labels = images[:limit], labels[:limit]
    return normalise(images[:, None], [mean], [std]), torch.from_numpy(labels.astype("int64"))


def load_mnist(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images as float32 (N, 1, 28, 28), normalised with MNIST's mean/std, and int64 labels (N,).

    ``root``: a folder with the IDX files (or torchvision's root holding ``MNIST/raw/``); default: the subset
    shipped with the package (SHIPPED_MNIST: 10,000 train, 2,000 test). The full set normally lives in
    ``dataset_dir("mnist")``. ``limit`` keeps the first N examples. ``split``: "train" or "test".
    Errors: FileNotFoundError (missing files: where it looked, how to obtain them), IDXError naming a corrupt or
    truncated file, ValueError for a bad split or limit.
    """
    root = Path(root) if root is not None else SHIPPED_MNIST
    return _load("mnist", split, root, limit, MNIST_MEAN, MNIST_STD)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images as float32 (N, 1, 28, 28), normalised with its own mean/std (0.2860/0.3530),
    and int64 labels (N,).

    ``root``: a folder with the IDX files (or torchvision's root holding ``FashionMNIST/raw/``); default:
    ``dataset_dir("fashion-mnist")``. ``limit``, ``split`` and errors as for load_mnist.
    """
    root = Path(root) if root is not None else dataset_dir("fashion-mnist")
    return _load("fashion-mnist", split, root, limit, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
