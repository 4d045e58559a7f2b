"""Recurrent models: Park et al.'s TIDIGITS LSTM classifier and a character-level LSTM language model.

:class:`LSTMClassifier` reproduces Park et al. 2018, Section 4.5 / Table 4: "a single LSTM layer consisting of
200 units. The final state of the LSTM layer was fed to an FC layer with 200 units followed by a
classification layer for the 10 digit classes." Park feed 39-d MFCCs (TIDIGITS is LDC-licensed); the default
``input_size=13`` fits the free spoken-digit MFCC features this project uses instead. Park do not name the FC
layer's activation; ReLU is used.

:class:`CharLSTM` is the CPU-sized stand-in for MPT's language models (bigLSTM, spec 1(b)): embedding -> LSTM
-> linear over the vocabulary.

Both call their recurrent layer as ``self.lstm(x)`` with batch-first (N, T, F) input and use only the per-step
output tensor of the ``(output, (h, c))`` result, so any module with ``nn.LSTM``'s interface (a quantized
LSTM from ``lowprec.convert``) can replace it; no ``PackedSequence`` is used.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharLSTM", "LSTMClassifier"]


class LSTMClassifier(nn.Module):
    """LSTM(hidden) -> state at each sequence's last real step -> FC(fc) -> ReLU -> FC(num_classes)."""

    def __init__(self, input_size: int = 13, hidden: int = 200, fc: int = 200, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, fc)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Padded (N, T, input_size) sequences and their (N,) lengths (all T if None) -> (N, num_classes).

        The LSTM runs over all T steps; the hidden state at step ``lengths[i] - 1`` is taken for sequence i, so
        frames past a sequence's length (padding) cannot change its output.
        """
        output, _ = self.lstm(x)
        n, t = output.shape[:2]
        if lengths is None:
            last = output[:, -1]
        else:
            lengths = torch.as_tensor(lengths, device=output.device)
            if lengths.shape != (n,) or bool((lengths < 1).any()) or bool((lengths > t).any()):
                raise ValueError(f"lengths must be {n} values in [1, {t}], got {lengths.tolist()}")
            last = output[torch.arange(n, device=output.device), lengths.long() - 1]
        return self.fc2(self.relu(self.fc1(last)))


class CharLSTM(nn.Module):
    """Embedding(vocab, embed) -> LSTM(hidden, layers) -> Linear(vocab): next-token logits at every step."""

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 256, layers: int = 1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids -> (N, T, vocab_size) logits."""
        output, _ = self.lstm(self.embedding(tokens))
        return self.head(output)
