"""SVHN loader on small MATLAB v5 files generated in the real on-disk layout (needs scipy; skipped without)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowprec.data import load_svhn
from lowprec.data.svhn import SVHN_MEAN, SVHN_STD

scipy_io = pytest.importorskip("scipy.io")


def write_svhn(path: Path, n: int = 5, seed: int = 0, compress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A MATLAB v5 file in SVHN's layout: X uint8 (32, 32, 3, n), y uint8 (n, 1) with 10 meaning digit 0."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    labels = np.array([10, 1, 2, 10, 9][:n] + [5] * max(0, n - 5), np.uint8).reshape(n, 1)
    scipy_io.savemat(path, {"X": images, "y": labels}, do_compression=compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_layout_and_label_ten(tmp_path, compress):
    images, _ = write_svhn(tmp_path / "train_32x32.mat", compress=compress)
    x, y = load_svhn("train", root=tmp_path)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 2, 0, 9]
    n, c, h, w = 3, 1, 4, 30  # X[h, w, c, n] is pixel (c, h, w) of image n
    assert x[n, c, h, w].item() == pytest.approx((images[h, w, c, n] / 255 - SVHN_MEAN[c]) / SVHN_STD[c], abs=1e-5)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (SVHN_MEAN, SVHN_STD))
    expect = (torch.from_numpy(images.transpose(3, 2, 0, 1).astype(np.float64)) / 255 - mean) / std
    assert torch.allclose(x.double(), expect, atol=1e-5)


def test_svhn_splits_limit_and_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path))
    (tmp_path / "svhn").mkdir()
    write_svhn(tmp_path / "svhn" / "test_32x32.mat", n=7, seed=1)
    write_svhn(tmp_path / "svhn" / "extra_32x32.mat", n=2, seed=2)
    x, y = load_svhn("test", limit=3)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    assert load_svhn("extra")[0].shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError) as err:
        load_svhn("train")
    assert str(tmp_path / "svhn" / "train_32x32.mat") in str(err.value) and "ufldl.stanford.edu" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_svhn("valid")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "not a readable MATLAB"),
        ("garbage", "not a readable MATLAB"),
        ("no_y", "needs variables X and y"),
        ("label_zero", "labels in 1-10"),
        ("wrong_shape", r"uint8 \(32, 32, 3, N\)"),
        ("count", r"\(5, 1\)"),
    ],
)
def test_corrupt_svhn_names_the_file(tmp_path, damage, message):
    path = tmp_path / "test_32x32.mat"
    images, labels = write_svhn(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "garbage":
        path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\xff" * 200)
    elif damage == "no_y":
        scipy_io.savemat(path, {"X": images})
    elif damage == "label_zero":
        scipy_io.savemat(path, {"X": images, "y": labels % 10})
    elif damage == "wrong_shape":
        scipy_io.savemat(path, {"X": images.transpose(3, 2, 0, 1), "y": labels})
    else:
        scipy_io.savemat(path, {"X": images, "y": labels[:4]})
    with pytest.raises(ValueError, match=message) as err:
        load_svhn("test", root=tmp_path)
    assert str(path) in str(err.value)


def test_without_scipy_the_error_says_so(tmp_path, monkeypatch):
    write_svhn(tmp_path / "train_32x32.mat")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now fails
    with pytest.raises(ImportError, match="pip install scipy"):
        load_svhn("train", root=tmp_path)
