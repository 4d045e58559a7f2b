"""LossScaler: the dynamic rule step by step, a differential test against an unscaled fp32 control (PyTorch's
style), fp16/bf16 grads, overflow attribution, collapse, checkpoint resume, validation."""

import io
import math
import random

import pytest
import torch
from torch import nn

from lowprec.scaling import LossScaleCollapse, LossScaler, StepResult


def feed(scaler: LossScaler, overflows) -> list[StepResult]:
    return [scaler.update(bool(f)) for f in overflows]


def param_with_grad(grad: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    return p


# 1. growth -------------------------------------------------------------------------------------------------------


def test_dynamic_doubles_after_exactly_growth_interval_clean_steps():
    s = LossScaler.dynamic(init=8.0, growth_interval=3)
    r = feed(s, [0, 0, 0, 0, 0, 0])
    assert [x.scale for x in r] == [8, 8, 8, 16, 16, 16]
    assert [x.next_scale for x in r] == [8, 8, 16, 16, 16, 32]
    assert [x.growth_tracker for x in r] == [1, 2, 0, 1, 2, 0]
    assert not any(x.skipped for x in r)


def test_overflow_restarts_the_clean_count():
    s = LossScaler.dynamic(init=8.0, growth_interval=3)
    r = feed(s, [0, 0, 1, 0, 0, 0])
    assert [x.next_scale for x in r] == [8, 8, 4, 4, 4, 8]
    assert [x.skipped for x in r] == [False, False, True, False, False, False]


def test_hysteresis_one_matches_torch_amp_update_scale():
    rng = random.Random(1)
    flags = [rng.random() < 0.2 for _ in range(300)]
    ours = LossScaler.dynamic(init=2.0**16, growth_interval=4, floor=None, cap=None)
    scale, tracker = torch.tensor([2.0**16]), torch.zeros(1, dtype=torch.int32)
    seen = set()
    for f in flags:
        r = ours.update(f)
        torch._amp_update_scale_(scale, tracker, torch.tensor([float(f)]), 2.0, 0.5, 4)
        assert (r.skipped, r.next_scale, r.growth_tracker) == (
            f,
            scale.item(),
            tracker.item(),
        )
        seen.add(r.next_scale)
    assert len(seen) > 4  # both growth and backoff happened


# 2. backoff ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_halves_and_skips_on_inf_and_nan(bad):
    s = LossScaler.dynamic(init=2.0**10, growth_interval=3)
    feed(s, [0, 0])
    assert s.growth_tracker == 2
    g = torch.ones(5) * s.scale
    g[3] = bad
    found, names = s.unscale_([param_with_grad(torch.ones(3)), param_with_grad(g)])
    assert found and names == ["params[1]"]
    r = s.update(found)
    assert (r.skipped, r.scale, r.next_scale, r.growth_tracker) == (
        True,
        2.0**10,
        2.0**9,
        0,
    )
    assert [x.next_scale for x in feed(s, [0, 0, 0])] == [
        2.0**9,
        2.0**9,
        2.0**10,
    ]  # the count restarted


def test_hysteresis_two_needs_two_overflows_to_halve():
    s = LossScaler.dynamic(init=64.0, growth_interval=3, hysteresis=2)
    r = feed(s, [1, 0, 1, 1, 1])
    assert [x.skipped for x in r] == [True, False, True, True, True]
    assert [x.next_scale for x in r] == [
        64,
        64,
        32,
        32,
        16,
    ]  # clean steps do not restore the counter...
    r = feed(s, [0, 0, 0, 1, 1])
    assert [x.next_scale for x in r] == [16, 16, 32, 32, 16]  # ...a growth does


# 3. differential test against an fp32 control that skips the same step ------------------------------------------


def _train(scaled: bool, skip_step: int | None, steps: int = 20):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(steps, 8, 6), torch.randn(steps, 8, 3)
    scaler = LossScaler.dynamic(init=2.0**10, growth_interval=5) if scaled else None
    results = []
    for i in range(steps):
        step = i + 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[i]), y[i])
        if scaler is None:
            loss.backward()
            if step != skip_step:
                opt.step()
            continue
        scaler.scale_loss(loss).backward()
        if step == skip_step:
            model.weight.grad[1, 2] = math.inf
        found, _ = scaler.unscale_(model.named_parameters())
        if not found:
            opt.step()
        results.append(scaler.update(found))
    return model, scaler, results


