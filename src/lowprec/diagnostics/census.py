"""What a number format does to a tensor: the log2 histogram of its magnitudes and, per format and per
power-of-two loss scale S = 2**k, how many of its values underflow to zero, land among the subnormals, or
overflow.

Definitions, for a finite non-zero element x of the recorded float32 tensor and the product x·S (exact in
float32 for S >= 1, unless it passes float32's largest value and becomes inf):

* **lost** (underflow to zero): ``quantize(x·S, fmt) == 0``.
* **subnormal**: a float format rounds x·S to a non-zero value below its smallest normal (precision lost);
  always 0 for other formats.
* **overflow**: x·S rounds to ±inf (IEEE formats) or lies beyond the largest finite value, where the format
  clamps (saturating floats, fixed point, WRPN's clip range).

Elements that are exactly zero or not finite in float32 are counted apart (``zeros``, ``nonfinite``) and are in
none of the three. Rounding is to nearest, ties to even (the policies' default; stochastic rounding keeps a
value below the smallest step with probability |x|/step).

How the counts are exact and cheap. Round-to-nearest on a fixed grid (floats, fixed point, uniform) is
monotone in x, so each side of zero has three magnitudes found once per format by bisection over the float32
numbers with ``lowprec.quantize`` itself (the format's real behaviour, not a formula): Z, the largest
magnitude rounded to 0; N, the smallest rounded to a normal number; U, the smallest that overflows. Then x·2**k
is lost iff |x|·2**k <= Z. Writing |x| = m·2**e and Z = m_Z·2**e_Z (frexp, m in [0.5, 1)), that holds iff
k <= e_Z - e - [m > m_Z]: one integer per element, whose bincount gives the count at every k at once.
Formats whose step follows the tensor (dynamic fixed point at its max-abs exponent, block floating point) are
scale invariant: they are quantized directly, once, and their counts are the same at every S. So are the
scaled formats (MX, NVFP4, per-tensor scaled floats, whose scales follow the tensor; delayed scaling is read at
the tensor's own amax): they are rounded in the tensor's shape, blocks along the format's axis (or the layer's
``block_axis``), and count as lost the elements that flush to zero and as overflow the elements that clip
(saturate); see ``blocks.py``.

Every format's counts also carry a ``Rounding`` (``blocks.py``): the SQNR sums at S = 1 and, for scaled formats,
the block counts (blocks that clip or flush, the histogram of their scales).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from torch import Tensor

from ..formats import (
    Format,
    max_abs_int_bits,
    operand_format,
    parse_format,
    quantize,
)
from .blocks import Rounding, rounding_of

__all__ = ["SCALE_EXPONENTS", "LOG2_MIN", "LOG2_MAX", "FormatCounts", "Census", "census", "scale_exponent"]

#: The loss scales S = 2**k every census counts at (1 to 2**40: scaling up is exact in float32).
SCALE_EXPONENTS = range(0, 41)
#: The log2 histogram's bins: floor(log2|x|) from the smallest float32 subnormal to the largest binade.
LOG2_MIN, LOG2_MAX = -149, 127

_F32_MAX_BITS = 0x7F7FFFFF
_F32_OVERFLOW = 2.0**128 - 2.0**103  # the smallest real number float32 rounds to inf


def scale_exponent(scale: float) -> int:
    """k for a loss scale S = 2**k inside SCALE_EXPONENTS; ValueError for anything else."""
    mantissa, exponent = math.frexp(scale) if scale > 0 else (0.0, 0)
    if mantissa != 0.5 or exponent - 1 not in SCALE_EXPONENTS:
        raise ValueError(
            f"a census counts at loss scales 2**k, k in [{SCALE_EXPONENTS.start}, {SCALE_EXPONENTS.stop - 1}]; "
            f"got {scale!r}"
        )
    return exponent - 1


@dataclass(frozen=True)
class FormatCounts:
    """One format's counts over a census, one entry per k in SCALE_EXPONENTS (module docstring)."""

    format: str
    lost: tuple[int, ...]
    subnormal: tuple[int, ...]
    overflow: tuple[int, ...]
    rounding: Rounding = Rounding()  # SQNR sums at S = 1, block counts of scaled formats

    def at(self, scale: float = 1.0) -> tuple[int, int, int]:
        """(lost, subnormal, overflow) at loss scale ``scale`` (a power of two)."""
        i = scale_exponent(scale) - SCALE_EXPONENTS.start
        return self.lost[i], self.subnormal[i], self.overflow[i]

    def __add__(self, other: FormatCounts) -> FormatCounts:
        if other.format != self.format:
            raise ValueError(f"cannot add counts of {other.format} to counts of {self.format}")
        add = lambda a, b: tuple(x + y for x, y in zip(a, b))  # noqa: E731
        return FormatCounts(self.format, add(self.lost, other.lost), add(self.subnormal, other.subnormal),
                            add(self.overflow, other.overflow), self.rounding + other.rounding)


