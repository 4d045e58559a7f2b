"""The scaled-format presets on a small conv + linear model: roles, block axes, a training step, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.formats import MXFormat
from lowprec.nn import quantizers, update_exponents
from test_scaled_formats import bits

SCALED = ["fp8-current", "fp8-delayed", "mxfp8", "mxfp6", "mxfp4", "nvfp4"]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 40), nn.ReLU(),
                         nn.Linear(40, 10))


@pytest.mark.parametrize("name", SCALED)
def test_preset_trains_a_step_and_round_trips(name):
    policy = lp.Policy.preset(name)
    assert lp.Policy.parse(policy.spec()) == policy
    model = lp.nn.convert(small_net(), name)
    x = torch.randn(8, 1, 8, 8)
    loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    update_exponents(model)


def test_blocks_run_along_the_reduction_dimension():
    """A convolution's quantizers block along channels (dim 1) for its 4-D tensors; a linear layer's along the
    input features (the last dim); the bias keeps the format's own axis."""
    model = lp.nn.convert(small_net(), "mxfp8")
    conv, fc = model[0], model[3]
    assert all(q.block_axis == 1 for q in conv.quantizers.values())
    assert all(q.block_axis is None for q in fc.quantizers.values())
    w = torch.randn(4, 40, 3, 3)
    q = conv.quantizers["weight"]
    assert bits(q(w)) == bits(lp.quantize(w, MXFormat("e4m3", scale_rule="rceil", axis=1)))
    assert bits(q(w[0, :, 0, :])) == bits(lp.quantize(w[0, :, 0, :], MXFormat("e4m3", scale_rule="rceil")))


def test_delayed_preset_moves_and_checkpoints_its_scales():
    model = lp.nn.convert(small_net(), "fp8-delayed")
    x = torch.randn(8, 1, 8, 8) * 30
    model(x).sum().backward()
    update_exponents(model)
    states = {(n, r): q.scale_state for n, r, q in quantizers(model) if q.scale_state is not None}
    # the GEMMs' operands only (weight, activation, output_grad) in each of the 3 layers; the rest in bf16
    assert set(states) == {(n, r) for n in ("0", "3", "5") for r in ("weight", "activation", "output_grad")}
    assert all(str(q.quant.format) == "bf16" for n, r, q in quantizers(model) if q.enabled and (n, r) not in states)
    assert float(states[("0", "activation")].scale) == float(torch.tensor(448.0) / x.abs().max())
    fresh = lp.nn.convert(small_net(), "fp8-delayed")
    fresh.load_state_dict(model.state_dict())
    assert all(bits(q.scale_state.scale) == bits(states[(n, r)].scale) for n, r, q in quantizers(fresh)
               if q.scale_state is not None)
    assert bits(fresh(x)) == bits(model(x))
