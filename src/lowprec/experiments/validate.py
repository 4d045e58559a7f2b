"""Up-front checks of a run: settings, device and data are refused before training, with the problem and the fix.

Everything here raises ``ValueError`` naming the setting, the value and what to do; none of it trains. A run
calls these before building its trainer, so that a setting that cannot train (an infinite learning rate, an
empty test split, a label the model has no output for, images of the wrong size, a GPU that is not there) is
reported at once instead of an epoch in, or as a result that looks like a number.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..train.evaluating import evaluating
from .tasks import TaskData

__all__ = ["check_settings", "check_finite", "check_data_fits", "check_device", "check_value", "SETTING_RULES",
           "SCHEDULES"]

#: The learning-rate schedules a run knows (``runner._lr_at``).
SCHEDULES = ("constant", "inv", "linear", "courbariaux")
#: What each numeric setting of a run (and of a recipe: ``+lr=...``, ``[train]``, ``[model]``) may be:
#: (type, lowest, highest, lowest allowed itself). ``width`` is capped at 16x (WRPN uses 2x and 3x): a wider
#: model's parameters grow with its square.
SETTING_RULES: dict[str, tuple[type, float, float, bool]] = {
    "lr": (float, 0.0, math.inf, False),
    "epochs": (int, 1, math.inf, True),
    "batch_size": (int, 1, math.inf, True),
    "loss_multiplier": (float, 0.0, math.inf, False),
    "momentum": (float, 0.0, 1.0, True),
    "weight_decay": (float, 0.0, math.inf, True),
    "width": (float, 0.0, 16.0, False),
}


def _expected(key: str) -> str:
    kind, low, high, low_ok = SETTING_RULES[key]
    if kind is int:
        return f"an integer >= {low:g}"
    if high == math.inf:
        return f"a finite number {'>=' if low_ok else '>'} {low:g}"
    return f"a finite number in {'[' if low_ok else '('}{low:g}, {high:g}]"


def check_value(key: str, value: Any) -> int | float:
    """``value`` as the type ``SETTING_RULES[key]`` names (strings from a recipe are converted), or ValueError
    saying what the setting accepts. Floats must be finite; ``momentum`` lies in [0, 1]."""
    kind, low, high, low_ok = SETTING_RULES[key]
    expected = _expected(key)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = kind(value) if kind is float or isinstance(value, int) else int(str(value), 10)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be {expected}, got {value!r}") from None
    if not math.isfinite(number) or number < low or (number == low and not low_ok) or number > high:
        raise ValueError(f"{key} must be {expected}, got {value!r}")
    return number


def check_settings(settings: dict[str, Any], examples: int, checkpoint_every: int | None) -> None:
    """ValueError for settings a run cannot train with, naming the setting and the fix."""
    if examples < 1:
        raise ValueError("the training split is empty: no examples to train on (check train_limit and the data)")
    for key in sorted(SETTING_RULES.keys() & settings.keys()):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int if SETTING_RULES[key][0] is int else (int, float)):
            raise ValueError(f"{key} must be {_expected(key)}, got {value!r}")
        check_value(key, value)
    if settings.get("schedule", "constant") not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {settings['schedule']!r}")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1 (steps) or None, got {checkpoint_every!r}")


def check_finite(data: TaskData) -> None:
    """ValueError naming the split, the count and the first example of any NaN or inf in the inputs."""
    for split, inputs in (("train", data.train_inputs), ("validation", data.val_inputs or ()),
                          ("test", data.test_inputs)):
        for i, t in enumerate(inputs):
            bad = ~torch.isfinite(t) if t.is_floating_point() else None
            if bad is not None and bad.any():
                first = int(bad.reshape(len(t), -1).any(1).nonzero()[0])
                raise ValueError(f"the {split} inputs[{i}] hold {int(bad.sum())} NaN/inf values (first in example "
                                 f"{first}): clean or drop those examples")


def check_data_fits(model: nn.Module, data: TaskData, task: str) -> None:
    """ValueError unless ``data`` can train and test ``model`` (a plain, unconverted build of the run's model).

    Both splits must be non-empty with as many labels as examples; labels are integers in [0, classes), where
    ``classes`` is the last dimension of the model's output on the first two training examples, one label per
    example or per position the output scores (a language model's (N, T, C) takes (N, T)); the test examples must
    have the training examples' shape. The model runs once in eval mode without gradients (its first layer
    rejects an input of the wrong shape), so the trained model and the random streams are not touched."""
    for split, inputs, labels in (("train", data.train_inputs, data.train_labels),
                                  ("test", data.test_inputs, data.test_labels)):
        if len(labels) == 0:
            raise ValueError(f"the {split} split is empty: nothing to {split} on (check {split}_limit and the data)")
        sizes = sorted({len(t) for t in inputs} | {len(labels)})
        if len(sizes) > 1:
            raise ValueError(f"the {split} split has {', '.join(str(len(t)) for t in inputs)} inputs and "
                             f"{len(labels)} labels: every input needs a label")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() < 1:
            raise ValueError(f"the {split} labels must be an integer tensor of class indices (one per example, or "
                             f"one per position of a sequence), got {labels.dtype} of shape {tuple(labels.shape)}")
    shapes = [tuple(t.shape[1:]) for t in data.train_inputs]
    test_shapes = [tuple(t.shape[1:]) for t in data.test_inputs]
    if len(shapes) == 1 and shapes != test_shapes:  # several inputs (sequences, lengths): lengths may differ
        raise ValueError(f"test examples have shape {test_shapes[0]}, training examples {shapes[0]}: both splits "
                         "must hold the same kind of example")
    try:
        with evaluating(model):
            logits = model(*(t[:2] for t in data.train_inputs))
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"task {task}: the model does not take these inputs (one example has shape "
                         f"{', '.join(str(s) for s in shapes)}): {str(err).splitlines()[0]}") from None
    classes, per_example = logits.shape[-1], tuple(logits.shape[1:-1])
    for split, labels in (("train", data.train_labels), ("test", data.test_labels)):
        if tuple(labels.shape[1:]) != per_example:
            raise ValueError(f"the {split} labels have shape {tuple(labels.shape[1:])} per example, but the model "
                             f"scores {per_example or 'one label'} per example (its output: "
                             f"{tuple(logits.shape[1:])}, classes last): give one label per scored position")
        outside = (labels < 0) | (labels >= classes)
        if outside.any():
            first = int(outside.reshape(len(labels), -1).any(1).nonzero()[0])
            value = int(labels[first][outside[first]].reshape(-1)[0])
            raise ValueError(f"the {split} labels hold {int(outside.sum())} values outside [0, {classes - 1}] (the "
                             f"model has {classes} outputs), e.g. {value} at example {first}: relabel those "
                             "examples or drop them")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists on this machine; ValueError naming what there is instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}
    if dev.type not in available:
        raise ValueError(f"device {str(device)!r}: lowprec runs on cpu, cuda and mps, not {dev.type}")
    if not available[dev.type]():
        raise ValueError(f"device {str(device)!r}: this machine (torch {torch.__version__}) has no {dev.type} device "
                         "available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev
