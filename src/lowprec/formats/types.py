"""Number formats: small immutable values, validated at construction.

Every format here is a set of real numbers plus the rules that map any real onto it (see docs/formats.md).
A format knows its own value set and range; the rounding itself lives in ``kernels.py`` and is shared by all
formats: each format describes itself as a *grid* (the power-of-two quantum of each binade and a range) and
one core rounds onto that grid.

Conventions
-----------
* Bit widths count the sign bit: ``fixed<8,4>`` and ``dfx<8>`` are 8-bit two's-complement words, WRPN's
  ``uniform<4>`` is a 4-bit signed code. (Courbariaux et al. count bits *without* the sign: their "10-bit
  propagation, 12-bit update" is ``dfx<10>`` / ``dfx<12>`` here, their code's ``9 11``.)
* Floating-point formats follow IEEE 754 binary interchange layouts: ``e`` exponent bits with bias
  ``2**(e-1)-1``, ``m`` stored fraction bits, an implicit leading one for normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "Format",
    "FloatFormat",
    "FixedPoint",
    "DynamicFixedPoint",
    "Uniform",
    "BlockFloat",
    "Container",
    "container_of",
]


@dataclass(frozen=True)
class Container:
    """The torch dtype a quantized value is held in, described as a binary float."""

    dtype: torch.dtype
    man_bits: int  # stored fraction bits
    emin: int  # exponent of the smallest normal
    emax: int  # exponent of the largest finite binade

    @property
    def max_value(self) -> float:
        return torch.finfo(self.dtype).max

    @property
    def smallest_exponent(self) -> int:
        """Exponent of the smallest positive (subnormal) value."""
        return self.emin - self.man_bits


_CONTAINERS = {
    torch.float64: Container(torch.float64, 52, -1022, 1023),
    torch.float32: Container(torch.float32, 23, -126, 127),
    torch.bfloat16: Container(torch.bfloat16, 7, -126, 127),
    torch.float16: Container(torch.float16, 10, -14, 15),
}


def container_of(dtype: torch.dtype) -> Container:
    """The container description of a floating dtype; TypeError for anything else."""
    try:
        return _CONTAINERS[dtype]
    except KeyError:
        accepted = ", ".join(str(d) for d in _CONTAINERS)
        raise TypeError(
            f"lowprec quantizes floating-point tensors only ({accepted}); got {dtype}. "
            "Convert first, e.g. x.float()."
        ) from None


class Format:
    """Base of all number formats. Subclasses are frozen dataclasses; ``repr`` parses back.

    What the rest of lowprec needs to know about a format is a property of it, never a test of its class:

    * ``bits``: the width in bits (sign included) of a format with one word per value; None for the scaled
      formats, whose values also carry scales held outside them.
    * ``fixed_step``: the values are integer codes times one step (per tensor or block): fixed, dfx, uniform,
      bfp. Round-off is the step, not relative (Park et al. eq. 4): the classifier rule applies to them.
    * ``floating``: a plain binary float (its step scales with the value; no scale held outside).
    * ``fixed_point``: a two's-complement word at a binary point (fixed, dfx); the classifier rule widens it to
      ``dfx<bits>``.
    * ``signed``: the format holds negative values.
    * ``code_range``: (lowest, highest) integer code of a fixed-step format; None for the others.
    * ``value_range``: (lowest, highest) finite value where the range is fixed by the format alone; None where a
      scale or exponent set from the data moves it (dfx, bfp, the scaled formats).
    * ``clip_range``: the range a clip format (WRPN's ``uniform<k>``) clips to before rounding, where its
      straight-through estimator masks the gradient; None for every format that saturates instead.
    * ``scale_free``: the binary point follows each tensor's (dfx) or block's (bfp) own max-abs exponent, or
      the scale is computed from the data (the scaled formats; a delayed scale follows within its amax
      history), so multiplying the tensor by a power of two (a loss scale) changes none of its rounding.
    * ``scaled``: each element carries a scale computed from the data (per tensor, row or block: fp8 with
      amax scaling, MX, NVFP4), rounded in float32 only.
    * ``outside_state``: the state a quantizer keeps beside the format: ``"exponent"`` (dfx's moving exponent),
      ``"amax_history"`` (delayed scaling), None.
    * ``torch_dtype``: the torch dtype whose own cast implements the format exactly (fp32, bf16, fp16, e4m3,
      e5m2), or None.
    * ``widened(bits)``: the same kind of format at ``bits`` bits; ``fixed_at(int_bits)``: the format with its
      data-set exponent fixed at ``int_bits`` integer bits (None where each block has its own).
    """

    fixed_step: ClassVar[bool] = False
    floating: ClassVar[bool] = False
    fixed_point: ClassVar[bool] = False
    scale_free: ClassVar[bool] = False
    scaled: ClassVar[bool] = False
    signed = True  # a plain class attribute: Uniform's dataclass field of that name overrides it

    @property
    def code_range(self) -> tuple[int, int] | None:
        """(lowest, highest) integer code of a fixed-step format; None for the others."""
        return None

    @property
    def value_range(self) -> tuple[float, float] | None:
        """(lowest, highest) finite value, where the format alone fixes it; None where the data moves it."""
        return None

    @property
    def clip_range(self) -> tuple[float, float] | None:
        """The range a clip format clips to (its STE masks the gradient outside it); None: it saturates."""
        return None

    @property
    def outside_state(self) -> str | None:
        """The state a quantizer holds beside the format: "exponent", "amax_history", or None."""
        return None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype whose own cast implements this format exactly, or None."""
        return TORCH_DTYPES.get(self)

    def widened(self, bits: int) -> Format:
        """The same kind of format at ``bits`` bits; ValueError for a format without a wider kind."""
        raise ValueError(f"{self!r} has no wider version of its kind; name the wider format explicitly")

    def fixed_at(self, int_bits: int) -> Format | None:
        """This format with its data-set exponent at ``int_bits`` integer bits: itself where nothing is set from
        the data, None where each block has its own exponent."""
        return self

    def fits_in(self, dtype: torch.dtype) -> bool:
        """True if every value of the format is exactly representable in ``dtype``."""
        raise NotImplementedError

    def check_fits(self, dtype: torch.dtype) -> None:
        if not self.fits_in(dtype):
            raise ValueError(
                f"{self!r} values are not all representable in {dtype}: the result would be rounded twice. "
                f"Quantize a float32 (or float64) copy instead, e.g. quantize(x.float(), {str(self)!r})."
            )

    @property
    def storage(self):  # -> packing.Storage (imported late: packing builds on this module)
        """How the format's values are stored packed: dtype, bits a value, shared-exponent overhead
        (``lowprec.formats.packing.storage_of``)."""
        from .packing import storage_of

        return storage_of(self)

    def __str__(self) -> str:
        return repr(self)


def _grid_fits(
    c: Container, significant_bits: int, smallest_exponent: int, largest_exponent: int
) -> bool:
    """Does a container hold every multiple of 2**smallest_exponent below 2**(largest_exponent+1) that has at
    most ``significant_bits`` significant bits?"""
    return (
        significant_bits <= c.man_bits + 1
        and smallest_exponent >= c.smallest_exponent
        and largest_exponent <= c.emax
    )


def _check_int(name: str, value: object, lo: int, hi: int, form: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); form: {form}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range [{lo}, {hi}] in {form}")


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    """Binary floating point with ``exp_bits`` exponent and ``man_bits`` fraction bits.

    * ``subnormals``: gradual underflow (True) or flush-to-zero of results below the smallest normal (False).
    * ``overflow``: ``"inf"`` (IEEE: results beyond the largest finite value become +-inf) or ``"saturate"``
      (clamp to +-max; +-inf inputs become +-max as well).
    * ``finite``: the OCP "FN" encoding: no infinities, the top exponent holds normal numbers and only the
      all-ones pattern is NaN (e4m3: max 448). Requires ``overflow="saturate"``.
    """

    exp_bits: int
    man_bits: int
    subnormals: bool = True
    overflow: str = "inf"
    finite: bool = False

    def __post_init__(self) -> None:
        form = "float<e=2..8,m=0..23[,subnormals=on|off][,overflow=inf|saturate][,finite]>"
        _check_int("e (exponent bits)", self.exp_bits, 2, 8, form)
        _check_int("m (fraction bits)", self.man_bits, 0, 23, form)
        if self.overflow not in ("inf", "saturate"):
            raise ValueError(f"overflow must be 'inf' or 'saturate', got {self.overflow!r}")
        if self.finite and self.overflow != "saturate":
            raise ValueError("a finite (no-inf) float format must use overflow='saturate'")
        if self.finite and self.man_bits == 0:
            raise ValueError("a finite format needs m >= 1: with m=0 its top binade would be all NaN")

    floating: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def value_range(self) -> tuple[float, float]:
        return -self.max_value, self.max_value

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade."""
        return self.bias + 1 if self.finite else self.bias

    @property
    def max_value(self) -> float:
        top = 2.0 - 2.0 ** (1 - self.man_bits) if self.finite else 2.0 - 2.0 ** (-self.man_bits)
        return math.ldexp(top, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when subnormals are off)."""
        return math.ldexp(1.0, self.emin - self.man_bits) if self.subnormals else self.min_normal

    def fits_in(self, dtype: torch.dtype) -> bool:
        c = container_of(dtype)
        return _grid_fits(c, self.man_bits + 1, self.emin - self.man_bits, self.emax) and (
            self.max_value <= c.max_value
        )

    def __repr__(self) -> str:
        name = _PRESET_NAMES.get(self)
        if name:
            return name
        opts = [f"e={self.exp_bits}", f"m={self.man_bits}"]
        if not self.subnormals:
            opts.append("subnormals=off")
        if self.overflow != "inf":
            opts.append(f"overflow={self.overflow}")
        if self.finite:
            opts.append("finite")
        return f"float<{','.join(opts)}>"


#: The fraction bits a fixed-point format may have (a step from 2**100 down to 2**-100).
FRAC_RANGE = (-100, 100)


@dataclass(frozen=True, repr=False)
class FixedPoint(Format):
    """Two's-complement fixed point: ``word`` bits (sign included), ``frac`` of them after the binary point.

    Values are k * 2**-frac for integers -2**(word-1) <= k <= 2**(word-1)-1. Saturating: results beyond the
    range clamp to its ends (inf too). NaN stays NaN (a diverged run stays visible). ``frac`` may be negative
    (a step above 1) or exceed ``word`` (all values below 1).
    """

    word: int
    frac: int

    def __post_init__(self) -> None:
        form = "fixed<word=2..53,frac=-100..100>"
        _check_int("word", self.word, 2, 53, form)
        _check_int("frac", self.frac, *FRAC_RANGE, form)

    fixed_step: ClassVar[bool] = True
    fixed_point: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return self.word

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.word - 1)), 2 ** (self.word - 1) - 1

    @property
    def value_range(self) -> tuple[float, float]:
        return self.min_value, self.max_value

    def widened(self, bits: int) -> Format:
        """``dfx<bits>``: the classifier rule widens a fixed binary point into a moving one."""
        return DynamicFixedPoint(bits)

    @property
    def step(self) -> float:
        return math.ldexp(1.0, -self.frac)

    @property
    def max_value(self) -> float:
        return (2 ** (self.word - 1) - 1) * self.step

    @property
    def min_value(self) -> float:
        return -(2 ** (self.word - 1)) * self.step

    @property
    def int_bits(self) -> int:
        """Integer bits excluding the sign (Courbariaux's NOIB): the range is about +-2**int_bits."""
        return self.word - 1 - self.frac

    def fits_in(self, dtype: torch.dtype) -> bool:
        return _grid_fits(container_of(dtype), self.word - 1, -self.frac, self.int_bits)

    def __repr__(self) -> str:
        return f"fixed<{self.word},{self.frac}>"


