"""CIFAR-10 in its "python version" layout, as normalised tensors.

On disk (``cifar-10-batches-py/``, from cifar-10-python.tar.gz): ``data_batch_1`` .. ``data_batch_5`` (train,
10,000 images each), ``test_batch`` (10,000) and ``batches.meta``. Each batch is a pickled dict (Python 2,
protocol 2) with ``b"data"``: uint8 ndarray (N, 3072), each row 1024 red, 1024 green, 1024 blue values of a
32x32 image in row-major order, and ``b"labels"``: N ints in 0-9. Batches are read with a restricted
unpickler (safe_pickle): a file asking for anything beyond containers and numpy arrays is rejected.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ._common import check_limit, check_split, normalise
from .paths import DATASET_FOLDERS, dataset_dir
from .safe_pickle import safe_load
from .sources import how_to_obtain

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "find_cifar10_files", "load_cifar10", "read_cifar_batch"]

#: Per-channel (R, G, B) mean and std of the 50,000 training images, after scaling to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# What a damaged pickle stream can raise while being read (ValueError includes UnicodeDecodeError).
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                  OverflowError)

_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def find_cifar10_files(root: Path, split: str) -> list[Path]:
    """The batch files of ``split`` in ``root`` or ``root/cifar-10-batches-py`` (the tarball's folder).

    FileNotFoundError naming the folder(s), the missing files and how to obtain the data.
    """
    folders = [root, root / DATASET_FOLDERS["cifar10"]]
    for folder in folders:
        paths = [folder / name for name in _BATCHES[split]]
        if all(p.is_file() for p in paths):
            return paths
    raise FileNotFoundError(
        f"CIFAR-10 {split} batches ({', '.join(_BATCHES[split])}) not all in {' or '.join(map(str, folders))}. "
        f"{how_to_obtain('cifar10')}"
    )


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file as (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    Raises FileNotFoundError for a missing file; ValueError naming the file if it is not a (safe) pickle, is
    truncated, lacks data/labels, or its shapes, dtype or labels are wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = safe_load(f)
    except _PICKLE_ERRORS as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be a uint8 array (N, 3072), got {type(data).__name__} "
                         f"{getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or not np.isin(labels, range(10)).all():
        raise ValueError(f"{path}: b'labels' must be {len(data)} ints in 0-9, got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images as float32 (N, 3, 32, 32), normalised per channel (CIFAR10_MEAN/STD), and int64 labels.

    ``root``: the ``cifar-10-batches-py`` folder or its parent; default ``dataset_dir("cifar10")``.
    ``split``: "train" (data_batch_1..5, in order) or "test". ``limit`` keeps the first N examples (later
    batches are then not read). Errors: FileNotFoundError (where it looked, how to obtain the data),
    ValueError naming a corrupt batch, ValueError for a bad split or limit.
    """
    check_split(split)
    check_limit(limit)
    paths = find_cifar10_files(Path(root) if root is not None else dataset_dir("cifar10"), split)
    images, labels = [], []
    for path in paths:
        if labels and limit is not None and sum(map(len, labels)) >= limit:
            break
        x, y = read_cifar_batch(path)
        images.append(x)
        labels.append(y)
    x, y = np.concatenate(images)[:limit], np.concatenate(labels)[:limit]
    return normalise(x, CIFAR10_MEAN, CIFAR10_STD), torch.from_numpy(y)
