"""Converted models trained by the Trainer on 512 shipped MNIST images: every preset learns, the lazy update
matters for INT8, Courbariaux's range warm-up, bit-exact resume with layer exponents and stochastic rounding."""

import io
import math
import warnings

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.data import load_mnist
from lowprec.policy import Policy
from lowprec.train import SGD, Trainer
from lowprec.train.stored import load

PRESETS = ["fp32", "mixed-fp16", "mixed-bf16", "int8", "int8-lazy", "int16", "wrpn-4-4", "fixed-20",
           "dfx-10-12", "fp8-hybrid"]


@pytest.fixture(scope="module")
def mnist():
    x, y = load_mnist("train", limit=512)
    return x.flatten(1), y


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def batches(data, steps, size=64):
    x, y = data
    return [(x[i * size % 512:][:size], y[i * size % 512:][:size]) for i in range(steps)]


def loss_of(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def build(policy, *, lr=0.05, momentum=0.9, optimizer=torch.optim.SGD, seed=0, model_fn=mlp):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert's notes on fp32 accumulation and unconverted modules
        model = lp.nn.convert(model_fn(), policy)
    trainer = Trainer(model, optimizer(model.parameters(), lr=lr, momentum=momentum), policy)
    return model, trainer


def losses_while_training(model, trainer, data):
    losses = []
    for batch in data:
        loss = loss_of(model, batch)
        trainer.step(loss)
        losses.append(loss.item())
    return losses


# 7. every preset learns -----------------------------------------------------------------------------------------


def preset_policy(name):
    """The preset; dfx-10-12 with a short exponent interval so that a 40-step warm-up can move its exponents
    (the authors' interval is 100 batches over two warm-up epochs)."""
    policy = Policy.preset(name)
    return policy.with_roles(exponent_interval=2) if name == "dfx-10-12" else policy


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_learns_mnist(name, mnist):
    policy = preset_policy(name)
    model, trainer = build(policy)
    if policy.uses_dynamic_fixed_point and policy.exponent_rule == "overflow":
        trainer.warmup_exponents(batches(mnist, 40), loss_of)
    losses = losses_while_training(model, trainer, batches(mnist, 40))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_lazy_update_rescues_int8_when_updates_are_below_the_lsb(mnist):
    """lr 0.01, no momentum: lr*grad is far below half an INT8 weight quantum (2^-8 for |W| < 0.5), so plain
    INT8 storage freezes the weights while the INT16 accumulator lets them move as in fp32."""
    final = {}
    for name in ("int8", "int8-lazy", "fp32"):
        model, trainer = build(name, lr=0.01, momentum=0.0)
        losses = losses_while_training(model, trainer, batches(mnist, 80))
        final[name] = sum(losses[-8:]) / 8
    assert final["int8"] > final["int8-lazy"] + 0.1
    assert final["int8-lazy"] == pytest.approx(final["fp32"], abs=0.05)


def test_batch_norm_parameters_keep_an_fp32_master():
    def with_bn():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    model, trainer = build("int8-lazy", model_fn=with_bn)
    names = {name for name, role, _ in trainer.quantizers() if role == "master"}
    assert names == {"0.weight", "0.bias", "3.weight", "3.bias"}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        trainer.step(loss_of(model, (x, y)))
    bn_weight = model[1].weight.detach()
    assert not torch.equal(lp.quantize(bn_weight, "int8"), bn_weight)


def test_a_trainer_policy_unlike_the_converted_layers_warns():
    torch.manual_seed(0)
    model = lp.nn.convert(mlp(), "int8")
    with pytest.warns(UserWarning, match="layers 0, 2, 4 were converted under a policy"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "int8-lazy")


# Courbariaux's full-precision range warm-up --------------------------------------------------------------------


@pytest.mark.parametrize("use_trainer", [True, False], ids=["trainer", "function"])
def test_warmup_moves_exponents_and_restores_weights_and_optimizer(use_trainer, mnist):
    policy = Policy.preset("dfx-10-12").with_roles(exponent_interval=2, init_int_bits=5)  # the authors' start
    model, trainer = build(policy)
    trainer.step(loss_of(model, batches(mnist, 1)[0]))  # some optimizer state to restore
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [load(trainer.optimizer.state[p]["momentum_buffer"]).clone() for p in model.parameters()]
    if use_trainer:
        steps = trainer.warmup_exponents(batches(mnist, 20), loss_of, steps=12)
    else:
        steps = lp.train.warmup_exponents(model, trainer.optimizer, batches(mnist, 20), loss_of, 12)
    assert steps == 12
    for p, saved, buf in zip(model.parameters(), params, momentum):
        assert torch.equal(p, saved)
        assert torch.equal(load(trainer.optimizer.state[p]["momentum_buffer"]), buf)
    layer_bits = {(n, r): q.exponent.int_bits for n, r, q in lp.nn.quantizers(model) if q.exponent is not None}
    assert layer_bits[("0", "weight")] == 5 - 6  # |W| < 2^-1: down one per interval, 6 intervals
    assert layer_bits[("4", "output_grad")] < 0
    master_bits = {n: q.exponent.int_bits for n, r, q in trainer.quantizers() if r == "master"}
    assert master_bits["0.weight"] == (5 - 6 if use_trainer else 5)  # the trainer's own groups warm up too
    assert all(not q.observe_only for _, _, q in [*lp.nn.quantizers(model), *trainer.quantizers()])


def test_dfx_10_12_needs_a_warmup_or_a_data_driven_start(mnist):
    """With the authors' start (every exponent at 5 integer bits, the quantum of a 10-bit word is 1/16) every
    gradient rounds to 0 and nothing is learned without their warm-up; the preset's max-abs start learns."""
    model, trainer = build(Policy.preset("dfx-10-12").with_roles(init_int_bits=5))
    losses = losses_while_training(model, trainer, batches(mnist, 20))
    assert abs(sum(losses[-5:]) - sum(losses[:5])) / 5 < 0.05
    model, trainer = build("dfx-10-12")
    losses = losses_while_training(model, trainer, batches(mnist, 20))
    assert (sum(losses[:5]) - sum(losses[-5:])) / 5 > 0.2  # the mean loss drops (vs < 0.05 above)


# 8. bit-exact resume of converted models ------------------------------------------------------------------------

RESUME = {
    "int8-lazy": "int8-lazy",
    "dfx-10-12": Policy.preset("dfx-10-12").with_roles(exponent_interval=2),
    "stochastic": Policy.parse("params=fp16/stochastic,activations=fp16,grads=bf16/stochastic,"
                               "master=bf16/stochastic,optimizer_state=fp16/stochastic,loss_scale=dynamic"),
}


@pytest.mark.parametrize("policy", RESUME.values(), ids=RESUME.keys())
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, SGD], ids=["torch", "lowprec"])
def test_converted_model_resumes_bit_exactly(policy, optimizer, mnist):
    n, k, data = 12, 5, batches(mnist, 12, size=32)
    model, trainer = build(policy, optimizer=optimizer)
    for batch in data:
        trainer.step(loss_of(model, batch))
    expected = [p.detach().clone() for p in model.parameters()]
    expected_bits = [q.exponent.int_bits for _, _, q in lp.nn.quantizers(model) if q.exponent is not None]

    model, trainer = build(policy, optimizer=optimizer)
    for batch in data[:k]:
        trainer.step(loss_of(model, batch))
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    model, trainer = build(policy, optimizer=optimizer, seed=17)
    buffer.seek(0)
    trainer.load_state_dict(torch.load(buffer, weights_only=False))
    for batch in data[k:n]:
        trainer.step(loss_of(model, batch))
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p, e)
    assert [q.exponent.int_bits for _, _, q in lp.nn.quantizers(model) if q.exponent is not None] == expected_bits
