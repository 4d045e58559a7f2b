"""Packed storage: a tensor whose values lie on a format's grid, held in the format's real width.

``pack(x, fmt)`` turns a float tensor already rounded onto ``fmt`` (the output of ``quantize(x, fmt)``) into a
:class:`Packed` value that holds the same numbers in fewer bytes; ``Packed.unpack()`` gives them back, bit for
bit, in the original dtype and shape. One entry of ``PACKERS`` per format family:

* floating point (``FloatFormat``): a cast to the narrowest torch float dtype that holds every value of the
  format exactly: ``float8_e4m3fn`` (e4m3 and smaller saturating grids), ``float8_e5m2`` (e5m2 and smaller
  grids), then float16, bfloat16. -0, +-inf, NaN, subnormals and saturated values survive (NaN as torch's
  NaN of that dtype: the payload is not kept). Unpacking is one cast.
* fixed point (``FixedPoint``), dynamic fixed point (``DynamicFixedPoint``): the integer codes k = x * 2**frac
  in ``word`` bits; two 4-bit codes or four 2-bit codes share a byte. A ``dfx<bits>`` tensor carries its
  exponent: the smallest r with every value in [-2**r, 2**r), read from the tensor itself (the grid of that r is
  the rounding's own grid or a finer one, so the codes are exact). Unpacking is one cast and one multiply.
* ``Uniform`` (WRPN): the level index i = x * n, values fl32(i / n); unpacking is a cast and a divide.
* ``BlockFloat``: the codes of each block plus one int16 exponent a block (the dfx rule per block).

Integer codes have one zero: a -0 produced by the rounding (a small negative value rounded to 0) unpacks as +0,
the same number. A tensor holding NaN (a diverged run) cannot be coded in integers: ``pack`` then keeps it as
it is (a :class:`Raw`). A tensor that is not on the format's grid is refused (ValueError) when ``verify=True``.

Boolean tensors (masks) pack eight to a byte: :func:`pack_bool`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .types import (
    TORCH_DTYPES,
    BlockFloat,
    Container,
    DynamicFixedPoint,
    FixedPoint,
    FloatFormat,
    Format,
    Uniform,
    container_of,
)

__all__ = ["Packed", "Raw", "Cast", "Codes", "BlockCodes", "Bits", "pack", "pack_bool", "PACKERS", "storage_of",
           "Storage", "mark", "marked_format", "marked_packed", "take_packed", "copy_mark", "RoundingPacks",
           "rounding_packs", "FormDemand", "FormsFor", "codes_form", "MIN_NUMEL"]


class Packed:
    """A tensor held in packed form; ``unpack()`` returns the original values (a new tensor)."""

    shape: torch.Size
    dtype: torch.dtype

    def unpack(self) -> Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the packed payload (tensors only, not the Python object)."""
        raise NotImplementedError

    def __getattr__(self, name: str) -> object:
        """A tensor's attribute (``.norm()``, ``.device``, ``.mul_``) asked of a packed
        value: AttributeError naming the way to the values, instead of Python's bare "object has no attribute"
        (code written for torch reads ``optimizer.state[p]["exp_avg"]`` as a tensor). Not a silent unpacked
        copy: an in-place change of a copy would change nothing. Only called for names the object lacks."""
        if name.startswith("_") or not hasattr(Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}: this value is held packed "
            "(lowprec.formats.packing.Packed, e.g. optimizer state between steps), not as a torch.Tensor. "
            f".unpack() gives its float tensor (a copy: to change the value, assign a new tensor in its place, "
            "e.g. optimizer.state[p][name] = t); optimizer.state_dict() gives float tensors; packed=off in the "
            "policy or LOWPREC_PACKED=0 keeps float32 tensors"
        )

    def __repr__(self) -> str:
        """Its kind, shape, dtype, payload bytes and the values it holds (unpacked), not its raw codes or bytes,
        which a reader of a printed ``optimizer.state`` could take for the values."""
        return (f"{type(self).__name__}(packed, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"nbytes={self.nbytes}, values={self.unpack()!r})")

    def to(self, *args: Any, **kwargs: Any) -> Packed:
        """The same packed value with its tensors on another device, called as ``Tensor.to`` is (``to(device)``,
        ``to(device=..., non_blocking=...)``: what code that moves an optimizer's state between devices calls, e.g.
        Lightning's ``move_data_to_device``, accelerate's ``send_to_device``); a new object, bit for bit the same.

        A dtype other than the unpacked one (``to(torch.bfloat16)``, ``to(dtype=...)``, ``to(other_tensor)``) is
        refused with a TypeError: the payload is the format's codes, not the values, and casting it (int16 codes
        to bfloat16) would change the values silently; ``.unpack().to(dtype)`` converts the values."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise TypeError(
                f"{type(self).__name__}.to({dtype}): this value is held packed (lowprec.formats.packing.Packed, e.g. "
                f"optimizer state between steps) and unpacks to {self.dtype}; its payload is the format's codes, "
                "which a cast would change. Convert the values: .unpack().to(dtype) (assign the tensor in its "
                "place, e.g. optimizer.state[p][name] = t), or keep float32 tensors with packed=off in the policy "
                "or LOWPREC_PACKED=0"
            )
        if device is None:
            return self
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]


@dataclass(frozen=True, eq=False, repr=False)
class Raw(Packed):
    """A tensor kept as it is (NaN in an integer format, or no packer)."""

    tensor: Tensor

    def unpack(self) -> Tensor:
        return self.tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass(frozen=True, eq=False, repr=False)
class Cast(Packed):
    """Values held in a narrower torch float dtype; unpacked by one cast back to ``dtype``."""

    data: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.data.shape

    def unpack(self) -> Tensor:
        return _cast(self.data, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_compile_failed = False


@functools.cache
def _compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return torch.compile(fn, dynamic=True)


def _fused(fn: Callable[..., Tensor], data: Tensor, *args: object) -> Tensor:
    """``fn(data, *args)``, for a large ``data`` through torch.compile (one generated loop: the same values,
    elementwise integer and conversion ops), eagerly if compiling is off or fails."""
    from .quantize import COMPILE_MIN_NUMEL, compile_enabled  # quantize marks its results: it imports packing

    global _compile_failed
    if data.numel() >= COMPILE_MIN_NUMEL and not _compile_failed and compile_enabled():
        try:
            return _compiled(fn)(data, *args)
        except Exception:  # no C++ compiler: eager gives the same values
            _compile_failed = True
    return fn(data, *args)


def _to(data: Tensor, dtype: torch.dtype) -> Tensor:
    return data.to(dtype)


@torch.compiler.disable  # its own compiled graph: opaque to a user's torch.compile
def _cast(data: Tensor, dtype: torch.dtype) -> Tensor:
    """``data.to(dtype)``; a large tensor to or from float8 through torch.compile, whose generated loop
    converts several times faster than torch's eager float8 conversion on a CPU (packing casts values that
    lie on the float8 grid: exact either way, the same values; eager if compiling fails)."""
    if data.dtype in _FP8_DTYPES or dtype in _FP8_DTYPES:
        return _fused(_to, data, dtype)
    return data.to(dtype)


# -- integer codes --------------------------------------------------------------------------------------------


def _int_dtype(bits: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if bits <= torch.iinfo(dtype).bits:
            return dtype
    raise ValueError(f"no integer dtype holds {bits}-bit codes")


def _code_dtype(bits: int, signed: bool) -> torch.dtype:
    """The integer dtype of whole-byte codes: two's complement, or unsigned (uint8 up to 8 bits)."""
    return _int_dtype(bits) if signed else torch.uint8 if bits <= 8 else _int_dtype(bits + 1)


