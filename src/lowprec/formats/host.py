"""Fast paths for the common case, in a few whole-tensor torch ops: bit-identical to ``kernels.py``.

Emulated training quantizes dozens of tensors per step, most of them small: there the cost of a quantize call
is the number of ops it dispatches, not memory traffic. ``quantize`` sends float32 tensors rounded to nearest
here while they are small enough (``HOST_MAX_NUMEL``, ``COMPILE_MIN_NUMEL`` for casts); larger ones go to the
compiled kernels, whose single pass over memory wins once memory is the limit. These paths dispatch 1 to 5
vectorised ops:

* ``cast_round_trip``: nearest rounding of a float32 tensor onto fp16, bf16, e4m3 or e5m2 is torch's own cast
  there and back (``x.to(bf16).float()``), which is what the formats are defined to equal (round to nearest
  even, subnormals, overflow as torch's cast; tests/test_conformance.py checks the kernels against it), with
  NaN passed through unchanged as everywhere in lowprec.
* ``fixed_scaled``: fixed point with a known number of fraction bits f, on float32:
  ``round(x * 2**f)`` (``torch.round`` rounds ties to even; x * 2**f is exact, or below 2**-126 where it rounds
  to 0 anyway; f up to 149, float32's smallest subnormal step, scaling by two exact factors where 2**f is not a
  normal float32), clamped to the word (saturates +-inf), times 2**-f (exact). NaN stays NaN (every op
  propagates it; a final sum detects it and puts the input's NaN back bit for bit, signalling ones too), -0
  and negative values that round to 0 keep their sign, as ``kernels.fixed_fast``.
* ``max_abs_exponent``: dynamic fixed point's max-abs exponent of a CPU tensor, computed on the host from
  its min and max (reading a CPU scalar costs no device sync); ``quantize`` then rounds with
  ``fixed_scaled``, which the known peak spares the NaN check and, unless a value can round past the word,
  the clamp. A tensor holding NaN or inf takes the general kernel (the exponent must skip them).
* ``fixed_counting``: ``fixed_scaled`` and ``count_above`` of the same tensor (the overflow-rate rule of dynamic
  fixed point observes every tensor it rounds) sharing the scaled copy s = x * 2**f: |s| is compared with the
  scaled thresholds (exact: the scaling is exact wherever it matters), its peak skips the counts it cannot
  reach, the clamp when no value can round past the word, and the NaN check (a finite peak has no NaN).
* ``uniform_scaled``: WRPN's round(clip(x) * n) / n.

``fixed_scaled_coded`` is ``fixed_scaled`` handing out the integer codes it passes through on the way, for packed
storage to keep (``lowprec.formats.packing.codes_form``): given to ``encode`` before their scaling back, one pass
that reads them while they are there (no NaN check of its own: the rounding's serves).

Only round-to-nearest comes here: ``torch.trunc`` is not vectorised on CPUs and stochastic rounding needs the
kernels' random bits.
"""

from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch
from torch import Tensor

__all__ = ["cast_round_trip", "fixed_scaled", "fixed_scaled_coded", "fixed_codes", "fixed_counting", "counts_above",
           "uniform_scaled", "max_abs_exponent"]

#: What ``encode`` makes of the integer codes (a packed form: any type).
Coded = TypeVar("Coded")


