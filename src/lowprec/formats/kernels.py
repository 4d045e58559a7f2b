"""The rounding kernels: pure tensor code, run eagerly or fused by torch.compile (see ``quantize.py``).

One core serves every power-of-two grid format (floating point, fixed point, dynamic fixed point, block
floating point). A value x = sig * 2**(E - M) (sig the integer significand with its implicit bit, M the
container's fraction bits) is rounded to a multiple of the quantum 2**Q, Q = max(E - man_bits, qmin):
``man_bits`` bounds the relative precision (floats) and ``qmin`` the absolute one (the subnormal quantum of a
float, the step of a fixed-point word, a block's step). The rounding is integer arithmetic on the bits, so it
is exact: no double rounding, ties decided on the true value.

All kernels work on a float32 (int32 bits) or float64 (int64 bits) container; callers upcast half types.

Stochastic rounding draws its random bits from a counter-based hash of (key, element index): the key is
drawn once per call from a torch.Generator, so the same generator state gives the same bits, on any device
and whether or not the kernel is compiled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF

NEAREST, STOCHASTIC, TOWARD_ZERO = 0, 1, 2
#: The largest finite float32.
FLT_MAX = 3.4028234663852886e38
ROUNDINGS = {"nearest": NEAREST, "stochastic": STOCHASTIC, "toward_zero": TOWARD_ZERO}


def f32_bits(value: float) -> int:
    """The bits of a positive float32 normal ``value`` (the bits of +inf above FLT_MAX), in plain Python: no
    tensor made (costly per call, and a graph break where a compiled kernel computes its constants)."""
    if value > FLT_MAX:
        return 0x7F800000
    m, e = math.frexp(value)  # value = m * 2**e, m in [0.5, 1)
    return ((e + 126) << 23) | int((2 * m - 1) * 2**23)


class _Bits:
    """Bit layout of a float container."""

    def __init__(self, dtype: torch.dtype, itype: torch.dtype, man: int, bias: int, rand_bits: int):
        self.dtype, self.itype, self.man, self.bias, self.rand_bits = dtype, itype, man, bias, rand_bits
        width = torch.iinfo(itype).bits
        self.sign = -(2 ** (width - 1))
        self.abs = 2 ** (width - 1) - 1
        self.frac = 2**man - 1
        self.emin = 1 - bias
        self.inf = (2 * bias + 1) << man


_LAYOUT = {
    torch.float32: _Bits(torch.float32, torch.int32, 23, 127, 31),
    torch.float64: _Bits(torch.float64, torch.int64, 52, 1023, 62),
}


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, constants < 2**31 so int64 products never overflow)."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def random_bits(shape: torch.Size, key: Tensor, nbits: int, device: torch.device) -> Tensor:
    """Uniform random integers in [0, 2**nbits) (nbits <= 62), int64, one per element of ``shape``.

    ``key`` is an int64 scalar tensor. Element i gets hash(key, i): deterministic and order-free.
    """
    i = torch.arange(shape.numel(), device=device, dtype=torch.int64).view(shape)
    k0 = key & _M32
    k1 = (key >> 32) & _M32
    h = _mix32((i & _M32) ^ k0)
    h = _mix32(h ^ k1 ^ (i >> 32))
    if nbits <= 32:
        return h >> (32 - nbits)
    h2 = _mix32(h ^ 0x5BD1E995 ^ k0)
    return ((h << 30) | (h2 >> 2)) >> (62 - nbits)


def _mix32_int32(h: Tensor) -> Tensor:
    """``_mix32`` on int32 lanes holding the same 32 bits: products wrap modulo 2**32 (the low 32 bits of the int64
    product) and the right shifts are logical (an arithmetic shift, then the bits it copied from the sign cleared)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x21F0AAAD
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * 0x735A2D97
    return h ^ ((h >> 15) & 0x1FFFF)