def _sub_byte(bits: int) -> int | None:
    """The width a code of ``bits`` bits is packed at inside a byte (2 or 4), or None (whole bytes)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else None


def _to_lanes(values: Tensor, width: int) -> Tensor:
    """uint8 ``values`` below 2**width (any shape), 8 // width a byte, the first in the lowest bits (flat,
    zero-padded): the one sub-byte layout of masks (width 1) and 2- and 4-bit codes."""
    flat = values.reshape(-1)
    if width == 1 and flat.device.type == "cpu":  # numpy's packbits: the same layout in one C loop
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _to_lanes_torch(flat, width)


def _to_lanes_torch(flat: Tensor, width: int) -> Tensor:
    """``_to_lanes`` in tensor ops, on any device."""
    per_byte = 8 // width
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte)
    byte = lanes[:, 0].clone()
    for i in range(1, per_byte):
        byte |= lanes[:, i] << (width * i)
    return byte


def _from_lanes(stored: Tensor, width: int, numel: int) -> Tensor:
    """The first ``numel`` uint8 values of ``_to_lanes`` (flat)."""
    if width == 1 and stored.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(stored.numpy(), count=numel, bitorder="little"))
    return _from_lanes_torch(stored, width, numel)


def _from_lanes_torch(stored: Tensor, width: int, numel: int) -> Tensor:
    """``_from_lanes`` in tensor ops, on any device."""
    per_byte, low = 8 // width, 2**width - 1
    lanes = stored.new_empty(stored.numel(), per_byte)
    for i in range(per_byte):
        torch.bitwise_and(stored >> (width * i) if i else stored, low, out=lanes[:, i])
    return lanes.view(-1)[:numel]


@functools.cache
def _byte_codes(width: int, signed: bool) -> Tensor:
    """The ``8 // width`` codes each of the 256 bytes holds (``_to_lanes``' layout), a row a byte (int8;
    sign-extended from ``width`` bits when ``signed``)."""
    return _decode(torch.arange(256, dtype=torch.uint8), width, signed, 256 * (8 // width)).view(256, -1)


def _lookup(table: Tensor, stored: Tensor) -> Tensor:
    """Row ``b`` of ``table`` (256 rows, one per byte value) for each byte ``b`` of ``stored``, flat: sub-byte
    codes unpacked to their values in one gather a byte (numpy's take). The values are the table's, computed by
    the same arithmetic as value-by-value unpacking: the same bits, measured 3.7x faster on a CPU than
    separating the lanes, casting and scaling (737k 4-bit codes). The table is gathered as integers of its
    width (numpy has no bfloat16): the same bits."""
    ints = table.view(_int_dtype(8 * table.element_size())).numpy()
    return torch.from_numpy(np.take(ints, stored.numpy(), axis=0)).view(table.dtype).reshape(-1)


def _encode(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Integer-valued float codes (signed two's complement or unsigned, ``bits`` wide) as the stored tensor:
    int8..int64 for whole bytes, uint8 with 8 // width codes a byte for 2- and 4-bit codes (flat)."""
    width = _sub_byte(bits)
    if width is None:
        return codes.to(_code_dtype(bits, signed))
    if not signed:
        return _float_lanes(codes, width)
    # two's complement in ``width`` bits: the low bits of the int8 code
    return _to_lanes(codes.to(torch.int8).view(torch.uint8).bitwise_and_(2**width - 1), width)


def _float_lanes(codes: Tensor, width: int) -> Tensor:
    """``_to_lanes`` of integer-valued float ``codes`` in [0, 2**width): each byte's ``8 // width`` codes
    weighted by their lane's power of two and summed, neighbouring lanes pairwise (``a + b * 2**width``, then
    the same of those pairs at twice the width: one add for two 4-bit codes, faster on CPUs than a small matrix
    product), then cast: exact in float32 (integers below 256), with no full-size integer temporaries (a
    float-to-uint8 cast of every code is the slow part of the integer route)."""
    per_byte = 8 // width
    flat = codes.reshape(-1)
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte)
    while lanes.shape[1] > 1:
        lanes = torch.add(lanes[:, 0::2], lanes[:, 1::2], alpha=2.0**width)
        width *= 2
    return lanes.reshape(-1).to(torch.uint8)


