"""SVHN (Street View House Numbers, cropped digits) as normalised tensors.

On disk: MATLAB (v5) files ``train_32x32.mat`` (73,257 images), ``test_32x32.mat`` (26,032) and optionally
``extra_32x32.mat`` (531,131), each with ``X``: uint8 (32, 32, 3, N) and ``y``: (N, 1) labels 1-10, where 10
means the digit 0. Reading them needs scipy (imported only here, only when a file is read).

scipy's MAT reader is not hardened against malformed input (its loadmat documentation says so): truncated or
garbled files raise ValueError here, but some byte-level corruptions crash the interpreter inside scipy
(seen with scipy 1.17.1). If a process dies reading SVHN, re-download the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from ._common import check_limit, check_split, normalise
from .paths import dataset_dir
from .sources import how_to_obtain

__all__ = ["SVHN_MEAN", "SVHN_SPLITS", "SVHN_STD", "load_svhn", "read_svhn_mat"]

#: Per-channel (R, G, B) mean and std of the training images, after scaling to [0, 1].
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

SVHN_SPLITS = ("train", "test", "extra")


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``.mat`` file as (images uint8 (N, 3, 32, 32), labels int64 (N,) in 0-9, label 10 -> 0).

    Errors: FileNotFoundError for a missing file; ImportError if scipy is missing; ValueError naming the file
    if it is not a readable MATLAB v5 file, lacks X/y, or their shapes, dtype or labels (1-10) are wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}. {how_to_obtain('svhn')}")
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as err:
        raise ImportError(f"reading SVHN ({path}) needs scipy: pip install scipy") from err
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except (MatReadError, ValueError, TypeError, IndexError, KeyError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable MATLAB v5 file ({type(err).__name__}: {err})") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: needs variables X and y; found {sorted(k for k in mat if not k.startswith('__'))}")
    images, labels = mat["X"], mat["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: X must be uint8 (32, 32, 3, N), got {images.dtype} {images.shape}")
    n = images.shape[3]
    if labels.shape != (n, 1) or labels.dtype.kind not in "iuf" or not np.isin(labels, range(1, 11)).all():
        raise ValueError(f"{path}: y must be ({n}, 1) labels in 1-10, got {labels.dtype} {labels.shape}")
    return images.transpose(3, 2, 0, 1), labels.reshape(n).astype(np.int64) % 10


def load_svhn(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN images as float32 (N, 3, 32, 32), normalised per channel (SVHN_MEAN/STD), and int64 labels 0-9.

    ``root``: the folder holding ``{split}_32x32.mat``; default ``dataset_dir("svhn")``. ``split``: "train",
    "test" or "extra". ``limit`` keeps the first N examples (the whole file is still read).
    Errors: FileNotFoundError (the path, how to obtain the data), ImportError without scipy, ValueError naming
    a corrupt file, ValueError for a bad split or limit.
    """
    check_split(split, SVHN_SPLITS)
    check_limit(limit)
    images, labels = read_svhn_mat((Path(root) if root is not None else dataset_dir("svhn")) / f"{split}_32x32.mat")
    return normalise(images[:limit], SVHN_MEAN, SVHN_STD), torch.from_numpy(labels[:limit])
