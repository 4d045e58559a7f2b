"""The Trainer's step on plain models: equality with a plain PyTorch loop, loss-scaler skipping against an fp32
control, clipping on unscaled gradients, the torch.amp-like pieces, fp16 parameters, bit-exact resume."""

import io

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.policy import Policy
from lowprec.scaling import LossScaler
from lowprec.train import SGD, AdamW, Trainer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def build(policy="fp32", optimizer=torch.optim.SGD, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MLP()
    opt_kwargs = dict(lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer is not AdamW else dict(lr=1e-2)
    opt = optimizer(model.parameters(), **opt_kwargs)
    return model, opt, Trainer(model, opt, policy, **kwargs)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# 4. fp32 policy = plain PyTorch --------------------------------------------------------------------------------


def test_fp32_trainer_is_bitwise_a_plain_pytorch_loop():
    data = batches(20)
    model, _, trainer = build("fp32")
    for batch in data:
        result = trainer.step(loss_of(model, batch))
        assert not result.skipped and result.scale == 1.0
    torch.manual_seed(0)
    ref_model = MLP()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for batch in data:
        ref_opt.zero_grad()
        loss_of(ref_model, batch).backward()
        ref_opt.step()
    assert_bitwise_equal(params_of(model), params_of(ref_model))
    assert trainer.steps == 20


# 3. dynamic loss scaling in the step ----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, SGD], ids=["torch", "lowprec"])
def test_injected_inf_skips_the_step_and_matches_an_fp32_control(optimizer):
    data, bad_step = batches(12), 5
    model, _, trainer = build(
        Policy.of(loss_scale="dynamic"), optimizer, scaler=LossScaler.dynamic(init=2.0**10, growth_interval=4)
    )
    scales = []
    for i, batch in enumerate(data):
        trainer.backward(loss_of(model, batch))
        if i == bad_step:
            model.fc1.weight.grad[0, 0] = float("inf")
            before = params_of(model)
        result = trainer.apply_update()
        scales.append(result.scale)
        if i == bad_step:
            assert result.skipped and result.overflow_modules == ("fc1.weight",)
            assert result.next_scale == result.scale / 2
            assert_bitwise_equal(params_of(model), before)
            assert all(p.grad is None for p in model.parameters())
        else:
            assert not result.skipped and result.overflow_modules == ()
    assert scales == [1024, 1024, 1024, 1024, 2048, 2048, 1024, 1024, 1024, 1024, 2048, 2048]

    torch.manual_seed(0)
    control = MLP()
    control_opt = optimizer(control.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for i, batch in enumerate(data):
        control_opt.zero_grad()
        loss_of(control, batch).backward()
        if i != bad_step:
            control_opt.step()
    assert_bitwise_equal(params_of(model), params_of(control))  # power-of-two scales are exact


def test_nan_loss_is_skipped_even_without_loss_scaling():
    model, _, trainer = build("fp32")
    before = params_of(model)
    result = trainer.step(loss_of(model, batches(1)[0]) * float("nan"))
    assert result.skipped and set(result.overflow_modules) == {n for n, _ in model.named_parameters()}
    assert_bitwise_equal(params_of(model), before)


def test_clipping_sees_unscaled_gradients():
    data = batches(3)
    norms = {}
    for label, scaler in {"unscaled": LossScaler.none(), "scaled": LossScaler.static(2.0**12)}.items():
        model, _, trainer = build("fp32", scaler=scaler, clip_grad_norm=0.1)
        norms[label] = [trainer.step(loss_of(model, b)).grad_norm for b in data]
        norms[label + " params"] = params_of(model)
    assert torch.equal(torch.stack(norms["scaled"]), torch.stack(norms["unscaled"]))
    assert all(n > 0.1 for n in norms["scaled"])  # clipping was active
    assert_bitwise_equal(norms["scaled params"], norms["unscaled params"])


def test_lower_level_pieces_allow_gradient_accumulation_and_own_clipping():
    data = batches(4)
    model, _, trainer = build("fp32", scaler=LossScaler.static(256.0))
    for a, b in zip(data[::2], data[1::2]):
        trainer.backward(loss_of(model, a) / 2)
        trainer.backward(loss_of(model, b) / 2)
        found_inf, bad = trainer.unscale_()
        assert not found_inf and bad == []
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        trainer.apply_update()
    trainer.backward(loss_of(model, data[0]))
    trainer.unscale_()
    with pytest.raises(RuntimeError, match="apply_update"):
        trainer.backward(loss_of(model, data[0]))


def test_pure_fp16_parameters_train_with_dynamic_loss_scaling():
    """torch.amp's GradScaler refuses fp16 gradients; the Trainer unscales them in fp32 and skips overflows."""
    model, _, trainer = build(Policy.of(loss_scale="dynamic"), scaler=LossScaler.dynamic(init=2.0**20))
    model.half()
    results = [trainer.step(loss_of(model, (x.half(), y))) for x, y in batches(30)]
    assert results[0].skipped and results[0].scale == 2.0**20  # 2^20 * grad overflows fp16
    assert results[-1].scale < 2.0**20 and not results[-1].skipped
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())


# 8. bit-exact resume --------------------------------------------------------------------------------------------

RESUME_POLICIES = {
    "fp32": "fp32",
    "int8-lazy": Policy.of(master="int8", accumulator="int16", optimizer_state="int8", exponent_rule="maxabs"),
    "dfx-overflow": Policy.of(master="dfx<12>", optimizer_state="dfx<10>", exponent_interval=2),
    "stochastic": Policy.of(master="bf16/stochastic", optimizer_state="fp16/stochastic", loss_scale="dynamic"),
}


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, AdamW], ids=["torch-SGD", "lowprec-AdamW"])
@pytest.mark.parametrize("policy", RESUME_POLICIES.values(), ids=RESUME_POLICIES.keys())
def test_resume_continues_bit_exactly(policy, optimizer):
    n, k, data = 10, 4, batches(10)
    model, _, trainer = build(policy, optimizer)
    for batch in data:
        trainer.step(loss_of(model, batch))
    expected = params_of(model)

    model, _, trainer = build(policy, optimizer)
    for batch in data[:k]:
        trainer.step(loss_of(model, batch))
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    torch.manual_seed(1234)  # a fresh process: other RNG state, other initial weights
    model, _, trainer = build(policy, optimizer, seed=99)
    buffer.seek(0)
    trainer.load_state_dict(torch.load(buffer, weights_only=False))
    assert trainer.steps == k
    for batch in data[k:n]:
        trainer.step(loss_of(model, batch))
    assert_bitwise_equal(params_of(model), expected)


