"""Courbariaux's PI-MNIST protocol in the experiment layer: validation split held out of the training set,
test error at the best validation epoch, pixels in [0, 1], the per-epoch lr / momentum schedule and the
full-precision exponent warm-up."""

from dataclasses import replace

import pytest
import torch

from lowprec.data import load_mnist
from lowprec.experiments import RunResult, get_task, load_task_data, parse_recipe, run
from lowprec.experiments.runner import _lr_at, _momentum_at, _warmup
from lowprec.experiments.sweep import Cell, _row
from lowprec.models import build_model
from lowprec.nn import convert, quantizers
from lowprec.train import SGD, Trainer

PIMNIST = get_task("pimnist-maxout")


def test_the_task_states_the_authors_protocol():
    assert (PIMNIST.validation, PIMNIST.unit_pixels, PIMNIST.warmup_epochs) == (10000, True, 2)
    assert (PIMNIST.lr, PIMNIST.momentum, PIMNIST.momentum_final, PIMNIST.schedule) == (0.05, 0.5, 0.7,
                                                                                        "courbariaux")


def test_the_validation_split_is_the_tail_of_the_training_set_and_train_limit_cuts_the_rest():
    # the shipped subset: 10,000 training images; hold the last 2,000 out and train on the first 300
    task = replace(PIMNIST, validation=2000, train_limit=300, test_limit=100)
    data = load_task_data(task)
    x, y = load_mnist("train")
    pixels = torch.round((x * 0.3081 + 0.1307) * 255) / 255
    assert torch.equal(data.val_labels, y[8000:]) and torch.equal(data.train_labels, y[:300])
    assert torch.equal(data.val_inputs[0], pixels[8000:].flatten(1))
    assert torch.equal(data.train_inputs[0], pixels[:300].flatten(1))
    assert data.source == "300 train / 2000 validation / 100 test images"
    # unit pixels are exactly the IDX bytes / 255
    assert torch.equal(data.test_inputs[0] * 255, torch.round(data.test_inputs[0] * 255))
    assert data.test_inputs[0].min() == 0 and data.test_inputs[0].max() == 1
    with pytest.raises(ValueError, match="leaves no training examples"):
        load_task_data(replace(task, validation=10000))


def test_the_schedule_falls_to_a_tenth_at_half_the_epochs_and_momentum_ramps_over_a_quarter():
    lrs = [_lr_at(PIMNIST, 0.05, 0, 1, e, 800) for e in (0, 200, 400, 799)]
    assert lrs == pytest.approx([0.05, 0.0275, 0.005, 0.005], rel=1e-12)
    moms = [_momentum_at(PIMNIST, 0.5, e, 800) for e in (0, 100, 200, 799)]
    assert moms == pytest.approx([0.5, 0.6, 0.7, 0.7], rel=1e-12)
    # other schedules keep their momentum constant
    assert _momentum_at(replace(PIMNIST, schedule="linear"), 0.5, 100, 800) == 0.5


def _history(*rows):
    return RunResult("t", "r", 0, history=[{"epoch": i + 1, "train_loss": 0.1, "test_accuracy": t,
                                            "val_accuracy": v} for i, (v, t) in enumerate(rows)])


def test_the_reported_test_accuracy_is_at_the_first_best_validation_epoch():
    result = _history((97.0, 98.0), (98.5, 98.2), (98.5, 98.9), (98.1, 99.0))
    assert result.reported_accuracy == 98.2  # epoch 2: the first of the tied best validation epochs
    assert result.final_accuracy == 99.0
    plain = RunResult("t", "r", 0, history=[{"epoch": 1, "train_loss": 0.1, "test_accuracy": 91.0}])
    assert plain.reported_accuracy == 91.0
    # the sweep's table reports the same number
    assert _row(Cell((("p", "8"),), "dfx-8-12"), result)["test error %"] == "1.80"


@pytest.fixture(scope="module")
def tiny():
    task = replace(PIMNIST, epochs=1, validation=500, train_limit=200, test_limit=100, warmup_epochs=1)
    return task, load_task_data(task)


def _exponents(model):
    return [q.exponent.int_bits for _, _, q in quantizers(model) if q.exponent is not None]


def test_the_warmup_moves_dfx_exponents_and_leaves_other_policies_untouched(tiny):
    task, data = tiny
    recipe = parse_recipe("dfx-10-12+init_int_bits=5,exponent_interval=1")
    warm, cold = run(task, recipe, data), run(replace(task, warmup_epochs=0), recipe, data)
    # the first loss is ln 10 either way (the softmax layer starts at 0); the warmed-up exponents then train
    # the network differently from exponents that start at 5
    assert warm.losses[0] == cold.losses[0] and warm.losses[1:] != cold.losses[1:]
    # fp32 has no exponents: the warm-up is skipped and the run is the run without it, loss for loss
    a = run(task, parse_recipe("fp32"), data)
    b = run(replace(task, warmup_epochs=0), parse_recipe("fp32"), data)
    assert a.losses == b.losses and a.history[0]["val_accuracy"] == b.history[0]["val_accuracy"]


def test_the_warmup_restores_the_initial_parameters(tiny):
    task, data = tiny

    policy = parse_recipe("dfx-10-12+init_int_bits=5,exponent_interval=1").policy
    torch.manual_seed(0)
    model = convert(build_model(task.model, **task.model_kwargs), policy)
    trainer = Trainer(model, SGD(model.parameters(), lr=0.05, momentum=0.5), policy)
    before = [p.detach().clone() for p in model.parameters()]  # as the trainer stores them (12-bit dfx)
    _warmup(task, trainer, model, data, {"batch_size": 100, "lr": 0.05, "momentum": 0.5, "epochs": 1,
                                         "loss_multiplier": 10.0}, 0, 200, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert any(e != 5 for e in _exponents(model))


def test_a_run_refuses_a_validation_split_holding_nan(tiny):
    task, data = tiny
    bad = data.val_inputs[0].clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"validation inputs\[0\] hold 1 NaN/inf values \(first in example 3\)"):
        run(task, parse_recipe("fp32"), replace(data, val_inputs=(bad,)))
