"""The parameters ``convert`` left behind: an optimizer built over them before the conversion updates nothing.

``convert(model, policy)`` returns a converted *copy* (unless ``inplace=True``); the parameters of ``model``
itself no longer take part in training the copy, and an optimizer built over them (the usual order in a
script: optimizer first, conversion later) would step without a gradient forever. ``mark_replaced`` records
those parameters; a step-pre-hook on every torch optimizer (installed at the first copying conversion) raises
RuntimeError when an optimizer is about to step with no gradient at all while holding such parameters. An
optimizer that still trains the original model (its parameters have gradients) is not affected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["mark_replaced", "is_replaced", "REPLACED_HINT"]

_MARK = "_lowprec_replaced_by_convert"
_hook_installed = False

#: What to do about an optimizer over replaced parameters (shared with lowprec.Trainer's check).
REPLACED_HINT = ("build the optimizer over the converted model, after lowprec.convert (which returns a converted "
                 "copy), or convert with inplace=True to keep the model's own parameters")


def is_replaced(param: Tensor) -> bool:
    """Whether ``param`` belongs to a model that ``convert`` copied (the copy is the one that trains)."""
    return getattr(param, _MARK, False)


def mark_replaced(model: nn.Module) -> None:
    """Record ``model``'s parameters as replaced by a converted copy; install the optimizer check (once)."""
    global _hook_installed
    for p in model.parameters():
        setattr(p, _MARK, True)
    if not _hook_installed:
        register_optimizer_step_pre_hook(_refuse_replaced_step)
        _hook_installed = True


def _refuse_replaced_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if args[1:] or kwargs.get("closure") is not None:  # (self, closure): the closure computes the gradients
        return
    groups = optimizer.param_groups
    if any(p.grad is not None for group in groups for p in group["params"]):  # a normal step: answered at once
        return
    replaced = sum(is_replaced(p) for group in groups for p in group["params"])
    if replaced:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step(): none of its parameters has a gradient and {replaced} of them "
            f"belong to a model that lowprec.convert copied, so this step (and every later one) would update "
            f"nothing; {REPLACED_HINT}"
        )
