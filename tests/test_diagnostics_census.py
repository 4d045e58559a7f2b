"""The census counts what lowprec.quantize really does: exact equality with direct counts."""

import pytest
import torch

import lowprec as lp
from lowprec.diagnostics.census import LOG2_MIN, SCALE_EXPONENTS, census

GRID_FORMATS = ["fp16", "bf16", "e5m2", "fixed<8,4>", "uniform<4>", "uniform<4,unsigned>", "fp32",
                "float<e=5,m=10,subnormals=off>", "float<e=5,m=2,overflow=saturate>"]


def _awkward_tensor() -> torch.Tensor:
    """Magnitudes over 60 binades, zeros, inf/NaN, and the values on every fp16 boundary."""
    x = torch.randn(20000) * torch.exp2(torch.randint(-40, 20, (20000,)).float())
    x[::7] = 0
    x[5], x[6] = float("inf"), float("nan")
    edges = [2.0**-25, -(2.0**-25), 2.0**-24, 2.0**100, -3.0e38, 3 * 2.0**-26, 65504.0, 65520.0, -65520.0, 65519.0, 2.0**-14,
             2.0**-14 * (1 - 2.0**-11), 1.0, -1.0, 0.03125, -8.0, 7.9375, 2.0**-133, 2.0**-134]
    x[10 : 10 + len(edges)] = torch.tensor(edges)
    return x


def _direct(x: torch.Tensor, fmt: lp.Format, scale: float) -> tuple[int, int, int]:
    """lost, subnormal, overflow by quantizing x * scale (exact in float64, then float32) and comparing."""
    counted = torch.isfinite(x) & (x != 0)
    xs = x.double() * scale
    q = lp.quantize(xs.float(), fmt)
    lost = int(((q == 0) & counted).sum())
    sub = 0
    if isinstance(fmt, lp.FloatFormat) and fmt.subnormals:
        sub = int(((q != 0) & (q.abs() < fmt.min_normal) & counted).sum())
    if isinstance(fmt, lp.FloatFormat) and fmt.overflow == "inf":
        over = torch.isinf(q)
    elif isinstance(fmt, lp.FixedPoint):
        over = (xs > fmt.max_value) | (xs < fmt.min_value)
    elif isinstance(fmt, lp.Uniform):
        over = (xs > 1) | ((xs < -1) if fmt.signed else torch.zeros_like(counted))
    else:
        over = xs.abs() > fmt.max_value
    return lost, sub, int((over & counted).sum())


@pytest.mark.parametrize("name", GRID_FORMATS)
def test_counts_equal_direct_quantization_at_every_scale(name):
    x = _awkward_tensor()
    fmt = lp.parse_format(name)
    counts = census(x, [fmt]).counts(fmt)
    for k in (0, 3, 10, 17, 24, 33, SCALE_EXPONENTS.stop - 1):
        assert counts.at(2.0**k) == _direct(x, fmt, 2.0**k), (name, k)


@pytest.mark.parametrize("name", ["dfx<8>", "int8", "bfp<8,16>"])
def test_scale_invariant_formats_are_quantized_directly(name):
    x = _awkward_tensor()
    fmt = lp.parse_format(name)
    counted = torch.isfinite(x) & (x != 0)
    lost = int(((lp.quantize(x, fmt) == 0) & counted).sum())
    counts = census(x, [fmt]).counts(fmt)
    assert counts.at(1.0)[0] == counts.at(2.0**20)[0] == lost


def test_histogram_totals_and_merging():
    x = torch.tensor([1.0, 1.5, 2.0, 0.25, -3.0, 2.0**-149, 2.0**127 * 1.5, 0.0, float("nan")])
    c = census(x, ["fp16"])
    bins = {LOG2_MIN + i: n for i, n in enumerate(c.log2_counts) if n}
    assert bins == {-149: 1, -2: 1, 0: 2, 1: 2, 127: 1}
    assert (c.total, c.zeros, c.nonfinite, c.nonzero) == (9, 1, 1, 7)
    both = c + census(torch.tensor([2.0**-30]), ["fp16"])
    assert both.total == 10 and both.counts("fp16").at(1.0)[0] == c.counts("fp16").at(1.0)[0] + 1
    with pytest.raises(ValueError, match="loss scales 2\\*\\*k"):
        c.counts("fp16").at(3.0)
