"""Checkpoints that survive a crash: atomic write, a format version and a checksum.

The file is written to a temporary name in the same folder (``<name>.<random>.tmp``), flushed to disk, then
renamed over the old checkpoint (``os.replace`` is atomic on POSIX and Windows): a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file; a temporary file a kill left behind is
removed by ``remove_stale_temporaries`` (a run calls it once it holds its directory's lock). The file gets the
permissions of any file the process creates (0666 less the umask), not ``mkstemp``'s 0600. The payload is a ``torch.save`` of the state with a header
holding the version and the SHA-256 of the serialised state, verified on load.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "remove_stale_temporaries", "CheckpointError", "VERSION"]

VERSION = 1
_MAGIC = b"LOWPREC-CKPT\n"
_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, of another version, or for another run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _MAGIC + f"{VERSION} {hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed ``save_checkpoint(path, ...)`` left next to ``path``; return them.
    Only for a writer that knows no other process is writing ``path`` (a run holding its directory's lock)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{glob.escape(path.name)}.*{_TMP_SUFFIX}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError if it is not intact."""
    path = Path(path)
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a lowprec checkpoint")
    line_end = raw.find(b"\n", len(_MAGIC))
    try:
        version, digest, size = raw[len(_MAGIC) : line_end].decode().split()
        version, size = int(version), int(size)
    except ValueError:
        raise CheckpointError(f"{path}: damaged header") from None
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this lowprec reads {VERSION}")
    payload = raw[line_end + 1 :]
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch ({len(payload)} of {size} bytes): truncated or corrupt")
    return torch.load(io.BytesIO(payload), weights_only=False)
