"""lp.autocast / lp.GradScaler: a torch.amp-shaped loop takes exactly lp.Trainer's steps."""

import pytest
import torch
from torch import nn

import lowprec as lp
from integration_setup import POLICIES, INF_STEP, assert_same_tensors, batches, sgd, step_loss, tiny_net, trainer_run


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("LOWPREC_COMPILE", "0")  # fused and unfused native updates differ in rounding order


def amp_loop(scaler, model, optimizer, data, first_step=0, unscale=False):
    results = []
    for i, b in enumerate(data, start=first_step):
        optimizer.zero_grad()
        with lp.autocast(scaler):
            loss = step_loss(model, b, i)
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        results.append(scaler.last_result)
    return results


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale-then-step"])
def test_amp_loop_equals_trainer_bit_for_bit(policy, unscale):
    ref_model, ref_trainer, ref_results = trainer_run(policy, 5)
    model = tiny_net()
    optimizer = sgd(model)
    scaler = lp.GradScaler(policy, model, optimizer)  # converts model in place: the optimizer stays valid
    results = amp_loop(scaler, model, optimizer, batches(5), unscale=unscale)
    assert [r.skipped for r in results] == [r.skipped for r in ref_results] == [i == INF_STEP for i in range(5)]
    assert [r.scale for r in results] == [r.scale for r in ref_results]
    if policy == "mixed-fp16":  # dynamic loss scaling: the overflow halves S
        assert results[INF_STEP].next_scale == results[INF_STEP].scale / 2
    assert_same_tensors(model.state_dict(), ref_model.state_dict())
    assert_same_tensors(scaler.trainer.state_dict()["master_copies"], ref_trainer.state_dict()["master_copies"])
    assert_same_tensors(scaler.trainer.state_dict()["accumulators"], ref_trainer.state_dict()["accumulators"])
    assert scaler.get_scale() == ref_trainer.scaler.scale


@pytest.mark.parametrize("policy", ["int8-lazy", "native-bf16"])
def test_optimizer_bound_late_equals_trainer(policy):
    """GradScaler(policy, model): the Trainer is built on the optimizer first given to step()."""
    ref_model, _, _ = trainer_run(policy, 4)
    model = tiny_net()
    optimizer = sgd(model)
    scaler = lp.GradScaler(policy, model)
    amp_loop(scaler, model, optimizer, batches(4))
    assert_same_tensors(model.state_dict(), ref_model.state_dict())


@pytest.mark.parametrize("policy", POLICIES)
def test_resume_from_scaler_state_is_bit_exact(policy):
    ref_model, _, _ = trainer_run(policy, 6)
    model = tiny_net()
    optimizer = sgd(model)
    scaler = lp.GradScaler(policy, model, optimizer)
    amp_loop(scaler, model, optimizer, batches(6)[:3])
    saved = torch.load(_roundtrip(scaler.state_dict()), weights_only=True)
    model2 = tiny_net()
    optimizer2 = sgd(model2)
    scaler2 = lp.GradScaler(policy, model2, optimizer2)
    scaler2.load_state_dict(saved)
    amp_loop(scaler2, model2, optimizer2, batches(6)[3:], first_step=3)
    assert_same_tensors(model2.state_dict(), ref_model.state_dict())


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_clip_grad_norm_clips_the_master_copies_as_the_trainer_does():
    """Native bf16: gradients live on the fp32 masters after unscaling; clipping them equals Trainer's clip."""
    ref = lp.convert(tiny_net(), "native-bf16")
    trainer = lp.Trainer(ref, sgd(ref), "native-bf16", clip_grad_norm=0.05)
    model = tiny_net()
    optimizer = sgd(model)
    scaler = lp.GradScaler("native-bf16", model, optimizer)
    for i, b in enumerate(batches(3)):
        ref_norm = trainer.step(step_loss(ref, b, 0)).grad_norm
        scaler.scale(step_loss(model, b, 0)).backward()
        norm = scaler.clip_grad_norm_(0.05)
        assert torch.equal(norm, ref_norm) and norm > 0.05  # it really clipped
        with pytest.raises(RuntimeError):  # the bf16 parameters no longer hold the gradient: no silent no-op
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(optimizer)
        scaler.update()
    assert_same_tensors(model.state_dict(), ref.state_dict())


def test_autocast_with_a_policy_converts_once_in_place():
    model = tiny_net()
    first = model[0]
    with lp.autocast("mixed-fp16", model):
        out = model(torch.randn(2, 8))
    assert isinstance(model[0], lp.nn.QuantizedModule) and model[0] is first  # converted in place
    assert torch.equal(out, lp.quantize(out, "fp16"))  # the last layer's output is on the fp16 grid
    state = model.state_dict()
    with lp.autocast("mixed-fp16", model):
        pass
    assert_same_tensors(model.state_dict(), state)
    with pytest.raises(ValueError, match="converted under policy"):
        with lp.autocast("int8", model):
            pass


def test_bad_use_is_named():
    model = tiny_net()
    optimizer = sgd(model)
    with pytest.raises(TypeError, match="needs the model"):
        lp.GradScaler("int8")
    scaler = lp.GradScaler("int8", model, optimizer)
    with pytest.raises(RuntimeError, match="without a step"):
        scaler.update()
    with pytest.raises(ValueError, match="one optimizer"):
        scaler.step(torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.raises(TypeError, match="closure"):
        scaler.step(optimizer, closure=lambda: None)
    with pytest.raises(ValueError, match="own rule"):
        scaler.update(new_scale=2.0)
    with pytest.raises(ValueError, match="not the one"):
        with lp.autocast(scaler, nn.Linear(2, 2)):
            pass
    with pytest.raises(RuntimeError, match="no optimizer yet"):
        lp.GradScaler("int8", tiny_net()).trainer


def test_wraps_an_existing_trainer():
    model = lp.convert(tiny_net(), "int8")
    trainer = lp.Trainer(model, sgd(model), "int8")
    scaler = lp.GradScaler(trainer)
    assert scaler.trainer is trainer and scaler.model is model and scaler.get_scale() == trainer.scaler.scale


def test_a_backward_by_hand_is_still_refused():
    """scale(loss).backward() counts as the Trainer's backward; an unscaled loss.backward() does not."""
    model = tiny_net()
    optimizer = sgd(model)
    scaler = lp.GradScaler("mixed-fp16", model, optimizer)
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="by hand"):
        scaler.step(optimizer)
    scaler.trainer.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    assert not scaler.last_result.skipped
