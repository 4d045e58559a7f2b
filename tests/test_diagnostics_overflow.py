"""Overflow attribution: a skipped step names the module and role that overflowed; the post-mortem finds where
it started; lowprec train logs it."""

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

import lowprec as lp
from lowprec.diagnostics import OverflowSource, attribute_overflow, describe_skipped_step, explain_overflow
from lowprec.experiments import get_task, load_task_data, parse_recipe, run


def _weight_grad_overflow_case():
    """Two layers; only dE/dW is fp16. Inputs of 1e5 make the first layer's dE/dW = sum_b g_b x_b pass 65504;
    its tiny weights keep the second layer's input, and so its dE/dW, small."""
    torch.manual_seed(0)
    model = lp.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), "weight_grad=fp16")
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.zero_()
    x = torch.full((8, 4), 1e5)
    return model, x


def test_skipped_step_names_the_module_and_role():
    model, x = _weight_grad_overflow_case()
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), "weight_grad=fp16")
    result = trainer.step(model(x).sum())
    assert result.skipped and result.overflow_modules == ("0.weight",)
    assert attribute_overflow(result.overflow_modules) == (OverflowSource("0", "weight_grad", "0.weight"),)
    line = describe_skipped_step(7, result)
    assert line.startswith("step 7 skipped") and "0.weight_grad" in line
    nan_loss = trainer.step(model(x / 1e5).sum() * float("nan"))
    assert nan_loss.skipped and attribute_overflow(nan_loss.overflow_modules)[0].role in ("loss", "weight_grad")
    assert "step 8 skipped" in describe_skipped_step(8, nan_loss)


def test_post_mortem_finds_the_origin_and_leaves_the_model_alone():
    model, x = _weight_grad_overflow_case()
    before = [p.detach().clone() for p in model.parameters()]
    found = explain_overflow(model, x, lambda m, batch: m(batch).sum())
    assert found[0] == OverflowSource("0", "weight_grad", None, origin=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert explain_overflow(model, x / 1e5, lambda m, batch: m(batch).sum()) == ()  # no overflow, nothing found


def test_post_mortem_separates_origin_from_propagation():
    # fp16 everywhere and a huge loss scale: dE/dz of the last layer overflows first; the layer below only
    # receives the inf
    torch.manual_seed(0)
    model = lp.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), "grads=fp16")
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    found = explain_overflow(model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]), scale=2.0**30)
    assert found[0] == OverflowSource("1", "output_grad", None, origin=True)
    assert any(s.module == "0" and not s.origin for s in found)


def test_lowprec_train_logs_skipped_steps(caplog):
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=64, test_limit=64, batch_size=32)
    recipe = parse_recipe("mixed-fp16+loss_scale=static:1e9")  # every step overflows fp16
    with caplog.at_level(logging.WARNING, logger="lowprec.train"):
        result = run(task, recipe, load_task_data(task))
    assert result.skipped_steps == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "lowprec.train"]
    assert len(lines) == 2 and lines[0].startswith("step 0 skipped") and "_grad" in lines[0]
