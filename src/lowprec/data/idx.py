"""IDX files (MNIST, Fashion-MNIST): the original big-endian format, gzip-compressed or raw.

Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), the number of dimensions d, then d big-endian uint32 sizes, then the data in C order, big-endian.
A file starting with the gzip magic bytes (1f 8b) is decompressed first, whatever its name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["IDXError", "idx_shape", "read_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A file that is not a valid IDX file (wrong magic, truncated, corrupt gzip); the message names the file."""


def _open(path: Path) -> BinaryIO:
    """Open for reading, through gzip if the file starts with the gzip magic bytes. Missing: FileNotFoundError."""
    if not path.is_file():
        raise FileNotFoundError(f"no such IDX file: {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and header length from the first bytes of an IDX file."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
        raise IDXError(f"{path}: not an IDX file (bad magic number {head[:4].hex()})")
    ndim = head[3]
    size = 4 + 4 * ndim
    if len(head) < size:
        raise IDXError(f"{path}: truncated header")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.dtype(_DTYPES[head[2]]), dims, size


def idx_shape(path: str | Path) -> tuple[int, ...]:
    """The shape an IDX file declares, reading only its header (cheap, even for a large .gz).

    Raises FileNotFoundError for a missing file and IDXError naming the file for an unreadable header.
    """
    path = Path(path)
    stream = _open(path)
    try:
        with stream:
            head = stream.read(4 + 4 * 255)
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path}: cannot decompress ({err}); the file is corrupt or truncated") from None
    return _header(path, head)[1]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a numpy array of its stored dtype (native byte order) and shape.

    Raises FileNotFoundError for a missing file and IDXError naming the file for a corrupt or truncated one.
    """
    path = Path(path)
    stream = _open(path)
    try:
        with stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path}: cannot decompress ({err}); the file is corrupt or truncated") from None
    dtype, dims, header = _header(path, raw)
    need = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != need:
        raise IDXError(f"{path}: holds {len(raw)} bytes, its header {dims} needs {need}: truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
