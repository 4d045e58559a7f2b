"""Data sets: IDX readers and the small MNIST subset shipped with the package."""

from .idx import IDXError, read_idx
from .mnist import SHIPPED_MNIST, load_mnist

__all__ = ["read_idx", "IDXError", "load_mnist", "SHIPPED_MNIST"]