#: Values packed at a time: packing a large tensor holds at most this many values in temporaries (a multiple
#: of 8, so that each chunk fills whole bytes of sub-byte codes).
CHUNK = 1 << 20


def _encode_chunked(x: Tensor, to_codes: Callable[[Tensor], Tensor], bits: int, signed: bool) -> Tensor:
    """``_encode(to_codes(x))`` (flat), ``CHUNK`` values at a time: the float codes of one chunk are the only
    temporary, whatever the size of ``x``."""
    flat = x.reshape(-1)
    if flat.numel() <= CHUNK:
        return _encode(to_codes(flat), bits, signed)
    width = _sub_byte(bits)
    dtype = torch.uint8 if width is not None else _code_dtype(bits, signed)
    out = torch.empty(flat.numel() if width is None else -(-flat.numel() * width // 8), dtype=dtype,
                      device=x.device)
    start = 0
    for chunk in flat.split(CHUNK):
        part = _encode(to_codes(chunk), bits, signed)
        out[start: start + part.numel()].copy_(part)
        start += part.numel()
    return out


def _decode(stored: Tensor, bits: int, signed: bool, numel: int) -> Tensor:
    """The codes of ``_encode`` as an integer tensor (flat for sub-byte codes)."""
    width = _sub_byte(bits)
    if width is None:
        return stored
    lanes = _from_lanes(stored, width, numel)
    if not signed:
        return lanes
    shift = 8 - width  # sign extension: the code's top bit moved to the int8 sign bit and back
    return (lanes << shift).view(torch.int8) >> shift


def _scale(x: Tensor, k: int) -> Tensor:
    """x * 2**k, exact for values whose product is representable: the power of two is applied in steps that
    each stay a normal number of x's dtype (the first a new tensor, the rest in place)."""
    step = 126 if x.dtype != torch.float64 else 1022
    part = max(-step, min(step, k))
    x = x * 2.0**part
    k -= part
    while k:
        part = max(-step, min(step, k))
        x.mul_(2.0**part)
        k -= part
    return x


def _scale_rows(x: Tensor, k: Tensor) -> Tensor:
    """Row i of the 2-d ``x`` times 2**k[i] (int32, |k| <= 252), exact as ``_scale``: two factors 2**(k//2) and
    2**(k - k//2), each a normal number, computed on the device (no host sync)."""
    half = torch.div(k, 2, rounding_mode="floor")
    out = x * torch.exp2(half.to(x.dtype))[:, None]
    return out.mul_(torch.exp2((k - half).to(x.dtype))[:, None])


@dataclass(frozen=True, eq=False, repr=False)
class Codes(Packed):
    """Integer codes: value = code * 2**-frac (``levels`` None) or fl(code / levels) (WRPN's uniform)."""

    data: Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    signed: bool
    frac: int = 0
    levels: int | None = None

    def codes(self) -> Tensor:
        return _decode(self.data, self.bits, self.signed, self.shape.numel()).reshape(self.shape)

    def unpack(self) -> Tensor:
        width = _sub_byte(self.bits)
        if width is not None and self.data.device.type == "cpu":  # one table row a byte (_lookup)
            numel = self.shape.numel()
            return _lookup(self._values(_byte_codes(width, self.signed).to(self.dtype)), self.data)[:numel].view(
                self.shape)
        return self._values(self.codes().to(self.dtype))

    def _values(self, c: Tensor) -> Tensor:
        """The values of integer codes ``c`` (of the stored dtype), in place: c / levels or c * 2**-frac."""
        if self.levels is not None:
            return c.div_(self.levels)
        return c.mul_(2.0**-self.frac) if abs(self.frac) <= 126 else _scale(c, -self.frac)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(frozen=True, eq=False, repr=False)
class BlockCodes(Packed):
    """Block floating point: ``bits``-wide codes in blocks of ``block`` (row-major), one int16 ``frac`` a block:
    value = code * 2**-frac[block]."""

    data: Tensor
    fracs: Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block: int

    def unpack(self) -> Tensor:
        numel = self.shape.numel()
        c = _decode(self.data, self.bits, True, numel).reshape(-1).to(self.dtype)
        pad = -numel % self.block
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        out = _scale_rows(c.view(-1, self.block), -self.fracs.to(torch.int32))
        return out.reshape(-1)[:numel].reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.fracs.numel() * self.fracs.element_size()


def _bits_as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Each byte of ``data`` as its eight bits, lowest first, as 0/1 values of ``dtype`` (flat)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data[:, None] >> shifts) & 1).to(dtype).view(-1)


