"""IDX files (MNIST, Fashion-MNIST): the original big-endian format, gzip-compressed or raw."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "IDXError"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """A file that is not a valid IDX file (wrong magic, truncated, corrupt gzip)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of its stored dtype and shape.

    Raises FileNotFoundError for a missing file and IDXError naming the file for a corrupt or truncated one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such IDX file: {path}")
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise IDXError(f"{path}: cannot decompress ({err}); the file is corrupt or truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise IDXError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != need:
        raise IDXError(f"{path}: holds {len(raw)} bytes, its header {dims} needs {need}: truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
