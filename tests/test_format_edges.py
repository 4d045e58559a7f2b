"""Edge cases of the formats, each against an independent integer-arithmetic reference written here: m = 0 float
ties, NaN sign and payload on every container, dynamic fixed point down to the smallest subnormal step, the
uniform quantizer's float64 levels. Every check runs on every container the format fits and through every path
quantize can take: the few-op host paths, the eager kernels and the compiled kernels."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import lowprec as lp
from lowprec.formats import FloatFormat, compile_enabled

quantize_module = importlib.import_module("lowprec.formats.quantize")

CONTAINERS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
PATHS = ["host", "kernels", "compiled"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """host: quantize as shipped (float32 nearest takes host.py); kernels: the eager kernels only; compiled: the
    torch.compile'd kernels for every size."""
    if request.param == "compiled" and not compile_enabled():
        pytest.skip("torch.compile unavailable here")
    monkeypatch.setattr(quantize_module, "FAST_PATHS", request.param == "host")
    monkeypatch.setenv("LOWPREC_COMPILE", "1" if request.param == "compiled" else "0")
    if request.param == "compiled":
        monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 1)
    return request.param


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def _exact(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The float64 ``values`` that ``dtype`` holds exactly, as a ``dtype`` tensor (others dropped)."""
    t = torch.from_numpy(values).to(dtype)
    return t[t.double().numpy() == values]


def _decompose(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive finite float64 a = sig * 2**exp exactly, sig an int64 with 53 bits."""
    mant, ex = np.frexp(a)
    return (mant * 2.0**53).astype(np.int64), ex.astype(np.int64) - 53


def _round_int(sig: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """round(sig / 2**shift) with ties to even, in integer arithmetic (shift >= 0; sig < 2**53)."""
    shift = np.minimum(shift, 60)  # beyond 2**60 every sig < 2**53 is below half a unit: 0 either way
    k = sig >> shift
    rem = sig - (k << shift)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 1 << 62)
    up = (rem > half) | ((rem == half) & (k % 2 == 1))
    return k + up


def float_ref(x: torch.Tensor, fmt: FloatFormat) -> np.ndarray:
    """Nearest-even rounding onto ``fmt`` in integer arithmetic: |x| = sig * 2**exp, the quantum 2**q with
    q = max(floor(log2|x|) - M, emin - M), k = round_half_even(|x| / 2**q); then flush, overflow, sign, NaN."""
    v = x.double().numpy()
    a = np.abs(v)
    out = np.zeros_like(a)
    pos = (a > 0) & np.isfinite(a)
    sig, ex = _decompose(a[pos])
    q = np.maximum(ex + 52 - fmt.man_bits, fmt.emin - fmt.man_bits)
    y = np.ldexp(_round_int(sig, q - ex).astype(np.float64), q)
    if not fmt.subnormals:
        y = np.where(y < fmt.min_normal, 0.0, y)
    big = fmt.max_value if fmt.overflow == "saturate" else np.inf
    out[pos] = np.where(y > fmt.max_value, big, y)
    out[np.isinf(a)] = big
    out = np.copysign(out, v)
    out[np.isnan(v)] = np.nan
    return out


def _assert_same(y: torch.Tensor, want: np.ndarray, x: torch.Tensor) -> None:
    got = y.double().numpy()
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), list(zip(x.double().numpy()[~same][:4], got[~same][:4], want[~same][:4]))


M0_FORMATS = [FloatFormat(e, 0, sub, over) for e in range(2, 9) for sub in (True, False) for over in ("inf", "saturate")]


def _tie_probes(fmt: FloatFormat) -> np.ndarray:
    """Around every binade of fmt (and past both ends): the powers of two, the exact ties 1.5 * 2**k between
    neighbours (the overflow tie max + half a step and the subnormal tie 2**(emin-1) among them) and values one
    float32/float64 ulp either side of each, with both signs."""
    ks = np.arange(fmt.emin - 3, fmt.emax + 3, dtype=np.float64)
    mids = []
    for ulp in (0.0, 2.0**-52, 2.0**-23, 2.0**-10, 2.0**-7):
        for m in (1.0, 1.5, 1.25, 1.75):
            mids += [m - ulp, m + ulp]
    v = np.unique(np.ldexp(np.array(mids)[:, None], ks[None, :].astype(np.int64)).ravel())
    return np.concatenate([v, -v, [0.0, np.inf, -np.inf]])


@pytest.mark.parametrize("fmt", M0_FORMATS, ids=str)
def test_float_m0_ties_round_up_to_the_next_power_of_two_and_overflow_tie_is_inf(fmt, path):
    """m = 0: every normal significand is the implicit 1 (odd), so a tie 1.5 * 2**k rounds up to 2**(k+1) and the
    overflow tie max + half a step is inf (max when saturating); the subnormal tie 2**(emin-1) goes to 0. The
    float32 kernels used to read the exponent's low bit as the odd bit (3.0 -> 2.0, 12.0 -> 8.0 in
    float<e=3,m=0>)."""
    for dtype in CONTAINERS:
        if not fmt.fits_in(dtype):
            continue
        x = _exact(_tie_probes(fmt), dtype)
        _assert_same(lp.quantize(x, fmt), float_ref(x, fmt), x)