def random_hash32(shape: torch.Size, key: Tensor, device: torch.device) -> Tensor:
    """The 32-bit hash of ``random_bits(shape, key, 32, device)`` in int32 lanes (its bits as int32, values >= 2**31
    negative): its top 31 bits (a logical right shift by one) are ``random_bits31``. Computed in int32 lanes where
    every index fits (fewer than 2**31 elements): half the vector width of the int64 hash (measured on a CPU: 1.3x
    faster)."""
    if shape.numel() > 2**31:
        return random_bits(shape, key, 32, device).to(torch.int32)  # the low 32 bits: the same bits
    i = torch.arange(shape.numel(), device=device, dtype=torch.int32).view(shape)
    k0 = (key & _M32).to(torch.int32)  # the same 32 bits (values >= 2**31 wrap to negative int32)
    k1 = ((key >> 32) & _M32).to(torch.int32)
    return _mix32_int32(_mix32_int32(i ^ k0) ^ k1)  # i >> 32 is 0


def random_bits31(shape: torch.Size, key: Tensor, device: torch.device) -> Tensor:
    """``random_bits(shape, key, 31, device)`` as int32, the same integers: the top 31 bits of ``random_hash32``."""
    return (random_hash32(shape, key, device) >> 1) & 0x7FFFFFFF


def hash_below_mask(h: Tensor, f: Tensor) -> Tensor:
    """-1 where R < f, else 0 (int32), for R the 31-bit random integer of the hash h (``random_hash32``: R = h >> 1,
    logical) and int32 f in [0, 2**31): the sign of ((h >> 1) - f) ^ h, with the arithmetic shift. Where h >= 0 the
    difference is R - f; where h < 0 the arithmetic shift gives R - 2**31, so the difference wraps to R - f + 2**31
    (mod 2**32), whose sign is the opposite of R - f's, and the xor with h's sign bit flips it back. Two integer
    operations fewer per element than ``is_below(random_bits31(...), f)`` (no mask after the shift, no negation)."""
    return (((h >> 1) - f) ^ h) >> 31


def is_nan(x: Tensor) -> Tensor:
    """``torch.isnan(x)`` as x != x (true exactly for NaN). Compiled for a CPU, isnan and isfinite are evaluated
    one element at a time through a buffer, a comparison in vector registers (measured: bfp<8,16> nearest 1.35x
    faster with this and ``finite_abs``)."""
    return x != x


def finite_abs(x: Tensor) -> Tensor:
    """|x| where x is finite, else 0 (NaN and +-inf give 0): ``torch.where(torch.isfinite(x), x.abs(), 0)`` as a
    comparison (see ``is_nan``)."""
    a = x.abs()
    return torch.where(a < float("inf"), a, 0.0)


#: The largest value below 2**31 in each dtype round_integer works in.
_BELOW_2_31 = {torch.float32: 2.0**31 - 2.0**7, torch.float64: 2.0**31 - 2.0**-22}


def is_below(r: Tensor, f: Tensor) -> Tensor:
    """1 where r < f, else 0 (int32), for int32 r and f in [0, 2**31): the sign of r - f (no overflow in that
    range), shifted down. Integer arithmetic instead of a comparison: compiled, a comparison's mask feeding the
    rounding was kept as a per-element boolean buffer, which made stochastic block rounding 4x slower."""
    return -((r - f) >> 31)


def round_integer(v: Tensor, rounding: int, hashes: Tensor | None) -> Tensor:
    """v rounded to an integer (as floats): nearest ties to even, toward_zero truncates, stochastic is
    floor(v) + [R < floor(frac(v) * 2**31)] with R the 31-bit integers of ``random_bits``, given as their 32-bit
    hashes ``hashes`` (``random_hash32``, compared by ``hash_below_mask``).

    frac(v) = v - floor(v) is exact for v >= 0 and for v <= -1/2; for a negative v closer to 0 it is 1 - |v|
    rounded in v's dtype (a probability off by less than one ulp of 1). Where that rounding gives 1 (a negative
    v within half an ulp of 1 below an integer: -1e-9), the probability is held at the largest value below 1
    (2**31 - 128 of 2**31 in float32): up, to the integer, almost always, as the exact frac asks, not never."""
    if rounding == NEAREST:
        return torch.round(v)
    if rounding == TOWARD_ZERO:
        return torch.trunc(v)
    low = torch.floor(v)
    frac = torch.clamp((v - low) * 2.0**31, max=_BELOW_2_31[v.dtype])  # hash_below_mask needs it in [0, 2**31)
    return low - hash_below_mask(hashes, frac.to(torch.int32)).to(v.dtype)


