"""WRPN's k-bit uniform quantizer."""

import pytest
import torch

import lowprec as lp

pytestmark = pytest.mark.usefixtures("both_paths")


def test_two_bit_weights_are_ternary():
    x = torch.linspace(-3, 3, 1001)
    y = lp.quantize(x, "uniform<2>")
    assert set(y.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_four_bit_activations_are_fifteenths():
    x = torch.linspace(-1, 2, 3001)
    y = lp.quantize(x, "uniform<4,unsigned>")
    levels = torch.arange(16, dtype=torch.float32) / 15
    assert torch.equal(y.unique(), levels)


def test_signed_levels_and_ties():
    f = lp.parse_format("uniform<4>")
    assert f.levels == 7
    # 0.5/7 is a tie between 0 and 1/7 -> to even (0); 1.5/7 -> 2/7
    x = torch.tensor([0.5 / 7, 1.5 / 7, 5.0, -5.0])
    y = lp.quantize(x, f)
    assert y.tolist() == [0.0, pytest.approx(2 / 7), 1.0, -1.0]


def test_binary_is_sign():
    y = lp.quantize(torch.tensor([-0.3, 0.0, -0.0, 2.0, float("nan")]), "uniform<1>")
    assert y[:4].tolist() == [-1.0, 1.0, 1.0, 1.0] and torch.isnan(y[4])


def test_stochastic_uniform_is_unbiased():
    x = torch.full((200_000,), 0.3)
    y = lp.quantize(x, "uniform<2,unsigned>", "stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 3]))
    assert abs(y.mean().item() - 0.3) < 3e-3


def test_uniform_refuses_half_containers():
    with pytest.raises(ValueError, match="float32"):
        lp.quantize(torch.zeros(3, dtype=torch.float16), "uniform<4>")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compile", ["0", "1"])
def test_stochastic_uniform_of_tiny_negatives_rounds_to_zero(dtype, compile, monkeypatch):
    """-1e-9 * 7 lies 7e-9 of a step below 0: it rounds to 0 but with probability 7e-9. Its fraction above -1,
    1 - 7e-9, rounds to 1 in float32; the kernel once read that as probability 0 and gave -1/7 every time.
    Large tensors (the compiled kernels where torch.compile works) and small ones (eager) alike."""
    monkeypatch.setenv("LOWPREC_COMPILE", compile)
    for n in (64, 1 << 17):
        x = torch.full((n,), -1e-9, dtype=dtype)
        x[::2] = -1e-30
        q = lp.quantize(x, "uniform<4>", "stochastic", generator=torch.Generator().manual_seed(0))
        assert torch.equal(q, torch.zeros_like(x))
    y = torch.full((1 << 17,), -0.5 / 7, dtype=dtype)  # halfway: the mean stays unbiased
    q = lp.quantize(y, "uniform<4>", "stochastic", generator=torch.Generator().manual_seed(1))
    assert abs(q.double().mean().item() + 0.5 / 7) < 4 * (0.5 / 7) / (1 << 17) ** 0.5