@dataclass(frozen=True)
class Census:
    """Counts over every element of the tensors a census has seen (add censuses with ``+``)."""

    total: int = 0
    zeros: int = 0  # exactly zero in float32
    nonfinite: int = 0  # inf or NaN in float32
    log2_counts: tuple[int, ...] = (0,) * (LOG2_MAX - LOG2_MIN + 1)  # floor(log2|x|) = LOG2_MIN + i
    formats: tuple[FormatCounts, ...] = field(default=())

    @property
    def int_bits(self) -> int:
        """The max-abs exponent: the smallest r with |x| < 2**r for every finite x (0 for no non-zero x)."""
        top = max((i for i, n in enumerate(self.log2_counts) if n), default=None)
        return 0 if top is None else LOG2_MIN + top + 1

    @property
    def nonzero(self) -> int:
        """Finite non-zero elements: the ones a format can lose."""
        return self.total - self.zeros - self.nonfinite

    def counts(self, fmt: Format | str) -> FormatCounts:
        name = repr(parse_format(fmt)) if isinstance(fmt, str) else repr(fmt)
        for c in self.formats:
            if c.format == name:
                return c
        raise KeyError(f"this census did not count {name}; it counted {', '.join(c.format for c in self.formats)}")

    def fractions(self, fmt: Format | str, scale: float = 1.0) -> dict[str, float]:
        """Shares of *all* elements (MPT Fig. 3's convention): zero in fp32, and lost, subnormal, overflowing
        in ``fmt`` at loss scale ``scale``."""
        lost, sub, over = self.counts(fmt).at(scale)
        n = max(self.total, 1)
        return {"zero": self.zeros / n, "lost": lost / n, "subnormal": sub / n, "overflow": over / n}

    def __add__(self, other: Census) -> Census:
        if self.total == 0:
            return other
        if other.total == 0:
            return self
        mine = {c.format: c for c in self.formats}
        theirs = {c.format: c for c in other.formats}
        if set(mine) != set(theirs):
            raise ValueError(f"censuses of different formats: {sorted(mine)} and {sorted(theirs)}")
        return Census(
            self.total + other.total, self.zeros + other.zeros, self.nonfinite + other.nonfinite,
            tuple(a + b for a, b in zip(self.log2_counts, other.log2_counts)),
            tuple(mine[name] + theirs[name] for name in mine),
        )


# -- thresholds of a fixed-grid format ---------------------------------------------------------------------------
def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _first_true(pred) -> float:
    """The smallest non-negative finite float32 t with pred(t) (pred monotone: False ... False True ... True);
    +inf if none."""
    if not pred(_f32(_F32_MAX_BITS)):
        return math.inf
    lo, hi = -1, _F32_MAX_BITS  # pred(lo) False (virtually), pred(hi) True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pred(_f32(mid)) else (mid, hi)
    return _f32(hi)


def _last_true(pred) -> float:
    """The largest non-negative finite float32 t with pred(t) (pred monotone: True ... True False ... False);
    -1 if none."""
    if not pred(0.0):
        return -1.0
    lo, hi = 0, _F32_MAX_BITS + 1  # pred(lo) True, pred(hi) False (virtually)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if pred(_f32(mid)) else (lo, mid)
    return _f32(lo)


def _side_max(fmt: Format) -> tuple[float, float]:
    """The largest finite magnitude on the positive and the negative side (beyond them the format clamps)."""
    if fmt.value_range is None:
        raise TypeError(f"no fixed range: {fmt!r}")
    low, high = fmt.value_range
    return high, -low if fmt.signed else math.inf  # unsigned: negatives become 0 (lost), not clamped


@functools.cache
def _thresholds(fmt: Format) -> tuple[tuple[float, float | None, float], ...]:
    """((Z, N, U) of the positive side, (Z, N, U) of the negative side) as float32 magnitudes (module
    docstring). Z = -1 when nothing rounds to 0, N = None without a subnormal range, U = inf when nothing
    overflows."""

    def q(t: float) -> float:
        return quantize(torch.tensor([t], dtype=torch.float32), fmt).item()

    sides = []
    for sign, limit in zip((1.0, -1.0), _side_max(fmt)):
        zero = _last_true(lambda t: q(sign * t) == 0.0)
        if zero == _f32(_F32_MAX_BITS):  # the whole side rounds to 0 (negatives in an unsigned format), inf too
            sides.append((math.inf, None, math.inf))
            continue
        normal = None
        if fmt.floating and fmt.subnormals:
            normal = _first_true(lambda t: abs(q(sign * t)) >= fmt.min_normal)
        if fmt.floating and fmt.overflow == "inf":
            over = _first_true(lambda t: math.isinf(q(sign * t)))
        else:
            over = _first_true(lambda t: t > limit)
        sides.append((zero, normal, min(over, _F32_OVERFLOW)))
    return tuple(sides)


def _scale_invariant(fmt: Format) -> bool:
    return fmt.scale_free


# -- counting ------------------------------------------------------------------------------------------------------
_K0, _NK = SCALE_EXPONENTS.start, len(SCALE_EXPONENTS)
_E0, _NE = LOG2_MIN + 1, LOG2_MAX - LOG2_MIN + 1  # frexp exponents e = floor(log2|x|) + 1


@dataclass(frozen=True)
class _Histogram:
    """Finite non-zero elements counted by sign, frexp exponent e and the interval their frexp mantissa falls
    in among ``cuts`` (sorted float32 mantissas): ``below[s][e][c]`` = elements of sign s (0: positive) with
    exponent _E0 + e and mantissa below cuts[c]; ``rows[s][e]`` = all elements of sign s with exponent below
    _E0 + e. Enough to count |x|·2**k against any bound whose mantissa is a cut, at every k."""

    cuts: Tensor
    below: Tensor  # (2, _NE + 2, len(cuts)) int64
    rows: Tensor  # (2, _NE + 2) int64

    @classmethod
    def of(cls, flat: Tensor, cuts: Tensor) -> tuple[_Histogram, int, int]:
        """The histogram of a flat float32 tensor, its zeros and its non-finite elements (one pass each)."""
        nc = len(cuts) + 1
        m, e = torch.frexp(flat)  # zeros: m = 0, e = 0
        column = torch.bucketize(m.abs(), cuts, right=True)  # cuts[column - 1] <= |m| < cuts[column]; 0: zeros
        key = ((m < 0).to(torch.int64) * _NE + (e - _E0).to(torch.int64)) * nc + column
        finite = torch.isfinite(flat)
        key = torch.where(finite, key, 2 * _NE * nc)  # inf and NaN to a slot of their own
        h = torch.bincount(key, minlength=2 * _NE * nc + 1)[:-1].view(2, _NE, nc)
        zeros = int(h[0, -_E0, 0] + h[1, -_E0, 0])
        h[:, -_E0, 0] = 0
        h = torch.nn.functional.pad(h, (0, 0, 1, 1))  # an empty row below and above the exponent range
        below = h.cumsum(2)[:, :, :-1]
        rows = h.sum(2).cumsum(1) - h.sum(2)
        return cls(cuts, below, rows), zeros, flat.numel() - int(finite.sum())

    def at_most(self, side: int, bound: float, strict: bool) -> list[int]:
        """For every k in SCALE_EXPONENTS: elements of ``side`` with |x|·2**k <= bound (< bound if strict)."""
        if not bound > 0:
            return [0] * _NK
        if math.isinf(bound):
            return [int(self.rows[side, -1])] * _NK
        mb, eb = math.frexp(bound)
        c = int(torch.searchsorted(self.cuts, torch.tensor(mb if strict else _next32(mb), dtype=torch.float32)))
        # |x|·2**k <= bound  <=>  e + k < eb, or e + k == eb and m <= mb (both mantissas in [0.5, 1))
        row = (eb - torch.tensor(SCALE_EXPONENTS) - _E0 + 1).clamp(0, _NE + 1)
        return (self.rows[side, row] + self.below[side, row, c]).tolist()


