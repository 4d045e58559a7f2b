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
