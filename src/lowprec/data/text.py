"""Character corpora for char-level language models (char-LSTM, GPT): any UTF-8 text file, or Python's own
documentation as an offline default."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["char_batches", "char_windows", "default_corpus", "load_text"]


def default_corpus() -> str:
    """The offline default corpus: the topic strings of ``pydoc_data.topics`` concatenated in the module's order
    (about 0.47 M characters; the exact text depends on the Python version)."""
    from pydoc_data.topics import topics

    return "".join(topics.values())


def load_text(path: str | Path | None = None) -> tuple[torch.Tensor, list[str]]:
    """A corpus as (encoded, vocab): int64 (n_chars,) indices into ``vocab``, the sorted distinct characters.

    ``path``: a UTF-8 text file (read as-is, newlines untranslated); default: default_corpus().
    ``"".join(vocab[i] for i in encoded)`` gives the text back.
    Errors: FileNotFoundError for a missing file; ValueError naming a file that is not UTF-8 or is empty.
    """
    if path is None:
        text = default_corpus()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from None
        if not text:
            raise ValueError(f"{path}: empty file")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64), vocab


def char_batches(encoded: torch.Tensor, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a corpus into (inputs, targets), each int64 (n_batches, batch_size, seq_len), targets shifted by one.

    The corpus is split into ``batch_size`` contiguous streams of equal length; batch k holds characters
    [k*seq_len, (k+1)*seq_len) of every stream, so row b of batch k+1 continues row b of batch k (a char-LSTM
    may carry its hidden state across batches). ``targets[k, b, t]`` is the character after ``inputs[k, b, t]``.
    The tail that does not fill a whole batch is dropped. ValueError if not even one batch fits.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    stream = len(encoded) // batch_size
    n_batches = (stream - 1) // seq_len
    if n_batches < 1:
        raise ValueError(
            f"a corpus of {len(encoded)} characters is too short for one batch of {batch_size} x {seq_len} (+1)"
        )
    streams = encoded[: stream * batch_size].view(batch_size, stream)
    span = n_batches * seq_len

    def cut(s: torch.Tensor) -> torch.Tensor:
        return s.reshape(batch_size, n_batches, seq_len).transpose(0, 1).contiguous()

    return cut(streams[:, :span]), cut(streams[:, 1 : span + 1])


def char_windows(encoded: Tensor, seq_len: int, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut a corpus into independent windows for a model without carried state (a GPT): (inputs, targets),
    each int64 (n, seq_len), window i holding characters [i*seq_len, (i+1)*seq_len) and its targets the
    characters one further on (``targets[i, t] == encoded[i*seq_len + t + 1]``). Windows do not overlap; the
    tail that does not fill one (with its next character) is dropped; ``limit`` keeps the first ``limit``.
    ValueError if not even one window fits or for a seq_len or limit below 1.
    """
    if seq_len < 1 or (limit is not None and limit < 1):
        raise ValueError(f"seq_len and limit must be >= 1, got {seq_len}, {limit}")
    n = (len(encoded) - 1) // seq_len
    if n < 1:
        raise ValueError(f"a corpus of {len(encoded)} characters is too short for one window of {seq_len} (+1)")
    n = min(n, limit) if limit is not None else n
    return encoded[: n * seq_len].view(n, seq_len), encoded[1 : n * seq_len + 1].view(n, seq_len)