@dataclass(frozen=True, repr=False)
class DynamicFixedPoint(Format):
    """Dynamic fixed point: a ``bits``-wide two's-complement word whose binary point (the number of integer
    bits r, the tensor's exponent) is state held outside the format, set by a scaling rule (lowprec.scaling).

    With r integer bits it is exactly ``fixed<bits, bits-1-r>``. ``quantize`` without an explicit r uses the
    max-abs rule on the tensor itself: the smallest r with max|x| < 2**r.
    """

    bits: int

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 2, 32, "dfx<bits=2..32>")

    fixed_step: ClassVar[bool] = True
    fixed_point: ClassVar[bool] = True
    scale_free: ClassVar[bool] = True

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def outside_state(self) -> str:
        return "exponent"

    def widened(self, bits: int) -> Format:
        return DynamicFixedPoint(bits)

    def at(self, int_bits: int) -> FixedPoint:
        """The fixed-point format this word becomes with ``int_bits`` integer bits."""
        return FixedPoint(self.bits, self.bits - 1 - int_bits)

    def fixed_at(self, int_bits: int) -> FixedPoint:
        return self.at(int_bits)

    def fits_in(self, dtype: torch.dtype) -> bool:
        return self.bits - 1 <= container_of(dtype).man_bits + 1

    def __repr__(self) -> str:
        return f"dfx<{self.bits}>"


