"""How many activation gradients a format loses, before and after loss scaling (MPT Fig. 3, measured).

The model runs in fp32; a backward hook on every Linear/Conv layer records dE/dz (the gradient arriving at the
layer's output, the tensor MPT histograms). For each loss scale S the fraction of elements that are non-zero in
fp32 but become 0 when S·dE/dz is rounded to the format is counted, along with those that overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import FloatFormat, parse_format, quantize

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
    ``loss_multiplier``) and count, per loss scale, the activation gradients ``fmt`` loses."""
    fmt = parse_format(fmt)
    grads: list[Tensor] = []
    hooks = [m.register_full_backward_hook(lambda _m, _gi, go: grads.append(go[0].detach().reshape(-1)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    total = zero = 0
    lost = {s: 0 for s in scales}
    overflow = {s: 0 for s in scales}
    try:
        for inputs, labels in batches:
            model.zero_grad()
            with warnings.catch_warnings():  # the first layer's input needs no grad: its hook still sees dE/dz
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (F.cross_entropy(model(*inputs).float(), labels) * loss_multiplier).backward()
            for g in grads:
                nonzero = g != 0
                total += g.numel()
                zero += int((~nonzero).sum())
                for s in scales:
                    q = quantize(g * s, fmt)
                    lost[s] += int((nonzero & (q == 0)).sum())
                    over = torch.isinf(q) if fmt.overflow == "inf" else (g * s).abs() > fmt.max_value
                    overflow[s] += int(over.sum())
            grads.clear()
    finally:
        for h in hooks:
            h.remove()
    return GradientCensus(total, zero, lost, overflow)
