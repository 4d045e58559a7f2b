"""CIFAR-10 loader and the restricted unpickler, on small batches generated in the real on-disk format."""

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lowprec.data import load_cifar10
from lowprec.data.cifar import CIFAR10_MEAN, CIFAR10_STD, read_cifar_batch
from lowprec.data.safe_pickle import safe_load


def batch_dict(data: np.ndarray, labels: list[int], name: bytes) -> dict:
    """The dict of a real CIFAR-10 batch (Python 2 str keys load as bytes)."""
    return {b"batch_label": name, b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}


def write_cifar(folder: Path, per_batch: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    """data_batch_1..5, test_batch and batches.meta in ``folder`` (pickle protocol 2, bytes keys).
    Returns (train data (N, 3072), train labels, test data, test labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    datas, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        label = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(pickle.dumps(batch_dict(data, label, name.encode()), protocol=2))
        datas.append(data)
        labels.append(label)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(datas[:5]), np.concatenate(labels[:5]), datas[5], np.array(labels[5])


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch exactly as Python 2's cPickle wrote the real files: str (SHORT_BINSTRING) keys, the array via
    numpy.core.multiarray._reconstruct with its raw bytes as a BINSTRING."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        b"(K\x01M" + struct.pack("<H", len(data)) + b"M\x00\x0c\x86"
        b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + b"u."


def expected_cifar(data: np.ndarray) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
    return (torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float64)) / 255 - mean) / std


def test_cifar10_train_and_test(tmp_path):
    train_data, train_labels, test_data, test_labels = write_cifar(tmp_path / "cifar-10-batches-py")
    x, y = load_cifar10("train", root=tmp_path / "cifar-10-batches-py")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == train_labels.tolist()
    assert torch.allclose(x.double(), expected_cifar(train_data), atol=1e-5)
    # channel-major rows: value 1024*c + 32*h + w is pixel (c, h, w)
    k = 1024 * 2 + 32 * 5 + 7
    assert x[3, 2, 5, 7].item() == pytest.approx((train_data[3, k] / 255 - CIFAR10_MEAN[2]) / CIFAR10_STD[2], abs=1e-5)
    xt, yt = load_cifar10("test", root=tmp_path)  # the parent folder (where the tarball was extracted) works too
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == test_labels.tolist()
    assert torch.allclose(xt.double(), expected_cifar(test_data), atol=1e-5)


def test_cifar10_limit_stops_reading_early(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    full_x, full_y = load_cifar10("train", root=folder)
    x, y = load_cifar10("train", root=folder, limit=6)  # crosses into batch 2
    assert torch.equal(x, full_x[:6]) and torch.equal(y, full_y[:6])
    (folder / "data_batch_3").write_bytes(b"garbage")
    x, y = load_cifar10("train", root=folder, limit=8)  # batches 1 and 2 suffice; 3 is never opened
    assert torch.equal(y, full_y[:8])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10("train", root=folder, limit=9)
    assert load_cifar10("train", root=folder, limit=0)[0].shape == (0, 3, 32, 32)


def test_cifar10_default_root_is_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path))
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=2)
    assert load_cifar10("test")[0].shape == (2, 3, 32, 32)


def test_python2_format_batch_and_protocol_5(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    (tmp_path / "py2").write_bytes(py2_pickle(data, [3, 1, 4]))
    images, labels = read_cifar_batch(tmp_path / "py2")
    assert np.array_equal(images.reshape(3, 3072), data) and labels.tolist() == [3, 1, 4]
    (tmp_path / "p5").write_bytes(pickle.dumps(batch_dict(data, [3, 1, 4], b"b"), protocol=5))
    images5, labels5 = read_cifar_batch(tmp_path / "p5")
    assert np.array_equal(images5, images) and labels5.tolist() == [3, 1, 4]


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load __builtin__.print") as err:
        read_cifar_batch(path)
    assert str(path) in str(err.value) and "pwned" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError):
        safe_load(io.BytesIO(pickle.dumps(Path("x"))))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "not a readable CIFAR-10 batch"),
        ("garbage", "not a readable CIFAR-10 batch"),
        ("not_a_dict", "expected a dict"),
        ("wrong_shape", r"\(N, 3072\)"),
        ("wrong_dtype", "uint8"),
        ("bad_labels", "ints in 0-9"),
        ("label_count", "ints in 0-9"),
    ],
)
def test_corrupt_cifar_batch_names_the_file(tmp_path, damage, message):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    path = folder / "data_batch_2"
    data = np.zeros((4, 3072), np.uint8)
    blob = {
        "truncated": path.read_bytes()[:5000],
        "garbage": b"\x80\x02garbage",
        "not_a_dict": pickle.dumps([data], protocol=2),
        "wrong_shape": pickle.dumps(batch_dict(np.zeros((4, 1024), np.uint8), [0] * 4, b""), protocol=2),
        "wrong_dtype": pickle.dumps(batch_dict(data.astype(np.float32), [0] * 4, b""), protocol=2),
        "bad_labels": pickle.dumps(batch_dict(data, [0, 1, 10, 2], b""), protocol=2),
        "label_count": pickle.dumps(batch_dict(data, [0, 1, 2], b""), protocol=2),
    }[damage]
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as err:
        load_cifar10("train", root=folder)
    assert str(path) in str(err.value)


def test_cifar_missing_batch_says_where_and_how(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10("train", root=tmp_path)
    assert str(tmp_path) in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    load_cifar10("test", root=tmp_path)