def round_to_grid(
    x: Tensor, man_bits: int, qmin: Tensor | int, rounding: int, key: Tensor | None
) -> Tensor:
    """Round |x| onto the grid 2**max(E - man_bits, qmin), keeping the sign; no range limits applied.

    ``x`` is float32 or float64. Finite inputs only give meaningful results (callers mask inf/NaN).
    nearest: ties to even. toward_zero: truncation. stochastic: up with probability (distance to the lower
    grid point) / quantum, exact while the discarded part has at most ``rand_bits`` (31 / 62) bits, otherwise
    the probability is truncated to that many bits (an error below 2**-31 of a quantum).
    """
    L = _LAYOUT[x.dtype]
    bits = x.view(L.itype)
    a = bits & L.abs
    ef = a >> L.man
    sig = (a & L.frac) | ((ef > 0).to(L.itype) << L.man)
    e = torch.clamp(ef, min=1) - L.bias
    q = torch.clamp(e - man_bits, min=qmin)
    true_shift = torch.clamp(q - e + L.man, min=0, max=2 * L.bias + L.man)
    shift = torch.clamp(true_shift, max=L.man + 2)
    lower = sig >> shift
    rem = sig - (lower << shift)
    if rounding == NEAREST:
        unit = torch.ones_like(shift) << shift
        up = (2 * rem > unit) | ((2 * rem == unit) & ((lower & 1) == 1))
    elif rounding == STOCHASTIC:
        r = random_bits(x.shape, key, L.rand_bits, x.device).to(L.itype)
        k1 = torch.clamp(L.rand_bits - true_shift, min=0)
        k2 = torch.clamp(true_shift - L.rand_bits, min=0, max=L.man + 2)
        up = (r >> k1) < (rem >> k2)
    else:
        up = torch.zeros_like(rem, dtype=torch.bool)
    up = up.to(L.itype)
    # shift <= M: clear the low bits and add one quantum at bit `shift` (a carry moves into the exponent).
    # shift > M: |x| < 2**Q, so the result is 0 or exactly 2**Q.
    pow2 = torch.where(
        q >= L.emin, (q + L.bias) << L.man, torch.ones_like(q) << torch.clamp(q - L.emin + L.man, min=0)
    )
    out = torch.where(shift <= L.man, ((a >> shift) << shift) + (up << shift), up * pow2)
    return (out | (bits & L.sign)).view(x.dtype)


def float_grid(
    x: Tensor,
    man_bits: int,
    qmin: int,
    min_normal: float,
    flush: bool,
    max_value: Tensor,
    saturate: bool,
    rounding: int,
    key: Tensor | None,
) -> Tensor:
    """Any rounding onto a floating-point format (``qmin`` = emin - man_bits, the subnormal quantum's exponent),
    with its overflow, flush (results below ``min_normal``) and NaN rules."""
    y = round_to_grid(x, man_bits, qmin, rounding, key)
    ay = y.abs()
    if flush:
        y = torch.where(ay < min_normal, torch.zeros_like(y).copysign(x), y)
    finite_over = ay > max_value
    if saturate:
        big = max_value
    elif rounding == TOWARD_ZERO:
        # IEEE: truncation never rounds a finite value up to inf; only inf stays inf.
        big = torch.where(torch.isinf(x), float("inf"), max_value)
    else:
        big = torch.full_like(y, float("inf"))
    y = torch.where(finite_over | torch.isinf(x), big.copysign(x), y)
    return torch.where(is_nan(x), x, y)


