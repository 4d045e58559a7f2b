"""The training loss of the tasks: cross-entropy over every prediction a model makes, in float32."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy"]


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` (..., C) against integer ``labels`` (...), the logits upcast to float32 first
    (mixed precision computes the loss in float32, whatever the model's dtype).

    One label per example (a classifier: (N, C) and (N,)) or one per position (a language model: (N, T, C) and
    (N, T), each token a prediction); ``"mean"`` averages over all of them, ``"sum"`` adds them up. For 2-d
    logits this is exactly ``F.cross_entropy(logits.float(), labels)``. ValueError when the leading shapes
    differ.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: the labels must have the "
                         "logits' shape without the last (class) dimension")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)
