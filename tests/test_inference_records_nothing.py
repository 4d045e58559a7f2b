"""Evaluating a converted model (eval mode under ``torch.no_grad``, as ``lowprec.train.evaluating`` and the
runner's test-set evaluation do) rounds at the current exponents and scales and records nothing: training
with evaluations between its steps gives the weights, exponents and delayed scales of training without them,
bit for bit. Before, every evaluation batch counted in Courbariaux's overflow statistics and in the delayed
scaling amax, so the test data moved the training's exponents and scales."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.train.evaluating import evaluating
from tiny_attention import TinyAttention


def _state(model: nn.Module) -> dict:
    """Every exponent's (int_bits, batches, summed rates) and every delayed scale's (scale, history, pending)."""
    out = {}
    for name, role, q in lp.nn.quantizers(model):
        if q.exponent is not None:
            out[name, role] = (q.exponent.int_bits, q.exponent.batches, list(q.exponent._host_sum))
        if q.scale_state is not None:
            s = q.scale_state
            out[name, role] = (s.scale.item(), s.history.tolist(), None if s.pending is None else s.pending.item())
    return out


def _train(recipe: str, evaluate: bool, steps: int = 6):
    torch.manual_seed(0)
    model = lp.convert(TinyAttention(16), recipe)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), recipe)
    g, test = torch.Generator().manual_seed(1), torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(2))
    if evaluate:  # before the first step too: an init_int_bits=auto exponent starts at the first training batch
        with evaluating(model):
            model(100 * test)
    for _ in range(steps):
        x, y = torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        trainer.step(F.cross_entropy(model(x), y))
        if evaluate:
            with evaluating(model):
                model(100 * test)  # far outside the training range: any recording would move the exponents
    return _state(model), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("recipe", ["dfx-10-12+exponent_interval=3", "fp8-delayed"])
def test_evaluating_between_steps_changes_no_exponent_scale_or_weight(recipe):
    plain_state, plain_weights = _train(recipe, evaluate=False)
    state, weights = _train(recipe, evaluate=True)
    assert len(plain_state) > 10
    assert state == plain_state
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))


def _batches(model: nn.Module) -> int:
    return sum(q.exponent.batches for _, _, q in lp.nn.quantizers(model) if q.exponent is not None)


@pytest.mark.parametrize("training, grad, records", [
    (False, False, False),  # inference: eval mode under no_grad
    (False, True, True),  # a forward autograd records (fine-tuning with the model in eval mode)
    (True, False, True),  # a training forward under no_grad (a reentrant checkpoint's first forward)
    (True, True, True),
])
def test_only_an_inference_forward_records_nothing(training, grad, records):
    torch.manual_seed(0)
    model = lp.convert(TinyAttention(16), "dfx-10-12")
    model.train(training)
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        model.train()(x)  # a training forward starts the exponents (init_int_bits=auto)
        model.train(training)
        expected = model(x)
        before = _batches(model)
        again = model(x)
    assert torch.equal(again, expected)  # rounded at the same exponents either way
    assert (_batches(model) > before) == records


def test_calibration_records_in_inference_too():
    """``lp.nn.calibrating`` (observe only) measures the exponents also under eval mode and no_grad."""
    torch.manual_seed(0)
    model = lp.convert(TinyAttention(16), "dfx-10-12").eval()
    with torch.no_grad(), lp.nn.calibrating(model):
        model(torch.randn(4, 6, 8))
    assert _batches(model) > 20


@pytest.mark.parametrize("recipe", ["mixed-fp16", "int8-lazy", "dfx-10-12", "fp8-delayed", "mxfp4", "wrpn-4-4"])
def test_a_converted_model_runs_under_inference_mode_as_under_no_grad(recipe):
    """``torch.inference_mode()`` (Hugging Face's pipelines, most inference code): before, every emulated
    model raised "Inference tensors do not track version counter" at its first rounding (the mark that lets
    backward store a rounded tensor packed reads the version counter, which inference tensors lack). The
    outputs are those under ``torch.no_grad()`` bit for bit, and the model trains on afterwards."""
    torch.manual_seed(0)
    model = lp.convert(TinyAttention(16), recipe)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe)
    x, y = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    trainer.step(F.cross_entropy(model(x), y))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = model(x)
    assert got.is_inference() and torch.equal(got, expected)
    model.train()
    with torch.inference_mode():
        model(x)  # in train mode too (a delayed scale then records an inference tensor's amax)
    assert not trainer.step(F.cross_entropy(model(x), y)).skipped