def test_float_m0_issue_examples(path):
    for dtype in CONTAINERS:
        y = lp.quantize(torch.tensor([3.0, 12.0, -3.0, 11.5, 0.125], dtype=dtype), "float<e=3,m=0>")
        assert y.tolist() == [4.0, float("inf"), -4.0, 8.0, 0.0], dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_m0_every_half_bit_pattern(dtype, path):
    """All 2**16 fp16/bf16 bit patterns through every m = 0 format the container holds."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[~torch.isnan(x)]
    for fmt in M0_FORMATS:
        if fmt.fits_in(dtype):
            _assert_same(lp.quantize(x, fmt), float_ref(x, fmt), x)


HALF_FORMATS = ["float<e=3,m=2>", "float<e=4,m=0>", "e4m3", "e5m2", "fixed<8,3>", "dfx<8>", "bfp<6,4>"]
ROUNDINGS = ["nearest", "stochastic", "toward_zero"]


def _roundings(path: str) -> list[str]:
    """Every rounding, but only nearest through the compiled kernels (each rounding is a graph to compile)."""
    return ROUNDINGS if path != "compiled" else ["nearest"]


def _quantize(x: torch.Tensor, fmt: str, rounding: str, **kw) -> torch.Tensor:
    return lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(7), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_sign_and_payload_survive_every_half_container(dtype, path):
    """Every one of the 2**16 fp16/bf16 bit patterns: each NaN (quiet or signalling, either sign, any payload) is
    returned bit for bit, in float, fixed, dfx and bfp formats and every rounding (0x7C01, 0x7E00 and 0xFE00 used
    to become 0x7FFF); every other value equals the float32 container's result (+-inf, values of 2**15 and more
    and those within 2**10 of the smallest normal are zeroed first: there the container's own range clamps
    a dfx/bfp exponent, by design)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    a = x.abs()
    x = torch.where(torch.isinf(x) | (a >= 2**15) | (a < torch.finfo(dtype).tiny * 2**10), torch.zeros_like(x), x)
    nan = torch.isnan(x)
    for fmt in HALF_FORMATS:
        if not lp.parse_format(fmt).fits_in(dtype):
            continue
        for rounding in _roundings(path):
            for kw in ({}, {"int_bits": 2}) if fmt.startswith("dfx") else ({},):
                y = _quantize(x, fmt, rounding, **kw)
                assert torch.equal(_bits(y)[nan], _bits(x)[nan]), (fmt, rounding, kw)
                if path != "compiled":  # test_compiled checks compiled == eager on float32 (a graph per format)
                    want = _quantize(x.float(), fmt, rounding, **kw).to(dtype)
                    assert torch.equal(_bits(y)[~nan], _bits(want)[~nan]), (fmt, rounding, kw)


def _nan_patterns(dtype: torch.dtype, n: int = 4096) -> torch.Tensor:
    """NaNs of a float32/float64 tensor: random payloads of both signs, quiet and signalling, and the extremes."""
    width = torch.finfo(dtype).bits
    man = {torch.float32: 23, torch.float64: 52}[dtype]
    exp_all = ((1 << (width - 1 - man)) - 1) << man
    rng = np.random.default_rng(1)
    payload = rng.integers(1, 1 << man, size=n, dtype=np.int64).tolist() + [1, 1 << (man - 1), (1 << man) - 1]
    sign = 1 << (width - 1)
    pats = [exp_all | p for p in payload] + [sign | exp_all | p for p in payload]
    signed = [p - (1 << width) if p >= 1 << (width - 1) else p for p in pats]
    return torch.tensor(signed, dtype=INT_VIEW[dtype]).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_sign_and_payload_survive_float32_and_float64(dtype, path):
    """The same for the wide containers, with every format family (uniform and the torch casts included)."""
    x = torch.cat([_nan_patterns(dtype), torch.tensor([0.3, -2.0, 7.0], dtype=dtype)])
    nan = torch.isnan(x)
    for fmt in HALF_FORMATS + ["fp16", "bf16", "uniform<3>", "uniform<4,unsigned>", "uniform<1>", "bfp<6,5>"]:
        for rounding in _roundings(path):
            y = _quantize(x, fmt, rounding)
            assert torch.equal(_bits(y)[nan], _bits(x)[nan]), (fmt, rounding)


