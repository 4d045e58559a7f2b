"""Data sets as tensors, read from local files only (never downloaded).

Real data sets live in data_dir() ($LOWPREC_DATA, default ~/.cache/lowprec), one sub-folder each
(DATASET_FOLDERS); dataset_status() reports what is there and how to obtain the rest. A small MNIST subset
ships with the package (SHIPPED_MNIST) and the char-LSTM / GPT corpus defaults to Python's pydoc_data, so examples
and tests run offline with nothing downloaded.
"""

from .cifar import load_cifar10
from .idx import IDXError, idx_shape, read_idx
from .mnist import SHIPPED_MNIST, load_fashion_mnist, load_mnist
from .paths import DATASET_FOLDERS, data_dir, dataset_dir
from .sources import how_to_obtain
from .spoken_digits import SpokenDigits, load_spoken_digits, pack
from .status import DatasetStatus, dataset_status
from .svhn import load_svhn
from .text import char_batches, char_windows, load_text

__all__ = [
    "DATASET_FOLDERS",
    "SHIPPED_MNIST",
    "DatasetStatus",
    "IDXError",
    "SpokenDigits",
    "char_batches",
    "char_windows",
    "data_dir",
    "dataset_dir",
    "dataset_status",
    "how_to_obtain",
    "idx_shape",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist",
    "load_spoken_digits",
    "load_svhn",
    "load_text",
    "pack",
    "read_idx",
]
