"""Small models shared by the lowprec.nn tests, and a smoke test of every preset on them."""

import warnings

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.policy.presets import PRESETS


def lenet() -> nn.Sequential:
    """LeNet-like: (conv-relu-pool) x 2, then 2 linear layers; input (N, 1, 28, 28)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def mlp() -> nn.Sequential:
    """784 -> 48 -> 24 -> 10 with ReLUs and dropout; input (N, 784)."""
    return nn.Sequential(
        nn.Linear(784, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10)
    )


MODELS = {"lenet": (lenet, (4, 1, 28, 28)), "mlp": (mlp, (4, 784))}


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("native")] + ["wrpn-4-4", "wrpn-2-4"])
def test_every_preset_converts_and_trains_lenet(preset):  # the native presets: tests/test_native.py
    model = lenet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = lp.convert(model, preset)
    x = torch.rand(4, 1, 28, 28)
    y = q(x)
    nn.functional.cross_entropy(y, torch.tensor([0, 1, 2, 3])).backward()
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in q.parameters())
    assert [type(m).__name__ for m in q if isinstance(m, lp.nn.QuantizedModule)] == [
        "QConv2d", "QConv2d", "QLinear", "QLinear"
    ]


def test_int8_stays_finite_with_zero_biases_and_a_zero_initial_state():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.bias)
    assert torch.isfinite(lp.convert(model, "int8")(torch.randn(2, 4))).all()
    out, _ = lp.convert(nn.LSTM(4, 3), "int8")(torch.randn(5, 2, 4))
    assert torch.isfinite(out).all()
