"""How many activation gradients a format loses, before and after loss scaling (MPT Fig. 3, measured).

The model runs in fp32; a backward hook on every Linear/Conv layer records dE/dz (the gradient arriving at the
layer's output, the tensor MPT histograms). For each loss scale S (a power of two) the fraction of elements
that are non-zero in fp32 but become 0 when S·dE/dz is rounded to the format is counted, along with those that
overflow. The counting is ``lowprec.diagnostics.census`` (exact, every scale at once); ``lowprec.inspect``
gives the same numbers per layer and role, with histograms and the advised scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import warnings

from torch import Tensor, nn

from ..diagnostics import Census, census
from ..formats import FloatFormat, parse_format
from ..train import cross_entropy

__all__ = ["GradientCensus", "gradient_census"]


@dataclass(frozen=True)
class GradientCensus:
    """Counts over all recorded activation-gradient elements."""

    total: int
    zero_fp32: int  # exactly zero already in fp32 (e.g. behind a ReLU)
    lost: dict[float, int]  # S -> non-zero in fp32 but 0 after rounding S*g to the format
    overflow: dict[float, int]  # S -> beyond the format's largest finite value after scaling

    def lost_fraction(self, scale: float) -> float:
        """Of the non-zero fp32 gradients, the fraction the format flushes to zero at loss scale S."""
        return self.lost[scale] / max(self.total - self.zero_fp32, 1)


def gradient_census(
    model: nn.Module,
    batches: Iterable[tuple[tuple[Tensor, ...], Tensor]],
    fmt: FloatFormat | str = "fp16",
    scales: Sequence[float] = (1.0,),
    loss_multiplier: float = 1.0,
) -> GradientCensus:
    """Run fp32 forward/backward on ``batches`` ((inputs, labels) pairs, cross-entropy loss times
    ``loss_multiplier``) and count, per loss scale (powers of two from 1 to 2**40), the activation gradients
    ``fmt`` loses."""
    fmt = parse_format(fmt)
    total = Census()

    def record(_module: nn.Module, _grad_in: object, grad_out: tuple[Tensor, ...]) -> None:
        nonlocal total
        total = total + census(grad_out[0], [fmt])

    hooks = [m.register_full_backward_hook(record)
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    try:
        for inputs, labels in batches:
            model.zero_grad()
            with warnings.catch_warnings():  # the first layer's input needs no grad: its hook still sees dE/dz
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (cross_entropy(model(*inputs), labels) * loss_multiplier).backward()
    finally:
        for h in hooks:
            h.remove()
    counts = total.counts(fmt)
    return GradientCensus(total.total, total.zeros, {s: counts.at(s)[0] for s in scales},
                          {s: counts.at(s)[2] for s in scales})
