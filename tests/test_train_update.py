"""Update modes on single parameters with known updates: fp16 swamping vs an fp32 master (MPT), Park's lazy
update on an INT8 parameter, weight decay surviving bf16 storage, optimizer-state formats, policy checks."""

import pytest
import torch
from torch import nn

from lowprec import quantize
from lowprec.policy import Policy
from lowprec.formats.packing import Codes
from lowprec.train import SGD, AdamW, Trainer
from lowprec.train.stored import load

OPTIMIZERS = {"torch.optim.SGD": torch.optim.SGD, "lowprec.train.SGD": SGD}


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))


def constant_update_run(policy, start, update, steps, optimizer=torch.optim.SGD, **opt_kwargs):
    """Train one parameter whose update is the constant ``update`` (lr=1, grad=-update). Returns the trajectory."""
    model = Scalar(start)
    trainer = Trainer(model, optimizer(model.parameters(), lr=1.0, **opt_kwargs), policy)
    trajectory = []
    for _ in range(steps):
        trainer.step((model.w * -update).sum())
        trajectory.append(model.w.item())
    return torch.tensor(trajectory, dtype=torch.float64)


# 1. MPT swamping: |w| >= 2048 |dw| vanishes in fp16, survives in the fp32 master ------------------------------


@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_fp16_storage_swamps_small_updates_fp32_master_keeps_them(opt):
    dw = 2.0**-12
    stored_fp16 = constant_update_run(Policy.of(master="fp16"), 1.0, dw, 100, opt)
    assert (stored_fp16 == 1.0).all()
    fp32_master = constant_update_run(Policy(), 1.0, dw, 100, opt)
    assert fp32_master[-1].item() == 1.0 + 100 * dw  # exact: every 1 + k 2^-12 is an fp32 number


def test_fp16_storage_flushes_updates_below_its_smallest_subnormal():
    dw = 2.0**-26  # below half of fp16's smallest subnormal 2^-24
    assert (constant_update_run(Policy.of(master="fp16"), 0.0, dw, 50) == 0.0).all()
    assert constant_update_run(Policy.preset("fp32"), 0.0, dw, 50)[-1].item() == 50 * dw


# 2. Park's lazy update on an INT8 parameter ---------------------------------------------------------------------

LSB = 2.0**-4  # fixed<8,4>: an 8-bit word with 4 fraction bits, range [-8, 8 - 1/16]


@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_plain_int8_storage_freezes_a_parameter_under_a_sub_lsb_update(opt):
    frozen = constant_update_run(Policy.of(master="fixed<8,4>"), -7.5, 0.3 * LSB, 300, opt)
    assert (frozen == -7.5).all()


@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_lazy_update_moves_an_int8_parameter_one_lsb_every_3_or_4_steps(opt):
    policy = Policy.of(master="fixed<8,4>", accumulator="int16", exponent_rule="maxabs")
    steps = 600
    theta = constant_update_run(policy, -7.5, 0.3 * LSB, steps, opt)
    moves = torch.cat([torch.tensor([-7.5], dtype=torch.float64), theta]).diff() / LSB
    assert set(moves.tolist()) == {0.0, 1.0}  # never more than one LSB at once
    gaps = torch.nonzero(moves).flatten().diff()
    assert set(gaps.tolist()) <= {3, 4}
    speed = (theta[-1].item() + 7.5) / LSB / steps
    assert speed == pytest.approx(0.3, rel=0.01)


def test_lazy_update_sign_keeps_the_accumulator_within_one_lsb():
    """Park's Algorithm 1 prints acc + (θnew - θ): the accumulator would then grow without bound."""
    policy = Policy.of(master="fixed<8,4>", accumulator="int16", exponent_rule="maxabs")
    model = Scalar(-7.5)
    trainer = Trainer(model, SGD(model.parameters(), lr=1.0), policy)
    for _ in range(100):
        trainer.step((model.w * (-0.3 * LSB)).sum())
        assert trainer.slots[0].acc.abs().item() <= LSB / 2


def test_lazy_update_of_a_parameter_with_zero_update_stays_finite():
    """A dead unit's bias gets Δ = 0: acc + Δ is all zeros, which the accumulator must round to zeros."""
    policy = Policy.of(master="int8", accumulator="int16", exponent_rule="maxabs")
    theta = constant_update_run(policy, 0.5, 0.0, 3)
    assert (theta == 0.5).all()


# 6. weight decay survives low-precision storage through the accumulator -------------------------------------------


