"""What data is on disk: one DatasetStatus per data set, for ``lowprec data list``. Reads headers, not data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cifar import find_cifar10_files
from .idx import IDXError, idx_shape
from .mnist import SHIPPED_MNIST, find_mnist_files
from .paths import dataset_dir
from .sources import how_to_obtain
from .spoken_digits import FILE_NAMES, read_spoken_digits
from .svhn import SVHN_SPLITS
from .text import default_corpus

__all__ = ["DatasetStatus", "dataset_status"]


@dataclass(frozen=True)
class DatasetStatus:
    """One data set as found under data_dir().

    ``present``: all files a loader needs exist (their content is checked only as far as counting needs).
    ``path``: where they were found, else where they are expected. ``how_to_obtain``: instructions.
    ``size_bytes`` and ``counts`` (examples per split, or other tallies) when present and readable.
    ``note``: a built-in substitute (the shipped MNIST subset, pydoc_data text) or why counting failed.
    """

    name: str
    present: bool
    path: Path
    how_to_obtain: str
    size_bytes: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    note: str | None = None


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _idx_set(name: str, folder: Path) -> DatasetStatus:
    try:
        files = {split: find_mnist_files(folder, name, split) for split in ("train", "test")}
    except FileNotFoundError:
        return DatasetStatus(name, False, folder, how_to_obtain(name))
    paths = [p for pair in files.values() for p in pair]
    status = DatasetStatus(name, True, paths[0].parent, how_to_obtain(name), _size(paths))
    try:
        counts = {split: idx_shape(labels)[0] for split, (_, labels) in files.items()}
    except IDXError as err:
        return replace(status, note=f"unreadable: {err}")
    return replace(status, counts=counts)


def _mnist() -> DatasetStatus:
    status = _idx_set("mnist", dataset_dir("mnist"))
    train, test = (idx_shape(find_mnist_files(SHIPPED_MNIST, "mnist", split)[1])[0] for split in ("train", "test"))
    shipped = (f"a subset ships with the package ({train} train / {test} test images, {SHIPPED_MNIST}); "
               "load_mnist() without root uses it")
    return replace(status, note=f"{status.note}; {shipped}" if status.note else shipped)


def _spoken_digits() -> DatasetStatus:
    folder = dataset_dir("spoken-digits")
    found = [folder / n for n in FILE_NAMES if (folder / n).is_file()]
    if not found:
        return DatasetStatus("spoken-digits", False, folder, how_to_obtain("spoken-digits"))
    status = DatasetStatus("spoken-digits", True, found[0], how_to_obtain("spoken-digits"), _size(found[:1]))
    try:
        frames, lengths, labels = read_spoken_digits(found[0])
    except ValueError as err:
        return replace(status, note=f"unreadable: {err}")
    return replace(status, counts={"utterances": len(lengths), "frames": len(frames), "classes": len(set(labels))})


def _text() -> DatasetStatus:
    folder = dataset_dir("text")
    files = sorted(folder.glob("*.txt"))
    fallback = f"load_text() without a path uses pydoc_data.topics ({len(default_corpus()):,} characters)"
    if not files:
        return DatasetStatus("text", False, folder, how_to_obtain("text"), note=fallback)
    return DatasetStatus("text", True, folder, how_to_obtain("text"), _size(files), {"files": len(files)}, fallback)


def _cifar10() -> DatasetStatus:
    folder = dataset_dir("cifar10")
    try:
        paths = find_cifar10_files(folder, "train") + find_cifar10_files(folder, "test")
    except FileNotFoundError:
        return DatasetStatus("cifar10", False, folder, how_to_obtain("cifar10"))
    return DatasetStatus("cifar10", True, paths[0].parent, how_to_obtain("cifar10"), _size(paths),
                         {"batch_files": len(paths)})


def _svhn() -> DatasetStatus:
    folder = dataset_dir("svhn")
    paths = {split: folder / f"{split}_32x32.mat" for split in SVHN_SPLITS}
    paths = {split: p for split, p in paths.items() if p.is_file()}
    if "train" not in paths or "test" not in paths:
        return DatasetStatus("svhn", False, folder, how_to_obtain("svhn"))
    status = DatasetStatus("svhn", True, folder, how_to_obtain("svhn"), _size(list(paths.values())))
    try:
        from scipy.io import whosmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        return replace(status, note="install scipy to read the .mat files")
    try:
        counts = {split: {n: s for n, s, _ in whosmat(p)}["X"][3] for split, p in paths.items()}
    except (MatReadError, ValueError, TypeError, KeyError, IndexError, OSError, EOFError) as err:
        return replace(status, note=f"unreadable: {err}")
    return replace(status, counts=counts)


_CHECKS: list[Callable[[], DatasetStatus]] = [
    _mnist,
    lambda: _idx_set("fashion-mnist", dataset_dir("fashion-mnist")),
    _spoken_digits,
    _text,
    _cifar10,
    _svhn,
]


def dataset_status() -> list[DatasetStatus]:
    """The status of mnist, fashion-mnist, spoken-digits, text, cifar10 and svhn under data_dir(), in that order.

    Never downloads and never raises for missing or corrupt data (corruption is reported in ``note``).
    """
    return [check() for check in _CHECKS]
