"""What an update keeps between steps, held packed in its format's width (``lowprec.formats.packing``).

Park's lazy-update accumulator and the optimizer state (momentum, Adam's moments) of a parameter whose policy
gives them a format are rounded once per step by a role ``Quantizer``, whose result is marked with the grid it
lies on (``lowprec.formats.packing.mark``: a ``dfx<16>`` rounding leaves the ``fixed<16, frac>`` of the exponent
it chose). ``store`` packs such a result in that format (int16 or int8 codes with the exponent, fp16/fp8
casts, sub-byte codes) with no second rounding and no search for the exponent, where the packed width is below
the tensor's (20-bit fixed point takes int32 codes, no smaller than float32: kept as it is); whole-byte integer
codes are formed in the rounded tensor's own memory, which ``store`` consumes. ``store_rounded`` rounds and
stores in one: a max-abs dynamic fixed point rounding hands over its integer codes (``Quantizer.codes``), cast
once, with no rounded float tensor at all. ``load`` unpacks bit for bit (one cast and one multiply; integer
codes have one zero, so a -0 comes back as +0, the same number); ``load_add`` sums packed codes into another
tensor in one pass (the lazy update's ``acc + Δ``). A value that is not marked (a role without a format, a
rounding that changed nothing, a format family without a packer) or that holds NaN is kept as the float tensor
it is.

Packing is on where the policy's ``packed`` setting is (the default) and the environment variable
``LOWPREC_PACKED`` is not 0 (read at every store, as the saved tensors read it at every forward).
"""

from __future__ import annotations

import functools
from typing import Union

import torch
from torch import Tensor

from ..formats import DynamicFixedPoint, FixedPoint, Format
from ..formats.packing import PACKERS, Codes, Packed, Raw, marked_format, pack, storage_of
from ..nn.packed import packing_enabled
from ..policy import Policy, Quantizer
from ..policy.policy import Quant

__all__ = ["Stored", "packing_on", "store", "load", "load_add", "load_scaled", "store_rounded", "repack", "nbytes", "bytes_per_value"]

#: A tensor as an update keeps it between steps: packed, or a float tensor.
Stored = Union[Tensor, Packed]


def packing_on(policy: Policy) -> bool:
    """Whether ``policy`` keeps its update state packed now (its ``packed`` setting and ``LOWPREC_PACKED``)."""
    return policy.packed and packing_enabled()


def _packable(value: Tensor) -> bool:
    # a plain strided tensor: torch.distributed's DTensor shards and other subclasses are kept as they are
    return type(value) is Tensor and value.layout == torch.strided and value.is_floating_point()


@functools.cache
def _bytes_per_value(fmt: Format) -> float:
    return storage_of(fmt).bytes_per_value


def _smaller(fmt: Format, value: Tensor) -> bool:
    """Whether ``fmt``'s packed storage takes fewer bytes than ``value``'s dtype (fixed<20, 14> takes int32
    codes: no smaller than float32, so such a tensor is kept as it is). Cached per format: called per tensor
    per step."""
    return _bytes_per_value(fmt) < value.element_size()


@functools.cache
def _code_dtype(fmt: Format) -> torch.dtype | None:
    """The integer dtype of ``fmt``'s codes where each takes whole bytes (fixed and dynamic fixed point: int8,
    int16, ...); None for sub-byte codes (two or four to a byte) and other families, which ``pack`` encodes."""
    dtype = storage_of(fmt).dtype
    fixed = isinstance(fmt, (FixedPoint, DynamicFixedPoint))
    return dtype if fixed and dtype.is_signed and not dtype.is_floating_point else None


def _codes_in_place(value: Tensor, fmt: FixedPoint, dtype: torch.dtype) -> Packed:
    """``pack(value, fmt)`` for whole-byte codes, computed in ``value``'s own memory: value * 2**frac in place
    (exact: every value is k * 2**-frac and 2**frac, |frac| <= 100, is a normal float32/float64), then one cast
    to the codes' dtype; no float temporary beside ``value``, which is consumed. NaN (no integer code): kept as
    it is, as ``pack`` does."""
    if bool(value.sum().isnan()):
        return Raw(value)
    codes = value.mul_(2.0**fmt.frac).reshape(-1).to(dtype)
    return Codes(codes, value.shape, value.dtype, fmt.word, True, fmt.frac)