@pytest.mark.parametrize(
    "opt, kwargs",
    [(torch.optim.SGD, dict(lr=1e-2, weight_decay=1e-2)), (SGD, dict(lr=1e-2, weight_decay=1e-2)),
     (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)), (AdamW, dict(lr=1e-2, weight_decay=1e-2))],
    ids=["torch-SGD", "lowprec-SGD", "torch-AdamW", "lowprec-AdamW"],
)
def test_weight_decay_survives_bf16_storage_only_with_the_lazy_update(opt, kwargs):
    """w = 1, lr*wd = 1e-4 per step, zero gradient, 2000 steps: fp32 gives (1 - 1e-4)^2000."""
    expected = (1 - 1e-4) ** 2000  # 0.8187
    results = {}
    for label, policy in {
        "fp32": Policy(),
        "bf16": Policy.of(master="bf16"),
        "bf16+acc": Policy.of(master="bf16", accumulator="bf16"),
    }.items():
        model = Scalar(1.0)
        trainer = Trainer(model, opt(model.parameters(), **kwargs), policy)
        for _ in range(2000):
            trainer.step((model.w * 0.0).sum())
        results[label] = model.w.item()
    assert results["fp32"] == pytest.approx(expected, abs=1e-4)
    assert results["bf16"] == 1.0  # the decay step is below bf16's half-ulp at 1.0: lost every step
    assert results["bf16+acc"] == pytest.approx(expected, abs=1e-2)
    assert quantize(torch.tensor(results["bf16+acc"]), "bf16").item() == results["bf16+acc"]


# 5. optimizer state formats -------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train_steps(model, trainer, steps=5):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        trainer.step(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("fmt", ["fp16", "int8", "fixed<8,6>"])
@pytest.mark.parametrize("opt", [torch.optim.SGD, SGD], ids=["torch", "lowprec"])
def test_momentum_buffers_lie_in_the_optimizer_state_format(fmt, opt):
    buffers = {}
    policies = {"fp32": Policy(), fmt: Policy.of(optimizer_state=fmt, exponent_rule="maxabs")}
    for label, policy in policies.items():
        torch.manual_seed(0)
        model = mlp()
        optimizer = opt(model.parameters(), lr=0.1, momentum=0.9)
        train_steps(model, Trainer(model, optimizer, policy))
        buffers[label] = [load(optimizer.state[p]["momentum_buffer"]) for p in model.parameters()]
    for buf, ref in zip(buffers[fmt], buffers["fp32"]):
        assert torch.equal(quantize(buf, fmt), buf)
        assert not torch.equal(buf, ref)  # the format did something


def test_adam_moments_are_quantized_and_step_counters_are_not():
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer, Policy.of(optimizer_state="int16", exponent_rule="maxabs"))
    train_steps(model, trainer, steps=3)
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["step"].item() == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(state[key], Codes)  # kept packed between steps (lowprec.train.stored)
            assert torch.equal(quantize(load(state[key]), "int16"), load(state[key]))
    names = {name for name, role, _ in trainer.quantizers() if role == "optimizer_state"}
    assert names == {f"{n}:{k}" for n, _ in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}


def test_overflow_rule_exponents_move_for_master_and_state_groups():
    torch.manual_seed(0)
    model = mlp()
    policy = Policy.of(master="dfx<12>", optimizer_state="dfx<10>", exponent_interval=1, init_int_bits=5)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy)
    train_steps(model, trainer, steps=4)
    bits = {(name, role): q.exponent.int_bits for name, role, q in trainer.quantizers()}
    assert bits[("0.weight", "master")] < 5  # |W| < 1: the overflow rule lowers r by one per interval
    assert all(b < 5 for (name, role), b in bits.items() if role == "optimizer_state")
    for name, p in model.named_parameters():
        q = {(n, r): q for n, r, q in trainer.quantizers()}[(name, "master")]
        assert torch.equal(quantize(p.detach(), q.exponent.format), p.detach())


# policy and optimizer checks ------------------------------------------------------------------------------------


def test_accumulator_without_master_is_rejected():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulator=dfx<16> is set but master is not"):
        Trainer(model, opt, Policy.of(accumulator="int16"))
    overridden = Policy.of(master="int8", accumulator="int16").override("2", master="none")
    with pytest.raises(ValueError, match=r"^2\.weight: accumulator"):
        Trainer(model, opt, overridden)


def test_optimizer_must_hold_exactly_the_trainable_parameters():
    model = mlp()
    with pytest.raises(ValueError, match="does not hold 2 trainable parameter.*2.weight, 2.bias"):
        Trainer(model, torch.optim.SGD(model[0].parameters(), lr=0.1))
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="holds 2 parameter.*not parameters of the model"):
        Trainer(model, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1))
    model[2].requires_grad_(False)  # frozen parameters may stay out of the optimizer, or be in it
    Trainer(model, torch.optim.SGD(model[0].parameters(), lr=0.1))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_parameters_start_inside_the_master_format():
    torch.manual_seed(0)
    model = mlp()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), Policy.of(master="fixed<8,5>"))
    for p in model.parameters():
        assert torch.equal(quantize(p.detach(), "fixed<8,5>"), p.detach())


