"""Independent references for the scaled formats, in exact rational arithmetic (fractions), written from the
specifications (OCP MX v1.0, Transformer Engine's NVFP4 recipe), not from lowprec's kernels.

Element values are enumerated from their encodings (sign, exponent field, fraction field); rounding to nearest
picks the nearest enumerated value, a tie going to the even encoding; float32 steps are rounded by ``fl``."""

from __future__ import annotations

import bisect
import math
import struct
from fractions import Fraction

NAN = float("nan")
FLT_MAX = Fraction(struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0])


def decode_float(exp_bits: int, man_bits: int, code: int, finite_top: bool) -> Fraction | None:
    """Value of a sign-less float code; None for NaN/inf codes. ``finite_top``: no inf (OCP FN / MX fp6, fp4)."""
    bias = 2 ** (exp_bits - 1) - 1
    ef, frac = code >> man_bits, code & ((1 << man_bits) - 1)
    top = (1 << exp_bits) - 1
    if ef == top and not finite_top:
        return None
    if ef == 0:
        return Fraction(frac, 1 << man_bits) * Fraction(2) ** (1 - bias)
    return (1 + Fraction(frac, 1 << man_bits)) * Fraction(2) ** (ef - bias)


class Grid:
    """The non-negative values of an element format, in code order (index parity = last code bit)."""

    def __init__(self, name: str):
        self.name = name
        if name == "int8":
            self.pos = [Fraction(k, 64) for k in range(128)]  # 0 .. 127/64
            self.neg = [Fraction(k, 64) for k in range(129)]  # magnitudes 0 .. 2 (-128/64)
            return
        e, m, nan_codes = {"e4m3": (4, 3, {0x7F}), "e5m2": (5, 2, set()), "e2m3": (2, 3, set()),
                           "e3m2": (3, 2, set()), "e2m1": (2, 1, set())}[name]
        finite = name != "e5m2"
        vals = []
        for code in range(1 << (e + m)):
            v = None if code in nan_codes else decode_float(e, m, code, finite)
            if v is not None:
                vals.append(v)
        self.pos = self.neg = vals

    @property
    def max(self) -> Fraction:
        return self.pos[-1]

    def nearest(self, v: Fraction) -> Fraction:
        """v rounded to nearest (ties to the even code), saturating."""
        vals = self.pos if v >= 0 else self.neg
        a = min(abs(v), vals[-1])
        i = bisect.bisect_left(vals, a)
        if i < len(vals) and vals[i] == a:
            r = vals[i]
        else:
            lo, hi = vals[i - 1], vals[i]
            r = lo if (a - lo < hi - a or (a - lo == hi - a and (i - 1) % 2 == 0)) else hi
        return r if v >= 0 else -r


def floor_log2(a: Fraction) -> int:
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    return e


def fl(v: Fraction, p: int = 24, emin: int = -126) -> Fraction:
    """v rounded to nearest even in a binary float with p significant bits, smallest normal 2**emin (gradual
    underflow), unbounded above."""
    if v == 0:
        return Fraction(0)
    a = abs(v)
    q = max(floor_log2(a) - (p - 1), emin - (p - 1))
    k = a / Fraction(2) ** q
    n = math.floor(k)
    rem = k - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * Fraction(2) ** q
    return r if v > 0 else -r


def fl32(v: Fraction) -> Fraction | float:
    r = fl(v)
    return r if abs(r) <= FLT_MAX else math.copysign(math.inf, r)


EMAX = {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2, "int8": 0}
MAN = {"e4m3": 3, "e5m2": 2, "e2m3": 3, "e3m2": 2, "e2m1": 1, "int8": 6}


def mx_exponent(amax: Fraction, element: str, rule: str) -> int:
    """The block exponent, from its definition per rule (OCP floor; torchao ceil / even; cuBLAS rceil)."""
    if amax == 0:
        return -127
    grid, emax = Grid(element), EMAX[element]
    if rule == "floor":
        e = floor_log2(amax) - emax
    elif rule == "ceil":
        f = floor_log2(amax)
        e = (f if Fraction(2) ** f == amax else f + 1) - emax
    elif rule == "even":  # amax to MAN+1 significant bits, ties away from zero, then floor
        f = floor_log2(amax)
        step = Fraction(2) ** (f - MAN[element])
        rounded = math.floor(amax / step + Fraction(1, 2)) * step
        e = floor_log2(rounded) - emax
    else:  # rceil: d = fl32(amax * fl32(1 / max)), e = ceil(log2 d) (E8M0 rounded up, as cuBLAS)
        d = fl(amax * fl(1 / grid.max))
        e = -200
        while d > Fraction(2) ** e:
            e += 1
    return min(max(e, -127), 127)


def mx_block(xs: list[float], element: str, rule: str) -> list[float]:
    """One MX block: the spec's algorithm on exact values."""
    if any(not math.isfinite(x) for x in xs):
        return [NAN] * len(xs)
    vals = [Fraction(x) for x in xs]
    e = mx_exponent(max(abs(v) for v in vals), element, rule)
    scale = Fraction(2) ** e
    grid = Grid(element)
    out = []
    for x, v in zip(xs, vals):
        y = grid.nearest(v / scale) * scale
        out.append(float(y) if y != 0 else (0.0 if element == "int8" else math.copysign(0.0, x)))
    return out


def nvfp4_blocks(blocks: list[list[float]], amaxes: list[float] | None = None) -> list[list[float]]:
    """NVFP4 on blocks of one tensor (``amaxes``: each block's scale amax, default its own), each float32 step of
    the recipe rounded by ``fl32``."""
    finite = [abs(Fraction(x)) for b in blocks for x in b if math.isfinite(x)]
    A = max(finite) if finite else Fraction(0)
    s_enc = FLT_MAX if A == 0 else min(fl32(Fraction(2688) / A), FLT_MAX)
    s_dec = fl32(1 / s_enc)
    e4m3, e2m1 = Grid("e4m3"), Grid("e2m1")
    out = []
    for i, b in enumerate(blocks):
        if any(not math.isfinite(x) for x in b):
            out.append([NAN] * len(b))
            continue
        amax = Fraction(amaxes[i]) if amaxes else max(abs(Fraction(x)) for x in b)
        d = e4m3.nearest(min(fl32(fl32(amax / 6) * s_enc), Fraction(448)))
        prod = fl32(d * s_dec)
        enc = FLT_MAX if prod == 0 else min(fl32(1 / prod), FLT_MAX)
        row = []
        for x in b:
            v = fl32(Fraction(x) * enc)
            v = max(min(v, Fraction(6)), Fraction(-6))
            y = fl32(fl32(e2m1.nearest(v) * d) * s_dec)
            row.append(float(y) if y != 0 else math.copysign(0.0, x))
        out.append(row)
    return out