def _next32(m: float) -> float:
    """The float32 after m (m a positive float32)."""
    return _f32(struct.unpack("<I", struct.pack("<f", m))[0] + 1)


def _cuts(fmts: Iterable[Format]) -> Tensor:
    """Every mantissa a threshold of these formats has, and its float32 successor, sorted."""
    ms = {0.5}
    for fmt in fmts:
        for side in _thresholds(fmt):
            for bound in side:
                if bound is not None and 0 < bound < math.inf:
                    mb = math.frexp(bound)[0]
                    ms |= {mb, _next32(mb)}
    return torch.tensor(sorted(ms), dtype=torch.float32)


def _grid_counts(fmt: Format, hist: _Histogram) -> FormatCounts:
    counts: list[list[int]] = [[0] * _NK, [0] * _NK, [0] * _NK]  # lost, subnormal, overflow
    for side, (zero, normal, over) in enumerate(_thresholds(fmt)):
        lost = hist.at_most(side, zero, strict=False)
        below_normal = lost if normal is None else hist.at_most(side, normal, strict=True)
        not_over = hist.at_most(side, over, strict=True)
        total = int(hist.rows[side, -1])
        for i in range(_NK):
            counts[0][i] += lost[i]
            counts[1][i] += below_normal[i] - lost[i]
            counts[2][i] += total - not_over[i]
    return FormatCounts(repr(fmt), *(tuple(c) for c in counts))


def _direct_counts(fmt: Format, x: Tensor, counted: Tensor) -> FormatCounts:
    """Scale-invariant formats: quantize the whole tensor once (max-abs exponents) and count among the
    ``counted`` (finite non-zero) elements; the same counts at every scale."""
    q = quantize(x, fmt)
    lost = int(((q == 0) & counted).sum())
    over = 0  # a block floating point block sits at its own max-abs exponent
    if fmt.outside_state == "exponent":  # one exponent for the tensor (dfx), not one per block
        r = int(max_abs_int_bits(x))  # the largest code times the step 2**(r - bits + 1)
        over = int(((x.abs() > math.ldexp(fmt.code_range[1], r - fmt.bits + 1)) & counted).sum())
    return FormatCounts(repr(fmt), (lost,) * _NK, (0,) * _NK, (over,) * _NK)


def _scaled_counts(fmt: Format, rounding: Rounding) -> FormatCounts:
    """A scaled format's counts, the same at every scale: lost = flushed, overflow = clipped elements."""
    return FormatCounts(repr(fmt), (rounding.flushed,) * _NK, (rounding.subnormal,) * _NK,
                        (rounding.clipped,) * _NK, rounding)


def _counts(fmt: Format, x: Tensor, flat: Tensor, hist: _Histogram, counted: Tensor | None,
            axis: int | None, block_axis: int | None) -> FormatCounts:
    if fmt.scaled:
        return _scaled_counts(fmt, rounding_of(x, operand_format(fmt, x, axis, block_axis)))
    counts = _direct_counts(fmt, flat, counted) if _scale_invariant(fmt) else _grid_counts(fmt, hist)
    return replace(counts, rounding=rounding_of(flat, fmt))


def census(x: Tensor, formats: Iterable[Format | str] = (), *, axis: int | None = None,
           block_axis: int | None = None) -> Census:
    """The census of one tensor (read as float32): its log2 histogram and, for each format, the counts at
    every loss scale 2**k, k in SCALE_EXPONENTS, and its Rounding (module docstring). ``axis`` (an op's choice
    for this operand) and ``block_axis`` (a layer's, ``Quantizer.block_axis``): where the blocks of scaled
    formats run, as the quantizer's call would (``formats.operand_format``)."""
    fmts = [parse_format(f) if isinstance(f, str) else f for f in formats]
    x = x.detach().float()
    flat = x.reshape(-1)
    hist, zeros, nonfinite = _Histogram.of(flat, _cuts(f for f in fmts if not _scale_invariant(f)))
    counted = torch.isfinite(flat) & (flat != 0) if any(map(_scale_invariant, fmts)) else None
    counts = tuple(_counts(f, x, flat, hist, counted, axis, block_axis) for f in fmts)
    per_exponent = hist.rows.sum(0).diff()[1:]  # elements with exponent _E0 + i, both signs
    return Census(total=flat.numel(), zeros=zeros, nonfinite=nonfinite, log2_counts=tuple(per_exponent.tolist()),
                  formats=counts)