def test_scaled_run_with_injected_inf_equals_fp32_control_skipping_that_step():
    model, scaler, results = _train(scaled=True, skip_step=7)
    control, _, _ = _train(scaled=False, skip_step=7)
    no_skip, _, _ = _train(scaled=False, skip_step=None)
    assert [r.skipped for r in results] == [i + 1 == 7 for i in range(20)]
    assert results[6].overflow_modules == ("weight",)
    # Rule: clean steps 1-5 -> 2**11; step 6 clean; step 7 overflow -> 2**10, count 0; 13 clean steps (8-20)
    # grow at steps 12 and 17 -> 2**12, with 3 clean steps counted.
    assert (scaler.scale, scaler.growth_tracker) == (2.0**12, 3)
    for p, q, r in zip(model.parameters(), control.parameters(), no_skip.parameters()):
        assert torch.equal(p, q)  # power-of-two scales on fp32 grads: bit for bit
        assert not torch.equal(p, r)  # the test can fail: skipping step 7 matters


# 4. fp16 / bf16 grads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0**16, 3.0])
def test_unscale_in_place_on_low_precision_grads(dtype, scale):
    g32 = torch.randn(1000) * torch.logspace(-12, 2, 1000, base=2.0) * 2.0**-6
    p = nn.Parameter(torch.zeros(1000, dtype=dtype))
    p.grad = (g32 * scale).to(dtype)
    scaled, grad = p.grad.clone(), p.grad
    s = LossScaler.static(scale)
    found, names = s.unscale_([p])
    assert not found and names == []
    assert p.grad is grad and p.grad.dtype == dtype  # in place, own dtype
    assert torch.equal(p.grad, (scaled.float() / scale).to(dtype))  # fp32 divide, one rounding to dtype
    assert not torch.equal(p.grad, scaled)


def test_unscale_divides_rather_than_multiplying_by_the_reciprocal():
    g = torch.randn(1000) * 2.0**10
    p = param_with_grad(g)
    LossScaler.static(3.0).unscale_([p])
    assert torch.equal(p.grad, g / 3.0)
    assert not torch.equal(g / 3.0, g * (1 / 3.0))  # the two differ, so the check above has teeth


def test_fp16_model_end_to_end():
    model = nn.Linear(8, 4).half()
    ref = nn.Linear(8, 4)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(16, 8).half()
    s = LossScaler.dynamic(init=2.0**10)
    s.scale_loss(model(x).float().pow(2).mean()).backward()
    found, _ = s.unscale_(model.named_parameters())
    ref(x.float()).pow(2).mean().backward()
    assert not found and model.weight.grad.dtype == torch.float16
    torch.testing.assert_close(model.weight.grad.float(), ref.weight.grad, rtol=2e-2, atol=1e-3)


# 5. which parameter overflowed ------------------------------------------------------------------------------------


def test_overflow_modules_names_the_offending_parameters():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    s = LossScaler.dynamic(init=2.0**8)
    s.scale_loss(model(torch.randn(3, 4)).sum()).backward()
    model[2].bias.grad[1] = math.nan
    model[0].weight.grad[0, 0] = -math.inf
    found, names = s.unscale_(model.named_parameters())
    assert found and names == ["0.weight", "2.bias"]
    r = s.update(None)  # None: use what unscale_ found
    assert r.skipped and r.overflow_modules == ("0.weight", "2.bias") and r.next_scale == 2.0**7
    assert s.update(False).overflow_modules == ()


