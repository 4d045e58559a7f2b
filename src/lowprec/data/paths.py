"""Where data sets live on disk: the data directory and one sub-folder per data set."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATASET_FOLDERS", "data_dir", "dataset_dir"]

#: Sub-folder of the data directory that holds each data set.
DATASET_FOLDERS: dict[str, str] = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "spoken-digits": "spoken-digits",
    "text": "text",
    "cifar10": "cifar-10-batches-py",
    "svhn": "svhn",
}


def data_dir() -> Path:
    """The data directory: ``$LOWPREC_DATA`` if set and non-empty, else ``~/.cache/lowprec``.

    The folder need not exist; nothing is created or downloaded.
    """
    env = os.environ.get("LOWPREC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowprec"


def dataset_dir(name: str) -> Path:
    """The folder of data set ``name`` (a key of DATASET_FOLDERS) inside data_dir(). Unknown name: ValueError."""
    if name not in DATASET_FOLDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_FOLDERS)}")
    return data_dir() / DATASET_FOLDERS[name]