def float_fast_fp32(
    x: Tensor,
    rounding: int,
    key: Tensor | None,
    shift: int,
    rshift: int,
    round_add: int,
    odd_bit: int,
    keep_mask: int,
    discard_mask: int,
    min_normal_bits: int,
    max_bits: int,
    overflow_bits: int,
    inf_bits: int,
    sub_scale: float,
    sub_branch: bool,
    flush: bool,
) -> Tensor:
    """Fast path for float32 tensors onto a float format, any rounding; bit-identical to ``float_grid``.

    Normal range, on the bits with ``shift`` = 23 - man_bits (``keep_mask`` = -2**shift clears the discarded
    bits, ``discard_mask`` = 2**shift - 1 keeps only them): nearest adds ``round_add`` plus the lowest kept bit
    times ``odd_bit`` and masks, so a carry rounds up (into the exponent too): ties to even. For 0 < shift < 23
    the caller passes 2**(shift-1) - 1 and odd_bit 1; for shift = 0 nothing is discarded (0, 0); for shift = 23
    (man_bits = 0) the lowest kept significand bit is the implicit 1 of every normal, always odd, so the caller
    passes 2**22 and odd_bit 0 (a tie rounds up to the next power of two, the exponent's own bits play no part).
    toward_zero masks; stochastic adds one quantum when R >> ``rshift`` (R the 31 random bits of
    ``random_bits``, rshift = 31 - shift) is below the discarded bits, the same event as in ``round_to_grid``.
    The format's subnormal range (``sub_branch``: emin > -126, or man_bits = 0, whose rule above holds only for
    float32 normals) is rounded on v = |x| * 2**(man_bits - emin) (exact): round / trunc / floor(v) + [R <
    floor(frac(v) * 2**31)]. Results above ``max_bits`` become ``overflow_bits``; +-inf inputs ``inf_bits``;
    ``flush`` zeroes results below the smallest normal; NaN is returned as it is. All parameters are
    precomputed by the caller: no Python arithmetic here, so compiled graphs never break.
    """
    bits = x.view(torch.int32)
    a = bits & 0x7FFFFFFF
    if rounding == NEAREST:
        r = (a + round_add + ((a >> shift) & odd_bit)) & keep_mask
    elif rounding == TOWARD_ZERO:
        r = a & keep_mask
    else:
        hashes = random_hash32(x.shape, key, x.device)
        up_mask = hash_below_mask(hashes, (a & discard_mask) << rshift)  # R >> rshift < d exactly when R < d << rshift
        r = (a & keep_mask) + (up_mask & (1 << shift))
    if sub_branch:
        k = round_integer(x.abs() * sub_scale, rounding, hashes if rounding == STOCHASTIC else None)
        r = torch.where(a < min_normal_bits, (k / sub_scale).view(torch.int32), r)
    if flush:
        r = torch.where(r < min_normal_bits, 0, r)
    r = torch.where(r > max_bits, overflow_bits, r)
    r = torch.where(a == 0x7F800000, inf_bits, r)
    r = torch.where(a > 0x7F800000, a, r)
    return (r | (bits & -(2**31))).view(torch.float32)


def scaled_float_fp32(x: Tensor, s: Tensor, rounding: int, key: Tensor | None, *params: object) -> Tensor:
    """A per-tensor (or per-row) scaled float: fl(q / s) with q = ``float_fast_fp32(fl(x * s), rounding, key,
    *params)``, clamped to +-FLT_MAX (the dequantization saturates as the element does: a q / s beyond float32's
    range, reached by rounding up near 2**128, is never inf); a NaN input is returned as it is. One pass when
    compiled."""
    q = float_fast_fp32(x * s, rounding, key, *params)  # type: ignore[arg-type]
    return torch.where(is_nan(x), x, descale(q, s))


def descale(q: Tensor, s: Tensor) -> Tensor:
    """fl(q / s) clamped to +-FLT_MAX: a scaled float's dequantization, saturating as its element does."""
    return torch.clamp(q / s, -FLT_MAX, FLT_MAX)