def store(value: Tensor, on: bool) -> Stored:
    """``value`` (a role quantizer's result) packed in the format it is marked with when ``on`` and that is
    smaller; else ``value``. ``value`` is consumed when packed: integer codes are formed in its memory
    (``_codes_in_place``: the same ``Codes`` as ``pack``), so the caller must not read it afterwards."""
    fmt = marked_format(value) if on and _packable(value) else None
    if fmt is None or not _smaller(fmt, value):
        return value
    dtype = _code_dtype(fmt)
    if dtype is not None and isinstance(fmt, FixedPoint) and value.dtype in (torch.float32, torch.float64):
        return _codes_in_place(value, fmt, dtype)
    return pack(value, fmt, verify=False)


def store_rounded(quantizer: Quantizer, value: Tensor, on: bool, observe: bool = True) -> Stored:
    """``store(quantizer(value), on)`` (``quantizer.round(value)`` with ``observe=False``), bit for bit. Where
    the rounding gives the integer codes itself (``Quantizer.codes``: max-abs dynamic fixed point) they are cast
    once to their width: no rounded float tensor, no scaling back and forth, no NaN check (the rounding found
    none)."""
    fmt = quantizer.quant.format if quantizer.quant is not None else None
    dtype = _code_dtype(fmt) if on and fmt is not None and _packable(value) else None
    if dtype is not None and _smaller(fmt, value):
        got = quantizer.codes(value)
        if got is not None:
            codes, frac = got
            return Codes(codes.reshape(-1).to(dtype), value.shape, value.dtype, fmt.bits, True, frac)
    return store(quantizer(value) if observe else quantizer.round(value), on)


def load(stored: Stored) -> Tensor:
    """The float tensor of ``store``'s result: a new tensor when packed, the tensor itself otherwise."""
    return stored.unpack() if isinstance(stored, Packed) else stored


def load_add(stored: Stored, other: Tensor) -> Tensor:
    """``load(stored) + other`` as a new tensor, bit for bit. Integer codes k of a float32/float64 tensor are
    cast once and summed in place as ``other + 2**-frac · k`` (one pass: 2**-frac, |frac| <= 126, is a normal
    number and the product exact, so the sum is rounded once, as the unpacked value's sum is), instead of a
    cast, a multiply and a sum into a new tensor."""
    if (isinstance(stored, Codes) and stored.levels is None and abs(stored.frac) <= 126
            and stored.dtype in (torch.float32, torch.float64) and other.dtype == stored.dtype
            and other.shape == stored.shape):
        values = stored.codes().to(stored.dtype)
        return torch.add(other, values, alpha=2.0**-stored.frac, out=values)
    return load(stored) + other


def load_scaled(stored: Stored, factor: float) -> Tensor:
    """``load(stored) * factor`` as a new tensor, bit for bit. Integer codes k of a float32/float64 tensor are
    cast once and multiplied in place by c = fl(factor)·2**-frac (exact, checked to be a normal number of the
    dtype: then k·c is the same real product as (k·2**-frac)·fl(factor), rounded once), instead of a cast and
    two multiplies (Courbariaux's ``M·v`` of a packed velocity)."""
    if isinstance(stored, Codes) and stored.levels is None and stored.dtype in (torch.float32, torch.float64):
        info = torch.finfo(stored.dtype)
        c = torch.tensor(factor, dtype=stored.dtype).item() * 2.0**-stored.frac
        if c == 0.0 or info.tiny <= abs(c) <= info.max:
            return stored.codes().to(stored.dtype).mul_(c)
    return load(stored) * factor


def repack(value: Tensor, fmt: Format | None, on: bool) -> Stored:
    """A float tensor read back from a checkpoint, packed in ``fmt`` (the role's format) when ``on`` and every
    value lies on its grid (checked: ``pack(verify=True)``); as it is otherwise (e.g. state written before its
    parameter had a format), which changes no value: the next step rounds it."""
    if not on or fmt is None or type(fmt) not in PACKERS or not _packable(value) or not _smaller(fmt, value):
        return value
    try:
        return pack(value, fmt, verify=True)
    except ValueError:  # not on the grid: keep the exact values
        return value


def nbytes(stored: Stored) -> int:
    """Bytes of the tensors ``stored`` holds (packed payload and exponents, or the float tensor)."""
    return stored.nbytes if isinstance(stored, Packed) else stored.numel() * stored.element_size()


def bytes_per_value(quant: Quant | None, policy: Policy, element_size: int = 4) -> float:
    """Bytes a value of a role (``quant``: its format and rounding, None for none) takes between steps as
    ``store`` keeps it: its format's packed width where it packs it, else ``element_size`` (the float tensor's)."""
    if quant is None or not packing_on(policy) or type(quant.format) not in PACKERS:
        return float(element_size)
    return min(storage_of(quant.format).bytes_per_value, float(element_size))
