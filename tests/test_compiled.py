"""The compiled kernels give the same bits as the eager ones (every format kind, every rounding)."""

import pytest
import torch

import lowprec as lp
from lowprec.formats import compile_enabled

FORMATS = ["fp16", "bf16", "e4m3", "e5m2", "float<e=3,m=4,subnormals=off>", "fixed<12,5>", "dfx<8>", "uniform<3>", "bfp<6,32>"]


@pytest.fixture
def eager(monkeypatch):
    def run(fn):
        monkeypatch.setenv("LOWPREC_COMPILE", "0")
        try:
            return fn()
        finally:
            monkeypatch.setenv("LOWPREC_COMPILE", "1")

    return run


@pytest.mark.skipif(not compile_enabled(), reason="torch.compile unavailable here")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "toward_zero"])
def test_compiled_equals_eager(fmt, rounding, eager):
    x = torch.randn(1 << 17) * torch.exp2(torch.randint(-20, 20, (1 << 17,)).float())
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    compiled = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1))
    plain = eager(lambda: lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(compiled.view(torch.int32), plain.view(torch.int32))
    out = torch.empty_like(x)
    lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1), out=out)
    assert torch.equal(out.view(torch.int32), plain.view(torch.int32))
