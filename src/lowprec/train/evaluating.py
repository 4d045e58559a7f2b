"""``evaluating(model)``: run a model in eval mode without gradients, then put its mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` is in eval mode (dropout off, batch-norm on its running statistics) and no
    autograd graph is recorded; on leaving it, normally or by an exception, the model's training flag is what it
    was before (every submodule's, as ``model.train(flag)`` sets them)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