def fixed_grid(
    x: Tensor, qmin: Tensor | int, lo: Tensor, hi: Tensor, rounding: int, key: Tensor | None
) -> Tensor:
    """Any rounding onto a saturating fixed-point grid of step 2**qmin; NaN propagates, +-inf saturate."""
    y = round_to_grid(x, 4096, qmin, rounding, key)
    y = torch.where(torch.isinf(x), x, y)
    return torch.where(is_nan(x), x, torch.clamp(y, lo, hi))


def _pow2(e: Tensor) -> Tensor:
    """2**e as float32 from an int32 exponent in [-126, 127] (built from the bits)."""
    return ((e + 127) << 23).view(torch.float32)


def times_pow2(x: Tensor, e: Tensor) -> Tensor:
    """x * 2**e for float32 x and int32 exponents e in [-149, 149], where 2**e itself need not be a normal
    float32 (or any float32): two power-of-two factors (``pow2_factors``), 2**clamp(e, -126, 126) first, then the
    rest (|rest| <= 23).

    Exact wherever fixed-point rounding needs it: scaling up (e >= 0) only overflows (to inf, which saturates);
    scaling an integer k (|k| <= 2**31) down to a representable k * 2**e passes through the normal k * 2**-126.
    """
    first, rest = pow2_factors(e)
    return x * first * rest


def fixed_fast(
    x: Tensor, frac: Tensor, kmin: int, kmax: int, rounding: int, key: Tensor | None
) -> Tensor:
    """Fast path onto a saturating fixed-point grid of step 2**-frac, any rounding; bit-identical to ``fixed_grid``.

    v = |x| * 2**frac (``times_pow2``: exact, also for steps down to float32's smallest subnormal 2**-149) is
    rounded to an integer k: nearest ``round`` (ties to even), toward_zero ``trunc``, stochastic
    floor(v) + [R < floor(frac(v) * 2**31)] with R the 31 random bits of ``random_bits`` (the same event as
    ``round_to_grid``); then sign(x)*k is clamped to [kmin, kmax] (which also saturates +-inf) and multiplied by
    2**-frac (exact). ``frac``: an int32 tensor broadcasting against x, in [-126, 149]. A NaN input is returned
    as it is. (``fixed_factors``: the same with the four power-of-two factors given.)
    """
    return fixed_factors(x, *pow2_factors(frac), *pow2_factors(-frac), kmin, kmax, rounding, key)


def pow2_factors(e: Tensor) -> tuple[Tensor, Tensor]:
    """The two float32 factors ``times_pow2`` multiplies by: 2**clamp(e, -126, 126), then 2**(e - that)."""
    first = torch.clamp(e, -126, 126)
    return _pow2(first), _pow2(e - first)


def fixed_factors(
    x: Tensor, up: Tensor, up2: Tensor, down: Tensor, down2: Tensor, kmin: int, kmax: int, rounding: int,
    key: Tensor | None,
) -> Tensor:
    """``fixed_fast`` with 2**frac given as ``pow2_factors(frac)`` = (up, up2) and 2**-frac as (down, down2): k =
    the rounding of (|x| * up) * up2 to an integer, y = (clamp(sign(x) * k, kmin, kmax) * down) * down2, x's NaN
    as it is. Float32 arithmetic only (no bits read: a compiled CPU kernel bitcasts one element at a time)."""
    hashes = random_hash32(x.shape, key, x.device) if rounding == STOCHASTIC else None
    k = round_integer(x.abs() * up * up2, rounding, hashes)
    return torch.where(is_nan(x), x, torch.clamp(k.copysign(x), kmin, kmax) * down * down2)


def _maxabs_frac(peak: Tensor, top: int, frac_lo: int, frac_hi: int) -> Tensor:
    """frac = clamp(top - r, frac_lo, frac_hi) with r the frexp exponent of ``peak`` >= 0 (the smallest r with
    peak < 2**r), read from the float32 bits; a subnormal peak is first scaled by 2**64 (exact) so that its
    exponent is read exactly too. A zero peak gives the finest step frac_hi."""
    sub = peak < 2.0**-126
    scaled = torch.where(sub, peak * 2.0**64, peak)
    r = (scaled.view(torch.int32) >> 23) - 126 - (sub.to(torch.int32) << 6)
    return torch.clamp(top - r, frac_lo, frac_hi)


