"""Scaled formats: low-precision elements times a scale held outside them (see docs/formats.md, "Scaled formats").

* ``MXFormat``: OCP Microscaling v1.0: blocks of ``block`` elements along one dimension share a power-of-two
  E8M0 scale; the elements are fp8 (e4m3, e5m2), fp6 (e2m3, e3m2), fp4 (e2m1) or int8.
* ``NVFP4``: e2m1 elements, an e4m3 scale per 16 elements (1x16) or per 16x16 tile, and an fp32 tensor scale.
* ``ScaledFloat``: a float format (e4m3, e5m2, ...) with one fp32 scale per tensor (or per row): current
  scaling from the tensor's own amax, or delayed scaling from an amax history (state in ``lowprec.scaling``).

The rounding lives in ``scaled_kernels.py``; ``quantize`` dispatches here for these classes. All of them compute
in float32 and so round float32 tensors only (their values span scales a half type cannot hold).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .types import E4M3, FloatFormat, Format, _check_int

__all__ = ["Element", "ELEMENTS", "MXFormat", "NVFP4", "ScaledFloat", "SCALE_RULES", "ScaledFormat", "with_block_axis",
           "with_operand_axis", "operand_format"]


@dataclass(frozen=True)
class Element:
    """An MX element format as a grid: sign-magnitude values with ``man_bits`` fraction bits, smallest normal
    exponent ``emin``, largest binade ``emax`` and largest value ``max_value`` (no inf, no NaN: MX elements
    saturate). ``integer``: two's complement k * 2**-6, -128 <= k <= 127 (MXINT8; no -0)."""

    name: str
    exp_bits: int
    man_bits: int
    emin: int
    emax: int
    max_value: float
    min_value: float
    integer: bool = False

    @property
    def qmin(self) -> int:
        """Exponent of the smallest step (the subnormal quantum; the step of int8)."""
        return self.emin - self.man_bits


#: The OCP MX element formats. int8's grid is the fixed step 2**-6 (man_bits and emin chosen so that every binade
#: has that step); its range is the full two's-complement one, [-2, 127/64].
ELEMENTS: dict[str, Element] = {
    "e4m3": Element("e4m3", 4, 3, -6, 8, 448.0, -448.0),
    "e5m2": Element("e5m2", 5, 2, -14, 15, 57344.0, -57344.0),
    "e2m3": Element("e2m3", 2, 3, 0, 2, 7.5, -7.5),
    "e3m2": Element("e3m2", 3, 2, -2, 4, 28.0, -28.0),
    "e2m1": Element("e2m1", 2, 1, 0, 2, 6.0, -6.0),
    "int8": Element("int8", 0, 6, 0, 0, 127 / 64, -2.0, integer=True),
}

#: The shared-exponent rules, e = the exponent of the block scale 2**e (clamped to [-127, 127]):
#:   floor: floor(log2 amax) - emax_elem (OCP MX v1.0, gfloat, torchao FLOOR, microxcaling)
#:   ceil:  ceil(log2 amax) - emax_elem (torchao CEIL)
#:   even:  floor(log2 amax') - emax_elem, amax' = amax rounded to the element's man_bits+1 significant bits,
#:          ties away from zero (torchao EVEN)
#:   rceil: ceil(log2(d)), d = amax * (1 / max_elem) computed in float32 (each step rounded to nearest): the
#:          scale that clips nothing but a value within a float32 rounding of max (cuBLAS, Transformer Engine,
#:          torchao RCEIL)
SCALE_RULES = ("floor", "ceil", "even", "rceil")

_MX_NAMES = {"e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e2m3": "mxfp6_e2m3", "e3m2": "mxfp6_e3m2",
             "e2m1": "mxfp4", "int8": "mxint8"}