@dataclass(frozen=True, eq=False, repr=False)
class Bits(Packed):
    """A boolean tensor, eight values a byte."""

    data: Tensor
    shape: torch.Size
    dtype: torch.dtype = torch.bool

    def unpack(self) -> Tensor:
        return _from_lanes(self.data, 1, self.shape.numel()).view(torch.bool).reshape(self.shape)

    @torch.compiler.disable
    def unpack_as(self, dtype: torch.dtype) -> Tensor:
        """``unpack().to(dtype)`` (1 for True, 0 for False), not through a boolean tensor (a bool -> float cast
        runs 7x slower than a uint8 -> float one on a CPU): on a CPU, numpy's unpackbits to one byte a value, then
        that cast (measured, 524k values: 0.09 ms against 0.15-0.27 ms for the compiled kernel, which reads each
        byte once per value); elsewhere from the bytes in one pass (compiled for a large tensor)."""
        numel = self.shape.numel()
        if self.data.device.type == "cpu":
            return _from_lanes(self.data, 1, numel).to(dtype).view(self.shape)
        return _fused(_bits_as, self.data, dtype)[:numel].view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def pack_bool(mask: Tensor) -> Bits:
    """A boolean tensor packed eight values a byte (``Bits.unpack()`` gives it back)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bool packs bool tensors, got {mask.dtype}")
    return Bits(_to_lanes(mask.contiguous().view(torch.uint8), 1), mask.shape)


# -- one packer per family ----------------------------------------------------------------------------------

#: The float8 dtypes as containers, and whether they hold infinities.
_FP8 = (
    (Container(torch.float8_e4m3fn, 3, -6, 8), False),
    (Container(torch.float8_e5m2, 2, -14, 15), True),
)


def _float_dtype(fmt: FloatFormat) -> torch.dtype:
    """The narrowest torch float dtype holding every value of ``fmt`` exactly (and its inf, if it has one)."""
    if fmt in TORCH_DTYPES:
        return TORCH_DTYPES[fmt]
    for c, has_inf in _FP8:
        fits = (fmt.man_bits <= c.man_bits and fmt.emin - fmt.man_bits >= c.smallest_exponent
                and fmt.emax <= c.emax and fmt.max_value <= c.max_value)
        if fits and (has_inf or fmt.overflow == "saturate"):
            return c.dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        if fmt.fits_in(dtype):
            return dtype
    return torch.float64


def _pack_float(x: Tensor, fmt: FloatFormat) -> Packed:
    dtype = _float_dtype(fmt)
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return Raw(x)
    return Cast(_cast(x, dtype), x.dtype)


def _has_nan(x: Tensor) -> bool:
    """Whether ``x`` (values on an integer-coded grid: finite or NaN) holds a NaN, from one reduction and no
    temporary: its sum is NaN (a sum overflowing to both infinities reads as NaN too: the tensor is then kept
    as it is, still exact)."""
    return bool(x.sum().isnan())


def _pack_fixed_at(x: Tensor, word: int, frac: int) -> Packed:
    if _has_nan(x):
        return Raw(x)
    return Codes(_encode_chunked(x, lambda c: _scale(c, frac), word, True), x.shape, x.dtype, word, True, frac)


def _pack_fixed(x: Tensor, fmt: FixedPoint) -> Packed:
    return _pack_fixed_at(x, fmt.word, fmt.frac)


def _range_int_bits(lo: Tensor, hi: Tensor) -> Tensor:
    """Per element: the smallest r with lo >= -2**r and hi < 2**r (int32; a large negative r where both are 0)."""
    _, e_hi = torch.frexp(hi.clamp(min=0))  # hi = m * 2**e, 0.5 <= m < 1: hi < 2**e, the smallest such r
    m_lo, e_lo = torch.frexp((-lo).clamp(min=0))
    e_lo = e_lo - (m_lo == 0.5).to(e_lo.dtype)  # -lo <= 2**r: a power of two itself needs one bit less
    r = torch.maximum(torch.where(hi > 0, e_hi, -1000), torch.where(lo < 0, e_lo, -1000))
    return r


def _pack_dfx(x: Tensor, fmt: DynamicFixedPoint) -> Packed:
    if x.numel() == 0:
        return Raw(x)
    lo, hi = torch.aminmax(x)  # NaN if x holds one
    r, nan = torch.stack([_range_int_bits(lo, hi).to(torch.float64), (lo + hi).isnan()]).tolist()
    if nan:
        return Raw(x)
    r = int(r)
    frac = fmt.bits - 1 - (r if r > -1000 else 0)
    return _pack_fixed_at(x, fmt.bits, frac)


def _uniform_bits(fmt: Uniform) -> int:
    """The width of a uniform format's level codes: its bits, two for signed k=1 (codes -1/+1)."""
    return max(fmt.bits, 2) if fmt.signed else fmt.bits


