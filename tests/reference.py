"""An independent fp64/numpy reference for rounding onto power-of-two grids (tests only).

Written from the definitions, not from lowprec's kernels: y = round(x / q) * q with q the quantum of x's
binade in the format, evaluated in float64 (exact for float32 inputs: the scaling is by powers of two).
"""

from __future__ import annotations

import numpy as np

from lowprec.formats import FixedPoint, FloatFormat


def float_reference(x32: np.ndarray, fmt: FloatFormat, rounding: str = "nearest") -> np.ndarray:
    x = x32.astype(np.float64)
    with np.errstate(all="ignore"):
        ax = np.abs(x)
        _, e = np.frexp(ax)  # ax = f * 2**e, f in [0.5, 1) -> floor(log2 ax) = e - 1
        q_exp = np.maximum(e - 1 - fmt.man_bits, fmt.emin - fmt.man_bits)
        q = np.ldexp(1.0, q_exp)
        v = ax / q
        k = np.round(v) if rounding == "nearest" else np.trunc(v)
        y = k * q
        if not fmt.subnormals:
            y = np.where(y < fmt.min_normal, 0.0, y)
        if fmt.overflow == "saturate":
            y = np.where(y > fmt.max_value, fmt.max_value, y)
        elif rounding == "toward_zero":
            y = np.where(np.isinf(ax), np.inf, np.minimum(y, fmt.max_value))
        else:
            y = np.where(y > fmt.max_value, np.inf, y)
        y = np.copysign(y, x)
        y = np.where(np.isnan(x), x, y)
    return y.astype(x32.dtype)


def fixed_reference(x32: np.ndarray, fmt: FixedPoint, rounding: str = "nearest") -> np.ndarray:
    x = x32.astype(np.float64)
    with np.errstate(all="ignore"):
        v = x * 2.0**fmt.frac
        k = np.round(v) if rounding == "nearest" else np.trunc(v)
        k = np.clip(k, -(2 ** (fmt.word - 1)), 2 ** (fmt.word - 1) - 1)
        y = np.copysign(k * 2.0**-fmt.frac, x)
    return y.astype(x32.dtype)


def neighbours(x32: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """The format values just below-or-equal and just above-or-equal |x| (toward zero and away)."""
    down = float_reference(x32, fmt, "toward_zero").astype(np.float64)
    x = x32.astype(np.float64)
    _, e = np.frexp(np.abs(x))
    q = np.ldexp(1.0, np.maximum(e - 1 - fmt.man_bits, fmt.emin - fmt.man_bits))
    up = np.where(np.abs(down) == np.abs(x), down, np.copysign(np.abs(down) + q, x))
    return down, up