@pytest.mark.parametrize("preset", ["int8-lazy", "int8"])
def test_classifier_rule_widens_the_last_layers_master_so_the_stored_weight_is_on_the_wider_grid(preset):
    """100 classes: classifier_bits(100) = 9, so the rule gives the last layer weight=dfx<9>, and its master,
    optimizer state (and accumulator, where narrower) widen with it: after a step the stored weight lies on the
    dfx<9> grid and not on the dfx<8> one (with master=dfx<8> the widening did nothing)."""
    import lowprec as lp

    torch.manual_seed(0)
    model = lp.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 100)), preset)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), preset)
    slots = {s.name: s for s in trainer.slots}
    last, first = slots["2.weight"], slots["0.weight"]
    role = lambda slot, r: str(slot.policy.get(r).format)  # noqa: E731
    assert role(last, "master") == "dfx<9>" and role(last, "optimizer_state") == "dfx<9>"
    assert role(first, "master") == "dfx<8>"  # only the last layer widens
    assert role(last, "master") == str(model[2].policy.get("master").format)  # convert and Trainer agree
    if preset == "int8-lazy":
        assert role(last, "accumulator") == "dfx<16>"  # already wider than 9 bits
    x, y = torch.randn(64, 16), torch.randint(0, 100, (64,))
    for _ in range(2):
        trainer.step(nn.functional.cross_entropy(model(x), y))
    # a two's-complement word of b bits holds integers k * step with |k| <= 2**(b-1): the stored weight's own
    # finest power-of-two step gives the width it needs
    assert _word_magnitude(model[2].weight) in range(129, 257)  # 9 bits, more than any 8-bit word holds
    assert _word_magnitude(model[0].weight) <= 128


def _word_magnitude(w: torch.Tensor) -> int:
    """max |k| with w = k * step, step the largest power of two dividing every element of w."""
    w = w.detach().double()
    step = 2.0 ** (int(torch.frexp(w.abs().max())[1]))
    while not torch.equal(torch.round(w / step), w / step):
        step /= 2
    return int((w / step).abs().max().item())


def _q_grid(value, step):
    """round_half_even(value / step) * step on exact rationals."""
    return round(value / step) * step


@pytest.mark.parametrize("opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_courbariaux_update_applies_the_rounded_velocity(opt):
    """fixed-20 (update_rule=courbariaux): v <- Q(M v - LR g), W <- Q(W + v) on the fixed<20,14> grid, against an
    exact-rational reference; the old order (apply the fp32 momentum, round the buffer afterwards) gives another
    trajectory, so the check can fail."""
    from fractions import Fraction

    lr, mu, g, w0 = 2.0**-3, 0.75, 25 * 2.0**-13, 1.0  # LR·g = 6.25 grid steps: rounding matters
    model = Scalar(w0)
    update_roles = "master=fixed<20,14>,optimizer_state=fixed<20,14>,update_rule=courbariaux"  # fixed-20's
    trainer = Trainer(model, opt(model.parameters(), lr=lr, momentum=mu), update_roles)
    got = []
    for _ in range(6):
        trainer.step((model.w * g).sum())
        got.append(Fraction(model.w.item()))
    step = Fraction(1, 2**14)
    w, v, want = Fraction(w0), Fraction(0), []
    b, w_old, old = Fraction(0), Fraction(w0), []
    for i in range(6):
        v = _q_grid(Fraction(mu) * v - Fraction(lr) * Fraction(g), step)
        w = _q_grid(w + v, step)
        want.append(w)
        b = Fraction(g) if i == 0 else Fraction(mu) * b + Fraction(g)  # torch's buffer, applied unrounded
        w_old = _q_grid(w_old - Fraction(lr) * b, step)
        b = _q_grid(b, step)
        old.append(w_old)
    assert got == want
    assert want != old
    v_stored = load(trainer.optimizer.state[model.w]["momentum_buffer"])
    assert Fraction(v_stored.item()) == v  # the velocity form, LR included, on the grid


def test_courbariaux_update_with_dynamic_fixed_point_moves_the_weight_by_the_stored_rounded_velocity():
    """dfx-10-12 on a layer: after each step the momentum buffer is its own dfx<10> rounding and the new weight
    is the dfx<12> master rounding of old weight + that buffer."""
    import lowprec as lp

    torch.manual_seed(0)
    model = lp.convert(nn.Sequential(nn.Linear(8, 4)), "dfx-10-12")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "dfx-10-12")
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    slot = next(s for s in trainer.slots if s.name == "0.weight")
    for _ in range(3):
        before = model[0].weight.detach().clone()
        trainer.step(nn.functional.cross_entropy(model(x), y))
        v = load(trainer.optimizer.state[model[0].weight]["momentum_buffer"])
        q = dict(trainer.state_formats.items())["0.weight:momentum_buffer"]
        assert torch.equal(q.round(v), v)
        assert torch.equal(slot.master.round(before + v), model[0].weight.detach())


def test_courbariaux_update_refuses_an_optimizer_that_is_not_plain_sgd():
    import lowprec as lp

    dfx, fixed = (lp.convert(nn.Sequential(nn.Linear(2, 2)), p) for p in ("dfx-10-12", "fixed-20"))
    with pytest.raises(ValueError, match="update_rule=courbariaux.*AdamW.*update_rule=optimizer"):
        Trainer(dfx, torch.optim.AdamW(dfx.parameters()))
    with pytest.raises(ValueError, match="nesterov"):
        Trainer(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    Trainer(dfx, torch.optim.AdamW(dfx.parameters()), "dfx-10-12+update_rule=optimizer")