def _pack_uniform(x: Tensor, fmt: Uniform) -> Packed:
    if _has_nan(x):
        return Raw(x)
    bits = _uniform_bits(fmt)
    codes = _encode_chunked(x, lambda c: (c * fmt.levels).round_(), bits, fmt.signed)
    return Codes(codes, x.shape, x.dtype, bits, fmt.signed, levels=fmt.levels)


def _pack_block(x: Tensor, fmt: BlockFloat) -> Packed:
    if x.numel() == 0:
        return Raw(x)
    flat = x.reshape(-1)
    pad = -flat.numel() % fmt.block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, fmt.block)
    lo, hi = torch.aminmax(blocks, dim=1)  # NaN in a block that holds one
    if bool((lo + hi).isnan().any()):
        return Raw(x)
    r = _range_int_bits(lo, hi)
    fracs = fmt.bits - 1 - torch.where(r > -1000, r, 0)
    codes = _scale_rows(blocks, fracs).reshape(-1)[: x.numel()]
    return BlockCodes(_encode(codes, fmt.bits, True), fracs.to(torch.int16), x.shape, x.dtype, fmt.bits,
                      fmt.block)


#: One packer per format family: adding a family is one entry here (and its ``Storage`` in ``storage_of``).
PACKERS: dict[type[Format], Callable[[Tensor, Format], Packed]] = {
    FloatFormat: _pack_float,  # type: ignore[dict-item]
    FixedPoint: _pack_fixed,  # type: ignore[dict-item]
    DynamicFixedPoint: _pack_dfx,  # type: ignore[dict-item]
    Uniform: _pack_uniform,  # type: ignore[dict-item]
    BlockFloat: _pack_block,  # type: ignore[dict-item]
}


