"""Kernels of the scaled formats (MX, NVFP4, per-tensor scaled floats) on float32: pure tensor code, run eagerly
or fused by torch.compile (``quantize._run``), the same bits either way.

Every kernel receives its input as rows (``x.view(-1, block)``: one block per row) and returns the same shape.
Scales are powers of two built from their bits, or float32 values computed by the documented float32 operations;
elements are rounded by ``round_element``: exact integer-valued arithmetic on a power-of-two grid.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from .kernels import (
    FLT_MAX, NEAREST, STOCHASTIC, TOWARD_ZERO, f32_bits, finite_abs, hash_below_mask, is_below, random_bits31,
    random_hash32,
)

#: NVFP4: e4m3 max * e2m1 max, the numerator of the tensor scale.
NVFP4_TENSOR_NUMERATOR = 448.0 * 6.0


def pow2(e: Tensor) -> Tensor:
    """2**e as float32 for an int32 exponent in [-127, 127] (2**-127 is the float32 subnormal 0x00400000)."""
    return torch.where(e > -127, (e + 127) << 23, 1 << 22).view(torch.float32)


def round_element(
    v: Tensor, man_bits: int, qmin: int, max_value: float, min_value: float, rounding: int, key: Tensor | None,
    rand: Tensor | None = None,
) -> Tensor:
    """|v| rounded onto the grid of quantum 2**max(E - man_bits, qmin) (E = floor(log2 |v|)), sign kept, then
    clamped to [min_value, max_value] (saturation). v finite float32 with 2**(qmin + 23) a normal float32.

    Where |v| >= 2**(qmin + man_bits) (the element's normal range) the rounding is integer arithmetic on v's bits,
    as ``kernels.float_fast_fp32``: nearest adds 2**(s-1) - 1 plus the lowest kept bit and clears the s = 23 -
    man_bits discarded bits (ties to even; a carry moves into the exponent, exactly); toward_zero clears them;
    stochastic adds one quantum when R >> (31 - s) < the discarded bits (R: 31 random bits). Below (the
    element's subnormals, quantum 2**qmin) |v| * 2**-qmin (exact) is rounded to an integer by
    ``kernels.round_integer`` (nearest: as the exact sum (|v| + 2**(qmin+23)) - 2**(qmin+23)), times 2**qmin.
    Both are the rounding of |v| / quantum to an integer with the same random bits: stochastic rounds up when R <
    floor(frac * 2**31). ``rand``: the 31-bit random integers to use (else drawn from ``key``)."""
    bits = v.view(torch.int32)
    a = bits & 0x7FFFFFFF
    s = 23 - man_bits
    keep = -(1 << s)
    below = a < ((qmin + man_bits + 127) << 23)  # the element's subnormal range
    if rounding == NEAREST:
        r = (a + ((1 << s >> 1) - 1) + ((a >> s) & 1)) & keep
        big = 2.0 ** (qmin + 23)
        small = (v.abs() + big) - big
    elif rounding == TOWARD_ZERO:
        r = a & keep
        small = torch.floor(v.abs() * 2.0**-qmin) * 2.0**qmin
    else:  # one comparison with the random bits: against the discarded fraction of whichever branch applies
        if rand is None:
            rand = random_bits31(v.shape, key, v.device)
        w = v.abs() * 2.0**-qmin
        low = torch.floor(w)
        frac = torch.where(below, ((w - low) * 2.0**31).to(torch.int32), (a & ~keep) << (31 - s))
        up = is_below(rand, frac)
        r = (a & keep) + (up << s)
        small = (low + up) * 2.0**qmin
    y = torch.where(below, small, r.view(torch.float32))
    return torch.clamp(y.copysign(v), min_value, max_value)


def _round_up(a: Tensor, normal_above: int, subnormal_above: int) -> Tensor:
    """(floor(log2 a) for a normal, -127 for a subnormal or zero, + 1 where the 23 fraction bits of a exceed
    ``normal_above`` (a normal) or ``subnormal_above`` (a subnormal)) of a finite float32 a >= 0, from its bits."""
    bits = a.view(torch.int32)
    ef, frac = bits >> 23, bits & 0x7FFFFF
    up = torch.where(ef == 0, frac > subnormal_above, frac > normal_above)
    return ef - 127 + up.to(torch.int32)


def shared_exponent(amax: Tensor, rule: str, emax: int, man_bits: int, max_value: float) -> Tensor:
    """The MX block exponent e (int32, clamped to [-127, 127]) of each block's amax (finite, >= 0) under ``rule``
    (``scaled.SCALE_RULES``); an all-zero block gives -127. Exact, from the bits: below 2**-126 the true
    floor(log2 amax) is at most -127, so every rule's result there is -127 or, for amax in (2**-127, 2**-126)
    rounding up, -126 (reached only by int8's emax of 0 and by rceil); the subnormal thresholds decide that case.
    rceil rounds the float32 product descale = amax * (1 / max_value) up to a power of two (cuBLAS)."""
    never = 1 << 23  # a fraction field never exceeds it
    if rule == "rceil":
        e = _round_up(amax * torch.tensor(1.0 / max_value, dtype=torch.float32), 0, 0x400000)
    elif rule == "floor":
        e = _round_up(amax, never, never) - emax
    elif rule == "ceil":
        e = _round_up(amax, 0, 0x400000) - emax
    else:  # even: amax rounded to man_bits + 1 significant bits, ties away, may move up a binade
        e = _round_up(amax, (1 << 23) - (1 << (22 - man_bits)) - 1, (1 << 23) - (1 << (21 - man_bits)) - 1) - emax
    return e.clamp(-127, 127)


def mx_fp32(
    x: Tensor, block: int, rule: str, emax: int, man_bits: int, qmin: int, max_value: float, min_value: float,
    integer: bool, rounding: int, key: Tensor | None,
) -> Tensor:
    """OCP MX of a float32 tensor whose length is a multiple of ``block``, cut into rows of ``block`` (one block
    each): amax per row, e = ``shared_exponent``, elements ``round_element(x * 2**-e) * 2**e`` (both products
    exact where it matters: see docs/formats.md), NaN rows where amax is NaN or inf; ``integer`` (int8 elements)
    turns -0 into +0 (two's complement has no -0). Call through ``constant_block`` when compiling."""
    blocks = x.view(-1, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    e = shared_exponent(torch.where(bad, 0.0, amax), rule, emax, man_bits, max_value)
    y = round_element(blocks * pow2(-e), man_bits, qmin, max_value, min_value, rounding, key) * pow2(e)
    # per block: the NaN scale makes the whole block NaN, always the same NaN (a product of two NaNs would keep
    # either one's payload, depending on the operand order the compiler chose)
    return torch.where(bad, float("nan"), y + 0.0 if integer else y).view(x.shape)


#: The bits of the NaN a NaN or inf block becomes (float("nan"), positive).
NAN_BITS = 0x7FC00000


def mx_scales(
    blocks: Tensor, rule: str, emax: int, man_bits: int, qmin: int, max_value: float, min_value: float,
    integer: bool, rounding: int, key: Tensor | None,
) -> tuple[Tensor, ...]:
    """The first of the two kernels of OCP MX on a CPU (``mx_elements`` is the second; ``mx_fp32`` is the same
    rounding in one kernel): per row of ``blocks``, the amax and the block exponent e = ``shared_exponent``, given
    as e * 2**23 (int32: e added to a float32 exponent field), 2**-(e + qmin) (float32, ``pow2`` of the exponent
    clamped at 127: any factor serves an all-zero row) and the quantum 2**(e + qmin) (float32, possibly a float32
    subnormal: 2**e * 2**qmin, exact), and per row the int32 that every element's bits are max-ed with:
    NAN_BITS (the NaN the row becomes) where amax is NaN or inf, else -2**31 (no element's bits are below it).
    First, ``exact``: a bool scalar, false where a nonzero finite row has e < -126 - (qmin + man_bits): there the
    element's normal range scaled by 2**e reaches below 2**-126, and float32 subnormals would need the element's
    normal rounding, which ``mx_elements`` does not do (only rows with amax below about 2**-96 can: 2**-97 for
    e5m2, 2**-112 for e4m3, 2**-124 for e2m1); also false, where the elements need it, when a nonzero finite
    row's factor is not a float32: stochastic and toward_zero, 2**-(e + qmin) above 2**127 (e < -127 - qmin:
    amax below about 2**-110 for e4m3, 2**-96 for e5m2); nearest, its magic number 2**(e + qmin + 23) above
    2**127 (e > 104 - qmin: amax of about 2**122 or more for e4m3, 2**108 for e2m1; never for e5m2). The caller then
    runs ``mx_fp32``."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    finite = amax < float("inf")
    e = shared_exponent(torch.where(finite, amax, 0.0), rule, emax, man_bits, max_value)
    nonzero = (amax > 0) & finite
    if rounding == NEAREST:
        exact = (torch.where(nonzero, e, 127).amin() >= -126 - (qmin + man_bits)) & (
            torch.where(nonzero, e, -127).amax() <= 104 - qmin
        )
    else:
        exact = torch.where(nonzero, e, 127).amin() >= max(-126 - (qmin + man_bits), -127 - qmin)
    inverse = pow2(torch.clamp(-e - qmin, max=127))
    quantum = pow2(e) * 2.0**qmin
    return exact, e << 23, inverse, quantum, torch.where(finite, -(2**31), NAN_BITS).to(torch.int32)


def mx_elements(
    x: Tensor, xi: Tensor, e_bits: Tensor, inverse: Tensor, quantum: Tensor, nan_bits: Tensor, rule: str, emax: int,
    man_bits: int, qmin: int, max_value: float, min_value: float, integer: bool, rounding: int, key: Tensor | None,
) -> Tensor:
    """The elements of OCP MX given ``mx_scales`` of their rows, as int32 bits: x as rows (float32) and ``xi``, the
    same memory viewed as int32 (a compiled CPU kernel bitcasts one element at a time, through memory: reading
    both views costs nothing, bitcasting did). The same bits as ``mx_fp32`` (``rule`` and ``emax``: unused, the
    row exponents are given).

    With s = 23 - man_bits and a = the bits of |x|: where |x| >= 2**(qmin + man_bits + e) (the element's normal
    range, scaled; also x a float32 normal, which ``mx_scales``'s ``exact`` ensures), x * 2**-e and its rounding
    times 2**e are float32 normals whose bits differ from a's and the rounding's by e * 2**23, so ``round_element``'s
    integer rounding applies to a as it is (the low s bits are the same; a carry moves into the exponent alike),
    and saturation is a min with the bits of max_value * 2**e (of -min_value * 2**e for negative x: int8). Below,
    the element's subnormals: |x| rounded to a multiple of the row's quantum q = 2**(e + qmin) directly, the same
    value as ``round_element``'s rounding of |x| * 2**-e times 2**e: nearest as (|x| + q * 2**23) - q * 2**23 (the
    sum's ulp is q: ties to even); toward_zero and stochastic on w = |x| * 2**-(e + qmin) (exact where w >=
    2**-126; below, w and its scaled counterpart both floor to 0 with a fraction under 2**-31 of a quantum), floor(w)
    (+ 1 where R < floor(frac(w) * 2**31)) times q, exact. Sign from x (int8: not on a zero); NaN rows from
    ``nan_bits``: the bits are max-ed with it (NAN_BITS exceeds every finite result's bits, -2**31 none)."""
    a = xi & 0x7FFFFFFF
    sign = xi ^ a
    s = 23 - man_bits
    keep = -(1 << s)
    below = a < ((qmin + man_bits + 127) << 23) + e_bits
    if rounding == NEAREST:
        r = (a + ((1 << s >> 1) - 1) + ((a >> s) & 1)) & keep
        magic = quantum * 2.0**23
        small = (x.abs() + magic) - magic
    elif rounding == TOWARD_ZERO:
        r = a & keep
        small = torch.floor(x.abs() * inverse) * quantum
    else:  # as round_element: one comparison of the random bits with whichever branch's discarded fraction
        w = x.abs() * inverse
        low = torch.floor(w)
        frac = torch.where(below, ((w - low) * 2.0**31).to(torch.int32), (a & ~keep) << (31 - s))
        up_mask = hash_below_mask(random_hash32(x.shape, key, x.device), frac)  # -1: one quantum up
        r = (a & keep) + (up_mask & (1 << s))
        small = (low - up_mask) * quantum
    top = f32_bits(max_value)
    if min_value != -max_value:  # the negative side saturates at another magnitude
        top = top - ((xi >> 31) & (top - f32_bits(-min_value)))
    r = torch.minimum(r, top + e_bits)
    mag = torch.where(below, small.view(torch.int32), r)
    if integer:  # two's complement has no -0
        sign = sign & -is_below(0, mag)
    return torch.maximum(mag | sign, nan_bits)


mx_fp32.cpu_split = (mx_scales, mx_elements)  # type: ignore[attr-defined]  # quantize._run: two kernels on a CPU
mx_elements.reads_bits = True  # type: ignore[attr-defined]  # quantize._run: give it x as int32 too, write int32


@functools.cache
def constant_block(kernel: Callable[..., Tensor], block: int) -> Callable[..., Tensor]:
    """``kernel(x, block, *args)`` with ``block`` fixed: compiled with dynamic shapes, a block size passed as an
    argument (or held in a closure) becomes a symbolic row length, which inductor does not vectorise (measured:
    8x slower on a CPU); ``quantize._run`` compiles these closures with automatic dynamic shapes instead, which
    keeps the block static."""

    def with_block(x: Tensor, *args: object) -> Tensor:
        return kernel(x, block, *args)

    if hasattr(kernel, "cpu_split"):  # the split kernels take the rows as they are: no block argument
        with_block.cpu_split = kernel.cpu_split  # type: ignore[attr-defined]
    with_block.static_ints = True  # type: ignore[attr-defined]  # quantize._run: compile with static ints
    with_block.rows = block  # type: ignore[attr-defined]  # quantize._run: pass x and out as rows of the block
    return with_block


def e4m3_scale(s: Tensor) -> Tensor:
    """s (float32, >= 0, <= 448) rounded to nearest even onto e4m3 (exact: a float8_e4m3fn cast, no overflow)."""
    return s.to(torch.float8_e4m3fn).to(torch.float32)


def nvfp4_encode_scale(x: Tensor) -> Tensor:
    """NVFP4's tensor scale: s_enc = min(448 * 6 / amax, FLT_MAX) in float32, amax over x's finite values (an
    all-zero tensor gives FLT_MAX, as 2688 / 0 = inf clamped): ``nvfp4_scale_of_amax``."""
    return nvfp4_scale_of_amax(finite_abs(x).amax())


def nvfp4_scale_of_amax(amax: Tensor) -> Tensor:
    """min(448 * 6 / amax, FLT_MAX) in float32 for a 0-d amax: a correctly rounded division of two tensors (a Python
    number divided by a tensor is a reciprocal times the number in torch, one rounding too many: 2688 / 40 would
    give 67.20000458 instead of 67.19999695)."""
    numerator = torch.tensor(NVFP4_TENSOR_NUMERATOR, dtype=torch.float32, device=amax.device)
    return torch.clamp(numerator / amax, max=FLT_MAX)


def round_few_binades(v: Tensor, man_bits: int, qmin: int, emax: int, rounding: int, hashes: Tensor | None) -> Tensor:
    """``round_element`` in float32 arithmetic alone, for finite |v| <= the element's max value (the caller clamps)
    on a grid of a few binades (one comparison per binade; e2m1: two): the quantum is 2**qmin below
    2**(qmin + man_bits + 1) (the subnormals and the first binade share it), 2**(k - man_bits) in the binade
    [2**k, 2**(k+1)). Nearest: (|v| + C) - C with C = quantum * 2**23 (the sum's ulp is the quantum: rounded to
    nearest even, exactly as ``round_element``'s ties to even); toward_zero and stochastic round w = |v| / quantum
    (exact) to an integer as ``round_element`` does (floor; floor(w) + [R < (w - floor(w)) * 2**31], the discarded
    bits compared with the same 31 random bits R, those of the hashes ``hashes`` of ``kernels.random_hash32``, by
    ``kernels.hash_below_mask``), times the quantum. Sign kept. The same bits as
    ``round_element`` without reading v's bits (a compiled CPU kernel bitcasts one element at a time, through
    memory)."""
    av = v.abs()
    binades = [(2.0**k, k - man_bits) for k in range(qmin + man_bits + 1, emax + 1)]
    if rounding == NEAREST:
        magic = torch.full_like(av, 2.0 ** (qmin + 23))
        for start, q in binades:
            magic = torch.where(av >= start, 2.0 ** (q + 23), magic)
        return ((av + magic) - magic).copysign(v)
    inverse = torch.full_like(av, 2.0**-qmin)
    quantum = torch.full_like(av, 2.0**qmin)
    for start, q in binades:
        upper = av >= start
        inverse = torch.where(upper, 2.0**-q, inverse)
        quantum = torch.where(upper, 2.0**q, quantum)
    w = av * inverse
    k_int = torch.floor(w)
    if rounding == STOCHASTIC:
        k_int = k_int - hash_below_mask(hashes, ((w - k_int) * 2.0**31).to(torch.int32)).to(torch.float32)
    return (k_int * quantum).copysign(v)


def nvfp4_block_scales(block_amax: Tensor, s_enc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(enc, d, s_dec) of NVFP4 blocks from their amax and the tensor's encode scale, each step in float32 rounded
    to nearest: s_dec = 1 / s_enc; d = e4m3(min((amax_b / 6) * s_enc, 448)); enc = min(1 / (d * s_dec), FLT_MAX)."""
    s_dec = 1.0 / s_enc
    d = e4m3_scale(torch.clamp((block_amax / 6.0) * s_enc, max=448.0))  # clamp: also FLT_MAX's and inf's
    enc = torch.clamp(1.0 / (d * s_dec), max=FLT_MAX)
    return enc, d, s_dec


def nvfp4_elements(
    blocks: Tensor, enc: Tensor, d: Tensor, s_dec: Tensor, rounding: int, key: Tensor | None
) -> Tensor:
    """NVFP4 elements of finite ``blocks`` (rows) from ``nvfp4_block_scales``: q = e2m1(clamp(x * enc, -6, 6))
    (``round_few_binades``), y = (q * d) * s_dec, each product rounded to nearest in float32."""
    hashes = random_hash32(blocks.shape, key, blocks.device) if rounding == STOCHASTIC else None
    q = round_few_binades(torch.clamp(blocks * enc, -6.0, 6.0), 1, -1, 2, rounding, hashes)
    return (q * d) * s_dec


def nvfp4_fp32(
    blocks: Tensor, block_amax: Tensor, s_enc: Tensor, rounding: int, key: Tensor | None
) -> Tensor:
    """NVFP4 on rows ``blocks`` given each row's block amax ``block_amax`` (NaN where the block holds NaN or inf)
    and the tensor's encode scale ``s_enc`` (``nvfp4_encode_scale``): ``nvfp4_block_scales``, then
    ``nvfp4_elements``; NaN rows where the block amax is NaN. In float32, each step rounded to nearest:

        s_dec = 1 / s_enc;  d = e4m3(min((amax_b / 6) * s_enc, 448));
        enc = min(1 / (d * s_dec), FLT_MAX);  q = e2m1(clamp(x * enc, -6, 6));  y = (q * d) * s_dec
    """
    y = nvfp4_elements(blocks, *nvfp4_block_scales(block_amax, s_enc), rounding, key)
    return torch.where(torch.isnan(block_amax), float("nan"), y)


def nvfp4_1x16_fp32(x: Tensor, rounding: int, key: Tensor | None) -> Tensor:
    """NVFP4 with 1x16 blocks of a tensor whose length is a multiple of 16 (rows of 16), in one graph."""
    blocks = x.view(-1, 16)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(torch.isfinite(amax), amax, float("nan"))
    return nvfp4_fp32(blocks, amax, nvfp4_encode_scale(x), rounding, key).view(x.shape)


def nvfp4_1x16_scales(blocks: Tensor, rounding: int, key: Tensor | None) -> tuple[Tensor, ...]:
    """The first of the two kernels of NVFP4 1x16 on a CPU (``nvfp4_elements`` is the second): per row of 16, the
    amax, and from them the tensor amax (so x is read once here) and ``nvfp4_block_scales``. First, ``exact``: a
    bool scalar, false where some block holds NaN or inf (its finite values still count towards the tensor amax,
    and the block becomes NaN: the caller then runs ``nvfp4_1x16_fp32``)."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    finite = amax < float("inf")
    s_enc = nvfp4_scale_of_amax(torch.where(finite, amax, 0.0).amax())
    return (finite.all(), *nvfp4_block_scales(amax, s_enc))


nvfp4_1x16_fp32.rows = 16  # type: ignore[attr-defined]  # quantize._run: pass x and out as rows of 16
nvfp4_1x16_fp32.cpu_split = (nvfp4_1x16_scales, nvfp4_elements)  # type: ignore[attr-defined]
