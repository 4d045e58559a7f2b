"""retain_freed_memory: training-sized blocks come from (and go back to) the heap instead of mmap."""

import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
import lowprec as lp

class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
if sys.argv[1] == "retain":
    assert lp.train.retain_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(4 << 20)  # 16 MiB
print(libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    libc = ctypes.CDLL(None)
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_16_mib_tensor_is_mapped_by_default_and_taken_from_the_heap_after_retain():
    def mapped_bytes(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert mapped_bytes("default") >= 16 << 20
    assert mapped_bytes("retain") == 0