@dataclass(frozen=True, repr=False)
class Uniform(Format):
    """WRPN's k-bit uniform quantizer (Mishra et al.).

    * signed (weights): clip to [-1, 1], n = 2**(k-1)-1 levels a side, values i/n for |i| <= n.
      k = 1 is binary: sign(x) in {-1, +1} (x >= 0, -0 included, maps to +1).
    * unsigned (activations): clip to [0, 1], n = 2**k-1 levels, values i/n for 0 <= i <= n.

    Values are computed in the tensor's own dtype (float32 or float64) as round(clip(x)*n)/n: ties are decided
    on fl(x*n) (to even), and the stored levels are fl(i/n) in that dtype (fl32 on float32 tensors, fl64 on
    float64 ones). A NaN input is returned as it is; +-inf clip to the ends.
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        _check_int("k (bits)", self.bits, 1, 16, "uniform<k=1..16[,unsigned]>")

    fixed_step: ClassVar[bool] = True

    @property
    def code_range(self) -> tuple[int, int]:
        return (-self.levels if self.signed else 0), self.levels

    @property
    def value_range(self) -> tuple[float, float]:
        return (-1.0 if self.signed else 0.0), 1.0

    @property
    def clip_range(self) -> tuple[float, float]:
        return self.value_range

    def widened(self, bits: int) -> Format:
        return Uniform(bits, self.signed)

    @property
    def levels(self) -> int:
        """n: the number of nonzero levels on each side (signed) or above zero (unsigned)."""
        if self.signed:
            return 1 if self.bits == 1 else 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    def fits_in(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float64)

    def __repr__(self) -> str:
        return f"uniform<{self.bits}>" if self.signed else f"uniform<{self.bits},unsigned>"


@dataclass(frozen=True, repr=False)
class BlockFloat(Format):
    """Block floating point: consecutive groups of ``block`` elements (in row-major order) share one
    power-of-two exponent, each element a ``bits``-wide two's-complement integer times that scale.

    The shared exponent of a block is the max-abs rule: the smallest r with max|x| < 2**r, i.e. each block is
    ``dfx<bits>`` with its own r. The last block may be shorter.
    """

    bits: int
    block: int

    def __post_init__(self) -> None:
        form = "bfp<bits=2..24,block=1..65536>"
        _check_int("bits", self.bits, 2, 24, form)
        _check_int("block", self.block, 1, 65536, form)

    fixed_step: ClassVar[bool] = True
    scale_free: ClassVar[bool] = True

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def widened(self, bits: int) -> Format:
        return BlockFloat(bits, self.block)

    def fixed_at(self, int_bits: int) -> None:
        return None  # each block has its own exponent

    def fits_in(self, dtype: torch.dtype) -> bool:
        return self.bits - 1 <= container_of(dtype).man_bits + 1

    def __repr__(self) -> str:
        return f"bfp<{self.bits},{self.block}>"


FP32 = FloatFormat(8, 23)
BF16 = FloatFormat(8, 7)
FP16 = FloatFormat(5, 10)
E4M3 = FloatFormat(4, 3, overflow="saturate", finite=True)
E5M2 = FloatFormat(5, 2)

_PRESET_NAMES: dict[Format, str] = {FP32: "fp32", BF16: "bf16", FP16: "fp16", E4M3: "e4m3", E5M2: "e5m2"}

#: torch dtypes whose own cast implements a preset exactly (used by conformance tests and the native path).
TORCH_DTYPES: dict[Format, torch.dtype] = {
    FP32: torch.float32,
    BF16: torch.bfloat16,
    FP16: torch.float16,
    E4M3: torch.float8_e4m3fn,
    E5M2: torch.float8_e5m2,
}
