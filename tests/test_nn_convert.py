"""lowprec.convert: the fp32 identity, copies vs in place, policies per module, warnings, the classifier rule."""

import warnings

import pytest
import torch
from test_nn_models import MODELS, lenet, mlp
from torch import nn

import lowprec as lp
from lowprec.formats import DynamicFixedPoint
from lowprec.policy import LAYER_ROLES, Policy


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_fp32_policy_is_bitwise_the_original(name):
    factory, shape = MODELS[name]
    model = factory().eval()
    converted = lp.convert(model, Policy.preset("fp32"))
    x = torch.randn(shape)
    torch.manual_seed(1)
    y0 = model(x)
    y0.square().sum().backward()
    y1 = converted(x)
    y1.square().sum().backward()
    assert torch.equal(y0, y1)
    g0, g1 = _grads(model), _grads(converted)
    assert g0.keys() == g1.keys()
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_convert_copies_and_leaves_the_original_alone():
    model = lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = lp.convert(model, "int8")
    assert [type(m) for m in model] == [type(m) for m in lenet()]
    assert isinstance(converted[0], lp.nn.QConv2d) and isinstance(converted[7], lp.nn.QLinear)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in converted.parameters()}
    converted(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_inplace_converts_the_model_itself_and_keeps_its_parameters():
    model = mlp()
    params = [id(p) for p in model.parameters()]
    assert lp.convert(model, "mixed-fp16", inplace=True) is model
    assert isinstance(model[0], lp.nn.QLinear) and isinstance(model[0], nn.Linear)
    assert [id(p) for p in model.parameters()] == params


def test_converted_layers_keep_names_shapes_and_load_the_original_state_dict():
    model = lenet()
    converted = lp.convert(lenet(), "dfx-10-12")
    shapes = {k: v.shape for k, v in model.named_parameters()}
    assert {k: v.shape for k, v in converted.named_parameters()} == shapes
    converted.load_state_dict(model.state_dict())  # strict: the missing quantizer state is allowed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), converted.parameters()))
    assert list(converted.state_dict()) == list(model.state_dict())  # quantizer state rides in the metadata


def test_policy_may_be_a_preset_name_or_a_policy_string():
    by_name = lp.convert(mlp(), "int8")
    by_spec = lp.convert(mlp(), "weight=int8, activation=fp16")
    assert by_name[0].quantizers["weight"].quant.format == DynamicFixedPoint(8)
    assert str(by_spec[3].quantizers["activation"].quant) == "fp16"
    assert not by_spec[3].quantizers["weight_grad"].enabled
    with pytest.raises(ValueError, match="unknown preset"):
        lp.convert(mlp(), "int7")


def test_each_layer_gets_its_resolved_policy_with_first_and_last():
    policy = Policy.parse("weight=int8; @first: weight=fp16; @last: weight=int16; 3: activation=bf16")
    q = lp.convert(mlp(), policy)
    assert str(q[0].policy.get("weight")) == "fp16"
    assert str(q[3].policy.get("weight")) == "dfx<8>" == str(q[3].quantizers["weight"].quant)
    assert str(q[3].quantizers["activation"].quant) == "bf16"
    assert str(q[5].policy.get("weight")) == "dfx<16>"
    assert set(q[0].quantizers) == set(LAYER_ROLES)


def test_batchnorm_is_not_a_first_or_last_layer():
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 4), nn.BatchNorm1d(4))
    q = lp.convert(model, Policy.parse("activation=fp16; @first: activation=none; @last: activation=none"))
    assert q[0].quantizers["activation"].enabled and q[3].quantizers["activation"].enabled
    assert not q[1].quantizers["activation"].enabled and not q[2].quantizers["activation"].enabled


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale


def test_unknown_parametrised_modules_are_named_in_one_warning_and_still_run():
    # LayerNorm is quantized by the op-level emulation; InstanceNorm (F.instance_norm) is not: convert names it.
    # The first forward names each parameter that reached no quantized op (InstanceNorm's); a user module's
    # parameter multiplied elementwise (Scaled) is quantized in the weight role.
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), Scaled(), nn.ReLU(), nn.Unflatten(1, (1, 8)),
                          nn.InstanceNorm1d(1, affine=True), nn.Flatten(), nn.Linear(8, 2))
    with pytest.warns(UserWarning) as record:
        q = lp.convert(model, "mixed-fp16")
    assert len(record) == 1
    message = str(record[0].message)
    assert "5 (InstanceNorm1d)" in message and "LayerNorm" not in message and "ReLU" not in message
    assert type(q[1]) is nn.LayerNorm
    with pytest.warns(UserWarning, match=r"reach no quantized op .*: 5\.bias, 5\.weight \(lp") as record:
        assert q(torch.randn(3, 4)).shape == (3, 2)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.randn(3, 4))  # named once


def test_parameter_free_modules_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.convert(lenet(), "mixed-fp16")


def test_classifier_rule_widens_the_last_layer_to_classifier_bits():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1000))
    q = lp.convert(model, "int8")
    assert lp.classifier_bits(1000) == 12
    last, first = q[2].quantizers, q[0].quantizers
    for role in ("weight", "output", "output_grad"):
        assert last[role].quant.format == DynamicFixedPoint(12), role
        assert first[role].quant.format == DynamicFixedPoint(8), role
    assert last["activation"].quant.format == DynamicFixedPoint(8)
    assert last["weight_grad"].quant.format == DynamicFixedPoint(8)
    y = q(torch.randn(2, 16))
    assert torch.equal(y, lp.quantize(y, "dfx<12>"))
    assert not torch.equal(y, lp.quantize(y, "dfx<8>"))


def test_narrow_classifier_warns_when_the_rule_is_off():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.warns(UserWarning, match=r"'2' scores 10 classes.*6 bits.*weight=dfx<4>"):
        lp.convert(model, "params=dfx<4>,activations=dfx<4>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = lp.convert(model, "params=dfx<4>,activations=dfx<4>,classifier_rule=on")
    assert q[2].quantizers["weight"].quant.format == DynamicFixedPoint(6)
    assert q[0].quantizers["weight"].quant.format == DynamicFixedPoint(4)


def test_unsupported_layers_raise_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(NotImplementedError, match="proj_size"):
        lp.convert(model, "mixed-fp16", inplace=True)
    assert type(model[0]) is nn.Linear
    lp.convert(model, "fp32")  # nothing quantized: torch's own layer runs
    with pytest.raises(NotImplementedError, match="proj_size"):
        lp.convert(nn.LSTM(3, 4, proj_size=2), "mixed-fp16")
    with pytest.raises(NotImplementedError, match="sparse=False"):
        lp.convert(nn.Embedding(10, 4, sparse=True), "mixed-fp16")


def test_quantized_layers_can_be_built_directly():
    layer = lp.nn.QLinear(4, 3, bias=False, policy="weight=fp16")
    assert layer.bias is None and str(layer.quantizers["weight"].quant) == "fp16"
    assert not layer.quantizers["bias"].enabled
    assert torch.equal(layer.weight.detach().half().float(), layer(torch.eye(4)).detach().t())
