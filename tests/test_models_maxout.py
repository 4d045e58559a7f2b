"""Courbariaux's maxout networks: initialisation, maxout, their dropout, conv shapes, and the max-norm
constraint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowprec.models import (
    MAX_COL_NORM,
    ConvMaxoutMNIST,
    MaskDropout,
    Maxout,
    MaxoutMLP,
    apply_max_norm,
)


def test_maxout_mlp_initialisation():
    model = MaxoutMLP()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1200), (240, 1200), (240, 10)]
    for layer, fan_in in zip(linears[:2], (784, 240)):
        bound = math.sqrt(6 / (fan_in + 240 * 5))
        w = layer.weight
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.99 * bound  # uniform over the whole range, not a narrower one
        assert abs(w.mean().item()) < 0.02 * bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
        assert not layer.bias.any()
    assert not linears[2].weight.any() and not linears[2].bias.any()  # softmax W = 0, b = 0


def test_conv_maxout_initialisation_and_shapes():
    model = ConvMaxoutMNIST()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(96, 1, 8, 8), (96, 48, 8, 8), (96, 48, 5, 5)]
    # U(+-sqrt(6 / (fan_in + fan_out))), fan_out = filters * kh * kw / pool area (the code's MNIST_model)
    for conv, fan_in, fan_out in zip(convs, (64, 48 * 64, 48 * 25), (48 * 64 / 16, 48 * 64 / 16, 24 * 25 / 4)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert bound * 0.95 < conv.weight.abs().max() <= bound
        assert not conv.bias.any()
    assert not model.classifier[-1].weight.any()
    # the code's output shapes: 48x10x10, 48x4x4, 24x3x3 (cuda-convnet pooling = ceil_mode)
    x = torch.randn(2, 1, 28, 28)
    shapes = []
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(48, 10, 10), (48, 4, 4), (24, 3, 3)]


def test_maxout_takes_the_max_of_consecutive_pieces():
    x = torch.tensor([[1.0, 5.0, -2.0, 0.0, 3.0, 3.5]])
    assert torch.equal(Maxout(3)(x), torch.tensor([[5.0, 3.5]]))
    assert torch.equal(Maxout(2)(x), torch.tensor([[5.0, 0.0, 3.5]]))
    conv_like = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).view(2, 4, 3, 3)
    assert torch.equal(Maxout(2)(conv_like), conv_like[:, 1::2])
    with pytest.raises(ValueError):
        Maxout(0)


def test_mask_dropout_is_unscaled_in_training_and_scaled_in_evaluation():
    drop = MaskDropout(keep=0.5, scale=0.5)
    x = torch.full((20_000,), 3.0)
    y = drop.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 3.0}  # masked, not divided by keep
    assert abs((y > 0).float().mean().item() - 0.5) < 0.02
    assert torch.equal(drop.eval()(x), x * 0.5)
    assert torch.equal(MaskDropout(keep=0.8, scale=1.0).eval()(x), x)  # input dropout: test scale 1.0
    with pytest.raises(ValueError):
        MaskDropout(keep=0.0, scale=1.0)


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1)


def test_apply_max_norm_bounds_rows_and_leaves_small_rows_alone():
    model = MaxoutMLP()
    with torch.no_grad():
        for layer in (model.net[2], model.net[5], model.net[8]):
            layer.weight.normal_(0.0, 0.15)  # about half the rows above 1.9365 for fan-in 240, most for 784
            layer.weight[0].zero_()
            layer.bias.fill_(5.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_max_norm(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, before[name])  # biases are not constrained
            continue
        old_norms = _row_norms(before[name])
        assert (old_norms > MAX_COL_NORM).any() and (old_norms <= MAX_COL_NORM).any(), name
        assert (_row_norms(p) <= MAX_COL_NORM + 1e-6).all()
        under = old_norms <= MAX_COL_NORM
        assert torch.equal(p[under], before[name][under])  # bit for bit
        over = ~under
        torch.testing.assert_close(_row_norms(p[over]), torch.full((int(over.sum()),), MAX_COL_NORM))
        # rescaled, not clipped: same direction
        torch.testing.assert_close(p[over] / _row_norms(p[over])[:, None],
                                   before[name][over] / old_norms[over][:, None])


def test_apply_max_norm_is_per_row_of_the_torch_weight():
    # pylearn2's W is (in, out) and max_col_norm bounds each column = the incoming weights of one output unit;
    # torch's weight is (out, in), so each row is bounded
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 10.0]]))
    apply_max_norm(layer, max_norm=1.0)
    torch.testing.assert_close(layer.weight, torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]]))


def test_apply_max_norm_conv_per_filter_and_first_layer_override():
    model = ConvMaxoutMNIST()
    with torch.no_grad():
        for conv in (model.features[1], model.features[5], model.features[9]):
            conv.weight.mul_(30.0)
    apply_max_norm(model)
    assert torch.allclose(_row_norms(model.features[1].weight), torch.tensor(0.9))  # conv 1: 0.9
    for conv in (model.features[5], model.features[9]):
        assert torch.allclose(_row_norms(conv.weight), torch.tensor(MAX_COL_NORM))
    # an explicit bound applies where the model has no override
    apply_max_norm(model, max_norm=0.5)
    assert torch.allclose(_row_norms(model.features[5].weight), torch.tensor(0.5))
    assert torch.allclose(_row_norms(model.features[1].weight), torch.tensor(0.9))


def test_apply_max_norm_skips_embeddings_and_recurrent_weights():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LSTM(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(10.0)
    apply_max_norm(model, max_norm=1.0)
    assert all((p == 10.0).all() for p in model.parameters())


def test_maxout_mlp_trains_after_the_zero_softmax_step():
    # W = 0 at the softmax: the first step reaches only the softmax layer, the second reaches everything
    torch.manual_seed(0)
    model = MaxoutMLP(in_features=20, units=8, pieces=3, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reached = {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
        if step == 0:
            assert reached == {"net.8.weight", "net.8.bias"}
        else:
            assert reached == {n for n, _ in model.named_parameters()}
        opt.step()
        apply_max_norm(model)
