"""The precision plan (nn.resolve.Resolution): made once by convert, read by the layers, the op emulation, the
Trainer and inspect, so all of them agree on @first/@last, the classifier rule and the update roles."""

import warnings

import torch
from torch import nn

import lowprec as lp
from lowprec.formats import DynamicFixedPoint
from lowprec.nn import emulation_of
from lowprec.nn.resolve import Resolution, module_policy, recorded_resolution
from lowprec.policy import Policy


def _classifier(classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 16),
                         nn.ReLU(), nn.Linear(16, classes))


def _generator() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4 * 3 * 3), nn.Unflatten(1, (4, 3, 3)), nn.ConvTranspose2d(4, 2, 2))


def test_convert_records_the_weight_layers_once():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_classifier(), "int8-lazy")
    plan = recorded_resolution(model)
    assert plan.layers == ("0", "4", "6")  # batch-norm is no weight layer
    assert (plan.first, plan.last) == ("0", "6")
    assert recorded_resolution(_generator()) is None
    assert recorded_resolution(lp.unconvert(model)) is None


def test_the_classifier_rule_reaches_layers_trainer_and_inspect_alike():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_classifier(), "int8-lazy")  # classifier_rule on: 1000 classes need 12 bits
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    plan = recorded_resolution(model)
    widened = DynamicFixedPoint(12)
    update = plan.update_policies(model)
    assert set(update) == {"0", "4", "6"}
    for role in ("weight", "output", "output_grad", "master", "optimizer_state"):
        assert update["6"].get(role).format == widened
        assert model[6].policy.get(role).format == widened
    assert update["4"].get("master").format == DynamicFixedPoint(8)
    slots = {s.name: s for s in trainer.slots}
    assert slots["6.weight"].policy.get("master").format == widened
    assert slots["6.weight"].state_quant.format == widened and slots["4.weight"].state_quant.format.bits == 8
    assert slots["1.weight"].policy == Policy()  # batch-norm: fp32 master and state


def test_an_emulated_weight_layer_is_last_for_every_reader():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_generator(), "int8; @last: weight=none,master=none")
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        model(torch.randn(2, 8)).sum().backward()
    plan = recorded_resolution(model)
    assert plan.layers == ("0", "2") and plan.last == "2"
    quantizers = emulation_of(model).quantizer_sets[("2", "conv_transpose2d", 0, "")]
    assert not quantizers["weight"].enabled and quantizers["activation"].enabled
    slots = {s.name: s for s in trainer.slots}
    assert slots["2.weight"].master is None and slots["0.weight"].master is not None
    assert slots["2.weight"].policy.get("weight") is None and slots["0.weight"].policy.get("weight") is not None


def test_module_policy_is_the_function_with_first_and_last_from_the_plan():
    model = _classifier(10)
    policy = Policy.parse("int8; @first: weight=int16; @last: output=fp16; 4: weight=none; op:linear: bias=none")
    plan = Resolution(policy, ("0", "4", "6"))
    modules = dict(model.named_modules())
    for name in ("", "0", "1", "4", "6"):
        for op in (None, "linear", "conv2d"):
            want = module_policy(policy, name, modules[name], first=name == "0", last=name == "6", op=op, warn=False)
            assert plan.module_policy(name, modules[name], op=op, warn=False) == want


def test_a_wrapped_model_without_a_recorded_plan_falls_back_to_its_weight_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = lp.convert(_classifier(), "int8-lazy")
        wrapper = nn.Sequential(inner)
        trainer = lp.Trainer(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1), policy="int8-lazy")
    slots = {s.name: s for s in trainer.slots}
    assert slots["0.6.weight"].policy.get("master").format == DynamicFixedPoint(12)  # 0.6 is @last there too
    assert slots["0.1.weight"].policy == Policy()


def test_an_op_override_of_an_update_role_reaches_the_trainer_as_it_reaches_the_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "converted under a policy whose update roles differ" warning
        model = lp.convert(_generator(), "int8; op:conv_transpose2d: master=int16; op:linear: optimizer_state=none")
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert recorded_resolution(model).ops == ("linear", "conv_transpose2d")
    slots = {s.name: s for s in trainer.slots}
    assert slots["2.weight"].policy.get("master").format == DynamicFixedPoint(16)
    assert slots["0.weight"].policy.get("master").format == DynamicFixedPoint(8)
    assert slots["0.weight"].state_quant is None and slots["2.weight"].state_quant.format == DynamicFixedPoint(8)
    assert model[0].policy.get("optimizer_state") is None  # the swapped layer resolved it alike