class ScaledFormat(Format):
    """Base of the formats whose elements carry a scale computed from the data (rounded in float32 only)."""

    scale_free: ClassVar[bool] = True
    scaled: ClassVar[bool] = True
    axis: int

    @property
    def bits(self) -> None:
        """None: besides its element bits, each value carries a share of the scales held outside it."""
        return None

    def fixed_at(self, int_bits: int) -> None:
        return None  # the scales come from the data, per tensor, row or block

    def fits_in(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32

    def check_fits(self, dtype: torch.dtype) -> None:
        if dtype != torch.float32:
            raise ValueError(
                f"{self!r} is computed in float32 (its scales span 2**-127..2**127, beyond a half type) and rounds "
                f"float32 tensors only; got {dtype}. Quantize a float32 copy, e.g. quantize(x.float(), {str(self)!r})."
            )


def with_block_axis(fmt: Format, block_axis: int | None, x: torch.Tensor) -> Format:
    """``fmt`` with its blocks (rows) along ``block_axis`` for a tensor ``x`` of 3 or more dimensions (a layer's
    choice: a convolution's channels, ``Quantizer.block_axis``); ``fmt`` itself for other tensors (a bias),
    for ``block_axis`` None and for formats without an axis."""
    if block_axis is not None and x.dim() >= 3 and isinstance(fmt, ScaledFormat):
        return replace(fmt, axis=block_axis)
    return fmt


def with_operand_axis(fmt: Format, axis: int | None, x: torch.Tensor) -> Format:
    """``fmt`` with its blocks (rows) along ``axis`` for an operand ``x`` that has that dimension (an op's
    choice per operand: its reduction dimension, e.g. -2 for the second factor of a matmul); ``fmt`` itself for
    ``axis`` None, formats without an axis, and tensors without that dimension (a 1-D factor of ``mv``, whose
    only dimension, the format's own axis -1, is then its reduction dimension)."""
    if axis is not None and isinstance(fmt, ScaledFormat) and -max(x.dim(), 1) <= axis < max(x.dim(), 1):
        return replace(fmt, axis=axis)
    return fmt


def operand_format(fmt: Format, x: torch.Tensor, axis: int | None = None, block_axis: int | None = None) -> Format:
    """The format ``x`` is rounded in: blocks along the call's ``axis`` (``with_operand_axis``: an op's choice for
    one operand) where given, else along the layer's ``block_axis`` (``with_block_axis``). The one rule that a
    role's quantizer and the census of what it would round both apply."""
    return with_operand_axis(fmt, axis, x) if axis is not None else with_block_axis(fmt, block_axis, x)


def _check_axis(axis: object) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int (the dimension the blocks run along), got {axis!r}")


@dataclass(frozen=True, repr=False)
class MXFormat(ScaledFormat):
    """OCP MX: blocks of ``block`` consecutive elements along dimension ``axis`` share the scale 2**e, e from
    ``scale_rule`` (``SCALE_RULES``) on the block's amax, clamped to the E8M0 range [-127, 127]; an all-zero block
    gets 2**-127; a block holding NaN or inf gets the NaN scale and becomes all NaN. Each element is x / 2**e
    rounded onto ``element`` (saturating at its largest value), times 2**e. A row whose length is not a multiple
    of ``block`` ends with a shorter block.
    """

    element: str
    block: int = 32
    scale_rule: str = "floor"
    axis: int = -1

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise ValueError(f"unknown MX element {self.element!r}; elements: {', '.join(ELEMENTS)}")
        _check_int("block", self.block, 1, 65536, "mx<element,block=1..65536[,scale=rule][,axis=d]>")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"unknown MX scale rule {self.scale_rule!r}; rules: {', '.join(SCALE_RULES)}")
        _check_axis(self.axis)

    @property
    def elem(self) -> Element:
        return ELEMENTS[self.element]

    def __repr__(self) -> str:
        opts = ([] if self.scale_rule == "floor" else [f"scale={self.scale_rule}"]) + (
            [] if self.axis == -1 else [f"axis={self.axis}"])
        if self.block == 32:
            name = _MX_NAMES[self.element]
            return name if not opts else f"{name}<{','.join(opts)}>"
        return f"mx<{','.join([self.element, str(self.block), *opts])}>"


#: NVFP4's constants: the e2m1 element's and the e4m3 block scale's largest values.
NVFP4_ELEMENT_MAX, NVFP4_SCALE_MAX = 6.0, 448.0


