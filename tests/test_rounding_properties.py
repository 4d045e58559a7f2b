"""Rounding properties (hypothesis) and differential checks against an fp64 reference for every grid format."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowprec as lp
from lowprec.formats import FixedPoint, FloatFormat
from reference import fixed_reference, float_reference, neighbours

pytestmark = pytest.mark.usefixtures("both_paths")

float_formats = st.builds(
    FloatFormat,
    exp_bits=st.integers(2, 8),
    man_bits=st.integers(0, 23),
    subnormals=st.booleans(),
    overflow=st.sampled_from(["inf", "saturate"]),
)
fixed_formats = st.builds(FixedPoint, word=st.integers(2, 24), frac=st.integers(-20, 40))
f32_values = st.floats(width=32, allow_nan=False, allow_infinity=False)
f32_arrays = st.lists(f32_values, min_size=1, max_size=64).map(lambda v: np.array(v, dtype=np.float32))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _random_f32(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return x


@given(fmt=float_formats, seed=st.integers(0, 2**16))
def test_float_nearest_and_toward_zero_match_fp64_reference(fmt, seed):
    x = _random_f32(4096, seed)
    for rounding in ("nearest", "toward_zero"):
        y = lp.quantize(torch.from_numpy(x), fmt, rounding).numpy()
        want = float_reference(x, fmt, rounding)
        ok = (y.view(np.uint32) == want.view(np.uint32)) | (np.isnan(y) & np.isnan(want))
        assert ok.all(), (fmt, rounding, x[~ok][:3], y[~ok][:3], want[~ok][:3])


@given(fmt=fixed_formats, seed=st.integers(0, 2**16))
def test_fixed_nearest_and_toward_zero_match_fp64_reference(fmt, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(4096) * 2.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    for rounding in ("nearest", "toward_zero"):
        y = lp.quantize(torch.from_numpy(x), fmt, rounding).numpy()
        want = fixed_reference(x, fmt, rounding)
        assert (y.view(np.uint32) == want.view(np.uint32)).all(), (fmt, rounding)


@given(fmt=float_formats, x=f32_arrays)
def test_idempotent_and_in_value_set(fmt, x):
    y = lp.quantize(torch.from_numpy(x), fmt)
    assert torch.equal(lp.quantize(y, fmt).view(torch.int32), y.view(torch.int32))
    finite = torch.isfinite(y)
    mant, exp = torch.frexp(y[finite].double())
    nonzero = mant != 0
    # at most man_bits+1 significant bits, exponent within [emin - m, emax]
    lowest = fmt.emin - fmt.man_bits  # exponent of the quantum at the bottom
    q = torch.clamp(exp[nonzero] - 1 - fmt.man_bits, min=lowest)
    assert torch.all(torch.remainder(y[finite][nonzero].double(), torch.ldexp(torch.ones_like(q, dtype=torch.float64), q)) == 0)
    assert torch.all(y[finite].abs() <= fmt.max_value)


@given(fmt=float_formats, x=f32_arrays)
def test_monotone(fmt, x):
    xs = np.sort(x)
    y = lp.quantize(torch.from_numpy(xs), fmt).double()
    assert torch.all(y[1:] >= y[:-1])


@given(fmt=float_formats, x=f32_arrays)
def test_nearest_error_at_most_half_ulp(fmt, x):
    y = lp.quantize(torch.from_numpy(x), fmt).double().numpy()
    xd = x.astype(np.float64)
    inrange = np.abs(xd) <= fmt.max_value
    _, e = np.frexp(np.abs(xd))
    ulp = np.ldexp(1.0, np.maximum(e - 1 - fmt.man_bits, fmt.emin - fmt.man_bits))
    if not fmt.subnormals:
        inrange &= np.abs(xd) >= fmt.min_normal
    ok = ~inrange | (np.abs(y - xd) <= ulp / 2)
    assert ok.all()


@given(fmt=float_formats, x=f32_arrays, seed=st.integers(0, 2**30))
def test_stochastic_lands_on_a_neighbour(fmt, x, seed):
    g = torch.Generator().manual_seed(seed)
    y = lp.quantize(torch.from_numpy(x), fmt, "stochastic", generator=g).double().numpy()
    down, up = neighbours(x, fmt)
    inrange = np.abs(up) <= fmt.max_value
    if not fmt.subnormals:
        inrange &= np.abs(down) >= fmt.min_normal
    assert np.all(((y == down) | (y == up))[inrange])


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3", "e5m2", "fixed<8,4>", "float<e=3,m=2>", "bfp<6,8>"])
def test_stochastic_is_unbiased(fmt):
    # values between two grid points (and in the subnormal range): the mean of many draws tends to x
    base = torch.tensor([1.0 + 2.0**-12, 0.3, -2.7, 1e-6, 3e-3, 7.3e-8], dtype=torch.float32)
    f = lp.parse_format(fmt)
    if hasattr(f, "max_value"):
        base = base[base.abs() < f.max_value]
    n = 200_000
    x = base.repeat(n).view(n, -1)
    y = lp.quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(3)).double()
    lo = lp.quantize(x[0], fmt, "toward_zero").double()
    spread = (y.max(0).values - y.min(0).values).clamp(min=1e-300)
    stderr = spread / 2 / math.sqrt(n)
    err = (y.mean(0) - base.double()).abs()
    moving = y.std(0) > 0
    assert torch.all(err[moving] < 5 * stderr[moving] + 1e-12)
    assert moving.any() and torch.all((y.min(0).values == lo) | (y.max(0).values == lo))


def test_same_generator_state_same_bits_and_fresh_state_differs():
    x = torch.randn(100_000)
    a = lp.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(5))
    b = lp.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(5))
    c = lp.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = lp.quantize(x, "e5m2", "stochastic")
    torch.manual_seed(9)
    assert torch.equal(d, lp.quantize(x, "e5m2", "stochastic"))


def test_sign_of_zero_is_kept():
    x = torch.tensor([-0.0, 0.0, -(2.0**-140), 2.0**-140])
    for fmt in ["fp16", "bf16", "e4m3", "e5m2", "fixed<8,2>", "float<e=5,m=10,subnormals=off>"]:
        y = lp.quantize(x, fmt)
        assert torch.equal(torch.signbit(y), torch.tensor([True, False, True, False])), fmt
        assert torch.all(y == 0)


def test_subnormals_off_flushes_after_rounding():
    f = lp.parse_format("float<e=5,m=10,subnormals=off>")
    x = torch.tensor([2.0**-14, 2.0**-14 * (1 - 2.0**-12), 2.0**-15, 2.0**-24])
    assert lp.quantize(x, f).tolist() == [2.0**-14, 2.0**-14, 0.0, 0.0]


def test_fp16_reference_facts():
    x = torch.tensor([65504.0, 65520.0, 2.0**-24, 2.0**-25, 1 + 2.0**-11, 1 + 2.0**-12, 1 + 2.0**-10])
    assert lp.quantize(x, "fp16").tolist() == [65504.0, float("inf"), 2.0**-24, 0.0, 1.0, 1.0, 1 + 2.0**-10]


def test_toward_zero_never_overflows_to_inf():
    x = torch.tensor([1e6, -1e6, float("inf")])
    assert lp.quantize(x, "fp16", "toward_zero").tolist() == [65504.0, -65504.0, float("inf")]


def test_saturating_float_clamps_inf():
    f = lp.parse_format("float<e=5,m=2,overflow=saturate>")
    x = torch.tensor([1e6, float("-inf"), float("nan")])
    y = lp.quantize(x, f, "stochastic")
    assert y[:2].tolist() == [57344.0, -57344.0] and torch.isnan(y[2])


@pytest.mark.parametrize("fmt", ["fp16", "e4m3", "fixed<12,6>", "uniform<3>"])
def test_float64_stochastic_lands_on_a_neighbour(fmt):
    x = torch.randn(10_000, dtype=torch.float64)
    y = lp.quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(0))
    lo = lp.quantize(x, fmt, "toward_zero")
    assert y.dtype == torch.float64
    assert torch.equal(lp.quantize(y, fmt), y)  # in the value set
    above = y != lo
    assert torch.all(y.abs()[above] > lo.abs()[above])  # away from zero, never below the truncation
    # and no further than the next value: truncating just below y gives back lo
    below_y = torch.nextafter(y, torch.zeros_like(y))
    assert torch.equal(lp.quantize(below_y, fmt, "toward_zero")[above], lo[above])
    assert 0.2 < above.double().mean() < 0.8


@given(fmt=float_formats, seed=st.integers(0, 2**16))
def test_fast_float32_path_equals_the_generic_core(fmt, seed):
    """quantize()'s float32 fast path and the generic integer core (used for float64) give the same bits."""
    from lowprec.formats import kernels

    x = torch.from_numpy(_random_f32(4096, seed))
    key = torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    max_value = torch.tensor(fmt.max_value, dtype=torch.float32)
    for rounding in ("nearest", "stochastic", "toward_zero"):
        mode = kernels.ROUNDINGS[rounding]
        generic = kernels.float_grid(x, fmt.man_bits, fmt.emin - fmt.man_bits, fmt.min_normal, not fmt.subnormals,
                                     max_value, fmt.overflow == "saturate", mode, key)
        fast = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(seed))  # draws that key
        same = (fast.view(torch.int32) == generic.view(torch.int32)) | (torch.isnan(fast) & torch.isnan(generic))
        assert same.all(), (fmt, rounding, x[~same][:3], fast[~same][:3], generic[~same][:3])