def cast_round_trip(x: Tensor, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x rounded to ``dtype`` by torch's cast (nearest even), returned in x's dtype; a NaN is returned as it is
    (the cast would make every NaN the canonical one)."""
    y = x.to(dtype)
    if dtype.itemsize == 1:  # torch does not promote float8 in where()
        y = y.to(x.dtype)
    return torch.where(torch.isnan(x), x, y, out=out)


def fixed_scaled(x: Tensor, out: Tensor | None, frac: int, kmin: int, kmax: int, peak: float | None = None) -> Tensor:
    """clamp(round(x * 2**frac), kmin, kmax) * 2**-frac (module docstring), ties to even; frac in [-126, 149]
    (steps down to float32's smallest subnormal). ``peak``, a finite max|x| the caller already knows, drops the
    NaN check and (when no value can round past the word) the clamp."""
    return fixed_scaled_coded(x, out, frac, kmin, kmax, peak)[0]


def fixed_scaled_coded(x: Tensor, out: Tensor | None, frac: int, kmin: int, kmax: int, peak: float | None = None,
                       encode: Callable[[Tensor], Coded] | None = None) -> tuple[Tensor, Coded | None]:
    """(``fixed_scaled(x, out, frac, kmin, kmax, peak)``, ``encode(k)``) with k the integer codes (a float tensor
    of x's layout, read by ``encode`` before it is scaled back in place into the result); None in place of
    ``encode(k)`` where x holds NaN (no integer codes) or no ``encode`` is given."""
    k = _round_codes_(_times_pow2(x, frac, out), kmin, kmax, math.inf if peak is None else peak * 2.0**frac)
    coded = None if encode is None else encode(k)
    y = _scale_(k, -frac)
    return y, (coded if peak is not None or not _keep_nan(x, y) else None)


def _times_pow2(x: Tensor, e: int, out: Tensor | None = None) -> Tensor:
    """x * 2**e, exact as ``kernels.times_pow2``: one multiplication while 2**e is a normal float32, otherwise
    2**clamp(e, -126, 126) first and the rest second (into ``out`` when given, else a new tensor)."""
    first = min(max(e, -126), 126)
    y = torch.mul(x, 2.0**first) if out is None else torch.mul(x, 2.0**first, out=out)
    return y if first == e else y.mul_(2.0 ** (e - first))


def _scale_(s: Tensor, e: int) -> Tensor:
    """s *= 2**e in place, in the exact factors of ``_times_pow2``. In-place ``mul_`` rather than
    ``_times_pow2(s, e, s)``: ``mul(out=)`` refuses a tensor that requires grad, and ``s`` may."""
    first = min(max(e, -126), 126)
    s.mul_(2.0**first)
    return s if first == e else s.mul_(2.0 ** (e - first))


def _round_codes_(s: Tensor, kmin: int, kmax: int, scaled_peak: float) -> Tensor:
    """s = x * 2**frac, in place: round (ties to even), clamp to [kmin, kmax] unless max|s| = ``scaled_peak``
    rounds inside (below kmax + 1/2; kmin = -kmax - 1 then holds every negative value)."""
    s.round_()
    if not scaled_peak < kmax + 0.5:
        s.clamp_(kmin, kmax)
    return s


def fixed_codes(x: Tensor, frac: int, kmin: int, kmax: int, peak: float) -> Tensor:
    """The integer codes k of ``fixed_scaled(x, None, frac, kmin, kmax, peak)`` (which is k * 2**-frac, exact), as
    a new float tensor: the same ops without the final scaling. ``peak``: the finite max|x|."""
    return _round_codes_(_times_pow2(x, frac), kmin, kmax, peak * 2.0**frac)


def fixed_counting(
    x: Tensor, frac: int, kmin: int, kmax: int, thresholds: tuple[float, ...],
    encode: Callable[[Tensor], Coded] | None = None,
) -> tuple[Tensor, list[float], Coded | None] | None:
    """(``fixed_scaled(x, None, frac, kmin, kmax)``, [count of |x| > t for t in thresholds], ``encode(k)`` of the
    integer codes k before they are scaled back, as ``fixed_scaled_coded``; None without ``encode``), or None
    when x holds NaN or a value whose scaled copy is inf (the caller then takes the general paths)."""
    scale = 2.0**frac
    s = _times_pow2(x, frac)
    a = s.abs()
    peak = a.amax().item()  # amax: 2.5x faster than max() on CPUs; both propagate NaN
    if not math.isfinite(peak):
        return None
    counts = [0.0 if c is None else c.item() for c in counts_above(a, [t * scale for t in thresholds], peak)]
    k = _round_codes_(s, kmin, kmax, peak)
    coded = None if encode is None else encode(k)
    return _scale_(k, -frac), counts, coded


def counts_above(a: Tensor, thresholds: list[float], peak: float) -> list[Tensor | None]:
    """count(a > t) for each threshold as a 0-d tensor, None where ``peak`` (a's max, inf if unknown) does not
    exceed t. Each count is ``gt`` written as 0/1 into a float buffer and summed: exact below 2**24 elements and
    vectorised, where a bool sum is not on CPUs; NaN never counts. The last count overwrites ``a``."""
    needed = [i for i, t in enumerate(thresholds) if not peak <= t]
    counts: list[Tensor | None] = [None] * len(thresholds)
    for i in needed:
        out = a if i == needed[-1] else torch.empty_like(a)
        counts[i] = torch.gt(a, thresholds[i], out=out).sum()
    return counts


def _keep_nan(x: Tensor, y: Tensor) -> bool:
    """Put x's NaNs back into y bit for bit (arithmetic quiets a signalling NaN); whether y may hold any: one
    fast sum finds out (y is finite elsewhere; an inf-inf false alarm only costs the where() and reads as NaN)."""
    if not torch.isnan(y.sum()):
        return False
    torch.where(torch.isnan(x), x, y, out=y)
    return True


def max_abs_exponent(x: Tensor) -> tuple[int, float] | None:
    """(r, max|x|) with 2**(r-1) <= max|x| < 2**r (a subnormal max too, as ``kernels.dfx_maxabs_fp32``; r = 0
    for an all-zero x, which any r represents), or None when x holds NaN or inf."""
    peak = max(-x.amin().item(), x.amax().item())  # two vectorised reductions beat aminmax's one on CPUs
    if not math.isfinite(peak):
        return None
    return math.frexp(peak)[1], peak


def uniform_scaled(x: Tensor, out: Tensor | None, levels: int, signed: bool) -> Tensor:
    """round(clamp(x, -1 or 0, 1) * levels) / levels, ties to even, as ``kernels.uniform_grid`` (NaN propagates)."""
    lo = -1.0 if signed else 0.0
    y = torch.clamp(x, lo, 1.0) if out is None else torch.clamp(x, lo, 1.0, out=out)
    y.mul_(levels).round_().div_(levels)
    _keep_nan(x, y)
    return y
