"""Kernels of the scaled formats (MX, NVFP4, per-tensor scaled floats) on float32: pure tensor code, run eagerly
or fused by torch.compile (``quantize._run``), the same bits either way.

Every kernel receives its input as rows (``x.view(-1, block)``: one block per row) and returns the same shape.
Scales are powers of two built from their bits, or float32 values computed by the documented float32 operations;
elements are rounded by ``round_element``: exact integer-valued arithmetic on a power-of-two grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import NEAREST, STOCHASTIC, random_bits, round_integer

FLT_MAX = 3.4028234663852886e38
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
    clamped to [min_value, max_value] (saturation). v finite float32 with 2**qmin a normal float32.

    The quantum is read from v's exponent bits; |v| / quantum is exact (a power of two), rounded to an integer by
    ``kernels.round_integer`` (nearest even / truncation / stochastic with 31 random bits), times the quantum
    (exact). A carry into the next binade is exact too (the grid of the next binade contains 2**(E+1)).
    ``rand``: the 31-bit random integers to use (else drawn from ``key``)."""
    a = v.abs()
    ef = (a.view(torch.int32) >> 23).clamp(min=qmin + man_bits + 127)  # biased exponent, at least emin's
    q = ((ef - man_bits) << 23).view(torch.float32)
    inv_q = ((254 - ef + man_bits) << 23).view(torch.float32)
    if rounding == STOCHASTIC and rand is None:
        rand = random_bits(v.shape, key, 31, v.device).to(torch.int32)
    k = round_integer(a * inv_q, rounding, rand)
    return torch.clamp((k * q).copysign(v), min_value, max_value)


def shared_exponent(amax: Tensor, rule: str, emax: int, man_bits: int, max_value: float) -> Tensor:
    """The MX block exponent e (int32, clamped to [-127, 127]) of each block's amax (finite, >= 0) under ``rule``
    (``scaled.SCALE_RULES``); an all-zero block gives -127. Exact: frexp reads log2 from the bits, subnormals too
    (rceil's descale is the one float32 product its definition rounds)."""
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    floor = exp - 1  # floor(log2 amax)
    m2 = mant * 2.0  # amax / 2**floor, in [1, 2)
    if rule == "floor":
        e = floor - emax
    elif rule == "ceil":
        e = floor - emax + (m2 > 1.0).to(torch.int32)
    elif rule == "even":  # amax rounded to man_bits + 1 significant bits, ties away, moves up a binade
        e = floor - emax + (m2 >= 2.0 - 2.0 ** -(man_bits + 1)).to(torch.int32)
    else:  # rceil: descale = amax * (1 / max_value) in float32, rounded up to a power of two (cuBLAS)
        dmant, dexp = torch.frexp(amax * torch.tensor(1.0 / max_value, dtype=torch.float32))
        e = dexp - (dmant == 0.5).to(torch.int32)
    return torch.where(amax > 0, e, -127).clamp(-127, 127).to(torch.int32)


def mx_fp32(
    blocks: Tensor, rule: str, emax: int, man_bits: int, qmin: int, max_value: float, min_value: float,
    integer: bool, rounding: int, key: Tensor | None, block: int = 0,
) -> Tensor:
    """OCP MX on rows ``blocks`` (one block per row; with ``block``, on any tensor whose length is a multiple of
    it, cut into rows of ``block``): amax per row, e = ``shared_exponent``, elements
    ``round_element(x * 2**-e) * 2**e`` (both products exact where it matters: see docs/formats.md), NaN rows
    where amax is NaN or inf; ``integer`` (int8 elements) turns -0 into +0 (two's complement has no -0)."""
    shape = blocks.shape
    blocks = blocks.view(-1, block) if block else blocks
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    e = shared_exponent(torch.where(bad, 0.0, amax), rule, emax, man_bits, max_value)
    y = round_element(blocks * pow2(-e), man_bits, qmin, max_value, min_value, rounding, key) * pow2(e)
    if integer:
        y = y + 0.0
    return torch.where(bad, float("nan"), y).view(shape)


def e4m3_scale(s: Tensor) -> Tensor:
    """s (float32, >= 0, <= 448) rounded to nearest even onto e4m3 (exact: a float8_e4m3fn cast, no overflow)."""
    return s.to(torch.float8_e4m3fn).to(torch.float32)


def nvfp4_encode_scale(x: Tensor) -> Tensor:
    """NVFP4's tensor scale: s_enc = min(448 * 6 / amax, FLT_MAX) in float32, amax over x's finite values (an
    all-zero tensor gives FLT_MAX, as 2688 / 0 = inf clamped)."""
    amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax()
    return torch.clamp(NVFP4_TENSOR_NUMERATOR / amax, max=FLT_MAX)


def nvfp4_1x16_fp32(x: Tensor, rounding: int, key: Tensor | None) -> Tensor:
    """NVFP4 with 1x16 blocks of a tensor whose length is a multiple of 16 (rows of 16), in one graph."""
    blocks = x.view(-1, 16)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(torch.isfinite(amax), amax, float("nan"))
    return nvfp4_fp32(blocks, amax, nvfp4_encode_scale(x), rounding, key).view(x.shape)


def nvfp4_fp32(
    blocks: Tensor, block_amax: Tensor, s_enc: Tensor, rounding: int, key: Tensor | None
) -> Tensor:
    """NVFP4 on rows ``blocks`` given each row's block amax ``block_amax`` (NaN where the block holds NaN or inf)
    and the tensor's encode scale ``s_enc`` (``nvfp4_encode_scale``). In float32, each step rounded to nearest:

        s_dec = 1 / s_enc;  d = e4m3(min((amax_b / 6) * s_enc, 448));
        enc = min(1 / (d * s_dec), FLT_MAX);  q = e2m1(clamp(x * enc, -6, 6));  y = (q * d) * s_dec
    """
    s_dec = 1.0 / s_enc
    d = e4m3_scale(torch.clamp((block_amax / 6.0) * s_enc, max=448.0))  # clamp: also FLT_MAX's and inf's
    enc = torch.clamp(1.0 / (d * s_dec), max=FLT_MAX)
    v = torch.clamp(blocks * enc, -6.0, 6.0)
    y = (round_element(v, 1, -1, 6.0, -6.0, rounding, key) * d) * s_dec
    return torch.where(torch.isnan(block_amax), float("nan"), y)