def _fixed_ref(values: list[float], frac: int, bits: int) -> list[float]:
    """round_half_even(x * 2**frac), clamped to the bits-wide word, times 2**-frac: exact rationals."""
    from fractions import Fraction

    kmax = 2 ** (bits - 1) - 1
    out = []
    for v in values:
        k = min(max(round(Fraction(v) * Fraction(2) ** frac), -kmax - 1), kmax)
        out.append(float(Fraction(k) * Fraction(2) ** -frac) if k else (-0.0 if v < 0 or str(v)[0] == "-" else 0.0))
    return out


SMALLEST = {torch.float64: -1074, torch.float32: -149, torch.float16: -24, torch.bfloat16: -133}


@pytest.mark.parametrize("dtype", CONTAINERS, ids=str)
def test_dfx_reaches_the_smallest_subnormal_step_of_each_container(dtype, path):
    """dfx<bits> with the max-abs rule (and with the same r given as int_bits, an int or a tensor) on tensors whose
    peak lies at every exponent from the container's smallest subnormal up past its smallest normal: the step
    is 2**(r - bits + 1), floored only at the dtype's smallest subnormal step (2**-149 in float32, 2**-1074 in
    float64, 2**-133 in bfloat16, 2**-24 in float16). float32 used to stop at 2**-126 and round an
    all-subnormal tensor to zeros."""
    import math

    rng = np.random.default_rng(3)
    tiny = SMALLEST[dtype]
    min_normal = math.frexp(torch.finfo(dtype).tiny)[1] - 1
    for bits in (2, 5, 8):
        if not lp.parse_format(f"dfx<{bits}>").fits_in(dtype):
            continue
        for r in range(tiny + 1, min_normal + bits + 3):
            peak = math.ldexp(1.0, r - 1) * 1.75
            v = np.concatenate([[peak, -peak / 3], rng.standard_normal(30) * peak / 4])
            x = torch.from_numpy(v).to(dtype)  # rounded into the container: its own values
            vals = x.double().tolist()
            got_r = math.frexp(max(abs(t) for t in vals))[1]
            want = _fixed_ref(vals, min(bits - 1 - got_r, -tiny), bits)
            for kw in ({}, {"int_bits": got_r}, {"int_bits": torch.tensor(got_r)}):
                y = lp.quantize(x, f"dfx<{bits}>", **kw)
                _assert_same(y, np.array(want), x)


def test_dfx_issue_examples_on_float32(path):
    x = torch.tensor([0x02081CEA, 0x012355E6], dtype=torch.int32).view(torch.float32)
    assert lp.quantize(x, "dfx<8>").view(torch.int32).tolist() == [0x02080000, 0x01200000]
    sub = torch.tensor([21, 714, -5]) * 2.0**-149  # all subnormal: r = -139, step 2**-146 = 8 * 2**-149
    assert lp.quantize(sub, "dfx<8>").tolist() == [24 * 2.0**-149, 712 * 2.0**-149, -8 * 2.0**-149]
    assert lp.quantize(sub, "bfp<8,3>").tolist() == lp.quantize(sub, "dfx<8>").tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", ["uniform<2>", "uniform<3>", "uniform<8>", "uniform<4,unsigned>", "uniform<16>"])
def test_uniform_levels_are_the_containers_own_rounding_of_i_over_n(fmt, dtype, path):
    """round(clip(x)·n)/n computed in the tensor's own dtype: i = round_half_even(fl(clip(x)·n)), the level
    fl(i/n), both IEEE operations of that dtype (float64 tensors get float64 levels, e.g. uniform<3> of 1/3 is
    0x3FD5555555555555; float32 ones fl32(i/n)). Reference: numpy scalars of the same dtype, exact ties
    (i + 1/2)/n included."""
    f = lp.parse_format(fmt)
    n, lo = f.levels, (-1.0 if f.signed else 0.0)
    npt = np.float64 if dtype == torch.float64 else np.float32
    rng = np.random.default_rng(5)
    v = np.concatenate([rng.uniform(-1.5, 1.5, 2000), (np.arange(-n, n) + 0.5) / n, [1 / 3, -0.0, 0.0, 2.0, -7.0]])
    x = torch.from_numpy(v.astype(npt))
    want = []
    for t in x.numpy():
        c = min(max(t, npt(lo)), npt(1.0))
        i = np.round(npt(c) * npt(n))  # numpy rounds halves to even
        want.append(t if t == 0 else npt(i) / npt(n))
    _assert_same(lp.quantize(x, fmt), np.array(want, dtype=np.float64), x)


def test_uniform_float64_issue_example(path):
    y = lp.quantize(torch.tensor([1 / 3], dtype=torch.float64), "uniform<3>")
    assert y.view(torch.int64).item() == 0x3FD5555555555555
    y32 = lp.quantize(torch.tensor([1 / 3]), "uniform<3>")
    assert y32.view(torch.int32).item() == 0x3EAAAAAB  # fl32(1/3)
