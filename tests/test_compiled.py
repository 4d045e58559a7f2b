"""The compiled kernels give the same bits as the eager ones (every format kind, every rounding)."""

import pytest
import torch

import lowprec as lp
from lowprec.formats import compile_enabled

FORMATS = ["fp16", "bf16", "e4m3", "e5m2", "float<e=3,m=4,subnormals=off>", "fixed<12,5>", "dfx<8>", "uniform<3>", "bfp<6,32>",
           "mxfp8_e4m3", "mxint8", "nvfp4", "scaled<e4m3>"]


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


@pytest.mark.skipif(not compile_enabled(), reason="needs torch.compile")
@pytest.mark.parametrize("recipe", ["mixed-fp16", "dfx-10-12"])
def test_torch_compile_of_a_converted_model_rounds_as_the_eager_model(recipe):
    """A user's torch.compile of a converted model runs (the roles' rounding, with its exponent state and its own
    compiled kernels, is opaque to the compiler: batch 64 makes tensors large enough for those kernels), its
    outputs still lie on the format's grid, and outputs and gradients match the eager model's up to the compiled
    convolutions' summation order (a few fp16 ulps)."""
    from lowprec.models import build_model

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = lp.convert(build_model("lenet"), recipe)
        run = torch.compile(model) if compiled else model
        out = run(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_e, grads_e), (out_c, grads_c) = results
    if recipe == "mixed-fp16":
        assert torch.equal(out_c, out_c.half().float())

    def near(a, b):
        return ((a - b).abs().max() <= 2.0**-8 * b.abs().max()).item()

    assert near(out_c, out_e) and all(near(a, b) for a, b in zip(grads_c, grads_e))