def test_resume_without_the_rng_state_would_differ():
    """The stochastic-rounding case above can fail: skipping the RNG restore changes the result."""
    policy, data = RESUME_POLICIES["stochastic"], batches(6)
    runs = []
    for restore_rng in (True, False):
        model, _, trainer = build(policy)
        for batch in data[:3]:
            trainer.step(loss_of(model, batch))
        state = trainer.state_dict()
        if not restore_rng:
            state = {**state, "rng": {"cpu": torch.manual_seed(5).get_state(), "cuda": None}}
        model, _, trainer = build(policy, seed=99)
        trainer.load_state_dict(state)
        for batch in data[3:]:
            trainer.step(loss_of(model, batch))
        runs.append(params_of(model))
    assert not all(torch.equal(a, b) for a, b in zip(*runs))


def test_load_rejects_a_checkpoint_of_another_policy():
    _, _, trainer = build("fp32")
    _, _, other = build(RESUME_POLICIES["int8-lazy"])
    with pytest.raises(ValueError, match="policy"):
        other.load_state_dict(trainer.state_dict())


def test_adam_with_int8_state_warns():
    import warnings as w

    def trainer(policy, optimizer, **kw):
        with w.catch_warnings():
            w.simplefilter("ignore")
            model = lp.convert(torch.nn.Linear(4, 2), policy)
        return Trainer(model, optimizer(model.parameters(), **kw))

    with pytest.warns(UserWarning, match="optimizer_state=dfx<8> with an Adam-type optimizer"):
        trainer("int8", torch.optim.Adam)
    int16_state = Policy.preset("int8").with_roles(optimizer_state="int16")
    with w.catch_warnings():
        w.simplefilter("error")
        trainer(int16_state, torch.optim.Adam, eps=1e-3)
        trainer("int8", torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="eps"):
        trainer(int16_state, torch.optim.Adam)  # eps 1e-8
