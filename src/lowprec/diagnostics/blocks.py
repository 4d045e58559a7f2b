"""Rounding error and block statistics of one format on one tensor, for the census (``census.py``).

* **SQNR** (every format): signal = sum of x^2, noise = sum of (Q(x) - x)^2 over the finite elements of x,
  both in float64, Q = ``lowprec.quantize`` to nearest (dynamic fixed point at the tensor's max-abs exponent);
  SQNR = 10 log10(signal / noise) dB (+inf where nothing changed; an element rounded to inf makes the noise
  inf). Sums add over tensors, so a census's SQNR is that of everything it has seen together.
* **Blocks** (scaled formats: MX, NVFP4, per-tensor scaled floats; ``lowprec.formats.scaled_blocks``): how many
  blocks there are, how many *clip* (at least one element saturates: its scaled magnitude exceeds the
  element's largest value) and how many *flush* (at least one finite non-zero element rounds to zero), and
  the histogram of floor(log2 s) of each block's decode scale s (NVFP4: d_b * s_dec; MX: 2**e; scaled floats:
  1/s); blocks with no non-zero value (``empty``: their scale says nothing, e.g. MX's 2**-127), with a zero
  scale (NVFP4's e4m3 block scale underflowed: the block is all zero) and with a NaN scale (NaN or inf in
  the block) are counted apart.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import Format, quantize
from ..formats.scaled_blocks import ScaledBlocks, scaled_blocks

__all__ = ["BlockCounts", "Rounding", "rounding_of"]


@dataclass(frozen=True)
class BlockCounts:
    """A scaled format's blocks over a census (module docstring); ``scale_log2``: ((floor(log2 s), blocks), ...)
    sorted by exponent."""

    blocks: int = 0
    clipped: int = 0
    flushed: int = 0
    scale_log2: tuple[tuple[int, int], ...] = ()
    zero_scale: int = 0
    nan_scale: int = 0
    empty: int = 0

    def __add__(self, other: BlockCounts) -> BlockCounts:
        hist = Counter(dict(self.scale_log2)) + Counter(dict(other.scale_log2))
        return BlockCounts(self.blocks + other.blocks, self.clipped + other.clipped, self.flushed + other.flushed,
                           tuple(sorted(hist.items())), self.zero_scale + other.zero_scale,
                           self.nan_scale + other.nan_scale, self.empty + other.empty)

    def share(self, what: str) -> float | None:
        """The share of blocks that ``clipped`` or ``flushed`` (None without blocks)."""
        return getattr(self, what) / self.blocks if self.blocks else None

    @classmethod
    def of(cls, sb: ScaledBlocks) -> BlockCounts:
        s = sb.scale
        filled = (sb.x != 0).any(dim=1)  # NaN counts as a value
        positive = torch.isfinite(s) & (s > 0) & filled
        exps = torch.frexp(s[positive])[1] - 1  # floor(log2 s): s = m 2**e, m in [0.5, 1)
        values, counts = torch.unique(exps, return_counts=True)
        return cls(
            blocks=s.numel(), clipped=int(sb.clipped.any(dim=1).sum()), flushed=int(sb.flushed.any(dim=1).sum()),
            scale_log2=tuple(zip(values.tolist(), counts.tolist())), zero_scale=int(((s == 0) & filled).sum()),
            nan_scale=int(torch.isnan(s).sum()), empty=int((~filled).sum()),
        )


@dataclass(frozen=True)
class Rounding:
    """What rounding onto one format did to a census's tensors: elements flushed, subnormal and clipped (scaled
    formats), the SQNR sums and the block counts (None for formats without blocks)."""

    signal: float = 0.0
    noise: float = 0.0
    flushed: int = 0
    subnormal: int = 0
    clipped: int = 0
    blocks: BlockCounts | None = None

    @property
    def sqnr_db(self) -> float | None:
        """10 log10(signal / noise): +inf with no noise, -inf with infinite noise, NaN where an element became
        NaN, None with no signal."""
        if self.signal == 0:
            return None
        if self.noise == 0 or not math.isfinite(self.noise):
            return math.inf if self.noise == 0 else -math.inf if self.noise > 0 else math.nan
        return 10 * math.log10(self.signal / self.noise)

    def __add__(self, other: Rounding) -> Rounding:
        blocks = self.blocks if other.blocks is None else other.blocks if self.blocks is None else (
            self.blocks + other.blocks)
        return Rounding(self.signal + other.signal, self.noise + other.noise, self.flushed + other.flushed,
                        self.subnormal + other.subnormal, self.clipped + other.clipped, blocks)


def _error(x: Tensor, q: Tensor) -> tuple[float, float]:
    finite = torch.isfinite(x)
    xd = torch.where(finite, x, 0.0).double().reshape(-1)
    diff = torch.where(finite, q, 0.0).double().reshape(-1) - xd
    return float(torch.dot(xd, xd)), float(torch.dot(diff, diff))


def rounding_of(x: Tensor, fmt: Format) -> Rounding:
    """The Rounding of one float32 tensor (in its own shape: blocks follow ``fmt.axis``) onto ``fmt``."""
    if fmt.scaled:
        sb = scaled_blocks(x, fmt)
        signal, noise = _error(sb.x, sb.quantized)
        return Rounding(signal, noise, int(sb.flushed.sum()), int(sb.subnormal.sum()), int(sb.clipped.sum()),
                        BlockCounts.of(sb))
    return Rounding(*_error(x, quantize(x, fmt)))