@dataclass(frozen=True)
class Storage:
    """How a format's values are stored packed: ``dtype`` (the torch dtype of the stored tensor), ``bits``
    (bits a value, sub-byte codes included), ``overhead_bits`` (shared exponents, per value)."""

    dtype: torch.dtype
    bits: float
    overhead_bits: float = 0.0

    @property
    def bytes_per_value(self) -> float:
        return (self.bits + self.overhead_bits) / 8


def storage_of(fmt: Format) -> Storage:
    """The packed storage of ``fmt``'s values (what memory estimates count); float32 for a family without a
    packer (the scaled formats MX, NVFP4 and scaled<...>: their values are kept in float32 containers)."""
    if isinstance(fmt, FloatFormat):
        dtype = _float_dtype(fmt)
        return Storage(dtype, torch.finfo(dtype).bits)
    if isinstance(fmt, (FixedPoint, DynamicFixedPoint, BlockFloat, Uniform)):
        bits = fmt.word if isinstance(fmt, FixedPoint) else fmt.bits
        signed = not isinstance(fmt, Uniform) or fmt.signed
        if isinstance(fmt, Uniform):
            bits = _uniform_bits(fmt)
        overhead = 16 / fmt.block if isinstance(fmt, BlockFloat) else 0.0
        width = _sub_byte(bits)
        if width is not None:
            return Storage(torch.uint8, width, overhead)
        dtype = _code_dtype(bits, signed)
        return Storage(dtype, torch.iinfo(dtype).bits, overhead)
    return Storage(torch.float32, 32)  # no packer (the scaled formats): saved in float32 containers


