"""Loading pickles that may hold numpy arrays, without letting them run arbitrary code.

pickle.load can call any importable callable named in the file. RestrictedUnpickler resolves only the names
that plain containers and numpy arrays need; anything else raises pickle.UnpicklingError.
"""

from __future__ import annotations

import codecs
import pickle
from typing import Any, BinaryIO

import numpy as np

__all__ = ["RestrictedUnpickler", "safe_load"]

# numpy's array-reconstruction functions, wherever this numpy keeps them (protocol <= 4, and 5 out-of-band)
_reconstruct = np.zeros(1).__reduce_ex__(2)[0]
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]

# (module, name) -> object. Python 2 pickles (the real CIFAR-10 batches) name numpy.core.multiarray; numpy >= 2
# writes numpy._core.*; pickle protocol 5 uses _frombuffer; bytes pickled by Python 3 with protocol < 3 go
# through _codecs.encode (and an empty bytes object through __builtin__.bytes).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only builtin containers, numpy ndarray/dtype and array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file") from None


def safe_load(f: BinaryIO, encoding: str = "bytes") -> Any:
    """Unpickle one object from ``f`` with RestrictedUnpickler. ``encoding="bytes"`` keeps Python 2 ``str``
    (keys of the CIFAR batches) as bytes."""
    return RestrictedUnpickler(f, encoding=encoding).load()
