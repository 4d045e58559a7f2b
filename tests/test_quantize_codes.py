"""formats.quantize_codes and Quantizer.codes: the integer codes of a dynamic fixed point rounding, taken from
the rounding itself, are the codes of its result bit for bit (what the update state is packed from)."""

import pytest
import torch

import lowprec as lp
from lowprec.formats import FixedPoint, quantize, quantize_codes
from lowprec.formats.packing import marked_format
from lowprec.policy import Quantizer
from lowprec.policy.policy import Quant


def _tensor(scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(41, 7, generator=g) * scale
    x[0, 0], x[0, 1], x[0, 2] = 0.0, -0.0, -scale * 1e-6  # zeros and a value rounding to -0
    return x


@pytest.mark.parametrize("bits", [4, 8, 10, 16, 24])
@pytest.mark.parametrize("scale", [1.0, 3e4, 2.0**-60, 0.0])
def test_quantize_codes_are_the_codes_of_quantize_bit_for_bit(bits, scale):
    x = _tensor(scale)
    fmt = lp.formats.parse_format(f"dfx<{bits}>")
    y = quantize(x, fmt)
    got = quantize_codes(x, fmt)
    assert got is not None
    codes, frac = got
    assert marked_format(y) == FixedPoint(bits, frac)  # the grid quantize marks its result with
    assert codes.dtype == x.dtype and codes.shape == x.shape
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (bits - 1)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal((codes * 2.0**-frac).view(torch.int32), y.view(torch.int32))  # -0 included


def test_quantize_codes_declines_what_the_rounding_does_not_serve_and_touches_nothing():
    fmt = lp.formats.parse_format("dfx<8>")
    x = _tensor(1.0)
    nan = x.clone()
    nan[3, 3] = float("nan")
    inf = x.clone()
    inf[1, 1] = float("inf")
    before = torch.get_rng_state()
    assert quantize_codes(nan, fmt) is None
    assert quantize_codes(inf, fmt) is None
    assert quantize_codes(x.double(), fmt) is None  # float64: the kernels
    assert quantize_codes(x, fmt, "stochastic") is None
    assert quantize_codes(x, lp.formats.parse_format("fixed<8,4>")) is None
    assert quantize_codes(x[:0], fmt) is None
    tiny = x * 2.0**-110
    assert quantize_codes(tiny, fmt) is None and not isinstance(marked_format(quantize(tiny, fmt)), FixedPoint)
    assert torch.equal(torch.get_rng_state(), before)


def test_quantizer_codes_only_for_the_max_abs_rule_and_match_its_call():
    x = _tensor(0.3, seed=2)
    maxabs = Quantizer(Quant.parse("dfx<16>"), lp.Policy.parse("exponent_rule=maxabs"))
    codes, frac = maxabs.codes(x)
    assert torch.equal(codes * 2.0**-frac, maxabs(x))
    overflow = Quantizer(Quant.parse("dfx<16>"), lp.Policy.parse("exponent_rule=overflow"))
    assert overflow.codes(x) is None  # its exponent keeps statistics: call it
    assert Quantizer(Quant.parse("e4m3")).codes(x) is None
    assert Quantizer(None).codes(x) is None
    maxabs.observe_only = True
    assert maxabs.codes(x) is None
