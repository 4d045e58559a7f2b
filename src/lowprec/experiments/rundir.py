"""A run's output directory: checked writable before training, locked while a run writes it, never overwritten
by accident, and every write failure reported as what failed and what to do.

``claim(out, resume=..., overwrite=...)`` is called once, before training, by the one process that writes
(rank 0): it creates the directory, takes an exclusive lock on ``out/.lock`` (``fcntl.flock``: the kernel drops
it when the process ends, SIGKILL included, so a crashed run never leaves a stale lock), refuses a directory
holding a finished or interrupted run unless ``resume`` or ``overwrite`` says what to do with it, proves the
directory writable by writing and removing a small file, and removes temporary files a killed checkpoint write
left behind. ``writing(what, path)`` turns an OSError of a later write (disk full, the directory made read-only)
into ``RunDirectoryError`` naming the file, the cause and that the last checkpoint is intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import remove_stale_temporaries

__all__ = ["RunDirectoryError", "RunLock", "claim", "writing", "RUN_FILES"]

#: Files whose presence means a run has written the directory.
RUN_FILES = ("checkpoint.pt", "metrics.csv", "result.json")
_LOCK = ".lock"


class RunDirectoryError(OSError):
    """A run directory that cannot be used: not writable, locked by another run, or holding a run that neither
    ``resume`` nor ``overwrite`` allows to touch; or a write into it that failed. ``str()`` is the message."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class RunLock:
    """The exclusive lock a run holds on its directory (``release`` ends it; so does the process's end)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _why(err: OSError) -> str:
    """The cause in words, with the fix for the usual ones."""
    cause = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{cause}: free some space or choose another --out"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{cause}: make it writable or choose another --out"
    return cause


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Run a write of ``what`` to ``path``; an OSError becomes RunDirectoryError saying so. The checkpoint is
    written atomically, so the previous one is intact whatever failed."""
    try:
        yield
    except RunDirectoryError:
        raise
    except OSError as err:
        raise RunDirectoryError(err.errno, f"cannot write the {what} {path}: {_why(err)}. The last checkpoint in "
                                           f"{path.parent} is intact; --resume continues from it") from None


def _lock(out: Path) -> RunLock:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the refusal of an existing run still protects it
        return RunLock(None)
    fd = os.open(out / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryError(errno.EBUSY, f"{out} is in use by another lowprec run (it holds {out / _LOCK}); "
                                             "wait for it to finish or choose another --out") from None
    return RunLock(fd)


def claim(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Make ``out`` this run's directory (see the module docstring); RunDirectoryError if it cannot be.

    With ``overwrite`` the previous run's files (``RUN_FILES``) are removed; with ``resume`` they stay (the
    caller continues from the checkpoint, or starts afresh where there is none)."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise RunDirectoryError(errno.ENOTDIR, f"the output folder {out} cannot be made: {existing} is a file; "
                                               "give --out a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except RunDirectoryError:
        raise
    except OSError as err:
        raise RunDirectoryError(err.errno, f"cannot create the output folder {out}: {_why(err)}") from None
    try:
        previous = [name for name in RUN_FILES if (out / name).exists()]
        if previous and not (resume or overwrite):
            raise RunDirectoryError(errno.EEXIST, f"{out} already holds a run ({', '.join(previous)}); pass --resume "
                                                  "to continue it, --overwrite to replace it, or choose another --out")
        with writing("test file", out / ".write-test"):
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"\0" * 4096)
            probe.unlink()
            if overwrite:
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            remove_stale_temporaries(out / "checkpoint.pt")
    except BaseException:
        lock.release()
        raise
    return lock
