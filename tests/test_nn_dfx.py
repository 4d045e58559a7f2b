"""Dynamic fixed point in converted models: one exponent per role and layer, updates, state, calibration."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_nn_models import lenet

import lowprec as lp
from lowprec.policy import LAYER_ROLES, Policy

POLICY = Policy.preset("dfx-10-12").with_roles(exponent_interval=3, init_int_bits=5)  # the authors' start
X, LABELS = torch.rand(4, 1, 28, 28), torch.tensor([3, 1, 4, 1])


def _train(model, batches):
    for _ in range(batches):
        F.cross_entropy(model(X), LABELS).backward()
        lp.nn.update_exponents(model)


def _observed(model):
    """Batches each group has seen since its last update (dE/dx of the first layer: none, X needs no grad)."""
    return {(name, role): q.exponent.batches for name, role, q in lp.nn.quantizers(model)}


def _exponents(model):
    return {(name, role): q.exponent.int_bits for name, role, q in lp.nn.quantizers(model)}


def test_each_layer_has_eight_exponent_groups():
    q = lp.convert(lenet(), POLICY)
    groups = {}
    for name, role, quantizer in lp.nn.quantizers(q):
        assert quantizer.exponent is not None and quantizer.exponent.int_bits == POLICY.init_int_bits
        assert str(quantizer.quant) == "dfx<10>"
        groups.setdefault(name, []).append(role)
    assert groups == {name: list(LAYER_ROLES) for name in ("0", "3", "7", "9")}
    assert len({id(qz.exponent) for _, _, qz in lp.nn.quantizers(q)}) == 32


def test_exponents_move_by_at_most_one_per_interval():
    q = lp.convert(lenet(), POLICY)
    start = _exponents(q)
    _train(q, POLICY.exponent_interval - 1)
    assert _exponents(q) == start  # the interval is not complete yet
    _train(q, 1)
    moved = {k: v - start[k] for k, v in _exponents(q).items()}
    assert all(abs(d) <= 1 for d in moved.values())
    assert any(d != 0 for d in moved.values())
    assert set(_observed(q).values()) == {0}


def test_state_dict_round_trips_the_exponents():
    model = lenet()
    q = lp.convert(model, POLICY)
    _train(q, 2 * POLICY.exponent_interval + 1)
    fresh = lp.convert(model, POLICY)
    assert _exponents(fresh) != _exponents(q)
    fresh.load_state_dict(q.state_dict())
    assert _exponents(fresh) == _exponents(q)
    assert _observed(fresh) == _observed(q)
    assert _observed(q)[("3", "weight")] == 1 and _observed(q)[("0", "activation_grad")] == 0
    assert torch.equal(fresh(X), q(X))


def test_loading_quantizer_state_of_another_policy_fails():
    q = lp.convert(lenet(), POLICY)
    other = lp.convert(lenet(), "mixed-fp16")
    with pytest.raises(ValueError, match="dfx<10>"):
        other.load_state_dict(q.state_dict())


def test_calibrating_observes_in_full_precision_and_restores():
    model = lenet()
    q = lp.convert(model, POLICY)
    with lp.nn.calibrating(q):
        assert all(qz.observe_only for _, _, qz in lp.nn.quantizers(q))
        y = q(X)
        y.sum().backward()
        assert torch.equal(y, model(X))
    assert not any(qz.observe_only for _, _, qz in lp.nn.quantizers(q))
    observed = _observed(q)
    assert observed.pop(("0", "activation_grad")) == 0
    assert set(observed.values()) == {1}
    assert not torch.equal(q(X), model(X))


def test_calibrating_restores_flags_after_an_error():
    q = lp.convert(lenet(), POLICY)
    with pytest.raises(RuntimeError), lp.nn.calibrating(q):
        raise RuntimeError("boom")
    assert not any(qz.observe_only for _, _, qz in itertools.islice(lp.nn.quantizers(q), 8))