@given(fmt=fixed_formats, seed=st.integers(0, 2**16))
def test_fast_fixed_path_equals_the_generic_core(fmt, seed):
    from lowprec.formats import kernels

    rng = np.random.default_rng(seed)
    x = torch.from_numpy((rng.standard_normal(4096) * 2.0 ** rng.integers(-30, 30, 4096)).astype(np.float32))
    x[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    key = torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    step = torch.tensor(fmt.step, dtype=torch.float32)
    kmin, kmax = -(2 ** (fmt.word - 1)), 2 ** (fmt.word - 1) - 1
    for rounding in ("nearest", "stochastic", "toward_zero"):
        mode = kernels.ROUNDINGS[rounding]
        generic = kernels.fixed_grid(x, -fmt.frac, kmin * step, kmax * step, mode, key)
        fast = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(seed))
        same = (fast.view(torch.int32) == generic.view(torch.int32)) | (torch.isnan(fast) & torch.isnan(generic))
        assert same.all(), (fmt, rounding, x[~same][:3], fast[~same][:3], generic[~same][:3])


def test_is_below_is_the_comparison_on_31_bit_operands():
    """kernels.is_below (integer arithmetic standing in for R < f in the stochastic kernels) equals the comparison
    for every pair of operands in [0, 2**31), the extremes included, eager and compiled-shaped alike."""
    from lowprec.formats.kernels import is_below

    edges = torch.tensor([0, 1, 2, 2**30, 2**31 - 2, 2**31 - 1], dtype=torch.int32)
    rand = torch.randint(0, 2**31 - 1, (4000,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    values = torch.cat([edges, rand])
    r, f = values.repeat_interleave(len(values)), values.repeat(len(values))
    assert torch.equal(is_below(r, f), (r < f).to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_nan_and_finite_abs_match_torch(dtype):
    """kernels.is_nan and finite_abs (comparisons standing in for isnan / isfinite) on every class of value: NaNs of
    both signs and other payloads, +-inf, +-0, subnormals, the largest finite values."""
    from lowprec.formats.kernels import finite_abs, is_nan

    info = torch.finfo(dtype)
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, info.tiny / 4, -info.tiny / 8, info.max, -info.max, float("inf"),
                      -float("inf"), float("nan"), -float("nan")], dtype=dtype)
    if dtype == torch.float32:
        payloads = torch.tensor([0x7F800001, 0x7FC12345, -0x00000001], dtype=torch.int32).view(torch.float32)
        x = torch.cat([x, payloads])
    assert torch.equal(is_nan(x), torch.isnan(x))
    expected = torch.where(torch.isfinite(x), x.abs(), 0.0)
    assert torch.equal(finite_abs(x).view(torch.uint8), expected.view(torch.uint8))
