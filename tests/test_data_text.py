"""Character corpora: encoding round trip, default offline corpus, batching for a char-LSTM, errors."""

import pytest
import torch

from lowprec.data import char_batches, load_text
from lowprec.data.text import default_corpus


def decode(encoded: torch.Tensor, vocab: list[str]) -> str:
    return "".join(vocab[i] for i in encoded.tolist())


def test_default_corpus_is_pydoc_topics():
    from pydoc_data.topics import topics

    encoded, vocab = load_text()
    text = default_corpus()
    assert text == "".join(topics.values()) and len(text) > 100_000
    assert encoded.dtype == torch.int64 and encoded.shape == (len(text),)
    assert vocab == sorted(set(text)) and len(set(vocab)) == len(vocab)
    assert decode(encoded, vocab) == text
    assert int(encoded.max()) == len(vocab) - 1 and int(encoded.min()) == 0


def test_utf8_file_round_trips_exactly(tmp_path):
    text = "Ça va?\r\nnaïve ✓ 数字\n\tend"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    encoded, vocab = load_text(path)
    assert decode(encoded, vocab) == text  # newlines untranslated, non-ASCII kept
    assert "\r" in vocab and "✓" in vocab and vocab == sorted(vocab)


@pytest.mark.parametrize(("blob", "message"), [(b"caf\xe9", "not UTF-8"), (b"", "empty")])
def test_bad_files_name_themselves(tmp_path, blob, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as err:
        load_text(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such text file"):
        load_text(tmp_path / "nope.txt")


def test_char_batches_small_exact():
    inputs, targets = char_batches(torch.arange(23), seq_len=3, batch_size=2)
    # two streams of 11: 0..10 and 11..21 (22 dropped); (11 - 1) // 3 = 3 batches of 3
    assert inputs.shape == targets.shape == (3, 2, 3)
    assert inputs[0].tolist() == [[0, 1, 2], [11, 12, 13]]
    assert targets[0].tolist() == [[1, 2, 3], [12, 13, 14]]
    assert inputs[2].tolist() == [[6, 7, 8], [17, 18, 19]]
    assert targets[2].tolist() == [[7, 8, 9], [18, 19, 20]]


def test_char_batches_on_the_corpus_are_shifted_and_continuous():
    encoded, _ = load_text()
    inputs, targets = char_batches(encoded, seq_len=50, batch_size=16)
    n = len(encoded) // 16
    assert inputs.shape == ((n - 1) // 50, 16, 50) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, :, 1:], targets[:, :, :-1])  # target = next character
    assert torch.equal(inputs[1:, :, 0], targets[:-1, :, -1])  # row b of batch k+1 continues row b of batch k
    assert torch.equal(inputs[0, 1], encoded[n : n + 50])  # stream 1 starts at n


def test_char_batches_rejects_too_little_text():
    with pytest.raises(ValueError, match="too short"):
        char_batches(torch.arange(10), seq_len=5, batch_size=2)
    with pytest.raises(ValueError, match=">= 1"):
        char_batches(torch.arange(10), seq_len=0, batch_size=2)