def test_one_host_sync_per_unscale(monkeypatch):
    calls = []
    for name in ("tolist", "item", "__bool__", "cpu"):
        orig = getattr(torch.Tensor, name)
        counted = lambda self, *a, _o=orig, _n=name, **k: calls.append(_n) or _o(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    ps = [param_with_grad(torch.randn(7, dtype=d)) for d in (torch.float32, torch.float16, torch.bfloat16) * 4]
    LossScaler.dynamic().unscale_(ps)
    assert len(calls) == 1


def test_unscaling_a_parameter_twice_raises():
    p = param_with_grad(torch.ones(3))
    s = LossScaler.static(4.0)
    s.unscale_([p])
    with pytest.raises(RuntimeError, match="already unscaled"):
        s.unscale_([p])
    s.update(False)
    s.unscale_([p])
    assert torch.equal(p.grad, torch.full((3,), 1 / 16))


# 6. collapse ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hysteresis", [1, 2])
def test_collapse_raises_after_predicted_number_of_overflows(hysteresis):
    s = LossScaler.dynamic(init=2.0**10, floor=1.0, hysteresis=hysteresis)
    n = (10 + 1) * hysteresis  # log2(init/floor) halvings reach the floor; the next backoff would cross it
    feed(s, [1] * (n - 1))
    assert s.scale == 1.0
    state, s = (
        s.state_dict(),
        LossScaler.dynamic(init=2.0**10, floor=1.0, hysteresis=hysteresis),
    )
    s.load_state_dict(state)  # the overflow streak survives a resume
    with pytest.raises(LossScaleCollapse, match=f"after {n} consecutive overflowing steps") as e:
        s.update(True)
    assert "learning rate" in str(e.value) and "NaN" in str(e.value) and isinstance(e.value, RuntimeError)
    assert s.scale == 1.0


def test_clean_steps_reset_the_collapse_streak_and_floor_none_never_reaches_zero():
    s = LossScaler.dynamic(init=4.0, floor=1.0)
    feed(s, [1, 1, 0])
    with pytest.raises(LossScaleCollapse, match="after 1 consecutive"):
        s.update(True)
    s = LossScaler.dynamic(init=2.0**16, floor=None)
    feed(s, [1] * 400)
    assert s.scale == 2.0**-126


# 7. cap, static, none ---------------------------------------------------------------------------------------------


def test_cap_is_respected():
    r = feed(LossScaler.dynamic(init=16.0, growth_interval=1, cap=48.0), [0, 0, 0, 0])
    assert [x.next_scale for x in r] == [32, 48, 48, 48]


def test_static_and_none_never_change_but_still_skip():
    for s, S in ((LossScaler.static(128.0), 128.0), (LossScaler.none(), 1.0)):
        r = feed(s, [0, 1, 1, 0] * 600)
        assert {x.scale for x in r} == {x.next_scale for x in r} == {S}
        assert [x.skipped for x in r[:4]] == [False, True, True, False]
    loss = torch.tensor(3.0, dtype=torch.float16)
    out = LossScaler.static(2.0**20).scale_loss(loss)
    assert out.dtype == torch.float32 and out.item() == 3.0 * 2**20  # no fp16 overflow
    assert LossScaler.none().scale == 1.0


# 8. checkpoint ----------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    rng = random.Random(3)
    flags = [rng.random() < 0.3 for _ in range(80)]
    make = lambda: LossScaler.dynamic(init=2.0**12, growth_interval=4, hysteresis=2, floor=2.0**-20)
    a = make()
    full = feed(a, flags)
    assert len({x.next_scale for x in full}) > 3  # the pattern exercises growth and backoff
    for cut in range(len(flags) + 1):  # every resume point, so every hysteresis/clean-count state is covered
        b = make()
        first = feed(b, flags[:cut])
        buf = io.BytesIO()
        torch.save(b.state_dict(), buf)
        buf.seek(0)
        c = make()
        c.load_state_dict(torch.load(buf))
        assert full == first + feed(c, flags[cut:]), cut
    assert repr(c) == repr(a) and "dynamic" in repr(a)


def test_load_state_dict_of_other_kind_or_config_raises():
    st = LossScaler.dynamic(growth_interval=100).state_dict()
    with pytest.raises(ValueError, match="'dynamic'.*'static'"):
        LossScaler.static(8.0).load_state_dict(st)
    with pytest.raises(ValueError, match="growth_interval: checkpoint 100 vs 2000"):
        LossScaler.dynamic().load_state_dict(st)
    with pytest.raises(ValueError, match="scale"):
        LossScaler.static(8.0).load_state_dict(LossScaler.static(4.0).state_dict())


# 9. validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init": 0.0}, "init must be a finite number > 0"),
        ({"init": math.inf}, "init must be a finite number > 0"),
        ({"growth_factor": 1.0}, "growth_factor must be a finite number > 1"),
        (
            {"backoff_factor": 1.0},
            r"backoff_factor must be a finite number in \(0, 1\)",
        ),
        (
            {"backoff_factor": 0.0},
            r"backoff_factor must be a finite number in \(0, 1\)",
        ),
        ({"growth_interval": 0}, "growth_interval must be an int >= 1"),
        ({"growth_interval": 2.0}, "growth_interval must be an int >= 1"),
        ({"hysteresis": 0}, "hysteresis must be an int >= 1"),
        ({"init": 0.5, "floor": 1.0}, "floor <= init <= cap"),
        ({"init": 2.0**25}, "floor <= init <= cap"),
        ({"floor": -1.0}, "floor must be a finite number > 0"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossScaler.dynamic(**kwargs)


def test_static_validation():
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        LossScaler.static(-2.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        LossScaler.static(math.nan)
