"""The Role enum: every role subset lowprec uses is a query on it, and a Role behaves as its plain name."""

import json

import pytest

import lowprec as lp
from lowprec.policy import LAYER_ROLES, ROLES, Role
from lowprec.policy.roles import ALIASES


def test_subsets_are_the_papers_role_lists():
    assert ROLES == ("weight", "bias", "activation", "output", "output_grad", "activation_grad", "weight_grad",
                     "bias_grad", "master", "optimizer_state", "accumulator", "accumulation")
    assert LAYER_ROLES == ROLES[:8]
    assert Role.select(gradient=True) == ("output_grad", "activation_grad", "weight_grad", "bias_grad")
    assert Role.select(update=True) == ("master", "optimizer_state", "accumulator")
    assert Role.select(classifier=True) == ("weight", "output", "output_grad")
    assert Role.select(layer=True, parameter=True) == ("weight", "bias", "weight_grad", "bias_grad")
    assert Role.select(bias=True) == ("bias", "bias_grad")
    assert {r: Role(r).grad for r in ROLES if Role(r).grad} == {"weight": "weight_grad", "bias": "bias_grad",
                                                    "activation": "activation_grad", "output": "output_grad"}
    assert ALIASES == {"grads": Role.select(gradient=True), "grad": Role.select(gradient=True),
                       "activations": ("activation", "output"), "params": ("weight", "bias")}


def test_every_role_is_exactly_one_of_layer_update_or_accumulation():
    for r in map(Role, ROLES):
        assert [r.layer, r.update, r is Role.ACCUMULATION].count(True) == 1
        assert not (r.gradient and not r.layer)


def test_a_role_is_its_plain_name():
    r = Role.OPTIMIZER_STATE
    assert r == "optimizer_state" and hash(r) == hash("optimizer_state")
    assert str(r) == f"{r}" == "optimizer_state" and f"{r:>16}" == f"{'optimizer_state':>16}"
    assert {"optimizer_state": 1}[r] == 1 and {r: 1}["optimizer_state"] == 1
    assert json.dumps({r: r}) == '{"optimizer_state": "optimizer_state"}'
    assert Role("weight") is Role.WEIGHT


def test_policies_keep_plain_role_names():
    p = lp.Policy.parse("grads=int16, params=int8; fc: activations=fp16")
    assert all(type(r) is str for r, _ in p.roles)
    assert all(type(r) is str for _, a in p.overrides for r, _ in a)
    assert p.spec() == "weight=dfx<8>,bias=dfx<8>,output_grad=dfx<16>,activation_grad=dfx<16>,weight_grad=dfx<16>," \
                       "bias_grad=dfx<16>; fc: activation=fp16,output=fp16"
    assert lp.Policy.parse(p.spec()) == p


def test_select_refuses_an_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'gradients'"):
        Role.select(gradients=True)


def test_queries_give_plain_names_that_load_weights_only(tmp_path):
    import torch

    assert tuple(Role) == ROLES and all(type(r) is str for r in ROLES + LAYER_ROLES)
    assert all(type(r) is str for v in ALIASES.values() for r in v)
    assert all(type(r) is str for r in Role.select(gradient=True) + Role.select(update=True))
    model = lp.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), "int8")
    torch.save(model.state_dict(), tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)  # only builtin types: no Role member leaked into the state
