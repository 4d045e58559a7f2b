"""argparse types for the command line's numbers: each refuses a value that cannot work, naming it."""

from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

__all__ = ["count", "natural", "positive", "fraction", "seed"]

N = TypeVar("N", int, float)


def _number(text: str, parse: Callable[[str], N], ok: Callable[[N], bool], expected: str) -> N:
    """``parse(text)`` if it parses and ``ok`` accepts it; else an ArgumentTypeError saying what was expected."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def natural(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def seed(text: str) -> int:
    """A seed in [0, 2**32)."""
    return _number(text, int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
