"""Keep freed memory in the process for the next training step (glibc's malloc, i.e. Linux).

torch's CPU tensors come from malloc. glibc hands blocks above its mmap threshold (128 KiB at first, raised
as such blocks are freed) straight back to the kernel on free, and trims the top of the heap beyond its trim
threshold. A training step frees and reallocates the same activations, gradients and rounding temporaries
every step, so each one is page-faulted in again. Emulated low precision makes many such temporaries (each
rounded tensor, each exponent's overflow count), and whether they are refaulted depends on how the heap
happens to be laid out: on a 2-core machine the emulated LeNet int8-lazy step measured anywhere from 1.40x
to 2.0x an fp32 step with glibc's defaults, from one process to the next, and 1.40-1.50x with the blocks kept.

``retain_freed_memory()`` sets the mmap threshold to its maximum (32 MiB: larger blocks still come from mmap)
and the trim threshold to 1 GiB, so that freed blocks stay in the heap and are reused. The process's resident
memory then stays near its peak, which the next step needs again anyway. It acts on the whole process from
the call on: ``lowprec train`` and ``lowprec compare`` call it, the library never does on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 1 << 30


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse (module docstring). Returns whether it
    applied: False, doing nothing, where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # another libc's mallopt may read these parameters differently
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