def pack(x: Tensor, fmt: Format, *, verify: bool = True) -> Packed:
    """``x`` (values on ``fmt``'s grid, e.g. ``quantize(x, fmt)``) in packed storage.

    ``verify=True`` unpacks again and raises ValueError if any value differs (``x`` was not on the grid);
    ``verify=False`` trusts the caller (a tensor the rounding itself produced).
    """
    container_of(x.dtype)  # TypeError for a non-float tensor
    packer = PACKERS.get(type(fmt))
    if packer is None:
        families = ", ".join(t.__name__ for t in PACKERS)
        raise TypeError(f"no packer for {type(fmt).__name__} ({fmt!r}); packers: {families}")
    packed = packer(x, fmt)
    if verify and not isinstance(packed, Raw):
        back = packed.unpack()
        same = (back == x) | (torch.isnan(back) & torch.isnan(x))
        if not bool(same.all()):
            raise ValueError(
                f"the tensor is not on the grid of {fmt!r}: packing would change {int((~same).sum())} values. "
                f"Pack the rounded tensor, quantize(x, {str(fmt)!r}), not x itself."
            )
    return packed


# -- marks: which tensors the rounding produced, and on which grid ------------------------------------------

class _Mark(NamedTuple):
    """What ``mark`` records of a rounded tensor."""

    format: Format
    version: int  # the tensor's version counter when marked
    packed: Packed | None = None  # its packed form, when the rounding made it
    demand: FormDemand | None = None  # the call site that made that form


#: tensor -> its _Mark; weak keys: a mark dies with its tensor.
_MARKS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _current(x: Tensor) -> _Mark | None:
    """``x``'s mark, or None: never marked, or changed in place since (its version moved)."""
    if x.is_inference():  # never marked (``mark``)
        return None
    entry = _MARKS.get(x)
    return entry if entry is not None and entry.version == x._version else None


def mark(x: Tensor, fmt: Format, packed: Packed | None = None) -> Tensor:
    """Record that ``x`` (the output of a rounding onto ``fmt``) lies on ``fmt``'s grid; returns ``x``. A format
    family without a packer (``PACKERS``) is not recorded: such tensors are saved as they are. A ``dfx<b>`` mark
    keeps the ``fixed<b, frac>`` mark its rounding already left (the exponent it chose), which is packed as it
    is, without finding the exponent again. ``packed``: ``x`` in packed storage, made by the rounding itself
    while it produced ``x`` (``rounding_packs``; ``pack(x, fmt)`` bit for bit in the values it unpacks to),
    which ``take_packed`` hands out in place of packing ``x`` again; marking ``x`` again with the same format
    keeps it. A tensor made under ``torch.inference_mode`` is not marked: it has no version counter to tell an
    in-place change, and autograd never saves it (a rounding of it is rounded again, to the same values)."""
    if x.is_inference():
        return x
    entry = _current(x)
    if entry is not None and packed is None and (
            (entry.format == fmt and entry.packed is not None)
            or (isinstance(fmt, DynamicFixedPoint) and isinstance(entry.format, FixedPoint)
                and entry.format.word == fmt.bits)):
        return x
    if type(fmt) in PACKERS:
        if packed is not None and _demand is not None:
            _demand.made += 1
        _MARKS[x] = _Mark(fmt, x._version, packed, _demand if packed is not None else None)
    return x


def copy_mark(source: Tensor, x: Tensor) -> Tensor:
    """``x`` (the same values as ``source``: a copy, or ``source.detach()``) marked as ``source`` is, with the
    packed form ``source``'s rounding made where ``x`` has ``source``'s layout; returns ``x``."""
    entry = _current(source)
    if entry is not None and not x.is_inference():
        same = entry.packed is not None and x.stride() == source.stride()
        _MARKS[x] = entry._replace(version=x._version) if same else _Mark(entry.format, x._version)
    return x