@dataclass(frozen=True, repr=False)
class NVFP4(ScaledFormat):
    """NVFP4: e2m1 elements; an e4m3 scale per ``tile`` ("1x16": 16 consecutive elements along ``axis``;
    "16x16": 16x16 tiles of the tensor seen as rows along ``axis``, for weights); an fp32 tensor scale
    ``448 * 6 / amax`` over the tensor's finite values. The exact float32 operation sequence (Transformer
    Engine's reference) is in ``scaled_kernels.nvfp4_fp32`` and docs/formats.md."""

    tile: str = "1x16"
    axis: int = -1

    def __post_init__(self) -> None:
        if self.tile not in ("1x16", "16x16"):
            raise ValueError(f"NVFP4 tile must be '1x16' or '16x16', got {self.tile!r}")
        _check_axis(self.axis)

    @property
    def elem(self) -> Element:
        return ELEMENTS["e2m1"]

    def __repr__(self) -> str:
        opts = ([] if self.tile == "1x16" else [f"tile={self.tile}"]) + ([] if self.axis == -1 else [f"axis={self.axis}"])
        return "nvfp4" if not opts else f"nvfp4<{','.join(opts)}>"


#: Names of the elements that have one: a scaled float's element always saturates (``__post_init__``), so these are
#: e4m3 (saturating already) and e5m2 made saturating.
_FLOAT_NAMES = {E4M3: "e4m3", FloatFormat(5, 2, overflow="saturate"): "e5m2"}


@dataclass(frozen=True, repr=False)
class ScaledFloat(ScaledFormat):
    """A float ``element`` format with one fp32 scale s per tensor (per row along ``axis`` when ``rowwise``):
    y = fl(q / s), q = x * s (rounded to float32) rounded onto the element, which saturates at its largest value.

    * ``scaling="current"``: s = element max / amax of this tensor's finite values (float32 division;
      ``pow2``: rounded down to a power of two); amax = 0 gives s = 1.
    * ``scaling="delayed"``: s comes from an amax history held outside the format
      (``lowprec.scaling.DelayedScale``: ``history`` amaxes, combined by ``algo`` "max" or "most_recent",
      s = element max / amax / 2**``margin``); ``quantize`` then needs ``scale=``.
    """

    element: FloatFormat
    scaling: str = "current"
    pow2: bool = False
    rowwise: bool = False
    history: int = 1024
    algo: str = "max"
    margin: int = 0
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.element, FloatFormat):
            raise TypeError(f"a scaled float needs a float element format (e4m3, e5m2, float<...>), got {self.element!r}")
        if self.element.overflow != "saturate":  # scaled casts saturate (satfinite): keep one value set
            object.__setattr__(self, "element", FloatFormat(
                self.element.exp_bits, self.element.man_bits, self.element.subnormals, "saturate", self.element.finite))
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling must be 'current' or 'delayed', got {self.scaling!r}")
        if self.algo not in ("max", "most_recent"):
            raise ValueError(f"algo must be 'max' or 'most_recent', got {self.algo!r}")
        _check_int("history", self.history, 1, 1 << 20, "scaled<elem,delayed,history=1..2**20>")
        _check_int("margin", self.margin, -126, 126, "scaled<elem,delayed,margin=-126..126>")
        if self.rowwise and self.scaling == "delayed":
            raise ValueError("delayed scaling keeps one scale per tensor: rowwise applies to current scaling only")
        _check_axis(self.axis)

    @property
    def outside_state(self) -> str | None:
        return "amax_history" if self.scaling == "delayed" else None

    @property
    def element_name(self) -> str:
        return _FLOAT_NAMES.get(self.element, repr(self.element))

    @property
    def max_value(self) -> float:
        return self.element.max_value

    def __repr__(self) -> str:
        opts = [self.element_name]
        if self.scaling == "delayed":
            opts.append("delayed")
            if self.history != 1024:
                opts.append(f"history={self.history}")
            if self.algo != "max":
                opts.append(f"algo={self.algo}")
            if self.margin:
                opts.append(f"margin={self.margin}")
        if self.pow2:
            opts.append("pow2")
        if self.rowwise:
            opts.append("rowwise")
        if self.axis != -1:
            opts.append(f"axis={self.axis}")
        return f"scaled<{','.join(opts)}>"

