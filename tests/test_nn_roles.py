"""Every role of the quantized layers is really quantized, where the papers put it; STE; accumulation."""

import pytest
import torch
import torch.nn.functional as F
from test_nn_models import mlp
from torch import nn

import lowprec as lp
from lowprec.policy import LAYER_ROLES, Policy

FORMATS = {"fixed<6,3>": {}, "dfx<4>": {"exponent_rule": "maxabs"}}


def _in_format(t, fmt):
    """t is a value of fmt (for dfx: at some exponent; max-abs rounding can carry -2**r to the next r)."""
    if fmt.startswith("dfx"):
        return any(torch.equal(lp.quantize(t, fmt, int_bits=r), t) for r in range(-24, 24))
    return torch.equal(lp.quantize(t, fmt), t)


def _case(kind):
    """(layer, input, op(x, w, b), input_grad(g, w)) for a small Linear or Conv2d."""
    if kind == "linear":
        layer, x = nn.Linear(8, 5), torch.randn(6, 8)
        return layer, x, F.linear, lambda g, w: g @ w
    layer, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)
    return (layer, x, lambda x_, w, b: F.conv2d(x_, w, b, padding=1),
            lambda g, w: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1))


def _half(t):
    return t.half().float()


def _run(layer, x, g):
    """Forward, backward with upstream gradient g: the output and the three gradients."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad}


@pytest.mark.filterwarnings("ignore:lowprec.convert. the last layer")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("role", LAYER_ROLES)
def test_each_role_alone_is_quantized(role, kind, fmt):
    layer, x, op, input_grad = _case(kind)
    q = lp.convert(layer, Policy.of(**{role: fmt}, **FORMATS[fmt]))
    assert [r for r, quantizer in q.quantizers.items() if quantizer.enabled] == [role]
    g = torch.randn_like(layer(x))
    reference, result = _run(layer, x, g), _run(q, x, g)
    w, b = layer.weight.detach(), layer.bias.detach()

    def Q(t):
        return lp.quantize(t, fmt)

    # the tensor each role changes, and its exact value (None: it must lie in the format)
    expected = {
        "weight": ("y", op(x, Q(w), b)),
        "bias": ("y", op(x, w, Q(b))),
        "activation": ("y", op(Q(x), w, b)),
        "output": ("y", None),
        "output_grad": ("x_grad", input_grad(Q(g), w)),
        "activation_grad": ("x_grad", None),
        "weight_grad": ("weight_grad", None),
        "bias_grad": ("bias_grad", None),
    }
    key, value = expected[role]
    assert _in_format(result[key], fmt) if value is None else torch.equal(result[key], value)
    assert not torch.equal(result[key], reference[key])


def test_mixed_fp16_rounds_every_saved_activation_output_and_gradient():
    model = lp.convert(mlp(), "mixed-fp16").eval()
    seen = []
    for m in model:
        if isinstance(m, lp.nn.QLinear):
            m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].detach(), out.detach())))
    x = torch.randn(4, 784, requires_grad=True)
    model(x).square().sum().backward()
    assert len(seen) == 3
    for mod, inp, out in seen:
        assert torch.equal(out, _half(out))
        w, b = mod.weight.detach(), mod.bias.detach()
        assert torch.equal(out, _half(F.linear(_half(inp), _half(w), _half(b))))
        assert not torch.equal(out, F.linear(inp, w, b))
    for p in model.parameters():
        assert torch.equal(p.grad, _half(p.grad))
    assert torch.equal(x.grad, _half(x.grad))


def test_wrpn_ternary_weights_4bit_activations_and_clipped_ste():
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # about half the weights beyond the clip at 1
    with pytest.warns(UserWarning, match="4 classes"):  # a lone layer is also the last: the classifier rule
        q = lp.convert(layer, "weight=uniform<2>, activation=uniform<4,unsigned>")
    x = (torch.randn(5, 6) * 1.5).requires_grad_()
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.weight.detach()
    wq, xq = lp.quantize(w, "uniform<2>"), lp.quantize(x.detach(), "uniform<4,unsigned>")
    assert set(wq.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(xq, torch.round(xq * 15) / 15) and xq.min() >= 0 and xq.max() <= 1
    assert torch.equal(y, F.linear(xq, wq, layer.bias))
    inside_w, inside_x = w.abs() <= 1, (x >= 0) & (x <= 1)
    assert (~inside_w).any() and inside_w.any() and (~inside_x).any() and inside_x.any()
    assert torch.equal(q.weight.grad, torch.where(inside_w, g.t() @ xq, 0.0))
    assert torch.equal(x.grad, torch.where(inside_x, g @ wq, 0.0))
    assert (q.weight.grad[~inside_w] == 0).all() and (x.grad[~inside_x] == 0).all()


def test_saturating_fixed_point_passes_the_gradient_straight_through():
    layer = nn.Linear(4, 3)
    q = lp.convert(layer, "activation=fixed<4,2>")  # range [-2, 1.75]
    x = torch.tensor([[3.0, -5.0, 0.3, 1.0]], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(1, 3) @ layer.weight.detach())


def test_wrpn_presets_keep_first_and_last_layers_full_precision():
    q = lp.convert(mlp(), "wrpn-2-4")
    assert not any(qz.enabled for qz in q[0].quantizers.values())
    assert not any(qz.enabled for qz in q[5].quantizers.values())
    assert str(q[3].quantizers["weight"].quant) == "uniform<2>"
    assert str(q[3].quantizers["activation"].quant) == "uniform<4,unsigned>"


def test_accumulation_emulation_rounds_the_running_sum_after_each_chunk():
    layer = nn.Linear(64, 3)
    x = torch.randn(5, 64) * 4
    q = lp.convert(layer, "accumulation=fp16, accumulation_chunk=4")
    w, b = layer.weight.detach(), layer.bias.detach()
    acc = torch.zeros(5, 3)
    for k in range(0, 64, 4):
        acc = _half(acc + x[:, k:k + 4] @ w.t()[k:k + 4])
    y = q(x)
    assert torch.equal(y, acc + b)
    assert not torch.equal(y, layer(x))
    assert torch.equal(acc, _half(acc))


def test_batchnorm_quantizes_its_boundaries_not_its_statistics():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.3, 1.7, -0.9]))
    q = lp.convert(bn, "mixed-fp16")
    assert not q.quantizers["weight"].enabled and not q.quantizers["bias"].enabled
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = q(x)
    y.square().sum().backward()
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(bn.state_dict())
    assert torch.equal(y, _half(reference(_half(x.detach()))))
    assert torch.equal(q.running_var, reference.running_var)  # float32 statistics of the fp16 input
    assert not torch.equal(q.running_var, _half(q.running_var))
    assert torch.equal(x.grad, _half(x.grad))
    assert not torch.equal(q.weight.grad, _half(q.weight.grad))  # affine parameters stay float32
    assert not lp.convert(bn, "activation=uniform<4,unsigned>").quantizing  # WRPN's clip is for weight layers


def test_embedding_quantizes_its_table_and_output():
    emb = nn.Embedding(20, 6, padding_idx=0)
    q = lp.convert(emb, "weight=int8, output=fp16, weight_grad=fp16, exponent_rule=maxabs")
    idx = torch.tensor([[1, 0, 5], [7, 7, 19]])
    y = q(idx)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(y, lp.quantize(lp.quantize(emb.weight.detach(), "int8")[idx], "fp16"))
    reference = nn.Embedding(20, 6, padding_idx=0)
    reference.load_state_dict(emb.state_dict())
    reference(idx).backward(g)
    assert torch.equal(q.weight.grad, _half(reference.weight.grad))
    assert not torch.equal(q.weight.grad, reference.weight.grad)


IDENTITY_FORMATS = "params=fp32, activations=fp32, grads=fp32"  # quantizers on, every value unchanged


@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Linear(5, 3), (2, 4, 5)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (3, 4, 11)),
    (lambda: nn.Conv1d(4, 6, 3), (4, 9)),
    (lambda: nn.Conv2d(2, 4, (3, 2), padding="same", padding_mode="reflect"), (2, 2, 6, 5)),
    (lambda: nn.Conv2d(2, 4, 4, padding="same", bias=False), (2, 2, 7, 7)),
])
def test_explicit_backward_matches_torch_autograd(layer, shape):
    plain = layer()
    q = lp.convert(plain, IDENTITY_FORMATS)
    assert q.quantizing
    x0, x1 = torch.randn(shape, requires_grad=True), None
    x1 = x0.detach().clone().requires_grad_()
    y0, y1 = plain(x0), q(x1)
    g = torch.randn_like(y0)
    y0.backward(g)
    y1.backward(g)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(x1.grad, x0.grad)
    for p0, p1 in zip(plain.parameters(), q.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad)
