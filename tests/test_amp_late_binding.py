"""``lp.GradScaler(policy, model)`` without its optimizer builds the Trainer at the first ``unscale_``/``step``,
after that step's forward and backward passes. That step is the Trainer's step bit for bit: a native model's
micro-batch gradients sum in fp32 (before, in bf16 on the parameters), and a state loaded before the optimizer
is known resumes bit for bit (before, binding loaded the checkpoint's model state again, undoing the exponent
statistics and amaxes the resumed step's forward had recorded)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from tiny_attention import TinyAttention


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def _build(recipe: str, with_optimizer: bool):
    torch.manual_seed(0)
    model = TinyAttention(32)
    if with_optimizer:
        lp.convert(model, recipe, inplace=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, lp.GradScaler(recipe, model, optimizer)
    scaler = lp.GradScaler(recipe, model)  # converts the model in place; the optimizer comes later
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), scaler


def _steps(model, optimizer, scaler, start: int, stop: int) -> None:
    for step in range(start, stop):
        optimizer.zero_grad()
        for micro in range(2):  # gradient accumulation
            x, y = _batch(step, micro)
            with lp.autocast(scaler):
                loss = F.cross_entropy(model(x), y) / 2
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _bits(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().view(torch.int32).clone() for p in model.parameters()]


@pytest.mark.parametrize("recipe", ["native-bf16", "int8-lazy"])
def test_the_first_step_of_a_scaler_bound_late_is_the_trainers_step(recipe):
    bound, late = _build(recipe, True), _build(recipe, False)
    _steps(*bound, 0, 2)
    _steps(*late, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(_bits(bound[0]), _bits(late[0])))


@pytest.mark.parametrize("recipe", ["dfx-10-12+exponent_interval=2", "fp8-delayed", "native-bf16"])
def test_a_state_loaded_before_the_optimizer_is_known_resumes_bit_for_bit(recipe):
    whole = _build(recipe, False)
    _steps(*whole, 0, 5)
    first = _build(recipe, False)
    _steps(*first, 0, 2)
    buffer = io.BytesIO()
    torch.save(first[2].state_dict(), buffer)
    buffer.seek(0)
    model, optimizer, scaler = _build(recipe, False)
    scaler.load_state_dict(torch.load(buffer, weights_only=True))  # the optimizer is given at the first step
    _steps(model, optimizer, scaler, 2, 5)
    assert all(torch.equal(a, b) for a, b in zip(_bits(whole[0]), _bits(model)))
