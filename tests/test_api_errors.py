"""Parsing, repr round trips, and clear errors on bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowprec as lp
from lowprec.formats import FORMS, BlockFloat, DynamicFixedPoint, FixedPoint, FloatFormat, Uniform

formats = st.one_of(
    st.builds(FloatFormat, st.integers(2, 8), st.integers(1, 23), st.booleans(), st.just("saturate"), st.booleans()),
    st.builds(FloatFormat, st.integers(2, 8), st.integers(0, 23), st.booleans(), st.just("inf")),
    st.builds(FixedPoint, st.integers(2, 53), st.integers(-100, 100)),
    st.builds(DynamicFixedPoint, st.integers(2, 32)),
    st.builds(Uniform, st.integers(1, 16), st.booleans()),
    st.builds(BlockFloat, st.integers(2, 24), st.integers(1, 65536)),
)


@given(formats)
def test_repr_parses_back(fmt):
    assert lp.parse_format(repr(fmt)) == fmt
    assert lp.parse_format(repr(fmt).upper().replace(",", " , ")) == fmt


@given(st.text(max_size=40))
def test_fuzzed_format_strings_raise_only_value_errors(text):
    try:
        lp.parse_format(text)
    except ValueError as err:
        assert str(err)
    # anything that parses is a real format: fine


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fp17", "accepted"),
        ("float<e=9,m=3>", "out of range"),
        ("float<e=5,m=24>", "out of range"),
        ("float<e=5>", "both e= and m="),
        ("float<e=4,m=3,finite>", "saturate"),
        ("float<e=4,m=3,colour=red>", "unknown float option"),
        ("fixed<1,0>", "word=1 is out of range"),
        ("fixed<8>", "cannot parse"),
        ("dfx<40>", "out of range"),
        ("uniform<0>", "out of range"),
        ("uniform<4,maybe>", "unsigned"),
        ("bfp<8,0>", "out of range"),
        ("fixed<a,b>", "integer"),
    ],
)
def test_bad_format_strings(spec, match):
    with pytest.raises(ValueError, match=match):
        lp.parse_format(spec)


def test_error_lists_accepted_forms():
    with pytest.raises(ValueError) as info:
        lp.parse_format("nonsense")
    assert FORMS in str(info.value)


def test_non_float_tensor():
    with pytest.raises(TypeError, match="floating-point tensors"):
        lp.quantize(torch.arange(4), "fp16")
    with pytest.raises(TypeError, match="torch.Tensor"):
        lp.quantize([1.0, 2.0], "fp16")


def test_unknown_rounding():
    with pytest.raises(ValueError, match="toward_zero"):
        lp.quantize(torch.ones(2), "fp16", rounding="up")


def test_format_not_fitting_the_container():
    with pytest.raises(ValueError, match="rounded twice"):
        lp.quantize(torch.ones(2, dtype=torch.float16), "bf16")
    with pytest.raises(ValueError, match="x.float"):
        lp.quantize(torch.ones(2, dtype=torch.bfloat16), "fixed<16,8>")
    with pytest.raises(ValueError):
        lp.quantize(torch.ones(2), "fixed<32,8>")  # 31 magnitude bits do not fit float32
    assert lp.quantize(torch.ones(2, dtype=torch.float64), "fixed<32,8>").dtype == torch.float64


def test_generator_device_and_type():
    with pytest.raises(TypeError, match="torch.Generator"):
        lp.quantize(torch.ones(2), "fp16", "stochastic", generator=0)
    on_meta = torch.ones(2, device="meta")  # any device other than the generator's
    with pytest.raises(ValueError, match="lives on cpu"):
        lp.quantize(on_meta, "fp16", "stochastic", generator=torch.Generator())


def test_int_bits_only_for_dfx_and_out_must_match():
    with pytest.raises(ValueError, match="int_bits"):
        lp.quantize(torch.ones(2), "fp16", int_bits=3)
    with pytest.raises(ValueError, match="out must match"):
        lp.quantize(torch.ones(2), "fp16", out=torch.empty(3))


def test_out_receives_the_result():
    x = torch.randn(1000)
    out = torch.empty_like(x)
    y = lp.quantize(x, "fp16", out=out)
    assert y is out and torch.equal(out, x.half().float())


def test_format_properties_table():
    fp16, e4m3, e5m2, bf16 = (lp.parse_format(n) for n in ("fp16", "e4m3", "e5m2", "bf16"))
    assert (fp16.max_value, fp16.min_normal, fp16.min_subnormal) == (65504.0, 2.0**-14, 2.0**-24)
    assert (e4m3.max_value, e4m3.min_normal, e4m3.min_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    assert (e5m2.max_value, e5m2.min_normal, e5m2.min_subnormal) == (57344.0, 2.0**-14, 2.0**-16)
    assert bf16.max_value == torch.finfo(torch.bfloat16).max
    assert lp.parse_format("float<e=5,m=10,subnormals=off>").min_subnormal == 2.0**-14


def test_classifier_bits():
    assert [lp.classifier_bits(c) for c in (2, 10, 44, 58, 1000)] == [3, 6, 8, 8, 12]
    assert lp.classifier_bits(1000, alpha=1 / 8) == 14  # the paper's own AlexNet figure
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            lp.classifier_bits(bad)
    with pytest.raises(ValueError, match="alpha"):
        lp.classifier_bits(10, alpha=1.0)


@given(classes=st.one_of(st.integers(2, 2**70), st.integers(1, 70).map(lambda k: 2**k + 1),
                         st.integers(1, 70).map(lambda k: 2**k)),
       alpha=st.one_of(st.sampled_from([0.5, 0.25, 1 / 8, 0.75, 0.1, 1 / 3]), st.floats(1e-6, 0.999999)))
def test_classifier_bits_is_exact_for_any_class_count(classes, alpha):
    """The smallest BW with 2**BW > (C - 1) * 2 / alpha, decided on exact rationals: no float log2 rounding at
    C - 1 just below a power of two (2**49 - 1 gave 52 instead of 51)."""
    from fractions import Fraction

    bound = Fraction(2 * (classes - 1)) / Fraction(alpha)
    bw = lp.classifier_bits(classes, alpha)
    assert 2**bw > bound >= 2 ** (bw - 1)


def test_classifier_bits_just_below_a_power_of_two():
    assert lp.classifier_bits(2**49) == 51  # log2(2**49 - 1) + 2 = 50.99999999999999...
    assert lp.classifier_bits(2**49 + 1) == 52  # log2(2**49) + 2 = 51 exactly: BW must exceed it
    assert lp.classifier_bits(2**60, alpha=0.25) == 63
