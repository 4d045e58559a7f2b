"""IDX reader and the MNIST-layout loaders (MNIST, Fashion-MNIST): shipped subset, real copies, layouts, errors."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lowprec.data import SHIPPED_MNIST, IDXError, idx_shape, load_fashion_mnist, load_mnist, read_idx
from lowprec.data.mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # development copies (../shared/data)
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array."""
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_mnist(folder: Path, n_train: int = 7, n_test: int = 3, gz: bool = True, seed: int = 0) -> dict:
    """Four small MNIST-layout IDX files in ``folder``; returns the arrays by stem."""
    rng = np.random.default_rng(seed)
    arrays = {
        STEMS[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        STEMS[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        STEMS[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        STEMS[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        else:
            (folder / stem).write_bytes(idx_bytes(array))
    return arrays


# --- shipped subset ------------------------------------------------------------------------------------------


def test_shipped_mnist_shapes_and_labels():
    x, y = load_mnist("train")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert set(y.tolist()) == set(range(10))
    xt, yt = load_mnist("test")
    assert xt.shape == (2_000, 1, 28, 28) and yt.shape == (2_000,)
    assert yt[:5].tolist() == [7, 2, 1, 0, 4]  # the first MNIST test digits
    # normalised with MNIST's constants: pixel 0 maps to -mean/std, 255 to (1-mean)/std
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)


def test_limit_keeps_the_first_examples():
    x, y = load_mnist("train", limit=25)
    full_x, full_y = load_mnist("train")
    assert torch.equal(x, full_x[:25]) and torch.equal(y, full_y[:25])
    assert load_mnist("test", limit=0)[0].shape == (0, 1, 28, 28)


@pytest.mark.parametrize("kwargs", [{"split": "valid"}, {"limit": -1}, {"limit": 2.5}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_mnist(**kwargs)


# --- the real data sets, when a development copy is present -----------------------------------------------------


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no full MNIST copy in ../shared/data/mnist")
def test_full_mnist_counts_and_pixel_statistics():
    raw = read_idx(SHARED / "mnist" / "train-images-idx3-ubyte.gz")
    assert raw.shape == (60_000, 28, 28) and raw.dtype == np.uint8
    pixels = raw.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(0.1307, abs=5e-5)
    assert pixels.std() == pytest.approx(0.3081, abs=5e-5)
    x, y = load_mnist("train", root=SHARED / "mnist")
    assert x.shape == (60_000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3) and x.std().item() == pytest.approx(1.0, abs=1e-3)
    xs, ys = load_mnist("train")  # the shipped subset is the first 10,000 training images
    assert torch.equal(xs, x[:10_000]) and torch.equal(ys, y[:10_000])
    xt, yt = load_mnist("test", root=SHARED / "mnist")
    assert xt.shape == (10_000, 1, 28, 28) and torch.bincount(yt).sum() == 10_000


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="no Fashion-MNIST copy in ../shared/data")
def test_full_fashion_mnist():
    x, y = load_fashion_mnist("train", root=SHARED / "fashion-mnist")
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [6000] * 10
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3) and x.std().item() == pytest.approx(1.0, abs=1e-3)
    pixels = x * FASHION_MNIST_STD + FASHION_MNIST_MEAN
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-5)
    xt, yt = load_fashion_mnist("test", root=SHARED / "fashion-mnist", limit=100)
    assert xt.shape == (100, 1, 28, 28) and yt.max() <= 9


# --- layouts -----------------------------------------------------------------------------------------------------


def test_raw_gz_and_torchvision_layouts_give_identical_tensors(tmp_path):
    arrays = write_mnist(tmp_path / "gz", gz=True)
    write_mnist(tmp_path / "raw", gz=False)
    write_mnist(tmp_path / "tv" / "MNIST" / "raw", gz=True)
    write_mnist(tmp_path / "tvf" / "FashionMNIST" / "raw", gz=False)
    dotted = tmp_path / "dotted"  # Kaggle-style names: train-images.idx3-ubyte
    dotted.mkdir()
    for stem, array in arrays.items():
        (dotted / stem.replace("-idx", ".idx")).write_bytes(idx_bytes(array))
    for split, n in (("train", 7), ("test", 3)):
        x, y = load_mnist(split, root=tmp_path / "gz")
        assert x.shape == (n, 1, 28, 28)
        prefix = "train" if split == "train" else "t10k"
        expect = (arrays[f"{prefix}-images-idx3-ubyte"] / 255 - MNIST_MEAN) / MNIST_STD
        assert torch.allclose(x[:, 0].double(), torch.from_numpy(expect), atol=1e-6)
        assert y.tolist() == arrays[f"{prefix}-labels-idx1-ubyte"].tolist()
        for root in ("raw", "tv", "dotted"):
            x2, y2 = load_mnist(split, root=tmp_path / root)
            assert torch.equal(x2, x) and torch.equal(y2, y), root
        xf, yf = load_fashion_mnist(split, root=tmp_path / "tvf")
        assert torch.equal(yf, y)
        assert torch.allclose(xf * FASHION_MNIST_STD + FASHION_MNIST_MEAN, x * MNIST_STD + MNIST_MEAN, atol=1e-6)


def test_gzip_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "a").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert idx_shape(tmp_path / "a") == (3, 4)


def test_other_idx_dtypes_are_native_endian(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=">f4")
    header = bytes([0, 0, 0x0D, 2]) + (2).to_bytes(4, "big") * 2
    (tmp_path / "f.idx").write_bytes(header + values.tobytes())
    out = read_idx(tmp_path / "f.idx")
    assert out.dtype == np.float32 and out.dtype.isnative and out.tolist() == values.tolist()


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_files_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as err:
        load_mnist("test", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "MNIST/raw" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train")  # default root: $LOWPREC_DATA/fashion-mnist
    assert str(tmp_path / "data" / "fashion-mnist") in str(err.value) and "zalandoresearch" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such IDX file"):
        read_idx(tmp_path / "missing.gz")


def test_truncated_raw_idx_names_the_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IDXError, match="truncated") as err:
        load_mnist("train", root=tmp_path)
    assert str(path) in str(err.value)
    load_mnist("test", root=tmp_path)  # the other split is intact


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":  # deflate data or CRC no longer match
        for i in range(12, len(blob) - 8):
            blob[i] ^= 0xFF
    else:
        blob[3] = 0xFF  # reserved gzip flag bits
    path.write_bytes(bytes(blob))
    with pytest.raises(IDXError) as err:
        load_mnist("train", root=tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00\x00\x08", "bad magic"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "bad magic"),  # unknown type code
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02\x05\x06\x07", "needs 10"),  # one byte too many
    ],
)
def test_malformed_idx(tmp_path, blob, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(IDXError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_shape_reads_header_only_and_checks_it(tmp_path):
    assert idx_shape(SHIPPED_MNIST / "train-images-idx3-ubyte.gz") == (10_000, 28, 28)
    path = tmp_path / "x"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IDXError) as err:
        idx_shape(path)
    assert str(path) in str(err.value)


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(IDXError, match="7 images") as err:
        load_mnist("train", root=tmp_path)
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_wrong_kind_of_idx_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 784), np.uint8)))
    with pytest.raises(IDXError, match=r"images \(N, H, W\)"):
        load_mnist("train", root=tmp_path)
