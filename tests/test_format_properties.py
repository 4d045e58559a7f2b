"""What consumers read off a format (bits, grid kind, code/value/clip range, outside state, torch dtype, widened,
fixed_at), checked against quantize() itself, torch's casts and integer references."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowprec.formats import (TORCH_DTYPES, BlockFloat, DynamicFixedPoint, FixedPoint, FloatFormat, Format, MXFormat,
                             NVFP4, ScaledFloat, Uniform, parse_format, quantize)

fixed = st.builds(FixedPoint, st.integers(2, 24), st.integers(-20, 40))
uniform = st.builds(Uniform, st.integers(1, 16), st.booleans())
saturating = st.builds(FloatFormat, st.integers(2, 7), st.integers(1, 10), st.booleans(), st.just("saturate"),
                       st.booleans())

SPECS = ["fp32", "bf16", "fp16", "e4m3", "e5m2", "float<e=5,m=7>", "fixed<8,4>", "dfx<10>", "uniform<4>",
         "uniform<2,unsigned>", "bfp<8,16>", "mxfp8_e4m3", "mxint8", "nvfp4", "scaled<e4m3>", "scaled<e5m2,delayed>"]


def _concrete(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _concrete(sub)


def test_every_format_class_answers_every_property():
    classes = {type(parse_format(s)) for s in SPECS}
    assert classes == {c for c in _concrete(Format) if "__repr__" in vars(c)}  # the table covers every class
    for spec in SPECS:
        f = parse_format(spec)
        for name in ("bits", "fixed_step", "floating", "fixed_point", "signed", "code_range", "value_range",
                     "clip_range", "scale_free", "outside_state", "torch_dtype"):
            getattr(f, name)


def test_exact_values():
    table = {  # bits, fixed_step, floating, fixed_point, scale_free, outside_state
        "fp16": (16, False, True, False, False, None), "e4m3": (8, False, True, False, False, None),
        "float<e=5,m=7>": (13, False, True, False, False, None), "fixed<8,4>": (8, True, False, True, False, None),
        "dfx<10>": (10, True, False, True, True, "exponent"), "uniform<4>": (4, True, False, False, False, None),
        "bfp<8,16>": (8, True, False, False, True, None), "mxfp8_e4m3": (None, False, False, False, True, None),
        "nvfp4": (None, False, False, False, True, None), "scaled<e4m3>": (None, False, False, False, True, None),
        "scaled<e5m2,delayed>": (None, False, False, False, True, "amax_history"),
    }
    for spec, want in table.items():
        f = parse_format(spec)
        assert (f.bits, f.fixed_step, f.floating, f.fixed_point, f.scale_free, f.outside_state) == want, spec
    assert parse_format("fixed<8,4>").code_range == (-128, 127)
    assert parse_format("fixed<8,4>").value_range == (-8.0, 127 / 16)
    assert parse_format("dfx<10>").code_range == (-512, 511) and parse_format("dfx<10>").value_range is None
    assert parse_format("uniform<4>").code_range == (-7, 7) and parse_format("uniform<1>").code_range == (-1, 1)
    assert parse_format("uniform<2,unsigned>").code_range == (0, 3)
    assert parse_format("uniform<2,unsigned>").clip_range == (0.0, 1.0) and not parse_format("uniform<2,unsigned>").signed
    assert parse_format("uniform<4>").clip_range == (-1.0, 1.0)
    assert all(parse_format(s).clip_range is None for s in SPECS if not s.startswith("uniform"))
    assert parse_format("e4m3").value_range == (-448.0, 448.0)
    assert {s: parse_format(s).torch_dtype for s in ("fp32", "bf16", "fp16", "e4m3", "e5m2")} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2}
    assert all(parse_format(s).torch_dtype is None for s in SPECS[5:])


def test_widened_keeps_the_kind():
    assert parse_format("fixed<8,4>").widened(12) == DynamicFixedPoint(12)
    assert parse_format("dfx<8>").widened(12) == DynamicFixedPoint(12)
    assert parse_format("uniform<2,unsigned>").widened(6) == Uniform(6, False)
    assert parse_format("bfp<8,16>").widened(10) == BlockFloat(10, 16)
    for spec in ("fp16", "mxfp4", "scaled<e4m3>"):
        with pytest.raises(ValueError, match="no wider version"):
            parse_format(spec).widened(12)


def test_fixed_at():
    assert parse_format("dfx<8>").fixed_at(3) == FixedPoint(8, 4)
    assert parse_format("bfp<8,16>").fixed_at(3) is None
    assert isinstance(parse_format("nvfp4"), NVFP4) and parse_format("nvfp4").fixed_at(3) is None
    assert parse_format("fixed<8,4>").fixed_at(7) == FixedPoint(8, 4)
    assert parse_format("fp16").fixed_at(7) == parse_format("fp16")


@settings(max_examples=60, deadline=None)
@given(fixed, st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20))
def test_fixed_point_codes_lie_in_the_code_range(fmt, values):
    q = quantize(torch.tensor(values + [1e30, -1e30]), fmt).double()
    codes = q * 2.0**fmt.frac
    assert torch.equal(codes, codes.round())
    low, high = fmt.code_range
    assert int(codes.min()) == low and int(codes.max()) == high  # the two huge values saturate to the ends
    assert (float(q.min()), float(q.max())) == fmt.value_range


@settings(max_examples=40, deadline=None)
@given(uniform)
def test_uniform_ranges_are_what_quantize_clips_to(fmt):
    q = quantize(torch.tensor([-5.0, 5.0, -0.0, 0.0]), fmt)
    low, high = fmt.value_range
    assert (float(q[0]), float(q[1])) == (low, high) == fmt.clip_range
    assert fmt.code_range == (-fmt.levels if fmt.signed else 0, fmt.levels)


@settings(max_examples=40, deadline=None)
@given(saturating)
def test_saturating_float_range_is_what_quantize_saturates_to(fmt):
    q = quantize(torch.tensor([-3e38, 3e38]), fmt)
    assert (float(q[0]), float(q[1])) == fmt.value_range == (-fmt.max_value, fmt.max_value)
    assert fmt.bits == 1 + fmt.exp_bits + fmt.man_bits


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 32), st.integers(-30, 30), st.lists(st.floats(-1e9, 1e9, width=32), min_size=1, max_size=16))
def test_dfx_fixed_at_is_quantize_at_that_exponent(bits, r, values):
    fmt, x = DynamicFixedPoint(bits), torch.tensor(values, dtype=torch.float64)
    assert torch.equal(quantize(x, fmt.fixed_at(r)), quantize(x, fmt, int_bits=r))
    assert fmt.code_range == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_torch_dtype_is_torchs_cast():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 300
    for fmt, dtype in TORCH_DTYPES.items():
        assert fmt.torch_dtype is dtype
        assert torch.equal(quantize(x, fmt), x.to(dtype).float())


def test_scaled_formats_carry_no_single_width():
    for f in (MXFormat("e2m1"), NVFP4(), ScaledFloat(parse_format("e4m3"))):
        assert f.bits is None and f.code_range is None and f.value_range is None 


def test_split_top_drops_or_keeps_empty_parts():
    from lowprec.formats.parse import split_top
    from lowprec.policy.policy import split_top as policy_split

    assert policy_split is split_top  # one splitter, owned by the formats layer
    assert split_top("a, float<e=4,m=3> ,,b,") == ["a", "float<e=4,m=3>", "b"]
    assert split_top("e4m3,,32", keep_empty=True) == ["e4m3", "", "32"]
    assert split_top("e4m3,32,", keep_empty=True) == ["e4m3", "32", ""]
    assert split_top("", keep_empty=True) == [] and split_top("  ") == []
    assert split_top("x;y<a;b>;z", ";") == ["x", "y<a;b>", "z"]
    for bad, message in (("mx<e4m3,,32>", "block must be an integer"), ("mx<e4m3,32,>", "unknown option ''")):
        with pytest.raises(ValueError, match=message):
            parse_format(bad)