def marked_format(x: Tensor) -> Format | None:
    """The format ``x`` was marked with, or None: never marked, or changed in place since (its version moved)."""
    entry = _current(x)
    return None if entry is None else entry.format


def marked_packed(x: Tensor) -> Packed | None:
    """``x`` in packed storage as the rounding that produced it made it (``mark``), or None: none made, or ``x``
    changed in place since (its version moved: the packed form holds the values it had then)."""
    entry = _current(x)
    return None if entry is None else entry.packed


def take_packed(x: Tensor) -> Packed | None:
    """``marked_packed(x)``, for storing it: the call site whose rounding made it learns that its forms are used
    (``FormDemand``)."""
    entry = _current(x)
    if entry is None or entry.packed is None:
        return None
    if entry.demand is not None:
        entry.demand.taken += 1
    return entry.packed


# -- the rounding's own packed form ---------------------------------------------------------------------------

#: Saved tensors smaller than this are stored as they are (packing them saves less than it costs).
MIN_NUMEL = 1024

_rounding_packs = 0


@dataclass
class FormDemand:
    """Whether the results of one rounding call site (a role's quantizer) are stored packed: how many packed
    forms its roundings made (``rounding_packs``) and how many of them a saved tensor took (``take_packed``).
    It wants forms until some were made and none taken: a result no op saves (a layer's output that a ReLU
    reads, whose own result is what it saves) then costs no encoding, and holds no packed form beside it while
    it lives. Such results are still stored packed if an op saves them later (packed at the save, as any
    marked tensor)."""

    made: int = 0
    taken: int = 0

    @property
    def wanted(self) -> bool:
        return self.taken > 0 or self.made == 0


_demand: FormDemand | None = None


class FormsFor:
    """Context manager: the roundings inside are ``demand``'s call site (see FormDemand)."""

    def __init__(self, demand: FormDemand) -> None:
        self.demand = demand
        self.outer: FormDemand | None = None

    def __enter__(self) -> None:
        global _demand
        self.outer, _demand = _demand, self.demand

    def __exit__(self, *exc: object) -> None:
        global _demand
        _demand = self.outer


def rounding_packs(x: Tensor) -> bool:
    """Whether a rounding of ``x`` should make the packed form of its result as it produces it, for ``mark``:
    inside ``RoundingPacks`` (while a model's forward stores what it saves packed), for a tensor large enough to
    be stored packed (``MIN_NUMEL``), at a call site whose forms are wanted (``FormDemand``; any outside
    ``FormsFor``)."""
    return _rounding_packs > 0 and x.numel() >= MIN_NUMEL and (_demand is None or _demand.wanted)

class RoundingPacks:
    """Context manager (nestable): inside it, roundings that can produce their packed form in the same pass
    (fixed point and dfx on the host path: ``codes_form``) do, and leave it with their mark. Outside it they make
    none: a packed form nobody packs would only hold memory while the rounded tensor lives."""

    def __enter__(self) -> None:
        global _rounding_packs
        _rounding_packs += 1

    def __exit__(self, *exc: object) -> None:
        global _rounding_packs
        _rounding_packs -= 1


def codes_form(codes: Tensor, fmt: FixedPoint, dtype: torch.dtype) -> Codes | None:
    """The packed form of a rounding onto the fixed-point grid ``fmt`` (a ``fixed<b, f>``, or the grid a ``dfx<b>``
    rounding chose) from its integer codes (integer-valued floats, no NaN): k with value k * 2**-frac, encoded
    as ``pack`` encodes them (whole-byte integers, or 4- and 2-bit codes two or four a byte); ``dtype``: the
    rounded tensor's. None for non-contiguous codes (``pack`` keeps such a tensor's layout: see
    lowprec.nn.packed)."""
    if not codes.is_contiguous():
        return None
    return Codes(_encode(codes, fmt.word, True), codes.shape, dtype, fmt.word, True, fmt.frac)