def dfx_maxabs_fp32(
    x: Tensor, kmin: int, kmax: int, top: int, frac_lo: int, frac_hi: int, rounding: int, key: Tensor | None
) -> Tensor:
    """Dynamic fixed point with the max-abs exponent of x itself, in one graph (a reduction, then the rounding).

    r = the frexp exponent of max|x| over finite elements (smallest r with max|x| < 2**r; subnormal maxima
    included), frac = clamp(top - r, frac_lo, frac_hi) with top = bits - 1 (``_maxabs_frac``). Then fixed-point
    rounding onto [kmin, kmax] * 2**-frac, as ``fixed_fast``.
    """
    peak = finite_abs(x).amax()
    return fixed_fast(x, _maxabs_frac(peak, top, frac_lo, frac_hi), kmin, kmax, rounding, key)


def block_fp32(
    x: Tensor, block: int, kmin: int, kmax: int, top: int, frac_lo: int, frac_hi: int, rounding: int,
    key: Tensor | None,
) -> Tensor:
    """Block floating point of a flat float32 tensor whose length is a multiple of ``block``: each block gets the
    max-abs exponent of its finite elements (as ``dfx_maxabs_fp32``) and is rounded with ``fixed_fast``."""
    blocks = x.view(-1, block)
    params = (kmin, kmax, top, frac_lo, frac_hi, rounding, key)
    _, frac = block_scales(blocks, *params)
    return block_elements(blocks, frac, *params).view(x.shape)


def block_scales(
    blocks: Tensor, kmin: int, kmax: int, top: int, frac_lo: int, frac_hi: int, rounding: int, key: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The first of the two kernels of block floating point on a CPU (``block_elements`` is the second): per row of
    ``blocks``, frac = ``_maxabs_frac`` of the row's finite max-abs (int32, one column). First, ``exact``: a bool
    scalar, always true (the two kernels give ``block_fp32``'s bits for every input). Vectorised over rows, the
    frac arithmetic runs apart from the elements' rounding: fused, each row's reduction, frac and rounding form
    one dependent chain (measured on a CPU, blocks of 16: the two kernels 1.25x faster)."""
    peak = finite_abs(blocks).amax(dim=1, keepdim=True)
    return torch.ones((), dtype=torch.bool, device=blocks.device), _maxabs_frac(peak, top, frac_lo, frac_hi)


def block_elements(
    blocks: Tensor, frac: Tensor, kmin: int, kmax: int, top: int, frac_lo: int, frac_hi: int, rounding: int,
    key: Tensor | None,
) -> Tensor:
    """The elements of block floating point given each row's ``frac`` (``block_scales``; ``top``, ``frac_lo`` and
    ``frac_hi``: unused, the rows' frac is given): ``fixed_fast``."""
    return fixed_fast(blocks, frac, kmin, kmax, rounding, key)


block_fp32.cpu_split = (block_scales, block_elements)  # type: ignore[attr-defined]  # quantize._run: two kernels


def uniform_grid(
    x: Tensor, levels: int, signed: bool, binary: bool, rounding: int, key: Tensor | None
) -> Tensor:
    """WRPN k-bit uniform quantizer: round(clip(x) * n) / n on [-1, 1] (signed) or [0, 1] (unsigned); NaN and
    +-0 are returned as they are."""
    if binary:
        return torch.where(is_nan(x), x, torch.where(x < 0, -1.0, 1.0).to(x.dtype))
    hashes = random_hash32(x.shape, key, x.device) if rounding == STOCHASTIC else None
    k = round_integer(torch.clamp(x, -1.0 if signed else 0.0, 1.0) * levels, rounding, hashes)
    return torch.where(is_nan(x) | (x == 0), x, k / levels)  # NaN and -0 as they are (compiled max() drops -0)
